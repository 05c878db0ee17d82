"""The leader's ACME duty: order and renew the cluster's ACME certificates.

Every node runs this loop; only the Raft leader acts. It reads the orders from the
replicated state, asks acme_orders.next_run whether one is due, and runs at most one order
at a time in a daemon thread (the `acme` library blocks; a daemon thread does not hold up
a node that is stopping). Challenge answers, the account key (sealed), failures and the
certificate itself all go through Raft, so a new leader carries on where the old one
stopped, every node answers the validator, and the old certificate keeps serving when an
order fails.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

from halb.certs.acme_client import Account, AcmeError, Issued, order_certificate
from halb.certs.acme_orders import next_run
from halb.certs.pem import CertError, check_pair
from halb.certs.records import cert_add_args
from halb.certs.sealing import KeySealer, SealError

log = logging.getLogger(__name__)

CHECK_INTERVAL_S = 1.0
CHALLENGE_TTL_S = 600.0  # an answer left behind by a leader that died mid-order expires
WRITE_TIMEOUT_S = 10.0
ORDER_TIMEOUT_S = 120.0
READY_TIMEOUT_S = 5.0  # members that do not serve a published answer by then are skipped


class AcmeManager:
    def __init__(self, node_id: str, raft: Any, writer: Any, sealer: KeySealer | None, data_dir: Path, *,
                 peers: Callable[[], list[tuple[str, str]]] = lambda: [],
                 peer_get: Callable[[str, str, float], Awaitable[dict[str, Any]]] | None = None,
                 clock: Callable[[], float] = time.time,
                 order: Callable[..., Issued] = order_certificate) -> None:
        self.node_id = node_id
        self.raft = raft
        self.writer = writer
        self.sealer = sealer
        self.dir = Path(data_dir) / "acme"
        self.clock = clock
        self.order = order
        self.peers = peers
        self.peer_get = peer_get
        self.running: str | None = None  # the certificate being ordered (status, tests)
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def by(self) -> str:
        return f"acme@{self.node_id}"

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(CHECK_INTERVAL_S)
            try:
                if self.raft.raft_status().state == "leader":
                    await self.step()
            except asyncio.CancelledError:
                raise
            except Exception:  # one bad order must not end the loop for the others
                log.exception("ACME step failed; retrying in %.0fs", CHECK_INTERVAL_S)

    def due(self) -> tuple[dict[str, Any], dict[str, Any] | None, str] | None:
        """The first order due now: (order, its account record, why)."""
        now = self.clock()
        with self.raft.read() as cs:
            for name in sorted(cs.acme_orders):
                order = cs.acme_orders[name]
                when = next_run(order, cs.certs.get(name))
                if when.at <= now:
                    return dict(order), dict(cs.acme_accounts.get(order["directory"]) or {}) or None, when.reason
        return None

    async def step(self) -> None:
        found = self.due()
        if found is None:
            return
        order, account_record, reason = found
        name = order["name"]
        if self.sealer is None:
            await self.writer.write("acme.failed", {"name": name, "reason": "this cluster has no secret to seal "
                                                    "keys with (--insecure-dev)"}, by=self.by)
            return
        log.info("ACME: ordering %s for %s (%s)", name, ", ".join(order["domains"]), reason)
        self.running = name
        started = time.monotonic()
        try:
            issued = await self._in_thread(lambda: self._order(order, account_record))
            await self._store(order, account_record, issued)
        except (AcmeError, CertError, SealError) as exc:
            log.warning("ACME: order for %s failed: %s", name, exc)
            await self.writer.write("acme.failed", {"name": name, "reason": str(exc)[:500]}, by=self.by)
        finally:
            self.running = None
        log.info("ACME: order for %s ended after %.1fs", name, time.monotonic() - started)

    def _order(self, order: dict[str, Any], account_record: dict[str, Any] | None) -> Issued:
        """Runs in the order thread."""
        assert self.sealer is not None
        account = None
        if account_record:
            account = Account(self.sealer.open(account_record["key_sealed"], "acme:" + order["directory"]),
                              account_record.get("uri", ""))
        verify: bool | str = True
        if order.get("ca_bundle"):
            self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            bundle = self.dir / f"{order['name']}.ca.pem"
            bundle.write_text(order["ca_bundle"])
            verify = str(bundle)
        return self.order(order["directory"], order["domains"], account=account, email=order.get("email", ""),
                          verify=verify, publish=self._publish, withdraw=self._withdraw, timeout_s=ORDER_TIMEOUT_S)

    def _publish(self, token: str, key_authorization: str) -> None:
        """Commit the answer, then wait until every reachable member's data plane serves it:
        the CA validates as soon as it is told to, and may connect to any of them."""
        self._write_from_thread("acme.challenge", {"token": token, "key_authorization": key_authorization,
                                                   "expires": self.clock() + CHALLENGE_TTL_S})
        assert self._loop is not None
        asyncio.run_coroutine_threadsafe(self._members_ready(token), self._loop).result(READY_TIMEOUT_S + 1)

    async def _members_ready(self, token: str) -> None:
        if self.peer_get is None:
            return
        waiting = dict(self.peers())
        deadline = time.monotonic() + READY_TIMEOUT_S
        while waiting and time.monotonic() < deadline:
            for member, api in list(waiting.items()):
                try:
                    if (await self.peer_get(api, f"/v1/acme-answers/{token}", 1.0)).get("ready"):
                        del waiting[member]
                except Exception:  # unreachable: it cannot be validated against either; keep asking
                    pass
            if waiting:
                await asyncio.sleep(0.02)
        if waiting:
            log.warning("ACME: members %s do not serve the challenge answer after %.0fs; asking the CA anyway",
                        ", ".join(sorted(waiting)), READY_TIMEOUT_S)

    def _withdraw(self, tokens: list[str]) -> None:
        self._write_from_thread("acme.challenge_clear", {"tokens": tokens})

    def _write_from_thread(self, op: str, args: dict[str, Any]) -> None:
        assert self._loop is not None
        fut = asyncio.run_coroutine_threadsafe(self.writer.write(op, args, by=self.by), self._loop)
        try:
            fut.result(WRITE_TIMEOUT_S + 1)
        except Exception as exc:
            raise AcmeError(f"could not publish through the cluster ({op}): {exc}") from None

    async def _store(self, order: dict[str, Any], account_record: dict[str, Any] | None, issued: Issued) -> None:
        assert self.sealer is not None
        name = order["name"]
        if account_record is None or account_record.get("uri") != issued.account.uri:
            await self.writer.write("acme.account", {
                "directory": order["directory"], "uri": issued.account.uri,
                "key_sealed": self.sealer.seal(issued.account.key_pem, "acme:" + order["directory"])}, by=self.by)
        pair = check_pair(issued.fullchain_pem, issued.key_pem.decode(), self.clock())
        with self.raft.read() as cs:
            replace = name in cs.certs
        await self.writer.write("cert.add", cert_add_args(name, pair, self.sealer.seal(pair.key_pem, name),
                                                          source="acme", replace=replace), by=self.by)

    async def _in_thread(self, fn: Callable[[], Issued]) -> Issued:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Issued] = loop.create_future()

        def work() -> None:
            try:
                result = fn()
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
                err = exc
                loop.call_soon_threadsafe(lambda: fut.done() or fut.set_exception(err))
            else:
                loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(result))

        threading.Thread(target=work, name=f"acme-{self.node_id}", daemon=True).start()
        return await fut


__all__ = ["AcmeManager"]

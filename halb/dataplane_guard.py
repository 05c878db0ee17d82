"""Drives the data-plane self-check (halb/dataplane/selfcheck.py) on a node and acts on it.

Every ``INTERVAL_S`` it feeds the check what the data plane reports, tells the
announcement (a failing node submits no lease renewals, so it never becomes or stays the
VIP holder), and, when this node is the Raft leader while failing, hands leadership to a
peer whose own check passes: the planned transfer path (``Node.transfer_leadership``)
deletes the VIP and releases the lease first, so the successor may skip its wait. After
such a hand-over the node does not try again for ``holddown_s`` (no ping-pong between
two broken nodes); when no peer passes its check or the transfer fails, it retries every
``RETRY_S``. A node that won an election while failing yields the same way.

Peers' verdicts: `halb cluster status` shows what each peer's ``GET /v1/load`` last said
(the load meter polls it every 2 s anyway, so the view costs no extra requests at idle);
the hand-over asks each peer's ``GET /v1/dataplane-check`` right before choosing.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import aiohttp

from halb.dataplane.selfcheck import DataPlaneCheck, SelfCheckParams, Verdict

log = logging.getLogger("halb.dataplane_guard")

INTERVAL_S = 0.1
PEER_TIMEOUT_S = 0.3
RETRY_S = 1.0  # no healthy peer, or the transfer failed: try again this soon (docs/failover.md)


class DataPlaneGuard:
    def __init__(self, node: Any, params: SelfCheckParams, holddown_s: float) -> None:
        self.node = node
        self.check = DataPlaneCheck(params)
        self.holddown_s = holddown_s
        self.verdict = Verdict(True, "", None)
        self.polled: dict[str, dict[str, Any]] = {}  # member id -> its /v1/dataplane-check answer at hand-over
        self.holddown_until = 0.0
        self.transfers = 0
        self._transfer_task: asyncio.Task[None] | None = None
        self._no_target_logged = False  # "no healthy peer" is logged once per failure
        self._writes: set[asyncio.Task[None]] = set()  # event.record writes in flight
        self._failed_unrecorded: str | None = None  # a failure not yet in the replicated event log

    def view(self) -> dict[str, Any]:
        v = self.verdict
        return {"ok": v.ok, "reason": v.reason or None,
                "failing_for_s": round(time.monotonic() - v.failing_since, 3) if v.failing_since is not None else None,
                "failing_since": v.failing_since,  # time.monotonic() (CLOCK_MONOTONIC: one clock per host)
                "enabled": self.check.params.enabled, "leadership_handed_over": self.transfers}

    async def run(self) -> None:
        while True:
            try:
                await self.step()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("data plane self-check step failed")
            await asyncio.sleep(INTERVAL_S)

    async def step(self) -> None:
        node = self.node
        now = time.monotonic()
        expected, unbound, deaths = node.dataplane.selfcheck_inputs()
        v = self.check.evaluate(expected, unbound, deaths, now)
        was = self.verdict
        self.verdict = v
        if was.ok and not v.ok:
            log.error("data plane self-check FAILED: %s; this node gives up the VIP lease", v.reason)
            node.issues.event("local.dataplane_check_failed", v.reason)
            self._failed_unrecorded = v.reason  # recorded after any hand-over: that must not queue behind it
        elif not was.ok and v.ok:
            self._no_target_logged = False
            log.warning("data plane self-check passes again; this node may hold the VIP lease again")
            node.issues.event("local.dataplane_check_ok", "data plane self-check passes again")
            self._record("dataplane.check_ok", f"{node.node_id}: data plane self-check passes again",
                         {"node": node.node_id})
        if node.announcer is not None:
            node.announcer.set_dataplane(v.ok, v.reason)
        handing_over = self._transfer_task is not None and not self._transfer_task.done()
        if (not v.ok and node.announcer is not None and now >= self.holddown_until
                and getattr(node.announcer, "hands_over_leadership", True)  # bgp: withdraws by itself
                and not handing_over and self._is_leader()):
            self.holddown_until = now + RETRY_S  # _hand_over extends it to holddown_s once it moved
            self._transfer_task = asyncio.create_task(self._hand_over(v.reason))
        elif self._failed_unrecorded is not None and not handing_over:
            reason, self._failed_unrecorded = self._failed_unrecorded, None
            self._record("dataplane.check_failed", f"{node.node_id}: data plane self-check failed: {reason}",
                         {"node": node.node_id, "reason": reason})

    def _is_leader(self) -> bool:
        st = self.node.raft.raft_status()
        return st.state == "leader" and st.leader == st.self_addr

    def peer(self, member: str) -> dict[str, Any]:
        """A peer's check for the status view: {"ok": bool | None, "reason": ...}."""
        meter = getattr(self.node, "load_meter", None)
        dp = meter.peer_dataplane.get(member) if meter is not None else None
        if dp is None:
            return {"ok": None, "reason": "not known (peer's /v1/load not answered yet)"}
        return {"ok": dp.get("ok"), "reason": dp.get("reason")}

    async def poll_peers(self) -> None:
        node = self.node

        async def one(member: str, api: str) -> tuple[str, dict[str, Any]]:
            try:
                async with node._http.get(node.admin_tls.url(api, "/v1/dataplane-check"),
                                          headers={"Authorization": f"Bearer {node.token}"},
                                          timeout=aiohttp.ClientTimeout(total=PEER_TIMEOUT_S)) as resp:
                    body = await resp.json()
                    return member, {"ok": bool(body.get("ok")), "reason": body.get("reason")}
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as exc:
                return member, {"ok": None, "reason": f"unreachable: {type(exc).__name__}"}

        results = await asyncio.gather(*(one(m, a) for m, a in node._peer_apis()))
        self.polled = dict(results)

    async def _hand_over(self, reason: str) -> None:
        """Leader with a failing data plane: transfer to a peer whose check passes (one
        that did not answer is the second choice); none at all -> keep leading without
        renewing the lease, so nobody holds the VIP, like keepalived with every
        track_script failing."""
        await self.poll_peers()
        healthy = sorted(m for m, p in self.polled.items() if p.get("ok") is True)
        unknown = sorted(m for m, p in self.polled.items() if p.get("ok") is None)
        connected = self._connected_ids()
        target = next((m for m in healthy + unknown if m in connected), None)
        if target is None:
            if self._no_target_logged:
                return
            self._no_target_logged = True
            log.error("data plane self-check failed (%s) but no connected peer passes its own check: "
                      "keeping Raft leadership without the VIP lease", reason)
            return
        log.error("data plane self-check failed (%s): handing leadership and the VIP to %s", reason, target)
        try:
            res = await self.node.transfer_leadership(target, by=f"node:{self.node.node_id} (data plane check)")
        except Exception as exc:
            log.error("leadership hand-over to %s after a failed data plane check did not work: %s", target, exc)
            return
        self.transfers += 1
        self.holddown_until = time.monotonic() + self.holddown_s
        msg = f"leadership handed to {res.get('to')} in {res.get('took_ms')} ms: {reason}"
        self.node.issues.event("local.dataplane_handover", msg)
        self._record("dataplane.handover", f"{self.node.node_id}: {msg}",
                     {"from": self.node.node_id, "to": res.get("to"), "took_ms": res.get("took_ms"), "reason": reason})

    def _record(self, kind: str, message: str, data: dict[str, Any]) -> None:
        """Also in the replicated event log (`halb events`), best effort and in the
        background: the hand-over must not wait for a commit, and a node without quorum
        still has its local events and the ERROR log."""
        async def write() -> None:
            from halb.control.writer import WriteError

            try:
                await self.node.writer.write("event.record", {"kind": kind, "message": message[:500], "data": data},
                                             by=f"node:{self.node.node_id}")
            except (WriteError, asyncio.TimeoutError, OSError) as exc:
                log.warning("could not record %s in the cluster event log: %s", kind, getattr(exc, "message", exc))

        task = asyncio.create_task(write())
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    def _connected_ids(self) -> set[str]:
        st = self.node.raft.raft_status()
        up = {a for a, ok in st.partners.items() if ok}
        with self.node.raft.read() as cs:
            return {m.id for m in cs.members.values() if m.raft in up}

    async def stop(self) -> None:
        tasks = [t for t in (self._transfer_task, *self._writes) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

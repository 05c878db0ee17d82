"""BGP mode on a node: quorum contact through Raft, service addresses on ``lo``, BIRD.

One asyncio task, every 25 ms (and at once when a contact commits or an input changes):

1. submits a ``lease.contact`` when due (:class:`~halb.announce.bgp.QuorumContact`);
2. decides per service address (:func:`~halb.announce.bgp.decide`) and converges the
   kernel: add/refresh the address on ``lo`` with ``valid_lft 1`` (fenced by the contact's
   end, like the VIP) or delete it; BIRD's ``direct`` protocol exports what is there;
3. keeps the BGP sessions enabled, or disabled once a drain has withdrawn;
4. restarts BIRD if it died (at most once a second).

Drain (``halb node drain``) lets the node's own client flows finish *before* the routers
withdraw it (stateless ECMP would re-hash them onto balancers that reset them):

1. ``closing``: responses say ``Connection: close``, idle keep-alive connections are closed,
   new connections still get one request each, until every connection that was open when
   the drain began has ended (or ``drain_grace_s``);
2. ``refusing``: the listeners drop SYNs silently (a BPF filter: no RST; the client
   retransmits after ~1 s and by then is hashed to another balancer) until no client
   connection is left (or ``drain_grace_s`` from the start);
3. ``withdrawn``: the BGP sessions are disabled (BIRD sends a Cease, the routers withdraw),
   the addresses stay on ``lo`` for packets still on their way.

``--undo`` reverses every step (filters off, keep-alive again, sessions enabled).
Shutdown runs steps 1-2 too, then withdraws, waits ``withdraw_wait_s`` for flows already
on their way, deletes the addresses and stops BIRD; all before the data plane stops
(Node.stop_components order).
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Mapping

from halb.announce.bgp import Decision, Inputs, QuorumContact, decide, eligible_services
from halb.announce.bird import BirdError, BirdProcess
from halb.announce.lease import boottime
from halb.announce.settings import AnnounceConfig
from halb.announce.step_loop import run_steps

log = logging.getLogger(__name__)

TICK_S = 0.025
REFRESH_EVERY_S = 0.1      # an accepted address's kernel lifetime is renewed this often
SESSIONS_POLL_S = 1.0      # `birdc show protocols` for the status view
KERNEL_MIN_LIFETIME_S = 1.0  # valid_lft 1: the kernel removes an unrefreshed address after 1.0-1.15 s
DRAIN_POLL_S = 0.005       # client connections counted this often while a drain waits (SYNs refused meanwhile)


class BgpAnnouncement:
    """The node's announcer in ``mode = "bgp"`` (same interface as manager.Announcement)."""

    hands_over_leadership = False  # active-active: Raft leadership has nothing to do with announcing

    def __init__(self, node_id: str, raft: Any, cfg: AnnounceConfig, *, routes: Callable[[], Mapping[str, Any]],
                 conf_dir: Path, clock: Callable[[], float] = boottime, addresses: Any = None,
                 bird: Any = None, dataplane: Any = None) -> None:
        assert cfg.bgp is not None
        self.node_id = node_id
        self.raft = raft
        self.cfg = cfg
        self.settings = cfg.bgp
        self.clock = clock
        self.routes = routes
        self.contact = QuorumContact(cfg.lease)
        self.bird = bird if bird is not None else BirdProcess(self.settings, node_id, conf_dir)
        self._addresses = addresses  # address -> VipAnnouncer-like (ahold_fenced, arelease, close)
        self.accepted: dict[str, bool] = {a.address: False for a in self.settings.addresses}
        self.decisions: dict[str, Decision] = {}
        self.last_refresh: dict[str, float] = {}
        self.late_refreshes = 0  # refreshes the contact's margin refused (status: slow commits)
        self.dataplane_ok = True
        self.dataplane_reason = ""
        self.draining = False
        self.dataplane = dataplane  # DataPlane (set_client_drain, client_drain_poll); None: withdraw at once
        self.drain_phase = ""       # "", closing, refusing, withdrawn (module docstring)
        self.drain_info: dict[str, Any] = {}
        self._drain_task: asyncio.Task[dict[str, Any]] | None = None
        self.sessions_enabled = True
        self.sessions: list[dict[str, str]] = []
        self.transitions: list[dict[str, Any]] = []
        self._eligible_key: Any = None
        self._eligible: dict[str, bool] = {}
        self._results: list[tuple[str, float, bool]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._poll_task: asyncio.Task[None] | None = None
        self._stopping = False
        self._stop_begun = False
        self._loop: asyncio.AbstractEventLoop | None = None

    # ---- lifecycle ------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self._addresses is None:
            from halb.announce.vip import VipAnnouncer

            self._addresses = {a.address: VipAnnouncer(self.settings.interface, a.address, 32)
                               for a in self.settings.addresses}
        for addr, ann in self._addresses.items():  # leftovers of a crashed run: nothing is decided yet
            try:
                await ann.arelease()
            except Exception as exc:
                log.warning("initial cleanup of %s on %s failed: %s", addr, self.settings.interface, exc)
        await self._loop.run_in_executor(None, self.bird.write_config)
        self.bird.start()  # in the loop thread: PR_SET_PDEATHSIG follows the forking thread
        await self.bird.wait_ready()
        self._task = asyncio.create_task(self._run(), name="announce-bgp")
        self._poll_task = asyncio.create_task(self._poll_sessions(), name="announce-bgp-sessions")
        log.info("BGP announcement started: AS %d, routers %s, addresses %s, BFD %s, contact every %.2fs "
                 "within %.2fs", self.settings.local_as,
                 ", ".join(f"{r.address} (AS {r.asn})" for r in self.settings.routers),
                 ", ".join(self.settings.address_strings()),
                 f"{self.settings.bfd_interval_ms} ms x {self.settings.bfd_multiplier}" if self.settings.bfd else "off",
                 self.cfg.lease.renew_interval_s, self.cfg.lease.lease_s)

    async def stop(self) -> None:
        """The clients' flows end first (as in a drain, at most ``drain_grace_s``), then
        withdraw (sessions down, the routers stop sending new flows), wait for flows already
        on their way, then delete the addresses and stop BIRD."""
        if self._stop_begun:
            return
        self._stop_begun = True
        t0 = time.monotonic()
        if self._drain_task is not None:
            self._drain_task.cancel()
            await asyncio.gather(self._drain_task, return_exceptions=True)
        if self.drain_phase != "withdrawn" and self.bird.alive() and any(self.accepted.values()):
            # let the clients' flows end first, as a drain does; the loop keeps running
            # meanwhile: it refreshes the addresses (valid_lft 1 s) the routers still send to
            await self._quiesce_clients(t0)
        self._stopping = True
        for t in (self._task, self._poll_task):
            if t is not None:
                t.cancel()
                await asyncio.gather(t, return_exceptions=True)
        if self.bird.alive() and any(self.accepted.values()):
            try:
                await self.bird.set_sessions(False)
                self._record("withdrawn", reason="shutdown")
                await asyncio.sleep(self.settings.withdraw_wait_s)
            except BirdError as exc:
                log.warning("withdrawing before shutdown failed (%s); stopping BIRD withdraws too", exc)
        for addr in list(self.accepted):
            await self._remove(addr, "shutdown")
        self.bird.stop()
        for ann in (self._addresses or {}).values():
            ann.close(release=True)
        log.info("BGP announcement stopped (withdrawn, addresses deleted, bird stopped in %.0f ms)",
                 (time.monotonic() - t0) * 1000)

    async def before_transfer(self) -> None:
        """Planned leadership transfer: nothing to give up. Every node announces for itself;
        the contacts of every node keep committing across a transfer (the leaderless gap is
        milliseconds against a 1.5 s lease). Planned work on a node is ``drain``."""

    async def drain(self, on: bool) -> dict[str, Any]:
        """Drain (on): the clients' flows end, then BGP is withdrawn (module docstring); the
        answer comes once withdrawn (at most ``drain_grace_s`` plus a BIRD call). Undrain
        (off): every step reversed, announcing again."""
        if on and not self.draining:
            self.draining = True
            log.warning("BGP draining: ending client connections (at most %.1fs), then withdrawing every "
                        "service address from the routers", self.settings.drain_grace_s)
            self._record("drain", grace_s=self.settings.drain_grace_s)
            self._drain_task = asyncio.create_task(self._drain_sequence(), name="announce-bgp-drain")
        elif not on and self.draining:
            task, self._drain_task = self._drain_task, None
            self.draining = False  # first: a drain call waiting for the task answers with this
            self.drain_phase = ""
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            if self.dataplane is not None:
                self.dataplane.set_client_drain("off")
            log.warning("BGP drain ended: accepting clients and announcing again")
            self._record("undrain")
            self._wake.set()
            await self._converge_sessions()
        task = self._drain_task
        if on and task is not None and not task.done():
            await asyncio.wait({task})  # not shield: an --undo meanwhile cancels it, and this answers
        return {"draining": self.draining, "sessions_enabled": self.sessions_enabled, "drain": dict(self.drain_info)}

    def _set_drain_phase(self, phase: str, **extra: Any) -> None:
        self.drain_phase = phase
        self.drain_info = {**self.drain_info, "phase": phase, **extra}
        self._record("drain_phase", phase=phase, **extra)

    async def _quiesce_clients(self, t0: float) -> tuple[int, int]:
        """Steps 1-2 (module docstring): (client connections, of them open since the drain
        began) left when they ended or ``drain_grace_s`` after t0 (time.monotonic) ran out."""
        dp = self.dataplane
        if dp is None or self.settings.drain_grace_s <= 0:  # 0: withdraw at once (the routers move the flows)
            return 0, 0
        deadline = t0 + self.settings.drain_grace_s
        start = dp.client_drain_poll()  # before the idle keep-alive connections are closed
        self.drain_info = {"phase": "closing", "grace_s": self.settings.drain_grace_s,
                           "connections_at_start": start.connections}
        dp.set_client_drain("closing")
        counts = dp.client_drain_poll()
        self._set_drain_phase("closing", connections=counts.connections, own_flows=counts.from_before)
        while counts.from_before and time.monotonic() < deadline:
            await asyncio.sleep(DRAIN_POLL_S)
            counts = dp.client_drain_poll()
        if not self.settings.drain_drop_syns:  # withdraw now; connections accepted meanwhile may be moved
            return counts.connections, counts.from_before
        dp.set_client_drain("refusing")
        counts = dp.client_drain_poll()
        self._set_drain_phase("refusing", connections=counts.connections, own_flows=counts.from_before,
                              after_s=round(time.monotonic() - t0, 3))
        while counts.connections and time.monotonic() < deadline:
            await asyncio.sleep(DRAIN_POLL_S)
            counts = dp.client_drain_poll()
        return counts.connections, counts.from_before

    async def _drain_sequence(self) -> dict[str, Any]:
        t0 = time.monotonic()
        left, own_left = await self._quiesce_clients(t0)
        waited = round(time.monotonic() - t0, 3)
        if left:
            log.warning("BGP drain: %d client connection(s) (%d of them from before the drain) still open "
                        "after drain_grace_s %.1fs: withdrawing anyway (the routers move them)",
                        left, own_left, self.settings.drain_grace_s)
        self._set_drain_phase("withdrawn", waited_s=waited, connections_left=left, own_flows_left=own_left)
        await self._converge_sessions()
        log.warning("BGP drained in %.3fs (%d client connection(s) left): every service address withdrawn "
                    "from the routers", waited, left)
        return dict(self.drain_info)

    # ---- inputs from the node -------------------------------------------------------
    def set_dataplane(self, ok: bool, reason: str) -> None:
        if ok != self.dataplane_ok:
            self._wake.set()
        self.dataplane_ok, self.dataplane_reason = ok, reason

    def on_applied(self, cmd: dict[str, Any], applied: Any) -> None:
        """Nothing to track: a contact's own callback carries its result."""

    def eligible(self) -> dict[str, bool]:
        """service -> has an eligible backend here; recomputed only when the routes changed
        (the routing cache replaces a ServiceRoute object whenever it rebuilds it)."""
        routes = self.routes()
        key = tuple((n, id(r)) for n, r in routes.items())
        if key != self._eligible_key:
            self._eligible_key = key
            self._eligible = eligible_services(routes)
        return self._eligible

    # ---- the loop -------------------------------------------------------------------
    async def _run(self) -> None:
        await run_steps(self._step, self._wake, TICK_S, log, "BGP announcement")

    async def _step(self) -> None:
        results, self._results = self._results, []
        for cid, submitted, ok in results:
            self.contact.on_result(cid, submitted, ok)
        now = self.clock()
        if self.contact.due(now):
            self._submit_contact()
        if self.bird.restart_if_dead(time.monotonic()):
            self._record("bird_restarted")
            self.sessions_enabled = True  # a fresh BIRD starts with its sessions enabled
        inputs = Inputs(quorum=self.contact.fresh(now), dataplane_ok=self.dataplane_ok,
                        dataplane_reason=self.dataplane_reason, eligible=self.eligible(),
                        draining=self.draining, stopping=self._stopping)
        for a in self.settings.addresses:
            d = decide(a, inputs)
            prev = self.decisions.get(a.address)
            if prev is None or (prev.accept, prev.announce, prev.reason) != (d.accept, d.announce, d.reason):
                self.decisions[a.address] = d
                level = logging.INFO if d.announce or prev is None else logging.WARNING
                log.log(level, "BGP %s: %s", a.address, "announce" if d.announce else
                        ("keep, not announced: " if d.accept else "withdraw: ") + d.reason)
            if d.accept:
                await self._refresh(a.address)
            elif self.accepted[a.address]:
                await self._remove(a.address, d.reason)
        if self.sessions_enabled != self._sessions_wanted():
            await self._converge_sessions()

    def _submit_contact(self) -> None:
        cid = uuid.uuid4().hex
        submitted = self.contact.begin(cid, self.clock())
        loop = self._loop

        def done(result: Any, err: int) -> None:  # tick thread
            ok = err == 0 and bool((result or {}).get("ok"))
            if loop is not None and not loop.is_closed():
                loop.call_soon_threadsafe(self._on_result, cid, submitted, ok)

        self.raft.submit("lease.contact", {"node": self.node_id}, by=f"node:{self.node_id}", cid=cid,
                         callback=done)

    def _on_result(self, cid: str, submitted: float, ok: bool) -> None:
        self._results.append((cid, submitted, ok))
        self._wake.set()

    async def _refresh(self, addr: str) -> None:
        now = self.clock()
        held = self.accepted[addr]
        if held and now - self.last_refresh.get(addr, 0.0) < REFRESH_EVERY_S:
            return
        if not self.contact.may_refresh(now):
            return  # the kernel lets it lapse unless the next contact commits in time
        c = self.contact
        end = c.until
        assert end is not None
        try:
            kept = await self._addresses[addr].ahold_fenced(
                self.clock, end - c.params.refresh_min_remaining_s, end - c.params.kernel_expiry_max_s, 1)
        except Exception as exc:
            log.error("adding/refreshing %s on %s failed: %r", addr, self.settings.interface, exc)
            await self._remove(addr, "refresh failed")
            return
        after = self.clock()
        if not kept:
            # refused (the contact got older than the refresh margin while queued) or undone
            # by the fence itself: either way nothing outlives the contact. Do not delete: the
            # next contact usually commits within ms and refreshes it; if none does, the kernel
            # drops it 1.0-1.15 s after the last refresh (a slow commit must not withdraw at once)
            self.late_refreshes += 1
            return
        if not c.refresh_was_safe(after):  # the netlink call itself was slow: it may outlive the contact
            await self._remove(addr, "refresh too late")
            return
        self.last_refresh[addr] = after
        if not held:
            self.accepted[addr] = True
            self._record("accepted", address=addr)
            log.info("BGP %s on %s (exported to the routers while sessions are up)", addr, self.settings.interface)

    async def _remove(self, addr: str, reason: str) -> None:
        was = self.accepted.get(addr, False)
        self.accepted[addr] = False
        try:
            await self._addresses[addr].arelease()
        except Exception as exc:
            log.error("deleting %s failed (%s); the kernel drops it within ~1.15 s: %s", addr, reason, exc)
        if was:
            self._record("removed", address=addr, reason=reason)

    def _sessions_wanted(self) -> bool:
        """Disabled only once a drain reached its last step (its clients' flows ended)."""
        return not (self.draining and self.drain_phase == "withdrawn")

    async def _converge_sessions(self) -> None:
        want = self._sessions_wanted()
        if want == self.sessions_enabled or not self.bird.alive():
            return
        try:
            await self.bird.set_sessions(want)
            self.sessions_enabled = want
        except BirdError as exc:
            log.error("bird: could not %s the BGP sessions: %s", "enable" if want else "disable", exc)

    async def _poll_sessions(self) -> None:
        while True:
            try:
                protos = await self.bird.protocols() if self.bird.alive() else []
                self.sessions = [{"name": p.name, "state": p.state, "info": p.info}
                                 for p in protos if p.proto == "BGP"]
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.sessions = [{"name": "?", "state": "unknown", "info": str(exc)[:200]}]
            await asyncio.sleep(SESSIONS_POLL_S)

    # ---- status -------------------------------------------------------------------------
    def _record(self, what: str, **extra: Any) -> None:
        self.transitions.append({"event": what, "at": round(self.clock(), 4), **extra})
        del self.transitions[:-50]

    def announcements(self) -> list[dict[str, Any]]:
        """Per service address: on this node (accepted), announced to the routers, and why not."""
        out = []
        now = self.clock()
        for a in self.settings.addresses:
            d = self.decisions.get(a.address)
            # not refreshed for KERNEL_MIN_LIFETIME_S: the kernel may already have dropped it
            # (the contact is running out and the loop has not removed it yet)
            accepted = (self.accepted.get(a.address, False)
                        and now - self.last_refresh.get(a.address, -1e9) < KERNEL_MIN_LIFETIME_S)
            out.append({"address": a.address, "services": list(a.services),
                        "announced": accepted and self.sessions_enabled and not self._stopping and self.bird.alive(),
                        "accepted": accepted, "reason": d.reason if d else "starting"})
        return out

    def status(self) -> dict[str, Any]:
        now = self.clock()
        s = self.settings
        return {
            "mode": "bgp",
            "local_as": s.local_as,
            "routers": [{"address": r.address, "as": r.asn} for r in s.routers],
            "announcements": self.announcements(),
            "draining": self.draining,
            "drain": dict(self.drain_info) if self.draining else None,
            "drain_grace_s": s.drain_grace_s,
            "quorum_contact": self.contact.fresh(now),
            "contact_remaining_s": round(self.contact.remaining(now), 3),
            "late_refreshes": self.late_refreshes,
            "lease_s": self.cfg.lease.lease_s,
            "sessions": self.sessions,
            "sessions_enabled": self.sessions_enabled,
            "bfd": {"interval_ms": s.bfd_interval_ms, "multiplier": s.bfd_multiplier} if s.bfd else None,
            "bird": self.bird.view(),
            "dataplane_ok": self.dataplane_ok,
        }

"""The node's announcement component: quorum lease -> VIP (or DNS answers), notify hooks.

One asyncio task converges "should this node hold the VIP?" (decided by
:class:`~halb.announce.lease.LeaseKeeper`) with what the kernel has, every 25 ms and at
once on every Raft role change or renewal result. All netlink work runs on the
VipAnnouncer's worker thread; the loop never blocks.

Order of operations that matter for the one-holder guarantee (docs/failover.md):

* acquire: add the VIP (valid_lft 1) only when ``may_refresh``; re-check the clock after
  netlink returned and delete again at once if the call was too slow; GARP afterwards.
* lose leadership or lease, stop, SIGTERM: delete the VIP before anything else.
* planned transfer (:meth:`Announcement.before_transfer`): stop renewing, delete the VIP,
  and only then commit ``lease.release {held: true}`` (only if we really held it), so the
  successor may skip its wait.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable

from halb.announce.lease import LeaseKeeper, RenewToken, boottime
from halb.announce.settings import AnnounceConfig, parse_announce
from halb.announce.step_loop import run_steps
from halb.control.pysyncobj_compat import last_log_entry

log = logging.getLogger(__name__)

TICK_S = 0.025
TICK_ERROR_LOG_EVERY_S = 30.0  # a persistently failing tick callback logs an error this often


@dataclass
class _Result:
    token: RenewToken
    ok: bool
    result: dict[str, Any] | None


class Announcement:
    """Lease keeper + VIP (mode vip) or DNS responder (mode dns) for one node.

    ``raft`` needs ``submit(op, args, by=, cid=, callback=)``, ``raft_status()`` and
    ``read()``; the node feeds every applied command to :meth:`on_applied`.
    """

    def __init__(self, node_id: str, raft: Any, cfg: AnnounceConfig, *,
                 clock: Callable[[], float] = boottime, vip: Any = None, hooks: Any = None) -> None:
        self.node_id = node_id
        self.raft = raft
        self.cfg = cfg
        self.clock = clock
        self.keeper = LeaseKeeper(cfg.lease, created_at=clock())
        self.vip = vip
        self.hooks = hooks
        self.dns: Any = None
        self.holding = False              # we added the VIP (mode vip) / we hold the lease (dns)
        self.held_since: float | None = None
        self.last_refresh = 0.0
        self.state = "BACKUP"
        self._notified = False
        self.last_holder: str | None = None
        self.last_holder_address: str | None = None
        self.transitions: list[dict[str, Any]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._garp_task: asyncio.Task[None] | None = None
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._results: list[_Result] = []
        self._last_log: tuple[int, int] | None = None
        self._log_changed_at = 0.0          # written by the tick thread (a float: atomic)
        self._log_tracking_failed = False   # written by the tick thread (a bool: atomic)
        self._tick_failures = 0             # tick thread only
        self._tick_error_logged_at = -TICK_ERROR_LOG_EVERY_S
        self.dataplane_ok = True            # the node's data-plane self-check (halb/dataplane_guard.py)
        self.dataplane_reason = ""

    # ---- lifecycle ------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self.cfg.mode == "vip":
            if self.vip is None:
                from halb.announce.vip import VipAnnouncer

                self.vip = VipAnnouncer(self.cfg.interface, self.cfg.vips or [self.cfg.vip], self.cfg.prefixlen,
                                        netns=self.cfg.netns)
            if self.hooks is None and any((self.cfg.notify_master, self.cfg.notify_backup, self.cfg.notify_fault)):
                from halb.announce.hooks import NotifyHooks

                self.hooks = NotifyHooks(self.cfg.notify_master, self.cfg.notify_backup, self.cfg.notify_fault,
                                         timeout_s=self.cfg.notify_timeout_s)
            if self.cfg.set_arp_sysctls:
                try:
                    await asyncio.get_running_loop().run_in_executor(None, self.vip.set_arp_sysctls)
                except Exception as exc:
                    log.warning("could not set arp_ignore/arp_announce on %s: %s", self.cfg.interface, exc)
            try:  # a leftover from a crashed run of this node: we do not hold a lease yet
                await self.vip.arelease()
            except Exception as exc:
                log.warning("initial VIP cleanup failed: %s", exc)
        elif self.cfg.mode == "dns":
            from halb.announce.dns import DnsResponder

            host, _, port = self.cfg.bind.rpartition(":")
            self.dns = DnsResponder(host, int(port), self.resolve, ttl=self.cfg.ttl, zone=self.cfg.zone,
                                    freebind=True)
            await self.dns.start()
        self._notify("BACKUP")
        if hasattr(self.raft, "addOnTickCallback"):
            self.raft.addOnTickCallback(self._on_tick)
            self.keeper.track_log = True
        self._task = asyncio.create_task(self._run(), name="announce")
        log.info("announcement %s started (lease %.2fs, renew every %.2fs, wait %.2fs from %s)", self.cfg.mode,
                 self.cfg.lease.lease_s, self.cfg.lease.renew_interval_s, self.cfg.lease.successor_wait_s,
                 self.cfg.lease.wait_from)

    async def stop(self) -> None:
        """Delete the VIP first; then tell the cluster (best effort) so a successor need not wait."""
        if self._stopping:
            return
        self._stopping = True
        held = self.holding
        if hasattr(self.raft, "removeOnTickCallback"):
            self.raft.removeOnTickCallback(self._on_tick)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        gone = await self._drop("shutdown")
        if held and gone and self.keeper.leader:  # only a surely deleted VIP lets a successor skip its wait
            await self._release_lease(held=True, timeout=0.5)
        if self.dns is not None:
            await self.dns.stop()
        if self.vip is not None:
            self.vip.close(release=True)
        if self.hooks is not None:
            await self.hooks.aclose()

    async def before_transfer(self) -> None:
        """Planned leadership transfer: give the VIP up first so the successor can skip its wait."""
        held = self.holding and self.keeper.may_hold(self.clock())
        self.keeper.begin_handover(self.clock())
        gone = await self._drop("leadership transfer")
        await self._release_lease(held=held and gone, timeout=1.0)
        self._wake.set()

    async def _release_lease(self, *, held: bool, timeout: float) -> None:
        fut = asyncio.get_running_loop().create_future()

        def done(result: Any, err: int) -> None:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result((result, err)))

        try:
            self.raft.submit("lease.release", {"holder": self.node_id, "held": held},
                             by=f"node:{self.node_id}", callback=done)
            result, err = await asyncio.wait_for(fut, timeout)
            log.info("lease released (held=%s): %s", held, result if err == 0 else f"failed {err}")
        except (asyncio.TimeoutError, Exception) as exc:
            log.info("lease release not committed (held=%s): %s", held, exc or "timeout")

    # ---- inputs from the node -------------------------------------------------------
    def set_dataplane(self, ok: bool, reason: str) -> None:
        """The data-plane self-check's verdict. While it fails no renewal is submitted, so
        this node never acquires the lease and a holder's lease runs out within lease_s
        even if no hand-over happens; the guard's leadership transfer is the fast path."""
        if ok != self.dataplane_ok:
            self.dataplane_ok, self.dataplane_reason = ok, reason
            self._wake.set()
        self.dataplane_reason = reason

    def on_applied(self, cmd: dict[str, Any], applied: Any) -> None:
        """Node listener (asyncio thread, log order): track renewals we did not submit."""
        op = cmd.get("op")
        now = self.clock()
        if op == "lease.renew":
            if not (getattr(applied, "result", None) or {}).get("ok"):
                return  # a rejected (stale-term) renewal changed nothing and grants nothing
            self.keeper.on_renewal_applied(cmd.get("id"), now, self._is_leader())
            args = cmd.get("args") or {}
            self.last_holder = args.get("holder")
            self.last_holder_address = args.get("address") or None
        elif op == "snapshot.loaded":
            self.keeper.on_snapshot_loaded(now)

    def _on_tick(self) -> None:
        """pysyncobj tick thread, after message processing: note when our log last changed
        while we were not leader (see LeaseKeeper.on_log_changed).

        If this fails (including pysyncobj internals changing under
        :func:`~halb.control.pysyncobj_compat.last_log_entry`), a log change may go
        unnoted, and the successor's shortened wait would rest on a stale time: so a
        failure switches the keeper to the full wait and is logged as an error. Only a
        later successful tick that compares the log with the last entry it saw (any tick
        but a leader's return on its own-term entry) ends that: it notes any change it
        missed, at a time no earlier than the change. The order of the two writes matters
        (see :meth:`_step`): time first, then the flag.
        """
        try:
            st = self.raft.raft_status()
            last = last_log_entry(self.raft)
            # our own appends as leader carry the current term; anything else is foreign
            if st.state == "leader" and last[1] == st.term:
                self._last_log = last
                return
            if last != self._last_log:
                self._last_log = last
                self._log_changed_at = self.clock()
            if self._log_tracking_failed:
                self._log_tracking_failed = False
                log.warning("lease: Raft log tracking works again after %d failed ticks; "
                            "the shortened successor wait applies again", self._tick_failures)
                self._tick_failures = 0
        except Exception:  # never break the tick thread
            self._log_tracking_failed = True
            self._tick_failures += 1
            now = time.monotonic()
            if self._tick_failures == 1 or now - self._tick_error_logged_at >= TICK_ERROR_LOG_EVERY_S:
                self._tick_error_logged_at = now
                log.error("lease: Raft log tracking failed (%d ticks so far); a successor falls back "
                          "to the full wait from its election", self._tick_failures, exc_info=True)

    # ---- the loop -------------------------------------------------------------------
    async def _run(self) -> None:
        await run_steps(self._step, self._wake, TICK_S, log, "announcement", on_error=lambda: self._notify("FAULT"))

    def _is_leader(self) -> bool:
        st = self.raft.raft_status()
        return st.state == "leader" and st.leader == st.self_addr

    async def _step(self) -> None:
        # the flag before the time: the tick thread writes the time before it clears the
        # flag, so "not failed" here guarantees the time read next is the noted one
        tracking_failed = self._log_tracking_failed
        self.keeper.on_log_changed(self._log_changed_at)
        self.keeper.set_log_tracking_failed(tracking_failed)
        now = self.clock()
        if self.keeper.set_leader(self._is_leader(), now):
            log.info("lease: %s (local epoch %d)", "leader: renewing" if self.keeper.leader else "not leader",
                     self.keeper.epoch)
            if not self.keeper.leader:
                await self._drop("lost Raft leadership")
            elif self.keeper.paused_until:
                self.keeper.end_handover()
        if self.keeper.paused_until and now >= self.keeper.paused_until:
            self.keeper.end_handover()
        results, self._results = self._results, []
        for r in results:
            self.keeper.on_renewal_result(r.token, r.ok, r.result, self.clock())
        if self.keeper.renew_due(now) and self.dataplane_ok:
            self._submit_renewal(now)
        await self._converge()

    def _submit_renewal(self, now: float) -> None:
        cid = uuid.uuid4().hex
        token = self.keeper.begin_renewal(cid, self.clock())
        loop = self._loop

        def done(result: Any, err: int) -> None:  # tick thread
            if loop is not None and not loop.is_closed():
                loop.call_soon_threadsafe(self._on_result, _Result(token, err == 0, result))

        args: dict[str, Any] = {"holder": self.node_id, "term": self.raft.raft_status().term}
        if self.cfg.mode == "dns":  # several (IPv4 and IPv6) as one comma-separated field
            args["address"] = ",".join(self.cfg.addresses or [self.cfg.address])
        self.raft.submit("lease.renew", args, by=f"node:{self.node_id}", cid=cid, callback=done)

    def _on_result(self, r: _Result) -> None:
        self._results.append(r)
        self._wake.set()

    async def _converge(self) -> None:
        now = self.clock()
        k = self.keeper
        if self.holding and not k.may_hold(now):
            reason = "lease expired" if k.leader else "not leader"
            await self._drop(reason)
            return
        if not k.may_hold(now) or not k.may_refresh(now):
            return
        if not self.dataplane_ok and not self.holding:
            return  # never acquire with a failing data plane (a holder keeps its VIP until handed over)
        if self.holding and now - self.last_refresh < 0.1:
            return
        if self.vip is not None:
            end = k.lease_end
            assert end is not None
            not_after = end - k.params.refresh_min_remaining_s
            undo_after = end - k.params.kernel_expiry_max_s
            try:
                if hasattr(self.vip, "ahold_fenced"):
                    kept = await self.vip.ahold_fenced(self.clock, not_after, undo_after, 1)
                else:
                    await self.vip.ahold(1)
                    kept = True
            except Exception as exc:
                # timed out or failed: whether the kernel got it is unknown -> make sure
                log.error("adding/refreshing VIP %s failed: %r", self._vips_text(), exc)
                self._notify("FAULT")
                await self._drop("refresh too late")
                return
            if not kept:
                log.warning("VIP refresh refused or undone on the netlink thread (lease too short)")
                await self._drop("refresh too late")
                return
        after = self.clock()
        if not k.refresh_was_safe(after):
            # the netlink call took so long that the kernel might keep the VIP past lease_end
            log.warning("VIP refresh finished with only %.3fs of lease left: deleting it again", k.remaining(after))
            await self._drop("refresh too late")
            return
        self.last_refresh = after
        if not self.holding:
            self.holding = True
            self.held_since = after
            log.info("VIP lease acquired (%s): lease epoch %s, %.3fs left%s", self._vips_text() or self.cfg.mode,
                     k.lease_epoch, k.remaining(after), " (planned hand-over)" if k.handover else "")
            self._record("acquired", after)
            self._notify("MASTER")
            if self.vip is not None:
                self._garp_task = asyncio.create_task(self._garp())

    async def _garp_round(self) -> bool:
        """One GARP round, fenced on the sending thread by the lease end."""
        if not self._may_announce():
            return False
        end = self.keeper.lease_end
        if end is None:
            return False
        if hasattr(self.vip, "asend_garp_fenced"):
            return await self.vip.asend_garp_fenced(self.clock, end, 1) > 0
        await self.vip.asend_garp(1, 0)
        return True

    def _may_announce(self) -> bool:
        """Checked right before every GARP round: never announce a VIP we may not hold.

        Why per round: a holder frozen during a burst or its refresh sleep resumes with its
        timers already expired; a GARP sent then (after the kernel dropped its VIP and a
        successor took over) would pull clients back to a MAC that no longer answers, for
        as long as their neighbour entry lives (8 s measured before this check).
        """
        return self.holding and self.keeper.may_hold(self.clock())

    async def _garp(self) -> None:
        """Burst on acquiring, a second burst after ``garp_refresh_after_s``, then one
        round every ``garp_repeat_s`` while holding (heals any client a stray ARP misled)."""
        try:
            sent = 0
            for i in range(self.cfg.garp_count):
                if not await self._garp_round():
                    return
                sent += 1
                if i + 1 < self.cfg.garp_count:
                    await asyncio.sleep(self.cfg.garp_interval_s)
            self._record("garp", self.clock(), rounds=sent)
            if self.cfg.garp_refresh_after_s > 0:
                await asyncio.sleep(self.cfg.garp_refresh_after_s)
                for _ in range(2):
                    if not await self._garp_round():
                        return
                    await asyncio.sleep(self.cfg.garp_interval_s)
            while self.cfg.garp_repeat_s > 0:
                await asyncio.sleep(self.cfg.garp_repeat_s)
                if not await self._garp_round():
                    return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("GARP/NA for %s failed: %s", self._vips_text(), exc)

    async def _drop(self, reason: str) -> bool:
        """Delete the VIP now (idempotent); False if deleting it failed (the kernel still will)."""
        if self._garp_task is not None:
            self._garp_task.cancel()
            self._garp_task = None
        was = self.holding
        self.holding = False
        self.held_since = None
        gone = True
        if self.vip is not None and (was or reason in ("shutdown", "refresh too late", "leadership transfer")):
            try:
                await self.vip.arelease()
            except Exception as exc:
                gone = False
                log.error("deleting VIP %s failed (%s); the kernel drops it within ~1.25s: %s",
                          self._vips_text(), reason, exc)
                self._notify("FAULT")
        if was:
            log.info("VIP lease given up: %s", reason)
            self._record("released", self.clock(), reason=reason)
            self._notify("BACKUP")
        return gone

    # ---- hooks, DNS, status -----------------------------------------------------------
    def _vips_text(self) -> str:
        return ", ".join(self.cfg.vips or ([self.cfg.vip] if self.cfg.vip else []))

    def _notify(self, state: str) -> None:
        if state == self.state and self._notified:
            return
        self._notified = True
        self.state = state
        if self.hooks is not None and (self.cfg.vip or self.cfg.mode == "vip"):
            try:
                self.hooks.notify(state, ",".join(self.cfg.vips) or self.cfg.vip)  # all VIPs, comma-separated
            except Exception:
                log.exception("notify %s failed", state)

    def _record(self, what: str, at: float, **extra: Any) -> None:
        self.transitions.append({"event": what, "at": round(at, 4), **extra})
        del self.transitions[:-50]

    def _members(self) -> dict[str, list[str]]:
        """member id -> advertised addresses (listen_host, else the Raft host; ours from config)."""
        out = {}
        with self.raft.read() as cs:
            for m in cs.members.values():
                addr = getattr(m, "listen_host", "") or m.raft.rsplit(":", 1)[0]
                out[m.id] = [addr.strip("[]")]
        if self.cfg.addresses or self.cfg.address:
            out[self.node_id] = list(self.cfg.addresses or [self.cfg.address])
        return out

    def resolve(self, name: str) -> list[str] | None:
        """DNS answers for ``name``: the holder's addresses, or all live balancers'; IPv4 and
        IPv6 mixed (the responder answers A with the one and AAAA with the other)."""
        zone = self.cfg.zone
        short = name[: -len(zone) - 1] if name.endswith("." + zone) else name
        if short not in self.cfg.names:
            return None
        members = self._members()
        if self.cfg.answer == "all":
            st = self.raft.raft_status()
            live_raft = {st.self_addr} | {a for a, up in st.partners.items() if up}
            with self.raft.read() as cs:
                ids = [m.id for m in cs.members.values() if m.raft in live_raft]
            return sorted({a for i in ids for a in members.get(i, [])})
        with self.raft.read() as cs:
            holder = cs.lease.get("holder")
        if holder is None:
            return []
        if holder == self.last_holder and self.last_holder_address:
            return [a for a in self.last_holder_address.split(",") if a]
        return list(members.get(holder, []))

    def status(self) -> dict[str, Any]:
        now = self.clock()
        k = self.keeper
        with self.raft.read() as cs:
            lease = dict(cs.lease)
        return {
            "mode": self.cfg.mode,
            "vip": self.cfg.vip or None,
            "vips": list(self.cfg.vips) or None,
            "holder": lease.get("holder"),
            "epoch": lease.get("epoch"),
            "holds_vip": self.holding,
            "state": self.state,
            "leader": k.leader,
            "lease_remaining_s": round(k.remaining(now), 3),
            "wait_remaining_s": round(max(0.0, k.wait_until() - now), 3) if k.leader and not k.handover else 0.0,
            "handover": k.handover,
            "held_for_s": round(now - self.held_since, 3) if self.held_since is not None else None,
            "lease_s": k.params.lease_s,
            "dataplane_ok": self.dataplane_ok,
            "log_tracking": ("failed: full successor wait" if k.log_tracking_failed else "ok") if k.track_log else None,
            "dns": self.dns.stats if self.dns is not None else None,
        }


async def start_announcement(node: Any) -> Announcement | None:
    """Build and start the node's announcer from ``node.cfg.announce`` (None for mode none;
    a BgpAnnouncement, with the same interface, for mode bgp)."""
    cfg = parse_announce(node.cfg.announce, node.cfg.path.parent, node.cfg.dataplane.listen_host)
    if cfg.mode == "none":
        return None
    if cfg.mode == "bgp":  # every node announces (halb/announce/bgp_manager.py)
        from halb.announce.bgp_manager import BgpAnnouncement

        bgp = BgpAnnouncement(node.node_id, node.raft, cfg, routes=lambda: node.routing.routes,
                              conf_dir=Path(node.cfg.data_dir) / "bird", dataplane=node.dataplane)
        node.add_listener(bgp.on_applied)
        await bgp.start()
        return bgp  # type: ignore[return-value]
    ann = Announcement(node.node_id, node.raft, cfg)
    node.add_listener(ann.on_applied)
    await ann.start()
    return ann

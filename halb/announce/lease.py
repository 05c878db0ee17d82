"""Quorum-lease timing for the floating VIP: pure logic, no I/O, driven by an injected clock.

Why a lease and not pysyncobj's leader flag: a partitioned or frozen leader keeps believing
it leads (pysyncobj's ``leaderFallbackTimeout``), so "I am leader" cannot decide who may hold
the VIP. The lease can: the leader commits ``lease.renew`` through Raft every ~150 ms and
holds the VIP only until ``lease_start + L``, where ``lease_start`` is the clock reading
taken *before it submitted* the last renewal that committed. A renewal can only commit
while a majority still follows this leader, so ``lease_start + L`` is a point in time
before which no other node can have completed its own wait (see docs/failover.md).

The successor's wait. A node that wins leadership may add the VIP only once
``L * (1 + drift) + margin`` has passed since ``seen_at``: the latest time at which this
process applied a ``lease.renew`` entry that it did not submit in its current leadership
(its own earlier leaderships count as "foreign"), or its Raft log changed while it was not
leader, or it loaded a snapshot, or the keeper was created. Why that is safe: every renewal the old holder believes
committed is, by Raft's leader completeness, in the new leader's log and applied by it
before its own first renewal commits; applying an entry happens after the old holder
submitted it, so ``seen_at >= old lease_start`` in real time. ``seen_at`` is usually the
moment the old leader died (not the later moment this node won the election), which takes
the election time off the failover gap. ``wait_from="election"`` keeps the textbook rule
(wait from winning) for comparison; it is never earlier than the default. The same
textbook rule is the fallback whenever the tick callback that reports log changes has
failed (``set_log_tracking_failed``): without it ``seen_at`` may be too early.

Planned hand-over: the releasing leader deletes the VIP first and then commits
``lease.release {held: true}`` only if it really held it. The state machine reports
``handover_from`` on the successor's *first* renewal only when that release was the last
lease entry before it; then the successor may skip the wait.

Kernel lifetime: the VIP carries ``valid_lft 1``, so the kernel deletes it ~1.0-1.15 s
(IPv6: 1.25 s, later on an idle machine: its timer is deferrable, docs/failover.md)
after the last refresh even if this process is frozen or dead. A refresh is allowed only
while ``lease_end - now > refresh_min_remaining_s`` (1.3 s), re-checked after the netlink
call against ``kernel_expiry_max_s``; so an unrefreshed VIP is gone before ``lease_end``.

Stale results never extend anything: a renewal result counts only if it belongs to the
current leadership epoch and was submitted later than the current ``lease_start``.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

Clock = Callable[[], float]


def boottime() -> float:
    """CLOCK_BOOTTIME: monotonic and keeps counting through suspend (CLOCK_MONOTONIC stops)."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


@dataclass(frozen=True)
class LeaseParams:
    lease_s: float = 1.5                 # L
    renew_interval_s: float = 0.15       # leader submits lease.renew this often
    clock_drift: float = 0.02            # max relative clock-rate difference between nodes
    wait_margin_s: float = 0.05          # added to the successor's wait
    refresh_min_remaining_s: float = 1.3 # refresh valid_lft only while lease_end - now > this
    kernel_expiry_max_s: float = 1.2     # a refresh finished later than lease_end - this is undone
    wait_from: str = "last_renewal_seen" # or "election" (textbook rule: wait from winning)
    max_outstanding: int = 16            # renewals in flight before we stop submitting more

    def check(self) -> list[str]:
        """Reasons these parameters are unsafe or useless (empty when fine)."""
        errs = []
        if self.lease_s <= 0 or self.renew_interval_s <= 0:
            errs.append("lease_s and renew_interval_s must be > 0")
        if self.kernel_expiry_max_s < 1.15:
            errs.append("kernel_expiry_max_s must be >= 1.15 (measured kernel removal of valid_lft 1)")
        if self.refresh_min_remaining_s < self.kernel_expiry_max_s:
            errs.append("refresh_min_remaining_s must be >= kernel_expiry_max_s")
        if self.refresh_min_remaining_s >= self.lease_s:
            errs.append(f"lease_s must exceed refresh_min_remaining_s ({self.refresh_min_remaining_s:g} s), "
                        "or the VIP could never be refreshed")
        if self.renew_interval_s >= self.lease_s - self.refresh_min_remaining_s + 0.5:
            errs.append("renew_interval_s is too long for lease_s")
        if self.wait_from not in ("last_renewal_seen", "election"):
            errs.append("wait_from must be 'last_renewal_seen' or 'election'")
        return errs

    @property
    def successor_wait_s(self) -> float:
        return self.lease_s * (1 + self.clock_drift) + self.wait_margin_s


@dataclass(frozen=True)
class RenewToken:
    """What the keeper needs back with a renewal result to judge whether it may extend."""

    epoch: int
    submitted_at: float
    cid: str


@dataclass
class LeaseKeeper:
    """Decides, from Raft leadership and renewal results, whether this node may hold the VIP.

    Every method takes ``now`` (CLOCK_BOOTTIME in production, a fake clock in tests). The
    keeper never reads a clock itself, so a test can replay any interleaving.
    """

    params: LeaseParams
    created_at: float
    epoch: int = 0                       # local leadership epoch; bumps on every change
    leader: bool = False
    leader_since: float | None = None
    lease_start: float | None = None     # submit time of the newest committed renewal (this epoch)
    handover: bool = False               # first result said: planned hand-over from a holder
    first_result_seen: bool = False
    lease_epoch: int | None = None       # the replicated lease epoch our renewals belong to
    seen_at: float = 0.0                 # latest apply of a renewal not ours (see module doc)
    paused_until: float = 0.0            # no renewals/holding while a hand-over is in progress
    last_submit: float = -math.inf
    track_log: bool = False              # on_log_changed is fed (the node's tick callback)
    log_tracking_failed: bool = False    # that feed may have missed a change: full wait (below)
    _own: dict[str, float] = field(default_factory=dict)  # cid -> submit time (this epoch)

    def __post_init__(self) -> None:
        self.seen_at = max(self.seen_at, self.created_at)

    # ---- inputs ---------------------------------------------------------------------
    def set_leader(self, is_leader: bool, now: float) -> bool:
        """Feed the current Raft role; returns True when it changed (a new epoch began)."""
        if is_leader == self.leader:
            return False
        self._new_epoch()
        self.leader = is_leader
        self.leader_since = now if is_leader else None
        return True

    def _new_epoch(self) -> None:
        self.epoch += 1
        self.lease_start = None
        self.handover = False
        self.first_result_seen = False
        self.lease_epoch = None
        self.last_submit = -math.inf
        self._own.clear()

    def renew_due(self, now: float) -> bool:
        return (self.leader and now >= self.paused_until
                and now - self.last_submit >= self.params.renew_interval_s
                and len(self._own_outstanding(now)) < self.params.max_outstanding)

    def _own_outstanding(self, now: float) -> list[str]:
        # submissions without a result yet; very old ones (never answered: partitioned) stop
        # counting against the limit but stay "ours" for the foreign-renewal test
        return [c for c, t in self._own.items() if now - t < 5.0]

    def begin_renewal(self, cid: str, now: float) -> RenewToken:
        """Record that a renewal with id ``cid`` is submitted *now* (call just before submit)."""
        self._own[cid] = now
        self.last_submit = now
        return RenewToken(self.epoch, now, cid)

    def on_renewal_result(self, token: RenewToken, ok: bool, result: dict[str, Any] | None,
                          now: float) -> bool:
        """A renewal callback arrived; returns True if it extended the lease.

        The entry's local apply was already reported (pysyncobj calls back after applying),
        so the id can be forgotten; a failed result whose entry is applied later anyway then
        counts as foreign, which only lengthens a wait.
        """
        if token.epoch == self.epoch:
            self._own.pop(token.cid, None)
        if token.epoch != self.epoch or not self.leader:
            return False                 # a stale callback from another leadership
        if not ok or not result or not result.get("ok"):
            return False
        if self.lease_start is not None and token.submitted_at <= self.lease_start:
            return False                 # older than what we already have
        if now < self.paused_until:
            return False                 # hand-over in progress: never re-extend
        if not self.first_result_seen:
            self.first_result_seen = True
            self.handover = bool(result.get("first")) and bool(result.get("handover_from"))
        self.lease_epoch = result.get("epoch", self.lease_epoch)
        self.lease_start = token.submitted_at
        return True

    def on_renewal_applied(self, cid: str | None, now: float, raft_leader: bool | None = None) -> None:
        """Any accepted ``lease.renew`` entry was applied locally (every one, in log order).

        While we lead, foreign renewals applied now are either entries that were already in
        our log when we won (their arrival is bounded by :meth:`on_log_changed`) or stale
        renewals a deposed leader's pysyncobj queue forwarded to us; the latter extend no
        lease, because the deposed node processes their callback only after its own Raft
        status says follower (a new local epoch). So they do not restart our wait.
        ``raft_leader`` is Raft's own view at apply time: the keeper's flag is updated a few
        milliseconds after a win, while the predecessor's last entries are applied at once.
        """
        leading = self.leader if raft_leader is None else raft_leader
        if leading and self._log_tracked():
            return
        if cid is None or cid not in self._own:
            self.seen_at = max(self.seen_at, now)

    def on_log_changed(self, at: float) -> None:
        """Our Raft log changed at ``at`` while we were not leader (from a tick callback).

        Every entry in our log arrived at or before the last such change, and a new leader's
        log holds every committed renewal of its predecessors, so this too bounds the
        previous holder's last ``lease_start`` from above. It matters when that renewal
        reached us but its commit did not before the holder died: we apply it only after
        winning, which would otherwise start our wait after the election.
        """
        self.seen_at = max(self.seen_at, at)

    def set_log_tracking_failed(self, failed: bool) -> None:
        """The tick callback that feeds :meth:`on_log_changed` failed (True) or has since
        compared the log with the last entry it saw again (False).

        While it is failed, ``seen_at`` may be older than the last log change, so the
        shortened wait is not known to be safe: :meth:`wait_until` falls back to the full
        wait (from winning the election, the textbook rule) and foreign renewals applied
        while leading count again. A successful comparison after a failure notes any change
        it missed (at a time no earlier than the change), so clearing is safe then.
        """
        self.log_tracking_failed = failed

    def _log_tracked(self) -> bool:
        return self.track_log and not self.log_tracking_failed

    def on_snapshot_loaded(self, now: float) -> None:
        """A snapshot replaced the state: renewals folded into it were submitted before now."""
        self.seen_at = max(self.seen_at, now)

    def begin_handover(self, now: float, hold_s: float = 3.0) -> None:
        """Planned transfer: stop renewing and holding now; the caller deletes the VIP.

        A new epoch makes every in-flight renewal result stale. If leadership has not moved
        after ``hold_s`` we resume: we deleted our own VIP, so holding again is safe once
        the normal rules allow it.
        """
        was_leader = self.leader
        self._new_epoch()
        self.leader = was_leader
        self.paused_until = now + hold_s

    def end_handover(self) -> None:
        self.paused_until = 0.0

    # ---- outputs --------------------------------------------------------------------
    @property
    def lease_end(self) -> float | None:
        return None if self.lease_start is None else self.lease_start + self.params.lease_s

    def wait_until(self) -> float:
        """Earliest time this leadership may add the VIP without a hand-over."""
        start = self.seen_at
        full = self.params.wait_from == "election" or (self.track_log and self.log_tracking_failed)
        if full and self.leader_since is not None:
            start = max(start, self.leader_since)
        return start + self.params.successor_wait_s

    def may_hold(self, now: float) -> bool:
        end = self.lease_end
        return (self.leader and end is not None and now < end and now >= self.paused_until
                and (self.handover or now >= self.wait_until()))

    def may_refresh(self, now: float) -> bool:
        """May we (re)write valid_lft now? Only with enough lease left to outlive the kernel."""
        end = self.lease_end
        return self.may_hold(now) and end is not None and end - now > self.params.refresh_min_remaining_s

    def refresh_was_safe(self, finished_at: float) -> bool:
        """After the netlink call: would the kernel surely drop the VIP before lease_end?"""
        end = self.lease_end
        return end is not None and end - finished_at > self.params.kernel_expiry_max_s

    def remaining(self, now: float) -> float:
        end = self.lease_end
        return 0.0 if end is None else max(0.0, end - now)

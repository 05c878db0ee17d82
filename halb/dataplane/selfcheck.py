"""The data plane's own health check (keepalived's ``track_script``, built in): pure
decision logic, no I/O, time passed in.

Why: the VIP follows the Raft leader's quorum lease, and Raft knows nothing about the
proxy. Without this check a holder whose listener failed to bind, or whose worker
processes crash-loop, keeps the VIP while clients get refused connections. The node feeds
:meth:`DataPlaneCheck.evaluate` what it observes every ~100 ms; the announcement stops
renewing and hands leadership over while the verdict is "failing" (docs/failover.md).

What counts as failing (both thresholds are [announce] knobs, docs/config.md):

* a service this node should serve (it is in the data plane's routing snapshot) has no
  bound listener for longer than ``bind_grace_s`` (a bind failed: port taken, address not
  configured; or its route could not be applied). The grace absorbs the moment between a
  new service's commit and its bind, never a real failure: binds do not succeed later by
  themselves.
* ``max_worker_deaths`` or more worker-process deaths within ``worker_window_s`` (crash
  loop). One death is an incident the respawn heals; several in a window is a broken
  node (keeping ``workers - 1`` processes still serving is not the point: a crash loop
  drops the connections of every process that dies).

A node with no services is healthy: it has nothing to serve, and refusing leadership then
would leave a fresh cluster without a lease holder.

Hysteresis: once failing, the verdict stays failing until every condition has been clear
for ``recover_s``, so a flapping listener or a respawn that dies again cannot make the
node take leadership back and forth.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence


@dataclass(frozen=True)
class SelfCheckParams:
    enabled: bool = True
    bind_grace_s: float = 0.3
    max_worker_deaths: int = 3
    worker_window_s: float = 30.0
    recover_s: float = 2.0

    def check(self) -> list[str]:
        """Reasons these parameters are unusable (empty when fine)."""
        errs = []
        if self.bind_grace_s < 0 or self.recover_s < 0:
            errs.append("dataplane_bind_grace_s and dataplane_recover_s must be >= 0")
        if self.max_worker_deaths < 1:
            errs.append("dataplane_worker_deaths must be >= 1")
        if self.worker_window_s <= 0:
            errs.append("dataplane_worker_window_s must be > 0")
        return errs


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str                      # "" when ok; the first failing condition otherwise
    failing_since: float | None      # when the current failure began (None when ok)


@dataclass
class DataPlaneCheck:
    """Turns observations into a verdict; keeps only the times it needs between calls."""

    params: SelfCheckParams = field(default_factory=SelfCheckParams)
    unbound_since: dict[str, float] = field(default_factory=dict)
    failing_since: float | None = None
    reason: str = ""
    clear_since: float | None = None

    def evaluate(self, expected: Iterable[str], unbound: Mapping[str, str],
                 worker_deaths: Sequence[float], now: float) -> Verdict:
        """``expected``: services the node should serve; ``unbound``: those of them without a
        bound listener, with why; ``worker_deaths``: times of worker deaths (same clock as
        ``now``)."""
        p = self.params
        if not p.enabled:
            return Verdict(True, "", None)
        want = expected if isinstance(expected, (set, frozenset)) else set(expected)
        if self.unbound_since:
            for name in [n for n in self.unbound_since if n not in unbound or n not in want]:
                del self.unbound_since[name]
        problems: list[str] = []
        for name in sorted(n for n in unbound if n in want) if unbound else ():
            since = self.unbound_since.setdefault(name, now)
            if now - since > p.bind_grace_s:
                problems.append(f"service {name} not listening for {now - since:.1f}s: {unbound[name]}")
        recent = [t for t in worker_deaths if now - t <= p.worker_window_s]
        if len(recent) >= p.max_worker_deaths:
            problems.append(f"{len(recent)} worker process deaths in the last {p.worker_window_s:g}s "
                            f"(limit {p.max_worker_deaths})")
        if problems:
            if self.failing_since is None:
                self.failing_since = now
            self.reason = "; ".join(problems)
            self.clear_since = None
        elif self.failing_since is not None:
            if any(n in want for n in unbound):  # unbound within its grace is not "clear"
                self.clear_since = None
            elif self.clear_since is None:
                self.clear_since = now
            if self.clear_since is not None and now - self.clear_since >= p.recover_s:
                self.failing_since, self.reason, self.clear_since = None, "", None
        if self.failing_since is None:
            return Verdict(True, "", None)
        reason = self.reason if problems else f"recovering ({self.reason})"
        return Verdict(False, reason, self.failing_since)

"""Adaptive concurrency: a backend's in-flight limit that follows its measured latency.

Pure logic, no I/O and no clock of its own: every call takes the time it runs at (like
``halb/announce/lease.py``), so the algorithm is tested with made-up time and a real
backend alike. The data-plane glue feeds it one latency sample per finished request and
applies :attr:`GradientLimit.limit` as the backend's ``max_conns``.

Why: a configured ``max_conns`` must be known and kept up to date by someone; a backend's
latency already says when it is full. While requests take about as long as the fastest
the backend has recently been (its *minimum*), it has spare workers and the limit may
grow; when they take longer, requests are waiting inside the backend, so the limit
shrinks in proportion. This is the gradient idea of Envoy's adaptive concurrency filter
and Netflix's concurrency-limits (gradient2), reduced to what halb needs:

* Samples are grouped into windows of ``window_s`` (and at least ``min_samples``); a
  window's latency is the **mean** of its samples. Not the median: on a saturated server
  latency is bimodal (a request either finds a free worker or waits a whole service time),
  and the median stays at the minimum until half the requests wait, letting the limit
  reach 1.5x the capacity; the mean follows Little's law (mean latency = in flight /
  throughput), so it rises as soon as requests start waiting inside the server.
* ``min_rtt`` is the lowest window mean of the last ``min_rtt_horizon_s`` seconds: the
  latency of an unloaded backend, re-learned continuously (Envoy re-measures it by
  pinning the concurrency down periodically; here the limit itself returns to the knee
  often enough, so a sliding minimum is sufficient).
* At the end of a window, with ``target = min_rtt * (1 + tolerance)``:
  - latency <= target (near the minimum) and the limit was actually used (the window's
    highest in-flight count reached at least ``used_fraction`` of the limit: an idle
    backend's limit must not grow without bound): ``limit += max(1, growth * limit)``;
  - latency > target: ``limit *= max(min_gradient, min_rtt / latency)`` (the gradient).
  - clamped to ``[min_limit, max_limit]``.

Fixed point on a server with N workers and service time W (a demo backend with
``--capacity N --work-ms W``): with L <= N in flight latency stays W, so the limit grows;
with L > N the L - N extra requests queue inside the server and latency becomes W * L / N.
Growth continues while W * L / N <= W * (1 + tolerance); past it the gradient
``min_rtt / latency = N / L`` brings L back to N. So the limit oscillates between N and
N * (1 + tolerance) plus one growth step. Shrinking to the minimum (not to the tolerance
band) matters: it brings the backend back to its unloaded latency every cycle, which keeps
``min_rtt`` true. Shrinking only to the band would let windows at the band's latency
become the new "minimum" once the true ones left the horizon, and the limit would creep
upwards (the drift gradient2 fights with its long-term average, and Envoy by pinning the
concurrency down to re-measure).
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field


@dataclass
class GradientParams:
    initial_limit: float = 4.0
    min_limit: float = 1.0
    max_limit: float = 1000.0
    window_s: float = 0.25  # one limit update per window ...
    min_samples: int = 8  # ... with at least this many latency samples
    tolerance: float = 0.1  # latency up to min_rtt * (1 + tolerance) counts as "near the minimum"
    growth: float = 0.1  # relative growth per window (at least +1)
    min_gradient: float = 0.5  # never shrink by more than half in one window
    used_fraction: float = 0.5  # grow only if the window's peak in flight reached this share of the limit
    min_rtt_horizon_s: float = 30.0  # how long a minimum latency is remembered

    def __post_init__(self) -> None:
        if not 1 <= self.min_limit <= self.initial_limit <= self.max_limit:
            raise ValueError("need 1 <= min_limit <= initial_limit <= max_limit")
        if self.window_s <= 0 or self.min_samples < 1:
            raise ValueError("window_s must be > 0 and min_samples >= 1")
        if self.tolerance < 0 or self.growth <= 0 or not 0 < self.min_gradient <= 1:
            raise ValueError("tolerance >= 0, growth > 0, 0 < min_gradient <= 1")
        if not 0 <= self.used_fraction <= 1 or self.min_rtt_horizon_s <= 0:
            raise ValueError("0 <= used_fraction <= 1 and min_rtt_horizon_s > 0")


@dataclass
class GradientLimit:
    """One backend's adaptive limit. ``sample(now, rtt, in_flight)`` per finished request."""

    params: GradientParams = field(default_factory=GradientParams)
    limit_f: float = field(init=False)
    min_rtt: float | None = field(init=False, default=None)
    updates: int = field(init=False, default=0)
    _window_start: float | None = field(init=False, default=None)
    _samples: list[float] = field(init=False, default_factory=list)
    _peak: int = field(init=False, default=0)
    _means: deque[tuple[float, float]] = field(init=False, default_factory=deque)  # (time, window mean)

    def __post_init__(self) -> None:
        self.limit_f = self.params.initial_limit

    @property
    def limit(self) -> int:
        """The in-flight limit to enforce (an integer, at least min_limit)."""
        return max(int(self.params.min_limit), int(self.limit_f))

    def sample(self, now: float, rtt: float, in_flight: int) -> bool:
        """Record one request's latency (seconds) and the in-flight count when it ended
        (itself included). Returns True when this sample closed a window and the limit
        was recomputed."""
        if rtt < 0 or math.isnan(rtt):
            return False
        if self._window_start is None:
            self._window_start = now
        self._samples.append(rtt)
        self._peak = max(self._peak, in_flight)
        if now - self._window_start < self.params.window_s or len(self._samples) < self.params.min_samples:
            return False
        self._update(now)
        return True

    def _update(self, now: float) -> None:
        p = self.params
        mean = sum(self._samples) / len(self._samples)  # see the module docstring: not the median
        self._means.append((now, mean))
        while self._means and now - self._means[0][0] > p.min_rtt_horizon_s:
            self._means.popleft()
        self.min_rtt = min(m for _, m in self._means)
        target = self.min_rtt * (1 + p.tolerance)
        if mean <= target:
            if self._peak >= p.used_fraction * self.limit_f:
                self.limit_f += max(1.0, p.growth * self.limit_f)
        else:  # back to the minimum, not to the tolerance: see the module docstring
            self.limit_f *= max(p.min_gradient, self.min_rtt / mean)
        self.limit_f = min(p.max_limit, max(p.min_limit, self.limit_f))
        self.updates += 1
        self._window_start, self._samples, self._peak = now, [], 0

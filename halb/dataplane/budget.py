"""Retry budget: bounds retries to a share of live traffic so retries cannot amplify an outage.

A sliding-window token budget (Finagle/Envoy style): over the last `window_s` seconds, a
retry is allowed while ``retries < ratio * requests + minimum``. The ratio (default 0.2)
caps retry load at 20 % extra; the small minimum lets a quiet service still retry a few
requests. Per-second buckets keep it O(1) per request without timers.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class RetryBudget:
    ratio: float = 0.2
    minimum: float = 10.0  # retries always allowed per window
    window_s: int = 10
    clock: object = time.monotonic
    _req: list[int] = field(default_factory=list)
    _ret: list[int] = field(default_factory=list)
    _sec: int = -1
    _req_sum: int = 0
    _ret_sum: int = 0
    live: int = 0  # requests counted by the proxy since the last fold (a bare += on the hot path)
    seen: int = 0  # last total passed to count_to

    def __post_init__(self) -> None:
        self._req = [0] * self.window_s
        self._ret = [0] * self.window_s

    def _advance(self) -> int:
        now = int(self.clock())  # type: ignore[operator]
        if now != self._sec:
            if self._sec < 0 or now - self._sec >= self.window_s:
                self._req = [0] * self.window_s
                self._ret = [0] * self.window_s
                self._req_sum = self._ret_sum = 0
            else:
                for s in range(self._sec + 1, now + 1):
                    i = s % self.window_s
                    self._req_sum -= self._req[i]
                    self._ret_sum -= self._ret[i]
                    self._req[i] = self._ret[i] = 0
            self._sec = now
        i = now % self.window_s
        if self.live:
            self._req[i] += self.live
            self._req_sum += self.live
            self.live = 0
        return i

    def count_to(self, total: int) -> None:
        """Count live requests from a monotonic total kept elsewhere (the service's request
        counter), so the hot path needs no increment of its own; call before try_withdraw."""
        if total > self.seen:
            self.live += total - self.seen
            self.seen = total

    def deposit(self) -> None:
        """Count one live request (called once per client request, not per attempt)."""
        self.live += 1

    def try_withdraw(self) -> bool:
        """Take one retry token if the budget allows; False means: do not retry."""
        i = self._advance()
        if self._ret_sum + 1 > self.ratio * self._req_sum + self.minimum:
            return False
        self._ret[i] += 1
        self._ret_sum += 1
        return True

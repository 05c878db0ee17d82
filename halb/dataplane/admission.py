"""A queue instead of an error: HTTP requests wait while every backend is at its limit.

Two parts, so the rules can be tested without sockets or a loop (like announce/lease.py):

* `AdmissionQueue` (pure, time passed in): one FIFO lane per priority (`critical`,
  `normal`, `low`), bounded by `max_queue` and `queue_timeout`. `pop` serves the oldest
  request of the best non-empty lane, so a queued critical request overtakes every normal
  and low one. When the queue is full, a newcomer evicts the *newest* waiter of the worst
  lane below its own priority (that one has waited least; it gets 503 `shed`); a newcomer
  with nothing worse to evict is refused (503 `queue_full`). So under pressure low goes
  first and critical last.
* `Admission` (the loop glue, one per service runtime and process): enqueue, wake when a
  slot frees (a response ended), a timer for deadlines and for a rate limit's next token,
  and dispatch through callbacks on the waiting connection.

The same request is never both queued and counted in a backend's in_flight: it holds a
slot only once dispatched, so a queued request costs the backend nothing.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterator

from halb.service_options import PRIORITIES

RANK = {p: i for i, p in enumerate(PRIORITIES)}
NORMAL = RANK["normal"]

WAITING, ADMITTED, TIMED_OUT, SHED, CANCELLED = range(5)

# reasons in the JSON body of the 503 (field "reason")
QUEUE_FULL = "queue_full"
QUEUE_TIMEOUT = "queue_timeout"
SHED_REASON = "shed"
AT_CAPACITY = "at_capacity"  # queueing is off (max_queue or queue_timeout 0)
QUEUE_MESSAGES = {  # str.format(service=NAME, opts=ServiceOptions)
    QUEUE_FULL: "every backend of service {service} is at its capacity limit and its queue is full "
                "(max_queue {opts.max_queue})",
    QUEUE_TIMEOUT: "every backend of service {service} stayed at its capacity limit for "
                   "{opts.queue_timeout:g}s (queue_timeout)",
    SHED_REASON: "shed from the queue of service {service}: a request of higher priority took its place",
    AT_CAPACITY: "every backend of service {service} is at its capacity limit (queueing is off)",
}


@dataclass(eq=False)
class Waiter:
    item: Any
    rank: int
    enqueued: float
    deadline: float
    state: int = WAITING


@dataclass
class AdmissionQueue:
    """Bounded priority FIFO with deadlines; every method takes the time it runs at."""

    max_queue: int = 1000
    timeout: float = 2.0
    lanes: tuple[deque[Waiter], ...] = field(default_factory=lambda: tuple(deque() for _ in PRIORITIES))
    length: int = 0  # live (WAITING) entries; cancelled ones may still sit in a lane
    by_rank: list[int] = field(default_factory=lambda: [0] * len(PRIORITIES))
    # counters since start
    enqueued: int = 0
    admitted: int = 0
    timed_out: int = 0
    shed: int = 0
    full: int = 0
    cancelled: int = 0
    wait_sum: float = 0.0  # seconds waited by admitted requests
    wait_max: float = 0.0

    @property
    def enabled(self) -> bool:
        return self.max_queue > 0 and self.timeout > 0

    def push(self, item: Any, rank: int, now: float) -> tuple[Waiter | None, Waiter | None]:
        """Queue `item`; returns (its waiter or None when refused, a waiter evicted for it)."""
        rank = min(max(rank, 0), len(PRIORITIES) - 1)
        evicted = None
        if self.length >= self.max_queue:
            evicted = self._evict_below(rank)
            if evicted is None:
                self.full += 1
                return None, None
        w = Waiter(item, rank, now, now + self.timeout)
        self.lanes[rank].append(w)
        self.length += 1
        self.by_rank[rank] += 1
        self.enqueued += 1
        return w, evicted

    def _evict_below(self, rank: int) -> Waiter | None:
        for r in range(len(PRIORITIES) - 1, rank, -1):
            lane = self.lanes[r]
            while lane:
                w = lane.pop()  # the newest of the worst lane
                if w.state == WAITING:
                    self._leave(w, SHED)
                    self.shed += 1
                    return w
        return None

    def _leave(self, w: Waiter, state: int) -> None:
        w.state = state
        self.length -= 1
        self.by_rank[w.rank] -= 1

    def peek(self) -> Waiter | None:
        """The waiter `pop` would return (drops cancelled entries at the heads)."""
        for lane in self.lanes:
            while lane and lane[0].state != WAITING:
                lane.popleft()
            if lane:
                return lane[0]
        return None

    def pop(self, now: float) -> Waiter | None:
        w = self.peek()
        if w is None:
            return None
        self.lanes[w.rank].popleft()
        self._leave(w, ADMITTED)
        self.admitted += 1
        waited = max(0.0, now - w.enqueued)
        self.wait_sum += waited
        self.wait_max = max(self.wait_max, waited)
        return w

    def cancel(self, w: Waiter) -> None:
        """The client went away while waiting; the entry is dropped lazily."""
        if w.state == WAITING:
            self._leave(w, CANCELLED)
            self.cancelled += 1

    def expire(self, now: float) -> list[Waiter]:
        """Waiters whose deadline passed, oldest first per lane (each lane's deadlines are in
        order: one timeout per service; a changed timeout applies to later arrivals)."""
        out: list[Waiter] = []
        for lane in self.lanes:
            while lane and (lane[0].state != WAITING or lane[0].deadline <= now):
                w = lane.popleft()
                if w.state == WAITING:
                    self._leave(w, TIMED_OUT)
                    self.timed_out += 1
                    out.append(w)
        return out

    def next_deadline(self) -> float | None:
        heads = [w.deadline for w in self._heads()]
        return min(heads) if heads else None

    def _heads(self) -> Iterator[Waiter]:
        for lane in self.lanes:
            for w in lane:
                if w.state == WAITING:
                    yield w
                    break

    def stats(self, now: float) -> dict[str, Any]:
        oldest = [now - w.enqueued for w in self._heads()]
        return {
            "length": self.length, "max_queue": self.max_queue, "timeout_s": self.timeout,
            "by_priority": {p: self.by_rank[i] for i, p in enumerate(PRIORITIES)},
            "enqueued": self.enqueued, "admitted": self.admitted, "timed_out": self.timed_out,
            "shed": self.shed, "full": self.full, "cancelled": self.cancelled,
            "wait_s_sum": round(self.wait_sum, 6), "wait_s_max": round(self.wait_max, 6),
            "oldest_wait_s": round(max(oldest), 6) if oldest else 0.0,
        }


class Admission:
    """One service's queue on one process, driven by the event loop.

    `item`s are `(conn, ex)` pairs; the connection is asked through three callbacks:
    `conn.queue_alive(ex)` (still wants an answer), `conn.dispatch(ex, backend)` (a slot is
    free: send it) and `conn.queue_refused(ex, reason, retry_after)` (503)."""

    def __init__(self, rt: Any, loop: Any) -> None:
        self.rt = rt
        self.loop = loop
        self.q = AdmissionQueue()
        self.timer: Any = None
        self.timer_at = math.inf
        self.wake_pending = False
        self.configure(rt.opts)

    def configure(self, opts: Any) -> None:
        self.q.max_queue = opts.max_queue
        self.q.timeout = opts.queue_timeout

    def enqueue(self, conn: Any, ex: Any, rank: int) -> Waiter | None:
        """Queue a request (None: refused and already answered)."""
        q = self.q
        if not q.enabled:
            self._refuse(conn, ex, AT_CAPACITY)
            return None
        w, evicted = q.push((conn, ex), rank, self.loop.time())
        self.rt.queued = q.length
        if evicted is not None:
            self._refuse(*evicted.item, SHED_REASON)
        if w is None:
            self._refuse(conn, ex, QUEUE_FULL)
            return None
        self.wake()  # a slot may already be free (the newcomer joined others waiting)
        return w

    def _refuse(self, conn: Any, ex: Any, reason: str) -> None:
        self.rt.rejected += 1
        conn.queue_refused(ex, reason, self.rt.retry_after())

    def wake(self) -> None:
        """A slot may have freed: drain on the next loop turn (never inside the caller,
        which is in the middle of finishing a response)."""
        if not self.wake_pending:
            self.wake_pending = True
            self.loop.call_soon(self.drain)

    def drain(self) -> None:
        self.wake_pending = False
        q = self.q
        now = self.loop.time()
        for w in q.expire(now):
            self._refuse(*w.item, QUEUE_TIMEOUT)
        rt = self.rt
        while q.length:
            w = q.peek()
            conn, ex = w.item  # type: ignore[union-attr]
            if not conn.queue_alive(ex):
                q.cancel(w)  # type: ignore[arg-type]
                continue
            # a waiting retry still avoids the backends that failed it (HOL: it may hold up
            # the waiters behind it until one of its other backends frees, or it times out)
            b = rt.pick(ex.key, exclude=ex.tried, avoid_servers=ex.failed_servers) if ex.tried else rt.pick(ex.key)
            if b is None:
                break
            q.pop(now)
            conn.dispatch(ex, b)
        rt.queued = q.length
        self._arm(now)

    def _arm(self, now: float) -> None:
        """Timer for the next deadline, or sooner when a rate limit's token will be back."""
        if not self.q.length:
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
                self.timer_at = math.inf
            return
        at = self.q.next_deadline() or now + 0.05
        rates = [b.rps_rate for b in self.rt.candidates if b.rps_rate > 0]
        if rates:
            at = min(at, now + max(0.001, 1.0 / max(rates)))
        if self.timer is not None and abs(self.timer_at - at) < 0.001:
            return
        if self.timer is not None:
            self.timer.cancel()
        self.timer_at = at
        self.timer = self.loop.call_at(at, self._on_timer)

    def _on_timer(self) -> None:
        self.timer = None
        self.timer_at = math.inf
        self.drain()

    def stats(self) -> dict[str, Any]:
        return self.q.stats(self.loop.time())


def empty_stats(max_queue: int, timeout: float) -> dict[str, Any]:
    """What a service that never queued reports (same keys)."""
    return AdmissionQueue(max_queue=max_queue, timeout=timeout).stats(0.0)


__all__ = ["Admission", "AdmissionQueue", "PRIORITIES", "RANK", "Waiter", "empty_stats", "QUEUE_MESSAGES",
           "QUEUE_FULL", "QUEUE_TIMEOUT", "SHED_REASON", "AT_CAPACITY"]

"""The node-local active prober: one timer and one epoll set for all (service, backend) targets.

Each balancer node runs one Prober in its event loop. It turns individual check results
into UP/DOWN with rise/fall hysteresis and calls ``on_transition`` only when the verdict
changes. What happens next (local fast ejection, reporting the observation to the
cluster, majority verdicts, flap damping) is the caller's business.

Initial state: a new target is assumed UP and goes DOWN only after ``fall`` consecutive
failures, the way HAProxy starts servers. Starting DOWN would make every node restart or
config reload take all backends out of rotation for ``rise * interval``; a dead backend
assumed up is covered by passive outlier detection in the data plane until the checks
catch up. The assumed initial UP is never a transition (``on_transition`` is not called
for it). Until the first ``rise`` good or ``fall`` failed checks, ``confirmed`` is False:
views show such a backend as *pending* (it is routed, but no check has vouched for it yet).

Scheduling: checks of one target never overlap (the next one starts after the previous
finished), the first check starts within ``jitter * interval`` of the target being
added, and every later wait is ``interval * (1 +/- jitter)`` minus the time the check took,
so three nodes started together do not hit a backend in lockstep.

Cost: at 10,000 targets and 30 s intervals a node runs 333 checks a second, all the time.
One asyncio Task per target sleeping between checks, plus ``asyncio.timeout`` and
``sock_connect`` per check, cost about 30 us of CPU per check before the connect itself
(Task wake-up, timer handle, cancel scope, future, add/remove of the fd in the loop).
Instead, due times live in one heap behind one loop timer (checks due within 2 % of their
interval, at most 50 ms, start in the same wake-up: about 20 wake-ups a second instead of
one per check), and a TCP check of an IP literal is a bare non-blocking connect in one
epoll set that the loop watches as a single fd (a ConnectSet, halb/health/connect_set.py:
C when built, else Python); its timeout is a deadline in a second heap checked by the same
timer. HTTP checks (and TCP checks of host names, or a subclass's own ``_check_once``)
still run as a Task per check, started from the same heap.
"""
from __future__ import annotations

import asyncio
import dataclasses
import heapq
import ipaddress
import itertools
import logging
import os
import random
import select
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import aiohttp

from halb.health.checks import CheckConfig, CheckResult, describe_error, http_check, tcp_check
from halb.health.connect_set import ConnectSetLike, new_connect_set

log = logging.getLogger("halb.health.prober")

TargetKey = tuple[str, str]  # (service, backend name)
Target = tuple[str, int, CheckConfig]  # (host, port, check config)
TransitionCallback = Callable[[str, str, bool, str], None]  # (service, backend, up, detail)
ResultCallback = Callable[[str, str, CheckResult], None]  # every probe: metrics (latency histogram)


@dataclass
class BackendHealth:
    """The node's current view of one backend. ``state()`` hands out copies."""

    up: bool = True
    confirmed: bool = False  # `up` rests on rise good / fall failed checks, not the initial assumption
    since_monotonic: float = field(default_factory=time.monotonic)  # when `up` last changed (or target added)
    since_wall: float = field(default_factory=time.time)
    consecutive_successes: int = 0
    consecutive_failures: int = 0
    last_error: str = ""  # detail of the most recent check if it failed; cleared by a good check
    last_failure: str = ""  # detail of the most recent failed check (kept after recovery)
    last_failure_wall: float | None = None  # when that check finished
    last_detail: str = ""  # detail of the most recent check, failed or not
    last_ok: bool | None = None  # None until the first check finished
    last_latency: float | None = None  # seconds, most recent check
    last_check_wall: float | None = None
    checks_total: int = 0
    failures_total: int = 0
    transitions: int = 0
    host: str = ""
    port: int = 0


MAX_EARLY = 0.05  # a check may start this much (at most 2 % of its interval) before it is due
_HAS_EPOLL = hasattr(select, "epoll")


class _Slot:
    """One target's check loop, without a Task: what is scheduled or in flight for it.

    A new slot replaces the old one whenever a target is (re)configured; the old one is
    marked cancelled, and heap entries that still point at it are skipped when popped.
    """

    __slots__ = ("key", "host", "port", "cfg", "family", "cancelled", "task", "fd", "started",
                 "started_mono", "attempt", "early")

    def __init__(self, key: TargetKey, target: Target, fast_tcp: bool) -> None:
        self.key = key
        self.host, self.port, self.cfg = target
        self.early = min(MAX_EARLY, 0.02 * self.cfg.interval)  # may start this much before it is due
        self.family = 0  # address family when the bare-socket TCP path applies, else 0
        if fast_tcp and self.cfg.kind == "tcp":
            try:
                if "%" not in self.host:  # a scoped IPv6 address (fe80::1%eth0) takes the stream path
                    self.family = socket.AF_INET6 if ipaddress.ip_address(self.host).version == 6 else socket.AF_INET
            except ValueError:
                pass  # a host name: the stream path resolves it
        self.cancelled = False
        self.task: asyncio.Task[None] | None = None  # a Task-based check in flight
        self.fd = -1  # a bare-socket TCP check in flight (its fd in the prober's ConnectSet)
        self.started = 0.0  # loop time the current check started
        self.started_mono = 0.0
        self.attempt = 0

    def done(self) -> bool:
        """True once the slot can start no more checks (removed, replaced or stopped)."""
        return self.cancelled


class Prober:
    """Runs active checks for a changing set of targets inside the running event loop."""

    def __init__(self, on_transition: TransitionCallback, *, on_result: ResultCallback | None = None,
                 rng: random.Random | None = None) -> None:
        self._on_transition = on_transition
        self._on_result = on_result
        self._rng = rng or random.Random()
        self._targets: dict[TargetKey, Target] = {}
        self._slots: dict[TargetKey, _Slot] = {}
        self._health: dict[TargetKey, BackendHealth] = {}
        self._by_service: dict[str, set[str]] = {}  # service -> backend names with a target
        self._session: aiohttp.ClientSession | None = None
        self._stopped = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._seq = itertools.count()  # heap tie-breaker
        self._due: list[tuple[float, int, _Slot]] = []  # (start no earlier than, seq, slot)
        self._deadlines: list[tuple[float, int, _Slot, int]] = []  # in-flight bare connects: (when, seq, slot, attempt)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")
        self._inflight: dict[int, _Slot] = {}  # fd -> slot of a bare-socket connect in flight
        self._cset: ConnectSetLike | None = None  # C or Python (halb/health/connect_set.py)
        # the bare-socket TCP path needs epoll (Linux) and must not bypass a subclass's own check
        self._fast_tcp = _HAS_EPOLL and type(self)._check_once is Prober._check_once

    # -- public API -------------------------------------------------------------------

    def set_targets(self, targets: Mapping[TargetKey, Target]) -> None:
        """Replace the target set. Must be called from the event loop's thread.

        New targets start checking, removed ones stop (their state is forgotten), and a
        target whose address or config changed restarts its loop but keeps its current
        verdict: the identity of a backend is (service, name), and changing its check
        should need fresh evidence, not reset it to UP.
        """
        new = self._validated(targets)
        for key in list(self._targets):
            if key not in new:
                self._drop(key)
        self._put(new)

    def set_service_targets(self, service: str, targets: Mapping[str, Target]) -> None:
        """Replace the targets of one service (backend name -> target); the others are
        untouched. Cost is proportional to that service, not to every target: this is
        what a change of one service or backend calls at 10,000 backends."""
        new = self._validated({(service, name): t for name, t in targets.items()})
        for key in [(service, name) for name in self._by_service.get(service, ())]:
            if key not in new:
                self._drop(key)
        self._put(new)

    def services(self) -> list[str]:
        return list(self._by_service)

    def _validated(self, targets: Mapping[TargetKey, Target]) -> dict[TargetKey, Target]:
        if self._stopped:
            raise RuntimeError("Prober is stopped")
        for key, target in targets.items():
            host, port, cfg = target
            if not isinstance(cfg, CheckConfig):
                raise TypeError(f"target {key}: expected CheckConfig, got {type(cfg).__name__}")
            if not isinstance(port, int) or not 0 < port < 65536:
                raise ValueError(f"target {key}: invalid port {port!r}")
        return {key: (t[0], t[1], t[2]) for key, t in targets.items()}  # normalise lists to tuples

    def _drop(self, key: TargetKey) -> None:
        self._cancel(key)
        del self._targets[key]
        self._health.pop(key, None)
        names = self._by_service.get(key[0])
        if names is not None:
            names.discard(key[1])
            if not names:
                del self._by_service[key[0]]

    def _put(self, new: dict[TargetKey, Target]) -> None:
        loop = self._loop = asyncio.get_running_loop()
        for key, target in new.items():
            if self._targets.get(key) == target and key in self._slots:
                continue
            self._cancel(key)
            self._targets[key] = target
            self._by_service.setdefault(key[0], set()).add(key[1])
            health = self._health.setdefault(key, BackendHealth())
            health.host, health.port = target[0], target[1]
            health.consecutive_successes = health.consecutive_failures = 0
            slot = self._slots[key] = _Slot(key, target, self._fast_tcp)
            self._schedule(slot, loop.time() + target[2].first_delay(self._rng))

    def state(self, service: str, backend: str) -> BackendHealth:
        """A copy of the current health of one target; KeyError if it is not a target."""
        return dataclasses.replace(self._health[(service, backend)])

    def is_up(self, service: str, backend: str) -> bool | None:
        """Current verdict without a copy (None: not a target); routing asks this for
        every backend of every service it rebuilds."""
        h = self._health.get((service, backend))
        return None if h is None else h.up

    def live_states(self) -> dict[TargetKey, BackendHealth]:
        """The prober's own state objects, not copies: for a scan in the loop thread that
        only reads them (at 10,000 targets, copying all of them twice a second was the
        node's largest idle cost)."""
        return self._health

    def states(self) -> dict[TargetKey, BackendHealth]:
        return {k: dataclasses.replace(v) for k, v in self._health.items()}

    def targets(self) -> dict[TargetKey, Target]:
        return dict(self._targets)

    def live_targets(self) -> dict[TargetKey, Target]:
        """The target map itself (no copy), for read-only scans in the loop thread."""
        return self._targets

    async def stop(self) -> None:
        """Stop every check loop and close the probe session. Idempotent."""
        self._stopped = True
        tasks = [s.task for s in self._slots.values() if s.task is not None]
        for key in list(self._slots):
            self._cancel(key)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._due.clear()
        self._deadlines.clear()
        if self._cset is not None:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self._cset.fileno())
            self._cset.close()
            self._cset = None
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- internals --------------------------------------------------------------------

    def _cancel(self, key: TargetKey) -> None:
        slot = self._slots.pop(key, None)
        if slot is None:
            return
        slot.cancelled = True
        if slot.task is not None:
            slot.task.cancel()
            slot.task = None
        if slot.fd >= 0:
            self._inflight.pop(slot.fd, None)
            if self._cset is not None:
                self._cset.abort(slot.fd)
            slot.fd = -1

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # force_close: a fresh TCP connection per check, never a reused keep-alive one.
            connector = aiohttp.TCPConnector(force_close=True, limit=0, ttl_dns_cache=10)
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=None),
                auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar())
        return self._session

    async def _check_once(self, host: str, port: int, cfg: CheckConfig) -> CheckResult:
        if cfg.kind == "tcp":
            return await tcp_check(host, port, cfg)
        return await http_check(self._get_session(), host, port, cfg)

    # -- scheduling: one heap, one timer ----------------------------------------------

    def _schedule(self, slot: _Slot, at: float) -> None:
        """Queue the slot's next check at loop time ``at`` (the timer may start it a little
        earlier, together with an earlier one: see ``_tick``)."""
        heapq.heappush(self._due, (at, next(self._seq), slot))
        if at < self._timer_at:
            self._arm()

    def _arm(self) -> None:
        """Point the one timer at the earliest due check or live connect deadline."""
        dl = self._deadlines
        while dl and (dl[0][2].fd < 0 or dl[0][2].attempt != dl[0][3]):
            heapq.heappop(dl)  # finished long before its deadline: most of them
        at = min(self._due[0][0] if self._due else float("inf"), dl[0][0] if dl else float("inf"))
        if at == self._timer_at and self._timer is not None:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = at
        if at != float("inf") and self._loop is not None and not self._stopped:
            self._timer = self._loop.call_at(at, self._tick)

    def _tick(self) -> None:
        self._timer = None
        self._timer_at = float("inf")
        loop = self._loop
        assert loop is not None
        now = loop.time() + 0.001  # uvloop's timers have millisecond resolution
        dl = self._deadlines
        while dl and dl[0][0] <= now:
            _, _, slot, attempt = heapq.heappop(dl)
            if slot.fd >= 0 and slot.attempt == attempt:
                self._inflight.pop(slot.fd, None)
                if self._cset is not None:
                    self._cset.abort(slot.fd)
                slot.fd = -1
                self._finish(slot, self._tcp_result(slot, False, f"connect timeout after {slot.cfg.timeout:g}s"))
        # Batch: every check due within its early allowance of now starts in this wake-up.
        # (Subtracting the allowance from every due time instead, as this once did, shifts
        # them all alike and batches nothing: 250 wake-ups a second for 333 checks.)
        due = self._due
        ready = []
        while due and due[0][0] <= now + due[0][2].early:
            ready.append(heapq.heappop(due)[2])
        for slot in ready:  # popped first: a check that finishes at once is requeued for later
            if slot.cancelled:
                continue
            try:
                self._start(slot)
            except Exception as exc:  # a bug in a check must not stop the scheduler
                log.exception("health check %s/%s crashed", *slot.key)
                self._finish(slot, CheckResult(ok=False, latency=0.0, at=time.time(),
                                               detail=f"check error: {type(exc).__name__}: {exc}"))
        if self._inflight:
            self._on_epoll()  # a loopback/LAN connect is often done already: skip a loop turn
        self._arm()

    def _start(self, slot: _Slot) -> None:
        assert self._loop is not None
        slot.started = self._loop.time()
        slot.started_mono = time.monotonic()
        slot.attempt += 1
        if slot.family:
            self._start_tcp(slot)
        else:
            slot.task = self._loop.create_task(self._run_check(slot), name=f"health-check {slot.key[0]}/{slot.key[1]}")

    async def _run_check(self, slot: _Slot) -> None:
        try:
            result = await self._check_once(slot.host, slot.port, slot.cfg)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug in a check must not kill the loop
            log.exception("health check %s/%s crashed", *slot.key)
            result = CheckResult(ok=False, latency=time.monotonic() - slot.started_mono,
                                 detail=f"check error: {type(exc).__name__}: {exc}", at=time.time())
        slot.task = None
        self._finish(slot, result)

    def _finish(self, slot: _Slot, result: CheckResult) -> None:
        """Record a check of a live slot and queue its next one."""
        if slot.cancelled:
            return  # replaced or removed while the check was in flight
        self._record(slot.key, slot.cfg, result)
        if slot.cancelled or self._loop is None:
            return  # a callback removed or replaced the target
        now = self._loop.time()
        self._schedule(slot, now + max(0.0, slot.cfg.next_delay(self._rng) - (now - slot.started)))

    # -- the bare-socket TCP check ----------------------------------------------------

    def _start_tcp(self, slot: _Slot) -> None:
        """socket, SO_LINGER 0, connect, then wait in the shared epoll set (ConnectSet)."""
        cset = self._cset
        if cset is None:
            assert self._loop is not None
            cset = self._cset = new_connect_set()
            self._loop.add_reader(cset.fileno(), self._on_epoll)
        fd, err = cset.start(slot.family, slot.host, slot.port)
        if fd < 0:  # finished at once (connected or refused), or no socket
            self._finish(slot, self._tcp_result(slot, err == 0, "connected" if err == 0 else _errno_detail(err)))
            return
        slot.fd = fd
        self._inflight[fd] = slot
        at = slot.started + slot.cfg.timeout
        heapq.heappush(self._deadlines, (at, next(self._seq), slot, slot.attempt))
        if at < self._timer_at:
            self._arm()

    def _on_epoll(self) -> None:
        cset = self._cset
        if cset is None:
            return
        pop = self._inflight.pop
        for fd, err in cset.collect():
            slot = pop(fd, None)
            if slot is None:
                continue
            slot.fd = -1
            self._finish(slot, self._tcp_result(slot, err == 0, "connected" if err == 0 else _errno_detail(err)))

    @staticmethod
    def _tcp_result(slot: _Slot, ok: bool, detail: str) -> CheckResult:
        return CheckResult(ok=ok, latency=time.monotonic() - slot.started_mono, detail=detail, at=time.time())

    def _record(self, key: TargetKey, cfg: CheckConfig, result: CheckResult) -> None:
        h = self._health[key]
        h.checks_total += 1
        h.last_latency = result.latency
        h.last_check_wall = result.at or time.time()
        h.last_ok = result.ok
        h.last_detail = result.detail
        if result.ok:
            h.consecutive_successes += 1
            h.consecutive_failures = 0
            h.last_error = ""
        else:
            h.failures_total += 1
            h.consecutive_failures += 1
            h.consecutive_successes = 0
            h.last_error = h.last_failure = result.detail
            h.last_failure_wall = h.last_check_wall
        if self._on_result is not None:
            try:
                self._on_result(key[0], key[1], result)
            except Exception:
                log.exception("on_result callback failed for %s/%s", *key)
        if h.up and h.consecutive_failures >= cfg.fall:
            self._transition(key, h, False,
                             f"{h.consecutive_failures} consecutive failed checks, last: {result.detail}")
        elif not h.up and h.consecutive_successes >= cfg.rise:
            self._transition(key, h, True,
                             f"{h.consecutive_successes} consecutive good checks, last: {result.detail}"
                             f" in {result.latency * 1000:.1f} ms")
        elif h.up and not h.confirmed and h.consecutive_successes >= cfg.rise:
            h.confirmed = True  # the assumed initial UP is now checked (not a transition)

    def _transition(self, key: TargetKey, h: BackendHealth, up: bool, detail: str) -> None:
        h.up = up
        h.confirmed = True
        h.since_monotonic = time.monotonic()
        h.since_wall = time.time()
        h.transitions += 1
        log.info("backend %s/%s is %s: %s", key[0], key[1], "UP" if up else "DOWN", detail)
        try:
            self._on_transition(key[0], key[1], up, detail)
        except Exception:
            log.exception("on_transition callback failed for %s/%s", *key)


def _errno_detail(err: int) -> str:
    """The same text tcp_check gives for a failed connect with this errno."""
    return describe_error(OSError(err, os.strerror(err)))

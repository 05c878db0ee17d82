"""The node-local active prober: one asyncio task per (service, backend) target.

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
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping

import aiohttp

from halb.health.checks import CheckConfig, CheckResult, http_check, tcp_check

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


class Prober:
    """Runs active checks for a changing set of targets inside the running event loop."""

    def __init__(self, on_transition: TransitionCallback, *, on_result: ResultCallback | None = None,
                 rng: random.Random | None = None) -> None:
        self._on_transition = on_transition
        self._on_result = on_result
        self._rng = rng or random.Random()
        self._targets: dict[TargetKey, Target] = {}
        self._tasks: dict[TargetKey, asyncio.Task[None]] = {}
        self._health: dict[TargetKey, BackendHealth] = {}
        self._by_service: dict[str, set[str]] = {}  # service -> backend names with a target
        self._session: aiohttp.ClientSession | None = None
        self._stopped = False

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
        for key, target in new.items():
            if self._targets.get(key) == target and key in self._tasks:
                continue
            self._cancel(key)
            self._targets[key] = target
            self._by_service.setdefault(key[0], set()).add(key[1])
            health = self._health.setdefault(key, BackendHealth())
            health.host, health.port = target[0], target[1]
            health.consecutive_successes = health.consecutive_failures = 0
            self._tasks[key] = asyncio.get_running_loop().create_task(
                self._run(key, target), name=f"health-check {key[0]}/{key[1]}")

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
        tasks = list(self._tasks.values())
        for key in list(self._tasks):
            self._cancel(key)
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- internals --------------------------------------------------------------------

    def _cancel(self, key: TargetKey) -> None:
        task = self._tasks.pop(key, None)
        if task is not None:
            task.cancel()

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

    async def _run(self, key: TargetKey, target: Target) -> None:
        host, port, cfg = target
        loop = asyncio.get_running_loop()
        await asyncio.sleep(cfg.first_delay(self._rng))
        while True:
            started = loop.time()
            try:
                result = await self._check_once(host, port, cfg)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug in a check must not kill the loop
                log.exception("health check %s/%s crashed", *key)
                result = CheckResult(ok=False, latency=loop.time() - started,
                                     detail=f"check error: {type(exc).__name__}: {exc}", at=time.time())
            if self._tasks.get(key) is not asyncio.current_task():
                return  # replaced or removed while the check was in flight
            self._record(key, cfg, result)
            elapsed = loop.time() - started
            await asyncio.sleep(max(0.0, cfg.next_delay(self._rng) - elapsed))

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

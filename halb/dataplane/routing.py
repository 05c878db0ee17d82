"""Per-service routing state on one worker: backend runtime state, candidate selection,
passive outlier detection, slow start and the panic / fail-closed policy.

The snapshot says what the cluster wants (admin state, health verdict, weight); this
module adds what only this worker sees (in-flight counts, ejections, latency) and decides
which backends may take the next request. It does no I/O: the proxies call `pick` and
report outcomes with `record_success` / `record_failure`; a periodic `tick` ends ejections
and advances slow-start ramps.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from halb.dataplane.admission import RANK, empty_stats
from halb.dataplane.adaptive import GradientLimit
from halb.dataplane.balancers import Maglev, PeakEwma, SmoothWeightedRoundRobin, ewma_update, make_balancer
from halb.dataplane.budget import RetryBudget
from halb.dataplane.limits import UNLIMITED, burst_for, conn_share, refill, rps_share
from halb.dataplane.options import ServiceOptions
from halb.dataplane.server_spread import ServerSpread, wants_server_spread
from halb.dataplane.snapshot import BackendRoute, ServiceRoute

log = logging.getLogger(__name__)

EjectionHook = Callable[[str, str, bool, str], None]


@dataclass(eq=False)
class BackendState:
    """One backend as this worker sees it. Identity-compared; shared by in-flight work."""

    route: BackendRoute
    name: str = ""
    host: str = ""
    port: int = 0
    server: str = ""
    weight: float = 1.0  # effective weight for balancers (slow start applied)
    in_flight: int = 0
    requests: int = 0
    errors: int = 0
    retries: int = 0  # attempts this backend received as a retry of a failed attempt
    ejections: int = 0
    ejected: bool = False
    ejected_until: float = 0.0
    ejection_streak: int = 0  # consecutive ejections without a quiet period in between
    consecutive_failures: int = 0
    consecutive_connect_failures: int = 0
    eligible_since: float = -math.inf
    was_eligible: bool = False
    ewma: float = 0.0
    ewma_stamp: float = 0.0
    removed: bool = False  # no longer in the snapshot: close connections when done
    # capacity limits, this process's share (limits.py): in_flight must stay below
    # conn_limit; rps_rate > 0: a token bucket of rps_burst tokens
    conn_limit: int = UNLIMITED
    rps_rate: float = 0.0
    rps_burst: float = 1.0
    tokens: float = 1.0
    tokens_at: float = 0.0
    at_limit: int = 0  # picks that passed this backend over because it was at a limit
    adaptive: Any = None  # adaptive.GradientLimit when the service learns limits from latency
    pool: list[Any] = field(default_factory=list)  # idle upstream connections (LIFO)

    def __post_init__(self) -> None:
        self.set_route(self.route)

    def set_route(self, route: BackendRoute) -> None:
        self.route = route
        self.name, self.host, self.port, self.server = route.name, route.host, route.port, route.server

    def close_pool(self) -> None:
        pool, self.pool = self.pool, []
        for conn in pool:
            conn.close()


class ServiceRuntime:
    """Long-lived per service; `apply(route)` swaps in a new snapshot atomically.

    Work already started keeps the `BackendState` and `ServiceOptions` objects it captured,
    so an update never changes the rules under an in-flight request.
    """

    def __init__(self, route: ServiceRoute, hook: EjectionHook | None = None,
                 clock: Callable[[], float] = time.monotonic, initial: bool = True,
                 slot: tuple[int, int] = (0, 1)) -> None:
        self.clock = clock
        # capacity limits: this process is slot[0] of slot[1] data-plane processes on the
        # node, and the node carries `share` of the cluster's traffic (limits.py)
        self.slot = slot
        self.share = 1.0
        self.limited = False  # some backend has max_conns or max_rps: pick checks limits
        self.saturated = 0  # picks that found backends but every one at its limit
        self.admission: Any = None  # admission.Admission, made by the first request that queues
        self.queued = 0  # requests waiting in it (mirror of its length: one read on the hot path)
        self.rank = 1  # the service's priority (admission.RANK)
        self.hook = hook
        self.backends: dict[str, BackendState] = {}
        self.route = route
        self.opts = ServiceOptions()
        self.balancer: Any = None
        self.budget = RetryBudget()
        self.candidates: list[BackendState] = []
        self.panic = False
        self.eligible_count = 0
        self.n_ejected = 0  # backends of `backends` with ejected set (tick walks them only then)
        self.dirty = True
        self.ramp_until = 0.0
        self.hash_header: bytes | None = None
        self.hash_cookie: bytes | None = None
        self.uses_key = False
        self.track_latency = False
        # O(1) round robin: with the smooth WRR balancer and all candidate weights equal, the
        # smooth order is plain rotation, so `pick` rotates an index instead (decided once
        # per candidate recompute, not per request); retries (excluded backends) still go
        # through the balancer
        self.rotate = False
        self.rot_next = 0
        self.is_swrr = False
        # service totals (per worker)
        self.requests = 0
        self.errors = 0
        self.retries = 0
        self.rejected = 0  # refused before any backend: 503 no backend, limits, bad requests
        self.connections = 0
        self.tunnels = 0  # upgraded (WebSocket) connections open now (tunnel.py)
        self.tunnels_total = 0
        self.apply(route, initial=initial)

    # ---------------------------------------------------------------- snapshot swap
    def apply(self, route: ServiceRoute, initial: bool = False) -> None:
        now = self.clock()
        old_algo = self.route.algorithm if self.balancer is not None else None
        self.route = route
        self.opts = ServiceOptions.from_route(route)
        self.rank = RANK.get(self.opts.priority, RANK["normal"])
        self.budget.ratio = self.opts.retry_budget
        self.budget.minimum = self.opts.retry_budget_min
        seen: set[str] = set()
        for br in route.backends:
            seen.add(br.name)
            st = self.backends.get(br.name)
            if st is None or (st.host, st.port) != (br.host, br.port):
                if st is not None:
                    st.removed = True
                    st.close_pool()
                st = BackendState(br)
                if not initial:
                    st.eligible_since = now  # a backend added later slow-starts
                self.backends[br.name] = st
            else:
                st.set_route(br)
                if br.admin_state != "active" or not br.healthy:
                    st.close_pool()
        for name in [n for n in self.backends if n not in seen]:
            st = self.backends.pop(name)
            st.removed = True
            st.close_pool()
        self.n_ejected = sum(1 for st in self.backends.values() if st.ejected)
        for st in self.backends.values():  # adaptive concurrency: keep what each backend has learned
            if not self.opts.adaptive_concurrency:
                st.adaptive = None
            elif st.adaptive is None:
                st.adaptive = GradientLimit()
        self._apply_limits(now)
        members = tuple((b.name, b.weight) for b in route.backends if b.admin_state != "maint" and b.weight > 0)
        algo = route.algorithm
        spread = wants_server_spread(self.opts.server_balance, algo)
        if self.balancer is None or old_algo != algo or (
            isinstance(self.balancer, Maglev) and self.balancer.members != members
        ) or spread != isinstance(self.balancer, ServerSpread):
            self.balancer = ServerSpread(algo) if spread else make_balancer(algo, members)
        self.uses_key = isinstance(self.balancer, Maglev)
        self.is_swrr = isinstance(self.balancer, SmoothWeightedRoundRobin)
        self.track_latency = (isinstance(getattr(self.balancer, "outer", self.balancer), PeakEwma)
                              or self.opts.adaptive_concurrency)
        hk = (route.hash_key or "source").strip()
        self.hash_header = self.hash_cookie = None
        if hk.lower().startswith("header:"):
            self.hash_header = hk[7:].strip().lower().encode()
        elif hk.lower().startswith("cookie:"):
            self.hash_cookie = hk[7:].strip().encode()
        self.dirty = True
        self._recompute(now, initial=initial)
        if self.admission is not None:
            self.admission.configure(self.opts)
            if self.queued:
                self.admission.wake()  # limits may have been raised, backends added

    def set_share(self, share: float) -> None:
        """The node's fraction of the cluster-wide limits (1.0: this node is the only one)."""
        share = min(max(float(share), 0.0), 1.0)
        if share != self.share:
            self.share = share
            self._apply_limits(self.clock())

    def _apply_limits(self, now: float) -> None:
        index, count = self.slot
        limited = False
        for st in self.backends.values():
            r = st.route
            st.conn_limit = conn_share(r.max_conns, index, count, self.share)
            if st.adaptive is not None:  # learned by this process from its own latencies
                st.conn_limit = min(st.conn_limit, st.adaptive.limit)
            rate = rps_share(r.max_rps, count, self.share)
            if rate != st.rps_rate:
                st.rps_rate = rate
                st.rps_burst = burst_for(rate)
                st.tokens = st.rps_burst
                st.tokens_at = now
            limited = limited or r.max_conns > 0 or rate > 0 or st.adaptive is not None
        self.limited = limited

    def has_room(self, st: BackendState, now: float | None = None) -> bool:
        """Below both limits (refills the token bucket; takes no token)."""
        if st.in_flight >= st.conn_limit:
            return False
        if st.rps_rate > 0:
            if now is None:
                now = self.clock()
            st.tokens = refill(st.tokens, st.tokens_at, now, st.rps_rate, st.rps_burst)
            st.tokens_at = now
            if st.tokens < 1.0:
                return False
        return True

    def _pick_limited(self, cands: list[BackendState], key: bytes | None) -> BackendState | None:
        """pick among the backends with room; takes a token from the one chosen.

        Fast path: the balancer's choice among all candidates usually has room (limits bind
        only under pressure), so the filtered list is built only when it does not."""
        b = self.balancer.pick(cands, key)
        if b is None:
            return None
        if not self.has_room(b):
            b.at_limit += 1
            now = self.clock()
            room = []
            for c in cands:
                if c is b:
                    continue
                if self.has_room(c, now):
                    room.append(c)
                else:
                    c.at_limit += 1
            if not room:
                self.saturated += 1
                return None
            b = self.balancer.pick(room, key)
            if b is None:
                return None
        if b.rps_rate > 0:
            b.tokens -= 1.0
        return b

    def at_capacity(self, exclude: set[BackendState] | None = None) -> bool:
        """True when there are candidates but every one is at a limit (queue, not 503)."""
        if not self.limited:
            return False
        if self.dirty:
            self._recompute(self.clock())
        now = self.clock()
        cands = [c for c in self.candidates if not exclude or c not in exclude]
        return bool(cands) and not any(self.has_room(c, now) for c in cands)

    # ---------------------------------------------------------------- candidates
    def _recompute(self, now: float, initial: bool = False) -> None:
        opts = self.opts
        active = 0
        eligible: list[BackendState] = []
        fallback: list[BackendState] = []
        ramp_until = 0.0
        last_resort: list[BackendState] = []
        for st in self.backends.values():
            r = st.route
            if r.weight <= 0 or r.admin_state == "maint":
                st.was_eligible = False
                continue
            if r.admin_state == "active":
                active += 1
                # panic never picks a draining backend (drain = no new requests, panic or
                # not); an ejected one only when every active backend is ejected
                (last_resort if st.ejected else fallback).append(st)
            ok = r.eligible and not st.ejected
            if ok and not st.was_eligible and not initial and st.eligible_since < now - 1e-9:
                st.eligible_since = now
            st.was_eligible = ok
            w = float(r.weight)
            if opts.slow_start_s > 0 and st.eligible_since > -math.inf:
                frac = (now - st.eligible_since) / opts.slow_start_s
                if frac < 1.0:
                    w = w * max(opts.slow_start_min_weight, frac)
                    ramp_until = max(ramp_until, st.eligible_since + opts.slow_start_s)
            st.weight = max(w, 1e-6)
            if ok:
                eligible.append(st)
        share = len(eligible) / active if active else 0.0
        self.eligible_count = len(eligible)
        self.panic = False
        # fail open (panic) below the threshold, and always when nothing is eligible: with
        # fail_policy "panic" a backend the checks doubt beats a certain 503
        if active and opts.fail_policy == "panic" and (share < opts.panic_threshold or not eligible):
            self.panic = True
            fallback = fallback or last_resort
            for st in fallback:
                st.weight = max(float(st.route.weight), 1e-6)
            self.candidates = fallback
        else:
            self.candidates = eligible
        self.ramp_until = ramp_until
        cands = self.candidates
        self.rotate = (self.is_swrr and len(cands) > 1
                       and all(c.weight == cands[0].weight for c in cands))
        self.dirty = False

    def pick(self, key: bytes | None = None, exclude: set[BackendState] | None = None,
             avoid_servers: set[str] | None = None) -> BackendState | None:
        """Choose a backend for a new request/connection, or None (-> 503)."""
        if self.dirty:
            self._recompute(self.clock())
        cands = self.candidates
        if self.limited:
            if exclude:
                cands = self._prefer(cands, exclude, avoid_servers)
            return self._pick_limited(cands, key)
        if self.rotate and not exclude:
            i = self.rot_next
            if i >= len(cands):
                i = 0
            self.rot_next = i + 1
            return cands[i]
        if exclude:
            cands = self._prefer(cands, exclude, avoid_servers)
        return self.balancer.pick(cands, key)

    def _prefer(self, cands: list[BackendState], exclude: set[BackendState],
                avoid_servers: set[str] | None) -> list[BackendState]:
        cands = [c for c in cands if c not in exclude]
        if avoid_servers and self.opts.server_aware:
            pref = [c for c in cands if not c.server or c.server not in avoid_servers]
            if pref:
                cands = pref
        return cands

    # ---------------------------------------------------------------- outcomes
    def record_success(self, st: BackendState, latency: float | None = None) -> None:
        if st.consecutive_failures:
            st.consecutive_failures = 0
            st.consecutive_connect_failures = 0
        if st.ejection_streak and not st.ejected:
            now = self.clock()
            quiet = min(self.opts.outlier_base_ejection_s * (2 ** st.ejection_streak), self.opts.outlier_max_ejection_s)
            if now - st.ejected_until > quiet:
                st.ejection_streak = 0
        if latency is not None and self.track_latency:
            now = self.clock()
            st.ewma = ewma_update(st.ewma, st.ewma_stamp, latency, now, self.opts.ewma_decay_s)
            st.ewma_stamp = now
            if st.adaptive is not None and st.adaptive.sample(now, latency, st.in_flight):
                old = st.conn_limit
                index, count = self.slot
                st.conn_limit = min(conn_share(st.route.max_conns, index, count, self.share), st.adaptive.limit)
                if st.conn_limit > old and self.admission is not None and self.queued:
                    self.admission.wake()  # room for waiters

    def record_failure(self, st: BackendState, connect: bool, reason: str) -> None:
        """A failed attempt: connect failure, reset, timeout or 5xx; may eject at once."""
        st.errors += 1
        opts = self.opts
        st.consecutive_failures += 1
        if connect:
            st.consecutive_connect_failures += 1
        trip = (connect and opts.outlier_consecutive_connect_failures
                and st.consecutive_connect_failures >= opts.outlier_consecutive_connect_failures) or (
            opts.outlier_consecutive_failures and st.consecutive_failures >= opts.outlier_consecutive_failures)
        if trip and not st.ejected and not st.removed:
            self._eject(st, reason)

    def _eject(self, st: BackendState, reason: str) -> None:
        opts = self.opts
        pool = [b for b in self.backends.values() if b.route.admin_state != "maint" and b.route.weight > 0]
        ejected = sum(1 for b in pool if b.ejected)
        allowed = max(1, int(len(pool) * opts.outlier_max_ejection_percent + 1e-9))
        if ejected >= allowed:
            return
        now = self.clock()
        dur = min(opts.outlier_base_ejection_s * (2 ** st.ejection_streak), opts.outlier_max_ejection_s)
        st.ejected = True
        self.n_ejected += 1
        st.ejected_until = now + dur
        st.ejection_streak += 1
        st.ejections += 1
        st.close_pool()
        self.dirty = True
        log.info("service %s: backend %s ejected for %.1fs (%s)", self.route.name, st.name, dur, reason)
        self._fire(st, True, f"{reason}; ejected for {dur:.1f}s")

    def _fire(self, st: BackendState, ejected: bool, reason: str) -> None:
        if self.hook is not None:
            try:
                self.hook(self.route.name, st.name, ejected, reason)
            except Exception:  # a subscriber bug must not break proxying
                log.exception("ejection hook failed")

    def tick(self, now: float | None = None) -> None:
        """End expired ejections, advance slow start; called a few times per second."""
        if now is None:
            now = self.clock()
        for st in self.backends.values() if self.n_ejected else ():  # at 10k backends: skip the walk
            if st.ejected and now >= st.ejected_until:
                self.n_ejected -= 1
                st.ejected = False
                st.consecutive_failures = 0
                st.consecutive_connect_failures = 0
                self.dirty = True
                log.info("service %s: backend %s returns after ejection", self.route.name, st.name)
                self._fire(st, False, "ejection expired")
        if self.ramp_until and now <= self.ramp_until + 0.5:
            self.dirty = True
        if self.dirty:
            self._recompute(now)
        if self.queued:
            self.admission.wake()  # an ejection ended, a ramp advanced, a token came back

    def retry_after(self) -> int:
        """Seconds a client should wait: the next ejection end if sooner than the default."""
        now = self.clock()
        ends = [b.ejected_until - now for b in self.backends.values() if b.ejected]
        base = self.opts.retry_after_s
        if ends:
            return max(1, min(base, int(math.ceil(min(ends)))))
        return max(1, base)

    # ---------------------------------------------------------------- stats
    def stats(self) -> dict[str, Any]:
        backends = {}
        for st in self.backends.values():
            backends[st.name] = {
                "address": f"{st.host}:{st.port}", "server": st.server,
                "admin_state": st.route.admin_state, "healthy": st.route.healthy,
                "weight": st.route.weight, "effective_weight": round(st.weight, 3),
                "in_flight": st.in_flight, "requests": st.requests, "errors": st.errors,
                "retries": st.retries, "ejected": st.ejected, "ejections": st.ejections,
                "idle_pool": len(st.pool), "ewma_ms": round(st.ewma * 1000, 3),
                "max_conns": st.route.max_conns, "max_rps": st.route.max_rps,
                "limit_conns": st.conn_limit if st.conn_limit < UNLIMITED else None,
                "limit_rps": round(st.rps_rate, 3) or None, "at_limit": st.at_limit,
                **({"adaptive_limit": st.adaptive.limit,
                    "adaptive_min_rtt_ms": round(st.adaptive.min_rtt * 1000, 3) if st.adaptive.min_rtt else None}
                   if st.adaptive is not None else {}),
            }
        return {
            "mode": self.route.mode, "algorithm": self.route.algorithm,
            "listen": f"{self.route.listen_host}:{self.route.listen_port}",
            "panic": self.panic, "eligible": self.eligible_count,
            "in_flight": sum(b.in_flight for b in self.backends.values()),
            "requests": self.requests, "errors": self.errors, "retries": self.retries,
            "rejected": self.rejected, "connections": self.connections,
            "websockets": self.tunnels, "websockets_total": self.tunnels_total,
            "limited": self.limited, "saturated": self.saturated, "share": self.share,
            "priority": self.opts.priority,
            "queue": (self.admission.stats() if self.admission is not None
                      else empty_stats(self.opts.max_queue, self.opts.queue_timeout)),
            "backends": backends,
        }

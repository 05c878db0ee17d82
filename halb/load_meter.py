"""Current load per backend, for the N+1 part of the resilience report.

The data plane counts requests per backend (cumulative) and knows what is in flight; it
does not keep rates, and it should not (the hot path stays free of bookkeeping). The
meter samples those counters once a second and turns them into a request rate over a
sliding window (`window_s`, 10 s).

Whether a service survives losing a server depends on the load of the whole cluster,
not of one balancer: clients spread over every node. So each node serves its own local
load at `GET /v1/load`, and the meter sums the local loads of every registered member
(polled every `cluster_every_s`, 2 s, with a short timeout; a node that does not answer
is listed in `unreachable` and contributes nothing). The summed figure is what the
resilience report uses; it lags the truth by up to a window.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import aiohttp

from halb.tls import AdminTls

log = logging.getLogger("halb.load")

Load = dict[str, dict[str, dict[str, float]]]  # service -> backend -> {"rps", "conns", "conns_avg"}
Demand = dict[str, float]  # service -> requests/s arriving at it (queued and shed ones included)


@dataclass
class MeanWindow:
    """Samples of a gauge (requests in flight) -> its mean over the last `window_s` seconds:
    one instant's in-flight count is noise; the capacity check needs the typical load."""

    window_s: float = 10.0
    samples: deque[tuple[float, int]] = field(default_factory=deque)

    def add(self, t: float, value: int) -> None:
        self.samples.append((t, value))
        while self.samples and t - self.samples[0][0] >= self.window_s:
            self.samples.popleft()

    def mean(self) -> float:
        return sum(v for _, v in self.samples) / len(self.samples) if self.samples else 0.0


@dataclass
class RateWindow:
    """Samples of one cumulative counter -> its rate over the last `window_s` seconds."""

    window_s: float = 10.0
    samples: deque[tuple[float, int]] = field(default_factory=deque)

    def add(self, t: float, count: int) -> None:
        if self.samples and count < self.samples[-1][1]:
            self.samples.clear()  # counter reset (backend re-created): start over
        self.samples.append((t, count))
        while len(self.samples) > 2 and t - self.samples[1][0] >= self.window_s:
            self.samples.popleft()

    def rate(self) -> float:
        if len(self.samples) < 2:
            return 0.0
        (t0, c0), (t1, c1) = self.samples[0], self.samples[-1]
        return (c1 - c0) / (t1 - t0) if t1 > t0 else 0.0


@dataclass
class LoadMeter:
    node_id: str
    stats: Callable[[], dict[str, Any]]  # the data plane's stats()
    peers: Callable[[], list[tuple[str, str]]]  # (member id, api address) of the other members
    token: str
    api_url: Callable[[str, str], str] = AdminTls().url  # (address, path) -> URL: the node's halb.tls.AdminTls
    window_s: float = 10.0
    sample_every_s: float = 1.0
    cluster_every_s: float = 2.0
    _windows: dict[tuple[str, str], RateWindow] = field(init=False, default_factory=dict)
    _last_sample: float | None = field(init=False, default=None)
    _local: Load = field(init=False, default_factory=dict)
    _conn_windows: dict[tuple[str, str], MeanWindow] = field(init=False, default_factory=dict)
    _demand_windows: dict[str, RateWindow] = field(init=False, default_factory=dict)
    _demand: Demand = field(init=False, default_factory=dict)
    # member -> service -> requests/s (window rates summed over backends), from the last
    # cluster refresh: what the capacity shares follow (limits.node_shares)
    _rates_by_member: dict[str, dict[str, float]] = field(init=False, default_factory=dict)
    on_cluster: Callable[[], None] | None = None  # called after every cluster refresh
    _cluster: dict[str, Any] = field(init=False, default_factory=dict)
    # each peer's data-plane self-check as its /v1/load last said (None: no answer); read by
    # halb/dataplane_guard.py for `cluster status`, so that view costs no requests of its own
    peer_dataplane: dict[str, dict[str, Any] | None] = field(init=False, default_factory=dict)
    # bgp mode: each peer's announcements as its /v1/load last said (absent: unknown)
    peer_announcements: dict[str, list[Any]] = field(init=False, default_factory=dict)
    _tasks: list[asyncio.Task[None]] = field(init=False, default_factory=list)

    def start(self, session: aiohttp.ClientSession) -> None:
        self._session = session
        self.sample()
        self._tasks = [asyncio.create_task(self._every(self.sample_every_s, self._sample_async), name="load-sample"),
                       asyncio.create_task(self._every(self.cluster_every_s, self.refresh_cluster), name="load-cluster")]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _every(self, seconds: float, fn: Callable[[], Any]) -> None:
        while True:
            await asyncio.sleep(seconds)
            try:
                await fn()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("load meter")

    async def _sample_async(self) -> None:
        self.sample()

    def sample(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        services = self.stats().get("services", {})
        local: Load = {}
        seen = set()
        last, self._last_sample = self._last_sample, now
        demand: Demand = {}
        for svc, s in services.items():
            if "requests" in s:  # arrivals at the service, before any queue or shedding
                dw = self._demand_windows.get(svc)
                if dw is None:
                    dw = self._demand_windows[svc] = RateWindow(self.window_s)
                    if last is not None:
                        dw.add(last, 0)
                dw.add(now, int(s["requests"]))
                if dw.rate():
                    demand[svc] = round(dw.rate(), 3)
            for be, b in s.get("backends", {}).items():
                key = (svc, be)
                requests, conns = int(b.get("requests", 0)), int(b.get("in_flight", 0))
                w = self._windows.get(key)
                if w is None:
                    if not requests and not conns:
                        continue  # never used: no window, not listed (absent = no load)
                    w = self._windows[key] = RateWindow(self.window_s)
                    if last is not None:
                        w.add(last, 0)  # it had no requests at the previous sample
                seen.add(key)
                w.add(now, requests)
                rps = round(w.rate(), 3)
                cw = self._conn_windows.get(key)
                if cw is None:
                    cw = self._conn_windows[key] = MeanWindow(self.window_s)
                cw.add(now, conns)
                if rps or conns:  # sparse: at 10,000 idle backends /v1/load stays small
                    local.setdefault(svc, {})[be] = {"rps": rps, "conns": conns, "conns_avg": round(cw.mean(), 3)}
        for key in [k for k in self._windows if k not in seen]:
            del self._windows[key]
            self._conn_windows.pop(key, None)
        for svc in [k for k in self._demand_windows if k not in services]:
            del self._demand_windows[svc]
        self._local = local
        self._demand = demand

    def demand(self) -> Demand:
        return self._demand

    def local(self) -> Load:
        return self._local

    def shares(self) -> tuple[dict[str, float], float]:
        """(this node's share per service, the share of a service idle everywhere) from the
        last cluster refresh (limits.node_shares); ({}, 1.0) before the first one.

        Window rates (not the last second's): every node sees nearly the same slow-moving
        numbers, so the shares they compute sum to ~1 even while traffic shifts; the price
        is that a node's limit follows a change in its traffic over about a window."""
        from halb.dataplane.limits import node_shares

        if not self._rates_by_member:
            return {}, 1.0
        return node_shares(self.node_id, self._rates_by_member), 1.0 / len(self._rates_by_member)

    async def refresh_cluster(self) -> None:
        peers = self.peers()

        async def one(member: str, api: str) -> tuple[str, Load | None, Demand]:
            try:
                async with self._session.get(self.api_url(api, "/v1/load"), headers={"Authorization": f"Bearer {self.token}"},
                                             timeout=aiohttp.ClientTimeout(total=1.0)) as resp:
                    if resp.status != 200:
                        self.peer_dataplane[member] = None
                        return member, None, {}
                    body = await resp.json()
                    dp = body.get("dataplane")
                    self.peer_dataplane[member] = dp if isinstance(dp, dict) else None
                    ann = body.get("announcements")
                    if isinstance(ann, list):
                        self.peer_announcements[member] = ann
                    else:
                        self.peer_announcements.pop(member, None)
                    return member, body.get("load", {}), body.get("demand") or {}
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError, AttributeError):
                self.peer_dataplane[member] = None
                return member, None, {}

        results = await asyncio.gather(*(one(m, a) for m, a in peers))
        total: Load = {}
        demand: Demand = {}
        nodes, unreachable = [self.node_id], []
        rates: dict[str, dict[str, float]] = {}
        for member, load, dem in [(self.node_id, self._local, self._demand), *results]:
            if load is None:
                unreachable.append(member)
                continue
            for svc, v in dem.items():
                demand[svc] = round(demand.get(svc, 0.0) + float(v), 3)
            if member != self.node_id:
                nodes.append(member)
            mine = rates[member] = {}
            for svc, backends in load.items():
                for be, v in backends.items():
                    mine[svc] = mine.get(svc, 0.0) + float(v.get("rps", 0.0))
                    cur = total.setdefault(svc, {}).setdefault(be, {"rps": 0.0, "conns": 0})
                    cur["rps"] = round(cur["rps"] + float(v.get("rps", 0.0)), 3)
                    cur["conns"] += int(v.get("conns", 0))
                    cur["conns_avg"] = round(cur.get("conns_avg", 0.0) + float(v.get("conns_avg", v.get("conns", 0))), 3)
        self._cluster = {"load": total, "demand": demand, "nodes": sorted(nodes), "unreachable": sorted(unreachable),
                         "at": time.time(), "window_s": self.window_s}
        self._rates_by_member = rates
        if self.on_cluster is not None:
            self.on_cluster()

    def cluster(self) -> dict[str, Any]:
        """Summed load of every member that answered (this node's own until the first poll)."""
        if not self._cluster:
            return {"load": self._local, "demand": self._demand, "nodes": [self.node_id], "unreachable": [],
                    "at": time.time(), "window_s": self.window_s}
        return self._cluster

"""Capacity limits without sockets: the share arithmetic (limits.py) and how ServiceRuntime.pick
passes over a backend at its max_conns / max_rps, per algorithm, per worker slot."""
from __future__ import annotations

import pytest

from halb.dataplane.limits import UNLIMITED, conn_share, node_shares, refill, rps_share
from halb.dataplane.routing import ServiceRuntime
from halb.dataplane.snapshot import BackendRoute, RoutingSnapshot, ServiceRoute
from halb.dataplane.stats import merge_stats


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def route(limits: dict[str, tuple[int, float]], algorithm: str = "round_robin") -> ServiceRoute:
    bs = tuple(BackendRoute(name=n, host="127.0.0.1", port=9000 + i, weight=1, server=n,
                            max_conns=mc, max_rps=mr) for i, (n, (mc, mr)) in enumerate(sorted(limits.items())))
    return ServiceRoute(name="web", mode="http", listen_host="127.0.0.1", listen_port=0, algorithm=algorithm,
                        backends=bs)


def hold(rt: ServiceRuntime, n: int) -> list[str]:
    """Pick n times and keep every request in flight (never finished)."""
    out = []
    for _ in range(n):
        b = rt.pick()
        if b is None:
            out.append("-")
            continue
        b.in_flight += 1
        out.append(b.name)
    return out


# --- share arithmetic ------------------------------------------------------------------

def test_conn_share_splits_exactly_over_worker_processes() -> None:
    assert conn_share(0, 0, 4) == UNLIMITED
    for n in (1, 2, 5, 7, 100):
        for w in (1, 2, 3, 4):
            shares = [conn_share(n, i, w) for i in range(w)]
            assert sum(shares) == n and max(shares) - min(shares) <= 1
    assert [conn_share(2, i, 4) for i in range(4)] == [1, 1, 0, 0]  # 0: this process may not use it


def test_conn_share_of_a_node_rounds_down_but_keeps_one() -> None:
    assert conn_share(10, 0, 1, 0.5) == 5
    assert conn_share(10, 0, 1, 0.33) == 3
    assert conn_share(10, 0, 1, 0.01) == 1
    assert conn_share(10, 0, 1, 1.0) == 10


def test_rps_share_and_refill() -> None:
    assert rps_share(0, 4) == 0.0
    assert rps_share(100, 4) == 25.0 and rps_share(100, 1, 0.5) == 50.0
    assert refill(0.0, 10.0, 10.5, rate=4.0, burst=10.0) == 2.0
    assert refill(0.0, 10.0, 99.0, rate=4.0, burst=10.0) == 10.0  # capped at the burst
    assert refill(3.0, 10.0, 9.0, rate=4.0, burst=10.0) == 3.0  # clock went back: nothing


# --- pick with limits ----------------------------------------------------------------------

@pytest.mark.parametrize("algorithm", ["round_robin", "least_conn", "p2c", "peak_ewma", "maglev"])
def test_max_conns_holds_for_every_algorithm(algorithm: str) -> None:
    rt = ServiceRuntime(route({"a": (2, 0.0), "b": (3, 0.0)}, algorithm), clock=Clock())
    got = hold(rt, 8)
    assert got.count("a") == 2 and got.count("b") == 3 and got.count("-") == 3
    assert rt.at_capacity() and rt.saturated == 3
    rt.backends["a"].in_flight -= 1  # one finishes: exactly one more fits, on a
    assert hold(rt, 2) == ["a", "-"]


def test_unlimited_backend_takes_the_overflow_of_a_limited_one() -> None:
    rt = ServiceRuntime(route({"a": (1, 0.0), "b": (0, 0.0)}), clock=Clock())
    got = hold(rt, 10)
    assert got.count("a") == 1 and got.count("b") == 9 and not rt.at_capacity()
    assert rt.backends["a"].at_limit >= 1  # the balancer chose it while full, at least once


def test_max_rps_is_a_token_bucket() -> None:
    clock = Clock()
    rt = ServiceRuntime(route({"a": (0, 20.0)}), clock=clock)  # burst: max(1, 20 * 0.1) = 2
    got = [b.name if (b := rt.pick()) else "-" for _ in range(5)]
    assert got == ["a", "a", "-", "-", "-"]
    clock.t += 0.06  # one token back (20/s: one per 50 ms)
    assert [b.name if (b := rt.pick()) else "-" for _ in range(2)] == ["a", "-"]
    clock.t += 10.0  # idle: the bucket refills to its burst only
    assert [b.name if (b := rt.pick()) else "-" for _ in range(3)] == ["a", "a", "-"]


def test_worker_slots_split_the_limit() -> None:
    r = route({"a": (3, 0.0)})
    procs = [ServiceRuntime(r, clock=Clock(), slot=(i, 2)) for i in range(2)]
    assert [len([x for x in hold(p, 5) if x == "a"]) for p in procs] == [2, 1]  # 3 in total, never 4


def test_limits_follow_a_new_snapshot_live() -> None:
    rt = ServiceRuntime(route({"a": (1, 0.0)}), clock=Clock())
    assert hold(rt, 3) == ["a", "-", "-"]
    rt.apply(route({"a": (3, 0.0)}))  # `backend set --max-conns 3`
    assert hold(rt, 3) == ["a", "a", "-"]
    rt.apply(route({"a": (0, 0.0)}))  # 0: no limit
    assert not rt.limited and hold(rt, 2) == ["a", "a"]


def test_node_share_scales_the_limit() -> None:
    rt = ServiceRuntime(route({"a": (10, 0.0)}), clock=Clock())
    rt.set_share(0.5)
    assert hold(rt, 7).count("a") == 5


def test_retry_excluding_the_only_backend_with_room_finds_none() -> None:
    rt = ServiceRuntime(route({"a": (1, 0.0), "b": (1, 0.0)}), clock=Clock())
    a = rt.backends["a"]
    b = rt.backends["b"]
    b.in_flight = 1
    assert rt.pick(exclude={a}) is None  # b is full, a excluded (already tried)
    assert rt.pick() is a


def test_limits_reach_workers_and_stats_merge() -> None:
    snap = RoutingSnapshot(version=3, services=(route({"a": (4, 7.5)}),))
    back = RoutingSnapshot.from_wire(snap.to_wire())
    assert back.services[0].backends[0].max_conns == 4 and back.services[0].backends[0].max_rps == 7.5
    parts = []
    for i in range(2):
        rt = ServiceRuntime(back.services[0], clock=Clock(), slot=(i, 2))
        parts.append({"node_id": "n1", "version": 3, "services": {"web": rt.stats()}})
    merged = merge_stats(parts)["services"]["web"]["backends"]["a"]
    assert merged["limit_conns"] == 4 and merged["limit_rps"] == 7.5 and merged["max_conns"] == 4
    unlimited = [{"services": {"web": ServiceRuntime(route({"a": (0, 0.0)})).stats()}} for _ in range(2)]
    assert merge_stats(unlimited)["services"]["web"]["backends"]["a"]["limit_conns"] is None


def test_node_shares_follow_the_traffic_each_node_carries() -> None:
    recent = {"n1": {"web": 30.0, "api": 0.0}, "n2": {"web": 10.0, "api": 5.0}, "n3": {"web": 0.0}}
    assert node_shares("n1", recent) == {"web": 0.75, "api": 1 / 3}  # api: idle here -> even split
    assert node_shares("n2", recent) == {"web": 0.25, "api": 1.0}
    assert node_shares("n3", recent) == {"web": 1 / 3, "api": 1 / 3}
    # the nodes' max_conns shares of a backend with 12 in steady state: 9 + 3 (+ n3's even split)
    assert conn_share(12, 0, 1, 0.75) + conn_share(12, 0, 1, 0.25) == 12
    # the VIP holder alone: everything; a dead node (not reporting) leaves its share to the others
    assert node_shares("n1", {"n1": {"web": 50.0}, "n2": {"web": 0.0}}) == {"web": 1.0}
    assert node_shares("n1", {"n1": {"web": 5.0}}) == {"web": 1.0}
    assert node_shares("n1", {"n1": {}, "n2": {}}) == {}


def test_slow_start_never_pushes_a_returning_backend_above_its_limit() -> None:
    clock = Clock()
    r = ServiceRoute(name="web", mode="http", listen_host="127.0.0.1", listen_port=0, backends=tuple(
        BackendRoute(name=n, host="127.0.0.1", port=9000 + i, weight=1, server=n, max_conns=3)
        for i, n in enumerate("ab")), options=(("slow_start_s", 10.0),))
    rt = ServiceRuntime(r, clock=clock)
    rt.apply(ServiceRoute(**{**r.__dict__, "backends": (r.backends[0],
                                                        BackendRoute(**{**r.backends[1].__dict__, "healthy": False}))}))
    rt.apply(r)  # b is back: it ramps up from 10 % of its weight
    assert rt.backends["b"].weight < 0.2
    for _ in range(20):  # ramp over time while requests pile up: b never above 3, a neither
        clock.t += 1.0
        rt.tick()
        hold(rt, 2)
        assert rt.backends["a"].in_flight <= 3 and rt.backends["b"].in_flight <= 3
    assert rt.backends["b"].in_flight == 3

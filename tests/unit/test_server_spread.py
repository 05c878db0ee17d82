"""Server-first balancing (halb/dataplane/server_spread.py) and retries across servers."""
from __future__ import annotations

from collections import Counter

from halb.dataplane.routing import ServiceRuntime
from halb.dataplane.server_spread import ServerSpread
from halb.dataplane.snapshot import BackendRoute, ServiceRoute


def svc(algorithm: str = "round_robin", weights: dict[str, int] | None = None, **opts: object) -> ServiceRoute:
    weights = weights or {}
    servers = {"a1": "A", "a2": "A", "b1": "B", "c1": "C"}
    bs = tuple(BackendRoute(n, "127.0.0.1", 9000 + i, weights.get(n, 100), server=s)
               for i, (n, s) in enumerate(servers.items()))
    return ServiceRoute("web", "http", "127.0.0.1", 0, algorithm=algorithm, backends=bs,
                        options=tuple(sorted(opts.items())))


def servers_of(rt: ServiceRuntime, n: int) -> list[str]:
    return [rt.pick().server for _ in range(n)]


def test_off_by_default_keeps_the_flat_balancer():
    rt = ServiceRuntime(svc())
    assert not isinstance(rt.balancer, ServerSpread)


def test_round_robin_server_first_shares_follow_summed_weights_and_interleave():
    rt = ServiceRuntime(svc(server_balance=True))
    assert isinstance(rt.balancer, ServerSpread)
    seq = servers_of(rt, 400)
    assert Counter(seq) == {"A": 200, "B": 100, "C": 100}  # A: 100 + 100
    assert all(seq[i:i + 4].count("A") <= 2 for i in range(0, 396))  # spread, no run of A
    names = Counter(rt.pick().name for _ in range(400))
    assert names["a1"] == names["a2"] == 100


def test_ejected_instance_lowers_its_servers_share():
    rt = ServiceRuntime(svc(server_balance=True, outlier_max_ejection_percent=1.0))
    rt._eject(rt.backends["a2"], "test")
    assert Counter(servers_of(rt, 300)) == {"A": 100, "B": 100, "C": 100}


def test_least_conn_compares_servers_by_summed_load():
    rt = ServiceRuntime(svc("least_conn", server_balance=True))
    rt.backends["a1"].in_flight = 3
    rt.backends["a2"].in_flight = 3  # server A: 6 in flight over weight 200 -> 0.035
    rt.backends["b1"].in_flight = 2  # B: 3/100 = 0.03 ; C: 1/100
    assert rt.pick().name == "c1"
    rt.backends["c1"].in_flight = 5
    assert rt.pick().name == "b1"


def test_maglev_ignores_the_option_and_option_toggles_with_updates():
    rt = ServiceRuntime(svc("maglev", server_balance=True))
    assert not isinstance(rt.balancer, ServerSpread)
    rt2 = ServiceRuntime(svc())
    rt2.apply(svc(server_balance=True))
    assert isinstance(rt2.balancer, ServerSpread)
    rt2.apply(svc())
    assert not isinstance(rt2.balancer, ServerSpread)


def test_retry_prefers_another_server_with_and_without_server_balance():
    for opts in ({}, {"server_balance": True}):
        rt = ServiceRuntime(svc(**opts))
        a1 = rt.backends["a1"]
        got = Counter(rt.pick(exclude={a1}, avoid_servers={"A"}).name for _ in range(40))
        assert set(got) == {"b1", "c1"}, (opts, got)

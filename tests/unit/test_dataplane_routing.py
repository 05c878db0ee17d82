"""Routing state without sockets: outlier ejection, panic/fail-closed, slow start, admin
states, retry budget, option parsing, snapshot wire round trip."""
from __future__ import annotations

from collections import Counter

from halb.dataplane.budget import RetryBudget
from halb.dataplane.options import ServiceOptions
from halb.dataplane.routing import ServiceRuntime
from halb.dataplane.snapshot import BackendRoute, RoutingSnapshot, ServiceRoute
from halb.dataplane.stats import merge_stats


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def route(n: int = 3, *, states: dict[str, str] | None = None, unhealthy: set[str] | None = None,
          algorithm: str = "round_robin", **opts: object) -> ServiceRoute:
    states = states or {}
    unhealthy = unhealthy or set()
    bs = tuple(BackendRoute(name=f"b{i}", host="127.0.0.1", port=9000 + i, weight=1,
                            admin_state=states.get(f"b{i}", "active"), healthy=f"b{i}" not in unhealthy,
                            server=f"s{i}") for i in range(n))
    return ServiceRoute(name="web", mode="http", listen_host="127.0.0.1", listen_port=0, algorithm=algorithm,
                        backends=bs, options=tuple(sorted(opts.items())))


def picks(rt: ServiceRuntime, n: int = 300) -> Counter[str]:
    c: Counter[str] = Counter()
    for _ in range(n):
        b = rt.pick()
        c[b.name if b else None] += 1  # type: ignore[index]
    return c


def test_connect_failure_ejects_at_once_with_exponential_backoff_and_hook() -> None:
    clock = Clock()
    events: list[tuple[str, str, bool, str]] = []
    rt = ServiceRuntime(route(4), hook=lambda *a: events.append(a), clock=clock)
    b1 = rt.backends["b1"]
    rt.record_failure(b1, True, "connect refused")
    assert b1.ejected and b1.ejections == 1
    assert events[-1][:3] == ("web", "b1", True)
    assert "b1" not in picks(rt)
    clock.t += 1.9
    rt.tick()
    assert b1.ejected
    clock.t += 0.2  # base 2 s elapsed
    rt.tick()
    assert not b1.ejected and events[-1][:3] == ("web", "b1", False)
    assert "b1" in picks(rt)
    rt.record_failure(b1, True, "connect refused")  # second ejection in a row: 4 s
    assert b1.ejected
    clock.t += 3.0
    rt.tick()
    assert b1.ejected
    clock.t += 1.1
    rt.tick()
    assert not b1.ejected


def test_5xx_needs_consecutive_failures_and_success_resets() -> None:
    clock = Clock()
    rt = ServiceRuntime(route(3, outlier_consecutive_failures=3), clock=clock)
    b = rt.backends["b0"]
    rt.record_failure(b, False, "503")
    rt.record_failure(b, False, "503")
    rt.record_success(b, 0.01)
    rt.record_failure(b, False, "503")
    rt.record_failure(b, False, "503")
    assert not b.ejected
    rt.record_failure(b, False, "503")
    assert b.ejected
    assert b.errors == 5


def test_max_ejection_percent_caps_ejections() -> None:
    clock = Clock()
    rt = ServiceRuntime(route(4), clock=clock)  # 50 % of 4 = 2
    for name in ("b0", "b1", "b2", "b3"):
        rt.record_failure(rt.backends[name], True, "refused")
    assert sum(b.ejected for b in rt.backends.values()) == 2
    rt2 = ServiceRuntime(route(2, outlier_max_ejection_percent=0.0), clock=clock)
    rt2.record_failure(rt2.backends["b0"], True, "refused")
    rt2.record_failure(rt2.backends["b1"], True, "refused")
    assert sum(b.ejected for b in rt2.backends.values()) == 1  # at least one may always go


def test_panic_routes_to_all_non_maint_backends() -> None:
    clock = Clock()
    rt = ServiceRuntime(route(4, unhealthy={"b0", "b1", "b2"}, states={"b3": "active"}, panic_threshold=0.5),
                        clock=clock)
    c = picks(rt, 400)
    assert rt.panic
    assert set(c) == {"b0", "b1", "b2", "b3"}
    # above the threshold: only healthy ones
    rt.apply(route(4, unhealthy={"b0"}, panic_threshold=0.5))
    assert not rt.panic
    assert set(picks(rt)) == {"b1", "b2", "b3"}
    # maint stays out even in panic
    rt.apply(route(4, unhealthy={"b0", "b1", "b2"}, states={"b2": "maint"}, panic_threshold=0.5))
    assert rt.panic and set(picks(rt)) == {"b0", "b1", "b3"}


def test_default_panics_only_when_no_backend_is_eligible() -> None:
    clock = Clock()
    # two of three down (the kill-two-backends drill): the healthy one takes everything
    rt = ServiceRuntime(route(3, unhealthy={"b0", "b1"}), clock=clock)
    assert not rt.panic and set(picks(rt)) == {"b2"}
    # all three marked down (a broken check): fail open to all rather than 503 everything
    rt.apply(route(3, unhealthy={"b0", "b1", "b2"}))
    assert rt.panic and set(picks(rt)) == {"b0", "b1", "b2"}


def test_fail_closed_uses_only_healthy_and_returns_none_when_empty() -> None:
    clock = Clock()
    rt = ServiceRuntime(route(4, unhealthy={"b0", "b1", "b2"}, fail_policy="closed"), clock=clock)
    assert not rt.panic
    assert set(picks(rt)) == {"b3"}
    rt.apply(route(4, unhealthy={"b0", "b1", "b2", "b3"}, fail_policy="closed"))
    assert rt.pick() is None
    assert rt.retry_after() >= 1


def test_drain_and_maint_out_of_rotation_but_stats_kept() -> None:
    clock = Clock()
    rt = ServiceRuntime(route(3), clock=clock)
    b0 = rt.backends["b0"]
    b0.in_flight = 2  # in-flight work on b0
    rt.apply(route(3, states={"b0": "drain", "b1": "maint"}))
    assert rt.backends["b0"] is b0  # same state object: in-flight accounting survives the swap
    assert set(picks(rt)) == {"b2"}
    s = rt.stats()
    assert s["backends"]["b0"]["in_flight"] == 2 and s["backends"]["b0"]["admin_state"] == "drain"


def test_slow_start_ramps_weight_linearly() -> None:
    clock = Clock()
    rt = ServiceRuntime(route(2, unhealthy={"b1"}, slow_start_s=10.0), clock=clock)
    rt.apply(route(2, slow_start_s=10.0, panic_threshold=0.0))  # b1 becomes healthy now
    b0, b1 = rt.backends["b0"], rt.backends["b1"]
    assert b0.weight == 1.0 and abs(b1.weight - 0.1) < 1e-9  # starts at the minimum share
    clock.t += 5
    rt.tick()
    assert abs(b1.weight - 0.5) < 0.01
    share = picks(rt, 1500)["b1"] / 1500
    assert 0.28 < share < 0.38  # 0.5 / 1.5
    clock.t += 5.1
    rt.tick()
    assert b1.weight == 1.0


def test_backends_of_first_snapshot_do_not_slow_start() -> None:
    rt = ServiceRuntime(route(2, slow_start_s=30.0), clock=Clock())
    assert all(b.weight == 1.0 for b in rt.backends.values())


def test_pick_excludes_tried_and_prefers_other_server() -> None:
    bs = (BackendRoute("a1", "127.0.0.1", 1, 1, server="A"), BackendRoute("a2", "127.0.0.1", 2, 1, server="A"),
          BackendRoute("c1", "127.0.0.1", 3, 1, server="C"))
    rt = ServiceRuntime(ServiceRoute("web", "http", "127.0.0.1", 0, backends=bs), clock=Clock())
    a1 = rt.backends["a1"]
    for _ in range(20):
        assert rt.pick(exclude={a1}, avoid_servers={"A"}).name == "c1"
    rt2 = ServiceRuntime(ServiceRoute("web", "http", "127.0.0.1", 0, backends=bs,
                                      options=(("server_aware", False),)), clock=Clock())
    got = {rt2.pick(exclude={rt2.backends["a1"]}, avoid_servers={"A"}).name for _ in range(20)}
    assert got == {"a2", "c1"}


def test_removed_backend_marked_and_new_backend_added() -> None:
    rt = ServiceRuntime(route(3), clock=Clock())
    old = rt.backends["b2"]
    rt.apply(route(2))
    assert old.removed and "b2" not in rt.backends


def test_retry_budget_ratio_plus_minimum() -> None:
    t = [0.0]
    bud = RetryBudget(ratio=0.2, minimum=3, clock=lambda: t[0])
    assert sum(bud.try_withdraw() for _ in range(10)) == 3  # only the minimum without traffic
    for _ in range(100):
        bud.deposit()
    assert sum(bud.try_withdraw() for _ in range(100)) == 20  # 20 % of 100 live requests
    t[0] += 11  # window passed
    assert sum(bud.try_withdraw() for _ in range(10)) == 3


def test_options_defaults_and_bad_values() -> None:
    r = ServiceRoute("x", "http", "127.0.0.1", 0, options=(
        ("connect_timeout", "0.5"), ("retries", 4), ("fail_policy", "bogus"), ("nope", 1),
        ("retry_on_status", "502,503"), ("server_aware", "false"), ("max_body_bytes", -5)))
    o = ServiceOptions.from_route(r)
    assert o.connect_timeout == 0.5 and o.retries == 4
    assert o.fail_policy == "panic" and o.retry_on_status == (502, 503) and o.server_aware is False
    assert o.max_body_bytes == 0 and o.retry_budget == 0.2


def test_snapshot_wire_round_trip() -> None:
    snap = RoutingSnapshot(3, (route(2, retries=1),))
    assert RoutingSnapshot.from_wire(snap.to_wire()) == snap


def test_merge_stats_sums_workers() -> None:
    a = {"node_id": "n", "version": 1, "workers": [{"pid": 1}], "services": {"web": {
        "requests": 3, "errors": 1, "panic": False, "backends": {"b0": {"requests": 3, "ejected": False}}}}}
    b = {"node_id": "n", "version": 1, "workers": [{"pid": 2}], "services": {"web": {
        "requests": 4, "errors": 0, "panic": True, "backends": {"b0": {"requests": 4, "ejected": True}}}}}
    m = merge_stats([a, b])
    assert m["services"]["web"]["requests"] == 7 and m["services"]["web"]["panic"] is True
    assert m["services"]["web"]["backends"]["b0"] == {"requests": 7, "ejected": True}
    assert len(m["workers"]) == 2


def test_round_robin_equal_weights_rotates_in_o1_and_retries_still_exclude() -> None:
    # equal weights: ServiceRuntime.pick rotates an index (the smooth WRR order for equal
    # weights) instead of scanning; unequal weights and retries use the balancer
    rt = ServiceRuntime(route(3), clock=Clock())
    assert rt.rotate
    assert [rt.pick().name for _ in range(6)] == ["b0", "b1", "b2", "b0", "b1", "b2"]
    b0 = rt.backends["b0"]
    assert all(rt.pick(exclude={b0}).name != "b0" for _ in range(10))
    counts: dict[str, int] = {}
    for _ in range(300):
        n = rt.pick().name
        counts[n] = counts.get(n, 0) + 1
    assert counts == {"b0": 100, "b1": 100, "b2": 100}
    bs = (BackendRoute("a", "127.0.0.1", 1, 5), BackendRoute("b", "127.0.0.1", 2, 1), BackendRoute("c", "127.0.0.1", 3, 1))
    rt2 = ServiceRuntime(ServiceRoute("web", "http", "127.0.0.1", 0, backends=bs), clock=Clock())
    assert not rt2.rotate
    assert [rt2.pick().name for _ in range(7)] == ["a", "a", "b", "a", "c", "a", "a"]

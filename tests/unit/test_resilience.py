"""The resilience report (halb/resilience.py): servers, zones and N+1 capacity."""
from __future__ import annotations

from halb.resilience import Instance, assess, instances_from_rows


def I(name: str, server: str, **kw) -> Instance:  # noqa: E743 - short name for tables
    return Instance(name=name, server=server, **kw)


def test_one_server_two_instances_does_not_survive():
    r = assess("checkout", [I("A", "A"), I("A2", "A")])
    assert r.servers_healthy == ["A"] and r.instances_per_server == {"A": 2}
    assert not r.survives_server_loss and r.status == "at_risk"
    assert "all 2 healthy instances of checkout run on server A: one crash takes checkout down" in r.warnings
    assert r.n_plus_one is None and r.survives_zone_loss is None


def test_single_instance():
    r = assess("web", [I("A", "A")])
    assert r.warnings == ["the only healthy instance of web runs on server A: one crash takes web down"]


def test_two_servers_survive_and_crowding_is_noted():
    r = assess("checkout", [I("A", "A"), I("A2", "A"), I("B", "B")])
    assert r.survives_server_loss and r.status == "ok"
    assert r.warnings == ["server A runs 2 of the 3 healthy instances of checkout: they fail together"]


def test_three_servers_one_down():
    r = assess("checkout", [I("A", "A", healthy=False), I("A2", "A", healthy=False), I("B", "B"), I("C", "C")])
    assert r.servers_down == ["A"] and r.servers_healthy == ["B", "C"]
    assert r.survives_server_loss and r.status == "ok"
    assert r.warnings[0] == "server A is down (2 instances of checkout not healthy)"


def test_two_servers_one_down_does_not_survive_another():
    r = assess("checkout", [I("A", "A", healthy=False), I("B", "B")])
    assert r.status == "at_risk" and not r.survives_another_server_loss
    assert any(w.startswith("checkout does not survive another server loss: the only healthy instance")
               for w in r.warnings)


def test_all_down():
    r = assess("checkout", [I("A", "A", healthy=False)])
    assert r.status == "down" and r.healthy_instances == 0
    assert "checkout has no healthy instance: it is down" in r.warnings


def test_capacity_n_plus_one_holds_and_fails():
    # 3 servers, 40 rps each, 50 rps load: losing any one leaves 80 >= 50
    insts = [I(n, n, max_rps=40, rps=50 / 3) for n in ("A", "B", "C")]
    r = assess("checkout", insts)
    assert r.n_plus_one is True and r.capacity[0].remaining == 80 and r.status == "ok"
    # after A is lost: B + C carry 80, but losing B leaves 40 < 50
    insts = [I("A", "A", max_rps=40, healthy=False), I("B", "B", max_rps=40, rps=25), I("C", "C", max_rps=40, rps=25)]
    r = assess("checkout", insts)
    assert r.survives_server_loss and r.n_plus_one is False and r.status == "at_risk"
    assert not r.survives_another_server_loss
    assert ("checkout does not survive another server loss (capacity): if server B dies, server C can carry "
            "40 rps but checkout takes 50 rps now") in r.warnings


def test_capacity_worst_server_is_the_biggest():
    insts = [I("A", "A", max_rps=40, rps=30), I("A2", "A", max_rps=40, rps=30), I("B", "B", max_rps=40, rps=30)]
    r = assess("checkout", insts)
    c = r.capacity[0]
    assert c.worst_server == "A" and c.remaining == 40 and c.load == 90 and not c.ok


def test_capacity_conns_and_unknown_when_partial():
    r = assess("db", [I("A", "A", max_conns=10, conns=4), I("B", "B", max_conns=10, conns=4)])
    assert r.n_plus_one is True and r.capacity[0].dimension == "conns"
    r = assess("db", [I("A", "A", max_conns=10, conns=8), I("B", "B", max_conns=10, conns=8)])
    assert r.n_plus_one is False
    r = assess("db", [I("A", "A", max_conns=10), I("B", "B")])
    assert r.n_plus_one is None and r.capacity == []


def test_zones():
    r = assess("checkout", [I("A", "A", zone="z1"), I("B", "B", zone="z1")])
    assert r.survives_server_loss and r.survives_zone_loss is False and r.status == "at_risk"
    assert "all healthy instances of checkout are in zone z1: one zone outage takes checkout down" in r.warnings
    r = assess("checkout", [I("A", "A", zone="z1"), I("B", "B", zone="z2")])
    assert r.survives_zone_loss is True and r.zones_healthy == ["z1", "z2"] and r.status == "ok"


def test_rows_conversion_counts_drain_and_weight_zero_as_unhealthy():
    rows = [{"name": "A", "address": "10.0.0.1:80", "server": "", "verdict": "up", "admin_state": "drain", "weight": 100},
            {"name": "B", "address": "10.0.0.2:80", "server": "B", "verdict": "up", "admin_state": "active", "weight": 0},
            {"name": "C", "address": "10.0.0.3:80", "server": "C", "verdict": "up", "admin_state": "active",
             "weight": 100, "max_rps": 5}]
    insts = instances_from_rows(rows, {"C": {"rps": 3, "conns": 1}})
    assert [i.healthy for i in insts] == [False, False, True]
    assert insts[0].server == "10.0.0.1" and insts[2].rps == 3
    d = assess("x", insts).to_dict()
    assert d["survives_another_server_loss"] is False and d["status"] == "at_risk"


def test_drained_server_is_not_reported_as_down():
    """Issue 12: `halb backend drain B` made the report say "server B is down"."""
    rows = [{"name": "A", "server": "A", "address": "a:1", "verdict": "up", "admin_state": "active", "weight": 100},
            {"name": "B", "server": "B", "address": "b:1", "verdict": "up", "admin_state": "drain", "weight": 100},
            {"name": "C", "server": "C", "address": "c:1", "verdict": "up", "admin_state": "maint", "weight": 100},
            {"name": "D", "server": "D", "address": "d:1", "verdict": "up", "admin_state": "active", "weight": 0},
            {"name": "E", "server": "E", "address": "e:1", "verdict": "down", "admin_state": "active", "weight": 100},
            {"name": "E2", "server": "E", "address": "e:2", "verdict": "up", "admin_state": "drain", "weight": 100}]
    r = assess("checkout", instances_from_rows(rows))
    assert "server B takes no new requests (B drained)" in r.warnings
    assert "server C takes no new requests (C in maintenance)" in r.warnings
    assert "server D takes no new requests (D weight 0)" in r.warnings
    assert "server E is down or out of rotation (E not healthy, E2 drained)" in r.warnings
    assert not any(w.startswith(("server B is down", "server C is down", "server D is down")) for w in r.warnings)


def test_report_carries_the_load_numbers():
    r = assess("checkout", [I("A", "A", rps=10.5, conns=2), I("B", "B", rps=4.25, conns=1)])
    assert r.rps == 14.75 and r.conns == 3
    assert r.to_dict()["rps"] == 14.75


# --- capacity on the loss of one server (server_losses) -----------------------------

from halb.resilience import ServiceDemand, server_losses, worst_verdict  # noqa: E402


def drill_services(checkout_conns: float, browse_conns: float, browse_demand: float = 0.0,
                   browse_served: float = 0.0) -> tuple[ServiceDemand, ServiceDemand]:
    """The overload drill's shape: checkout (critical) and browse (low) on servers A, B, C,
    5 in flight allowed per backend of each; the conns are per backend."""
    def insts(conns: float, rps: float) -> tuple[Instance, ...]:
        return tuple(I(s, s, max_conns=5, conns_avg=conns, rps=rps) for s in "ABC")
    return (ServiceDemand("checkout", "critical", insts(checkout_conns, 10.0), 30.0),
            ServiceDemand("browse", "low", insts(browse_conns, browse_served / 3), browse_demand))


def test_idle_service_survives_every_server_loss():
    checkout, browse = drill_services(0, 0)
    losses = server_losses(checkout, [browse])
    assert [(x.server, x.verdict) for x in losses] == [("A", "survives"), ("B", "survives"), ("C", "survives")]
    assert all(x.capacity_known and x.answer == "survives" for x in losses)
    r = assess("checkout", list(checkout.instances), None, losses)
    assert r.server_loss_verdict == "survives" and r.status == "ok"


def test_no_capacity_declared_is_topology_only():
    sd = ServiceDemand("web", "normal", (I("A", "A"), I("A2", "A"), I("B", "B")))
    losses = server_losses(sd)
    assert [(x.server, x.verdict, x.capacity_known) for x in losses] == [("A", "survives", False),
                                                                         ("B", "survives", False)]
    only = server_losses(ServiceDemand("web", "normal", (I("A", "A"),)))
    assert only[0].verdict == "overloaded" and "no other server" in only[0].detail


def test_drill_load_degrades_losing_a_and_names_what_is_shed():
    # 70 % load: checkout ~2.1 in flight per backend, browse ~4.9 (of 5)
    checkout, browse = drill_services(2.1, 4.9, browse_demand=73.5, browse_served=73.5)
    losses = server_losses(checkout, [browse])
    a = losses[0]
    assert a.server == "A" and a.verdict == "degraded" and a.answer == "degraded (sheds low priority)"
    assert [(n.service, n.dimension) for n in a.sheds] == [("browse", "conns")]
    assert round(a.sheds[0].need, 1) == 14.7 and a.sheds[0].capacity == 10
    assert "would be shed: browse (low)" in a.detail
    r = assess("checkout", list(checkout.instances), None, losses)
    assert r.server_loss_verdict == "degraded" and r.status == "ok"  # checkout itself is fine
    assert any(w.startswith("if server A fails: degraded (sheds low priority)") for w in r.warnings)
    # browse's own answer: it does not fit, and nothing is below it
    b = server_losses(browse, [checkout])
    assert worst_verdict(b) == "overloaded" and not b[0].sheds


def test_demand_above_what_was_served_scales_the_need():
    """Limits cap what reaches the backends; arrivals (queued, shed) show the real need."""
    checkout, browse = drill_services(2.1, 3.0, browse_demand=60.0, browse_served=30.0)
    (a, *_) = server_losses(checkout, [browse])
    assert a.sheds and round(a.sheds[0].need, 1) == 18.0  # 9 in flight x 60/30


def test_checkout_that_does_not_fit_is_overloaded_and_at_risk():
    checkout, browse = drill_services(4.0, 0)  # 12 in flight on 10 left
    losses = server_losses(checkout, [browse])
    assert worst_verdict(losses) == "overloaded"
    r = assess("checkout", list(checkout.instances), None, losses)
    assert r.status == "at_risk"


def test_only_lower_priority_neighbours_on_shared_servers_are_shed():
    checkout, browse = drill_services(2.0, 4.9, browse_demand=73.5, browse_served=73.5)
    elsewhere = ServiceDemand("reports", "low", tuple(I(s, s + "x", max_conns=1, conns_avg=5) for s in "DE"), 0)
    peer = ServiceDemand("orders", "critical", tuple(I(s, s, max_conns=1, conns_avg=5) for s in "ABC"), 0)
    (a, *_) = server_losses(checkout, [browse, elsewhere, peer])
    assert [n.service for n in a.sheds] == ["browse"]


def test_learned_capacity_counts_when_none_is_declared():
    rows = [{"name": n, "address": f"10.0.0.{i}:80", "server": n, "learned_conns": 6} for i, n in enumerate("AB")]
    rows.append({"name": "C", "address": "10.0.0.9:80", "server": "C", "max_conns": 3, "learned_conns": 6})
    insts = instances_from_rows(rows)
    assert [i.max_conns for i in insts] == [6, 6, 3]  # declared wins over learned

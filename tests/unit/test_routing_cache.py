"""The incremental RoutingCache equals a full rebuild after any sequence of commands, rebuilds
only what a command touched, and skips (and reports) a service that cannot be built."""
from __future__ import annotations

import random

from halb.control.state import ClusterState
from halb.local_issues import LocalIssues
from halb.routing_builder import build_snapshot
from halb.routing_cache import RoutingCache, touched_services

SERVICES = [f"s{i}" for i in range(6)]
MEMBERS = ["n1", "n2", "n3"]


def command(rng: random.Random, cs: ClusterState, n: int) -> dict:
    svc = rng.choice(SERVICES)
    be = f"b{rng.randrange(12)}"
    op = rng.choice(["service.add", "service.remove", "service.update", "backend.add", "backend.add", "backend.add",
                     "backend.remove", "backend.state", "backend.weight", "health.observe", "health.observe",
                     "health.observe_many", "health.liveness", "health.release", "event.record", "lease.renew"])
    node = rng.choice(MEMBERS)
    args: dict = {}
    if op == "service.add":
        args = {"name": svc, "mode": rng.choice(["http", "tcp"]), "listen": f"127.0.0.1:{9000 + SERVICES.index(svc)}",
                "algorithm": rng.choice(["round_robin", "maglev", "least_conn"]),
                "options": {"connect_timeout": rng.choice([1, 2]), "flap_changes": 100}}
    elif op == "service.remove":
        args = {"name": svc}
    elif op == "service.update":
        args = {"name": svc, "algorithm": rng.choice(["round_robin", "p2c"]), "options": {"retries": rng.randrange(3)}}
    elif op == "backend.add":
        args = {"service": svc, "backend": {"name": be, "address": f"127.0.{SERVICES.index(svc)}.{be[1:]}:80",
                                            "weight": rng.randrange(1, 5) * 10, "server": f"srv{rng.randrange(3)}"}}
    elif op in ("backend.remove", "backend.state", "backend.weight"):
        args = {"service": svc, "name": be, "state": rng.choice(["active", "drain", "maint"]),
                "weight": rng.randrange(0, 50)}
    elif op == "health.observe":
        args = {"service": svc, "backend": be, "up": rng.random() < 0.5}
    elif op == "health.observe_many":
        args = {"observations": [{"service": rng.choice(SERVICES), "backend": f"b{rng.randrange(12)}",
                                  "up": rng.random() < 0.5} for _ in range(rng.randrange(1, 4))]}
    elif op == "health.liveness":
        args = {"live": rng.sample(MEMBERS, rng.randrange(1, 4))}
    elif op == "health.release":
        args = {"service": svc, "backend": be}
    elif op == "event.record":
        args = {"kind": "note", "message": "x"}
    elif op == "lease.renew":
        args = {"holder": node}
    return {"op": op, "args": args, "id": f"c{n}", "by": "test", "node": node, "at": 1000.0 + n}


def test_incremental_equals_full_rebuild_for_random_command_sequences() -> None:
    for seed in range(30):
        rng = random.Random(seed)
        cs = ClusterState()
        for m in MEMBERS:
            cs.apply({"op": "member.register", "args": {"id": m, "raft": f"127.0.0.1:{7000 + int(m[1])}",
                                                          "api": f"127.0.0.1:{8000 + int(m[1])}"}, "id": m, "at": 1.0})
        down: set[tuple[str, str]] = set()
        local_up = lambda s, b: (s, b) not in down  # noqa: E731
        cache = RoutingCache("10.0.0.1", {"127.0.1.3:80": "127.9.9.9:81"})
        cache.build(cs, local_up)
        for n in range(400):
            cmd = command(rng, cs, n)
            applied = cs.apply(cmd)
            cache.mark(touched_services(cmd, applied.events))
            if rng.random() < 0.1:  # a local health transition marks just its service
                key = (rng.choice(SERVICES), f"b{rng.randrange(12)}")
                down.symmetric_difference_update({key})
                cache.mark({key[0]})
            if rng.random() < 0.3:  # builds are coalesced: several commands per build
                got = cache.build(cs, local_up)
                want = build_snapshot(cs, got.version, "10.0.0.1", local_up, {"127.0.1.3:80": "127.9.9.9:81"})
                assert got == want, f"seed {seed} after command {n} ({cmd['op']})"
        assert not cache.issues.current


def test_only_touched_services_are_rebuilt_and_others_keep_their_objects() -> None:
    cs = ClusterState()
    for i in range(20):
        cs.apply({"op": "service.add", "args": {"name": f"s{i}", "listen": f"127.0.0.1:{9000 + i}"}, "id": f"a{i}"})
        for j in range(50):
            cs.apply({"op": "backend.add", "args": {"service": f"s{i}", "backend": {
                "name": f"b{j}", "address": f"127.0.{i}.{j + 1}:80"}}, "id": f"b{i}-{j}"})
    cache = RoutingCache("")
    first = cache.build(cs, lambda s, b: True)
    assert cache.rebuilt == 20
    cmd = {"op": "backend.weight", "args": {"service": "s7", "name": "b3", "weight": 5}, "id": "w"}
    cs.apply(cmd)
    cache.mark(touched_services(cmd))
    second = cache.build(cs, lambda s, b: True)
    assert cache.rebuilt == 21  # one service, not twenty
    for a, b in zip(first.services, second.services):
        assert (a is b) == (a.name != "s7")
    cmd = {"op": "lease.renew", "args": {"holder": "n1"}, "id": "l"}
    assert touched_services(cmd) == set()


def test_unbuildable_service_is_skipped_reported_and_keeps_last_good_route() -> None:
    cs = ClusterState()
    for port, name in enumerate(("aaa", "web"), start=9000):  # one port each: a shared port is a clash
        cs.apply({"op": "service.add", "args": {"name": name, "listen": f"127.0.0.1:{port}"}, "id": name})
        cs.apply({"op": "backend.add", "args": {"service": name, "backend": {"name": "x", "address": "127.0.0.2:80"}},
                  "id": name + "x"})
    issues = LocalIssues()
    cache = RoutingCache("", issues=issues)
    good = cache.build(cs, lambda s, b: True).service("aaa")
    cs.services["aaa"].options = "abc"  # bypasses every validation, as old state could
    cs.services["aaa"].backends["x"].weight = 3
    cs.services["web"].backends["x"].weight = 4
    cache.mark({"aaa", "web"})
    snap = cache.build(cs, lambda s, b: True)
    assert snap.service("aaa") is good  # last good route stays
    assert snap.service("web").backends[0].weight == 4  # the other one is updated
    assert [i.service for i in issues.for_service("aaa")] == ["aaa"]
    assert "options must be a map" in issues.for_service("aaa")[0].message
    assert [e["kind"] for e in issues.events] == ["local.routing_error"]
    cache.mark(None)
    cache.build(cs, lambda s, b: True)  # reported once, not on every rebuild
    assert len(issues.events) == 1 and issues.current[("routing", "aaa")].count == 2
    cs.services["aaa"].options = {}
    cache.mark({"aaa"})
    assert cache.build(cs, lambda s, b: True).service("aaa").backends[0].weight == 3
    assert not issues.current and issues.events[-1]["kind"] == "local.routing_ok"


def test_applied_events_are_reported_also_when_the_event_log_is_full() -> None:
    """touched_services relies on Applied.events for health commands; once the log held
    MAX_EVENTS, apply used to hand back no events at all."""
    from halb.control.state import MAX_EVENTS

    cs = ClusterState()
    for i in range(MAX_EVENTS + 5):
        cs.apply({"op": "event.record", "args": {"kind": "note", "message": str(i)}, "id": f"e{i}"})
    assert len(cs.events) == MAX_EVENTS
    applied = cs.apply({"op": "service.add", "args": {"name": "web", "listen": "127.0.0.1:9000"}, "id": "s"})
    assert [e.kind for e in applied.events] == ["service.added"]
    applied = cs.apply({"op": "health.liveness", "args": {"live": ["n1"]}, "id": "l"})
    assert [e.kind for e in applied.events] == ["cluster.liveness"]


def test_server_wide_verdict_change_names_every_service_it_touched() -> None:
    cs = ClusterState()
    for m in MEMBERS:
        cs.apply({"op": "member.register", "args": {"id": m, "raft": f"127.0.0.1:{7000 + int(m[1])}",
                                                      "api": f"127.0.0.1:{8000 + int(m[1])}"}, "id": m})
    for port, svc in enumerate(("a", "b", "c"), start=9000):
        cs.apply({"op": "service.add", "args": {"name": svc, "listen": f"127.0.0.1:{port}"}, "id": svc})
    for svc in ("a", "b"):  # server S runs one instance of a and one of b; c is elsewhere
        cs.apply({"op": "backend.add", "args": {"service": svc, "backend": {"name": "x", "address": "127.0.0.5:80",
                                                                            "server": "S"}}, "id": svc + "x"})
    cs.apply({"op": "backend.add", "args": {"service": "c", "backend": {"name": "x", "address": "127.0.0.6:80"}},
              "id": "cx"})
    down = [{"service": s, "backend": "x", "up": False} for s in ("a", "b")]
    cmd = {"op": "health.observe_many", "args": {"observations": down}, "id": "o1", "node": "n1"}
    cs.apply(cmd)  # one observer of three: no verdict changes
    # n2 and n3 drop out: n1 alone decides, both instances of S flip in this one command
    cmd = {"op": "health.liveness", "args": {"live": ["n1"]}, "id": "l"}
    applied = cs.apply(cmd)
    assert [e.kind for e in applied.events] == ["cluster.liveness", "server.down"]
    assert touched_services(cmd, applied.events) == {"a", "b"}

"""The replicated state machine: deterministic, idempotent by id, nothing partial."""
from __future__ import annotations

import msgpack

from halb.control.state import ClusterState


def cmd(op, args, cid, at=1000.0):
    return {"op": op, "args": args, "id": cid, "by": "test", "node": "n1", "at": at}


SEED = {"services": [{"name": "checkout", "listen": "127.0.0.1:8080",
                      "backends": {"A": {"name": "A", "address": "127.0.0.21:8080"}}}]}


def test_seed_applies_once_and_only_to_an_empty_cluster():
    st = ClusterState()
    assert st.apply(cmd("seed", SEED, "s1")).result == {"ok": True, "seeded": True}
    other = {"services": [{"name": "other", "listen": "127.0.0.1:9"}]}
    assert st.apply(cmd("seed", other, "s2")).result == {"ok": True, "seeded": False}
    assert list(st.services) == ["checkout"]


def test_same_command_id_is_applied_once():
    st = ClusterState()
    st.apply(cmd("seed", SEED, "s1"))
    add = cmd("backend.add", {"service": "checkout", "backend": {"name": "B", "address": "127.0.0.22:8080"}}, "c1")
    first = st.apply(add).result
    again = st.apply(add).result
    assert first["ok"] and again["ok"] and again["duplicate"]
    assert len([e for e in st.events if e.kind == "backend.added"]) == 1


def test_rejected_command_changes_nothing():
    st = ClusterState()
    st.apply(cmd("seed", SEED, "s1"))
    before = msgpack.packb(st.to_dict())
    for bad in [
        cmd("backend.add", {"service": "nope", "backend": {"name": "B", "address": "127.0.0.22:8080"}}, "x1"),
        cmd("backend.add", {"service": "checkout", "backend": {"name": "A", "address": "127.0.0.9:1"}}, "x2"),
        cmd("backend.add", {"service": "checkout", "backend": {"name": "Z", "address": "127.0.0.21:8080"}}, "x3"),
        cmd("backend.weight", {"service": "checkout", "name": "A", "weight": 10**6}, "x4"),
        cmd("backend.state", {"service": "checkout", "name": "A", "state": "asleep"}, "x5"),
        cmd("service.update", {"name": "checkout", "algorithm": "random"}, "x6"),
        cmd("nonsense", {}, "x7"),
    ]:
        result = st.apply(bad).result
        assert result["ok"] is False and result["error"] in ("invalid", "not_found", "conflict"), result
    after = st.to_dict()
    after_cmp = dict(after, applied_ids=[], index=0)
    before_cmp = dict(msgpack.unpackb(before, strict_map_key=False), applied_ids=[], index=0)
    assert after_cmp == before_cmp


def test_replicas_applying_the_same_log_agree_and_snapshot_round_trips():
    log = [cmd("seed", SEED, "s1"),
           cmd("backend.add", {"service": "checkout", "backend": {"name": "B", "address": "127.0.0.22:8080"}}, "c1"),
           cmd("backend.state", {"service": "checkout", "name": "A", "state": "drain"}, "c2", at=1001.5),
           cmd("member.register", {"id": "n1", "raft": "127.0.0.1:1", "api": "127.0.0.1:2"}, "c3")]
    a, b = ClusterState(), ClusterState()
    for c in log:
        a.apply(c)
        b.apply(c)
    assert msgpack.packb(a.to_dict()) == msgpack.packb(b.to_dict())
    restored = ClusterState.from_dict(msgpack.unpackb(msgpack.packb(a.to_dict()), strict_map_key=False))
    assert restored.to_dict() == a.to_dict()
    assert restored.services["checkout"].backends["A"].admin_state == "drain"
    assert restored.events[-1].at == 1000.0 and restored.events[1].at == 1000.0


def test_event_log_is_bounded():
    from halb.control import state as state_mod

    st = ClusterState()
    for i in range(state_mod.MAX_EVENTS + 50):
        st.apply(cmd("event.record", {"kind": "test.tick", "message": str(i)}, f"e{i}"))
    assert len(st.events) == state_mod.MAX_EVENTS
    assert st.events[-1].message == str(state_mod.MAX_EVENTS + 49)

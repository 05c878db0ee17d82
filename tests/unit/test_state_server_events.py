"""Correlated failure in the state machine: a whole server's instances flipping in one
command are one `server.down` / `server.up` event; single instances keep `backend.verdict`."""
from __future__ import annotations

from halb.control.state import ClusterState

BACKENDS = {"A": {"name": "A", "address": "127.0.0.21:8080", "server": "A"},
            "A2": {"name": "A2", "address": "127.0.0.21:8081", "server": "A"},
            "A3": {"name": "A3", "address": "127.0.0.21:8082", "server": "A"},
            "B": {"name": "B", "address": "127.0.0.22:8080", "server": "B"}}


def cmd(op, args, cid, node="n1", at=1000.0):
    return {"op": op, "args": args, "id": cid, "by": "test", "node": node, "at": at}


def cluster() -> ClusterState:
    st = ClusterState()
    st.apply(cmd("seed", {"services": [{"name": "checkout", "listen": "127.0.0.1:8080", "backends": BACKENDS}]}, "s"))
    for i, n in enumerate(("n1", "n2", "n3")):
        st.apply(cmd("member.register", {"id": n, "raft": f"127.0.0.1:{100 + i}", "api": f"127.0.0.1:{200 + i}"}, n))
    return st


def many(names, up, node, cid, at=1000.0):
    return cmd("health.observe_many", {"observations": [
        {"service": "checkout", "backend": b, "up": up, "detail": "connect refused" if not up else ""}
        for b in names]}, cid, node=node, at=at)


def kinds(st, since=0):
    return [e.kind for e in st.events if e.seq > since and e.kind in ("server.down", "server.up", "backend.verdict")]


def test_whole_server_down_and_up_is_one_event_each():
    st = cluster()
    mark = st.event_seq
    st.apply(many(["A", "A2", "A3"], False, "n1", "c1"))
    assert kinds(st, mark) == []  # one observer is no majority
    r = st.apply(many(["A", "A2", "A3"], False, "n2", "c2")).result
    assert r["ok"] and set(r["verdicts"].values()) == {"down"}
    assert kinds(st, mark) == ["server.down"]
    ev = [e for e in st.events if e.kind == "server.down"][-1]
    assert ev.message.startswith("server A DOWN (3 instances: checkout/A, checkout/A2, checkout/A3) by majority")
    assert ev.data["instances"] == 3 and ev.data["server"] == "A"
    # per-backend verdict data stays queryable
    assert all(st.verdicts[f"checkout/{b}"]["verdict"] == "down" for b in ("A", "A2", "A3"))
    mark = st.event_seq
    st.apply(many(["A", "A2", "A3"], True, "n1", "c3", at=1010))
    st.apply(many(["A", "A2", "A3"], True, "n2", "c4", at=1010))
    assert kinds(st, mark) == ["server.up"]


def test_single_instance_server_keeps_backend_verdict():
    st = cluster()
    mark = st.event_seq
    for i, node in enumerate(("n1", "n2")):
        st.apply(cmd("health.observe", {"service": "checkout", "backend": "B", "up": False}, f"b{i}", node=node))
    assert kinds(st, mark) == ["backend.verdict"]


def test_part_of_a_server_is_per_backend_and_completing_it_groups():
    st = cluster()
    mark = st.event_seq
    st.apply(many(["A"], False, "n1", "c1"))
    st.apply(many(["A"], False, "n2", "c2"))
    assert kinds(st, mark) == ["backend.verdict"]  # A2, A3 still up: not a server failure
    mark = st.event_seq
    st.apply(many(["A2", "A3"], False, "n1", "c3"))
    st.apply(many(["A2", "A3"], False, "n2", "c4"))
    assert kinds(st, mark) == ["server.down"]


def test_replicas_agree():
    a, b = cluster(), cluster()
    log = [many(["A", "A2", "A3"], False, "n1", "c1"), many(["A", "A2", "A3"], False, "n2", "c2")]
    for c in log:
        a.apply(c)
        b.apply(c)
    assert a.to_dict() == b.to_dict()


def test_invalid_batch_changes_nothing():
    st = cluster()
    before = st.to_dict()
    bad = cmd("health.observe_many", {"observations": [{"service": "checkout", "backend": "A", "up": False},
                                                       {"service": "checkout", "backend": "nope", "up": False}]}, "x")
    assert st.apply(bad).result["ok"] is False
    assert dict(st.to_dict(), applied_ids=[], index=0) == dict(before, applied_ids=[], index=0)

"""Log compaction writes the snapshot in a forked child (so the Raft thread keeps sending
heartbeats); the snapshot must still be complete and consistent: a cluster restarted from
snapshot + journal has every write, and a node that lost its data catches up from it."""
from __future__ import annotations

import json
import shutil
import signal
import urllib.request

import msgpack
import pytest

from tests.conftest import Cluster, admin_urlopen, wait_until

pytestmark = pytest.mark.timeout(180)


def add_backend(c: Cluster, node: str, name: str, address: str) -> None:
    req = urllib.request.Request(c.url(node, "/v1/services/checkout/backends"), method="POST",
                                 data=json.dumps({"name": name, "address": address}).encode(),
                                 headers={"Authorization": f"Bearer {c.token}", "Content-Type": "application/json"})
    with admin_urlopen(req, timeout=10) as resp:
        assert resp.status == 201


def backend_names(c: Cluster, node: str) -> set[str]:
    code, body = c.get(node, "/v1/services/checkout/backends")
    assert code == 200, body
    return {b["name"] for b in body["backends"]}


def test_compaction_snapshots_are_complete_and_restorable(cluster_factory):
    c = cluster_factory(n=3, extra_raft={"log_compaction_entries": 40})
    leader = c.leader()
    want = {"A", "B", "C"}
    for i in range(150):  # several compactions
        add_backend(c, leader, f"x{i}", f"127.3.{i // 200}.{i % 200 + 1}:80")
        want.add(f"x{i}")
    for n in c.nodes:
        wait_until(lambda n=n: backend_names(c, n) == want, 15, 0.1, f"{n} has every backend")
    # each node wrote a snapshot by itself, and it is a whole halb snapshot
    for n in c.nodes:
        snap = c.directory / "data" / n / "raft.snapshot"
        wait_until(snap.exists, 10, 0.1, f"{n} snapshot")
        d = msgpack.unpackb(snap.read_bytes(), raw=False, strict_map_key=False)
        assert d["format"] == "halb-snapshot-1" and "checkout" in d["state"]["services"]
        assert len(d["state"]["services"]["checkout"]["backends"]) > 40
        assert not (c.directory / "data" / n / "raft.snapshot.writing").exists()
    logs = "".join(p.read_text() for p in (c.directory / "logs").glob("n*.log"))
    assert "raft snapshot written in" in logs and "snapshot writer failed" not in logs
    # every node restarts from its snapshot + journal with every write
    for n in list(c.nodes):
        c.kill(n, signal.SIGKILL)
    # and one node starts from nothing: it must be sent a snapshot and catch up
    shutil.rmtree(c.directory / "data" / "n3")
    c.start_all()
    c.leader()
    for n in c.nodes:
        wait_until(lambda n=n: backend_names(c, n) == want, 30, 0.2, f"{n} restored every backend")
    add_backend(c, c.leader(), "after", "127.3.9.9:80")
    for n in c.nodes:
        wait_until(lambda n=n: "after" in backend_names(c, n), 10, 0.1, f"{n} applies new writes")

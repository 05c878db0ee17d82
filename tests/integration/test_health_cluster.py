"""Health checking the cluster agrees on: local fast ejection, majority verdicts,
asymmetric failures, flap damping, verdicts surviving leader failover."""
from __future__ import annotations

import signal
import threading
import time

import pytest

from tests.conftest import wait_until

pytestmark = pytest.mark.timeout(150)
NODES = ("n1", "n2", "n3")


def routable(c, node: str, backend: str) -> bool:
    code, body = c.get(node, "/v1/dataplane")
    return body["services"]["checkout"]["backends"][backend]["healthy"]


def local_state(c, node: str, backend: str) -> str:
    """What `node`'s own checks say about `backend` (pending/up/down)."""
    code, body = c.get(node, "/v1/services/checkout/backends")
    return next(r for r in body["backends"] if r["name"] == backend)["local"]["state"]


def backend_row(c, name: str, node: str | None = None) -> dict:
    return next(r for r in c.cli_json("backend", "list", node=node) if r["name"] == name)


def test_killed_backend_is_ejected_locally_then_by_verdict_and_returns(cluster_factory):
    c = cluster_factory(run_backends=True)
    c.wait_serving()
    wait_until(lambda: all(routable(c, n, "C") for n in NODES), 10)
    c.backends["C"].signal(signal.SIGKILL)
    killed = time.monotonic()
    # local fast path: every node stops routing within interval (1 s) x fall (2) + 1 s
    deadline = killed + 3.0
    for node in NODES:
        wait_until(lambda node=node: not routable(c, node, "C"), max(0.05, deadline - time.monotonic()),
                   0.02, f"{node} stops routing to C within 3 s")
    local_done = time.monotonic() - killed
    # cluster verdict within 3 s with the default settings
    wait_until(lambda: c.get("n1", "/v1/services/checkout/backends/C")[1]["backend"]["verdict"] == "down",
               max(0.05, deadline - time.monotonic()), 0.02, "cluster verdict DOWN within 3 s")
    verdict_done = time.monotonic() - killed
    wait_until(lambda: backend_row(c, "C")["observations"] == {"n1": "down", "n2": "down", "n3": "down"},
               3, 0.1, "every node's observation of C reported")
    events = c.cli_json("events", "--limit", "200")
    verdicts = [e for e in events if e["kind"] == "backend.verdict" and e["data"].get("backend") == "C"]
    assert verdicts and verdicts[-1]["data"]["verdict"] == "down"
    # the verdict formed as soon as a majority (2 of 3) observed C down, and says who
    assert "majority" in verdicts[-1]["message"] and len(verdicts[-1]["data"]["down"]) >= 2
    # restart: UP again after rise (2) successful checks
    c.start_backend("C")
    wait_until(lambda: c.get("n1", "/v1/services/checkout/backends/C")[1]["backend"]["verdict"] == "up",
               8, 0.05, "verdict UP after restart")
    for node in NODES:
        wait_until(lambda node=node: routable(c, node, "C"), 5, 0.05, f"{node} routes to C again")
    print(f"local ejection {local_done:.2f}s, verdict {verdict_done:.2f}s")


def test_one_balancer_losing_its_path_does_not_take_backend_out(cluster_factory, fault_proxy):
    # n1 reaches B only through a fault proxy; cutting it breaks only n1's path
    from tests.conftest import free_port

    b_addr = f"127.0.0.1:{free_port()}"
    via = fault_proxy.create("n1-to-B", b_addr)
    c = cluster_factory(start=False, dataplane_extra={"n1": {"backend_dial": {b_addr: via}}},
                        backends=[("A", f"127.0.0.1:{free_port()}"), ("B", b_addr), ("C", f"127.0.0.1:{free_port()}")])
    c.start_backends()
    c.start_all()
    c.leader()
    c.wait_registered()
    c.wait_serving()
    wait_until(lambda: routable(c, "n1", "B"), 10)
    fault_proxy.set_enabled("n1-to-B", False)
    wait_until(lambda: not routable(c, "n1", "B"), 5, 0.05, "n1 routes around B")
    # every node has reported (n2 and n3 their first settled UP); the verdict is computed in
    # the same apply as each observation, so it is final for these reports
    wait_until(lambda: backend_row(c, "B")["observations"] == {"n1": "down", "n2": "up", "n3": "up"}, 8, 0.1,
               "n1 reported B down, n2 and n3 reported it up")
    row = backend_row(c, "B")
    assert row["verdict"] == "up"
    assert routable(c, "n2", "B") and routable(c, "n3", "B")
    # n1's own traffic avoids B, and no request through n1 fails
    import urllib.request

    for _ in range(30):
        with urllib.request.urlopen(f"http://{c.service_address('n1')}/products", timeout=5) as resp:
            assert resp.status == 200 and resp.headers["X-Served-By"] in ("A", "C")
    # the operator sees the disagreement in the human table too
    table = c.cli("backend", "list").stdout
    assert "n1=down" in table
    fault_proxy.set_enabled("n1-to-B", True)
    wait_until(lambda: backend_row(c, "B")["observations"]["n1"] == "up", 8, 0.1, "n1 sees B again")
    assert routable(c, "n1", "B")


def test_flapping_backend_is_held_down(cluster_factory, fault_proxy):
    from tests.conftest import free_port

    real = f"127.0.0.1:{free_port()}"
    flappy = fault_proxy.create("flappy-B", real)
    c = cluster_factory(start=False, backends=[("A", f"127.0.0.1:{free_port()}"), ("B", flappy)],
                        health={"kind": "http", "path": "/health", "interval": 0.2, "timeout": 0.15, "rise": 1,
                                "fall": 1},
                        service_options={"flap_window_s": 30.0, "flap_changes": 4, "flap_hold_s": 20.0})
    # B's process listens on its real address; every node reaches it through the proxy
    c.spec.backends = [("A", c.spec.backends[0][1]), ("B", real)]
    c.start_backends()
    c.start_all()
    c.leader()
    c.wait_registered()
    stop = threading.Event()

    def toggle() -> None:
        enabled = True
        deadline = time.monotonic() + 20
        while not stop.is_set() and time.monotonic() < deadline:
            time.sleep(0.5)
            enabled = not enabled
            fault_proxy.set_enabled("flappy-B", enabled)

    t = threading.Thread(target=toggle)
    t.start()
    try:
        wait_until(lambda: backend_row(c, "B")["verdict"] == "held", 20, 0.1, "B held by flap damping")
    finally:
        stop.set()
        t.join(5)
    fault_proxy.set_enabled("flappy-B", True)
    events = c.cli_json("events", "--limit", "500")
    held = [e for e in events if e["kind"] == "backend.held"]
    assert held and "flapping" in held[0]["message"] and held[0]["data"]["hold_s"] == 20.0
    row = backend_row(c, "B")
    assert row["verdict"] == "held" and row["hold_until"] > time.time()
    assert "held" in c.cli("backend", "list").stdout
    # while held, no node routes to B even though every node's own checks see it up again
    for n in NODES:
        wait_until(lambda n=n: local_state(c, n, "B") == "up", 5, 0.05, f"{n}'s checks see B up")
    assert backend_row(c, "B")["verdict"] == "held"
    assert not any(routable(c, n, "B") for n in NODES)


def test_verdict_survives_leader_failover(cluster_factory):
    c = cluster_factory(run_backends=True)
    c.wait_serving()
    c.backends["C"].signal(signal.SIGKILL)
    wait_until(lambda: c.get("n1", "/v1/services/checkout/backends/C")[1]["backend"]["verdict"] == "down",
               6, 0.02, "verdict DOWN")
    leader = c.leader()
    c.kill(leader)  # SIGKILL right after the change committed
    survivors = [n for n in NODES if n != leader]
    new_leader = c.leader(among=survivors, timeout=15)
    assert new_leader != leader
    code, body = c.get(new_leader, "/v1/services/checkout/backends/C")
    assert body["backend"]["verdict"] == "down"
    # the new leader recomputes liveness: the dead node stops voting, and C stays DOWN
    # (2 of 2 live voters observe it down)
    wait_until(lambda: set(backend_row(c, "C", new_leader)["observations"]) == set(survivors), 10, 0.1,
               "voters are the survivors")
    assert c.get(new_leader, "/v1/services/checkout/backends/C")[1]["backend"]["verdict"] == "down"


def test_new_backend_is_pending_until_checked_and_a_recovered_one_shows_no_stale_error(cluster_factory):
    """A new backend on a closed port read "up" from all three nodes beside "connect failed"
    until `fall` checks completed; a recovered backend kept showing its old error."""
    from halb.api.client import Client
    from tests.conftest import free_port

    c = cluster_factory(run_backends=True)
    host = c.spec_of("n1").host
    closed = f"127.0.0.1:{free_port()}"  # nothing listens here
    # jitter 0: the first check runs at once, the second only 30 s later; in between each
    # node has exactly one failed check (fall 2): deterministic, no race with the checks
    Client(c.apis, c.token, tls=c.tls).post("/v1/services", {
        "name": "slow", "listen": f"{host}:{free_port(host)}", "backends": [{"name": "X", "address": closed}],
        "options": {"health": {"kind": "tcp", "interval": 30, "jitter": 0, "timeout": 0.5, "rise": 2, "fall": 2}}})

    def row(node: str, svc: str, name: str) -> dict:
        code, body = c.get(node, f"/v1/services/{svc}/backends")
        assert code == 200, body
        return next(r for r in body["backends"] if r["name"] == name)

    for n in NODES:
        wait_until(lambda n=n: (row(n, "slow", "X")["local"] or {}).get("last_error"), 10, 0.05,
                   f"{n} checked X once")
        # every node a voter (the leader's liveness view can lag a moment after start-up)
        wait_until(lambda n=n: set(row(n, "slow", "X")["observations"]) == set(NODES), 10, 0.05, "3 voters")
    for n in NODES:
        r = row(n, "slow", "X")
        assert r["verdict"] == "pending", r
        assert r["observations"] == {"n1": "pending", "n2": "pending", "n3": "pending"}
        assert r["local"]["state"] == "pending" and r["local"]["checks"] == 1
        assert r["local"]["last_error"].startswith("connect failed")
        # routing is unchanged: like HAProxy, an unchecked backend is routed until checks fail
        assert c.get(n, "/v1/dataplane")[1]["services"]["slow"]["backends"]["X"]["healthy"] is True
    table = c.cli("backend", "list", "--service", "slow").stdout
    assert "pending" in table and "n1=pending,n2=pending,n3=pending" in table

    # recovery: the error of the last failed check moves to last_failure
    wait_until(lambda: row("n1", "checkout", "C")["observations"] == {"n1": "up", "n2": "up", "n3": "up"}, 15, 0.1,
               "every node reported C up")
    assert row("n1", "checkout", "C")["verdict"] == "up"
    killed = time.time()
    c.backends["C"].signal(signal.SIGKILL)
    wait_until(lambda: row("n1", "checkout", "C")["local"]["state"] == "down", 10, 0.05, "n1 sees C down")
    assert row("n1", "checkout", "C")["local"]["last_error"].startswith("connect failed")
    c.start_backend("C")
    wait_until(lambda: row("n1", "checkout", "C")["local"]["state"] == "up", 10, 0.05, "n1 sees C up again")
    local = row("n1", "checkout", "C")["local"]
    assert local["last_error"] is None and local["last_check_ok"] is True
    assert local["last_failure"].startswith("connect failed") and local["last_failure_at"] >= killed

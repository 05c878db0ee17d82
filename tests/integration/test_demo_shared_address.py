"""Issue 12: the demo's one service address survives `kill -9` of any balancer.

A real three-node cluster whose nodes all also serve the service on one shared loopback
address ([dataplane] shared_hosts, SO_REUSEPORT). Plain HTTP clients, a new TCP connection
per request and no retries of their own, run a bounded number of requests against that
address while a balancer is SIGKILLed: the leader first, then (after it is back) a
follower. A request may only fail if it was in flight while the kill happened (queued on
or being served by the dying process); every other request must succeed.
"""
from __future__ import annotations

import http.client
import signal
import threading
import time
from dataclasses import dataclass

import pytest

from tests.conftest import _port_open, wait_until

pytestmark = pytest.mark.timeout(180)

CLIENTS = 4  # concurrent client loops: at most this many requests are in flight at once
PER_CLIENT = 150  # 600 requests in all per phase
KILL_AFTER = 200  # requests completed before the kill


@dataclass
class Outcome:
    started: float
    ended: float
    ok: bool
    detail: str


def one_request(address: str) -> tuple[bool, str]:
    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        conn.request("GET", "/products", headers={"Connection": "close"})
        resp = conn.getresponse()
        resp.read()
        return resp.status == 200, f"HTTP {resp.status}"
    except (OSError, http.client.HTTPException) as exc:
        return False, f"{type(exc).__name__}: {exc}"
    finally:
        conn.close()


def run_loop_with_kill(cluster, address: str, victim: str) -> tuple[list[Outcome], float, float]:
    """CLIENTS threads x PER_CLIENT requests; SIGKILL victim after KILL_AFTER completions.
    Returns the outcomes and the kill window (just before the signal, after the process is reaped)."""
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    kill_at: list[float] = []
    killed = threading.Event()

    def client() -> None:
        for _ in range(PER_CLIENT):
            t0 = time.monotonic()
            ok, detail = one_request(address)
            with lock:
                outcomes.append(Outcome(t0, time.monotonic(), ok, detail))
                fire = len(outcomes) == KILL_AFTER
            if fire:
                kill_at.append(time.monotonic())
                cluster.kill(victim, signal.SIGKILL)  # reaps it: its sockets are closed on return
                kill_at.append(time.monotonic())
                killed.set()

    threads = [threading.Thread(target=client, daemon=True) for _ in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert killed.is_set(), "the loop ended before the kill"
    assert len(outcomes) == CLIENTS * PER_CLIENT
    return outcomes, kill_at[0], kill_at[1]


def split_by_kill(outcomes: list[Outcome], t_kill: float, t_reaped: float) -> tuple[list[Outcome], list[Outcome]]:
    """(failures in flight during the kill, failures at any other time)."""
    failed = [o for o in outcomes if not o.ok]
    in_flight = [o for o in failed if o.started <= t_reaped and o.ended >= t_kill]
    other = [o for o in failed if o not in in_flight]
    return in_flight, other


def node_requests(cluster, node_id: str, service: str = "checkout") -> int:
    code, body = cluster.get(node_id, "/v1/dataplane")
    assert code == 200, body
    return sum(b.get("requests", 0) for b in body["services"][service]["backends"].values())


def test_shared_address_survives_kill_of_leader_and_of_a_follower(cluster_factory) -> None:
    c = cluster_factory(run_backends=True, shared=True)
    address = c.spec.shared_address
    c.wait_serving()
    st = c.cli_json("cluster", "status")
    assert st["services"][0]["address"] == address
    wait_until(lambda: all(one_request(address)[0] for _ in range(10)), 30, 0.2, "backends healthy via shared address")

    # the kernel spreads connections to the shared address over all three balancers
    before = {n: node_requests(c, n) for n in c.nodes}
    for _ in range(60):
        assert one_request(address)[0]
    after = {n: node_requests(c, n) for n in c.nodes}
    assert all(after[n] > before[n] for n in c.nodes), (before, after)

    report = []
    leader = c.leader()
    outcomes, t_kill, t_reaped = run_loop_with_kill(c, address, leader)
    in_flight, other = split_by_kill(outcomes, t_kill, t_reaped)
    report.append(f"leader {leader}: {len(outcomes)} requests, {len(in_flight)} failed in flight at the kill "
                  f"({sorted({o.detail for o in in_flight})}), {len(other)} failed otherwise")
    assert other == [], [o.detail for o in other]
    assert len(in_flight) <= CLIENTS

    # the killed leader comes back and rejoins the shared group; then a follower dies
    c.start(leader)
    wait_until(lambda: _port_open(c.service_address(leader)), 20, 0.05, f"{leader} serving again")
    new_leader = c.leader()
    follower = next(n for n in c.nodes if n != new_leader and c.nodes[n].alive())
    outcomes, t_kill, t_reaped = run_loop_with_kill(c, address, follower)
    in_flight, other = split_by_kill(outcomes, t_kill, t_reaped)
    report.append(f"follower {follower}: {len(outcomes)} requests, {len(in_flight)} failed in flight at the kill "
                  f"({sorted({o.detail for o in in_flight})}), {len(other)} failed otherwise")
    print("\n".join(report))
    assert other == [], [o.detail for o in other]
    assert len(in_flight) <= CLIENTS


def test_worker_processes_also_serve_the_shared_address() -> None:
    """With [dataplane] workers > 1 each worker process joins the shared address's group too."""
    import asyncio
    import os

    from halb.dataplane.engine import DataPlane
    from halb.dataplane.testing import run, service, snapshot
    from halb.demo.supervise import listening_pids

    async def main() -> None:
        dp = DataPlane("t", workers=2, shared_hosts=["127.0.0.10"])
        await dp.start(snapshot(service("shop", [("127.0.0.1", 9)])))
        try:
            port = dp.bound_port("shop")
            pids = await asyncio.get_running_loop().run_in_executor(None, listening_pids, f"127.0.0.10:{port}")
            workers = [w.proc.pid for w in dp._pool_supervisor.workers]
            assert os.getpid() in pids and set(workers) <= set(pids) and len(pids) == 2, (pids, workers)
        finally:
            await dp.stop()

    run(main(), timeout=60)

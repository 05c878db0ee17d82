"""Servers as failure domains, with real nodes: the resilience report for 1, 2 and 3
servers with and without capacities; a whole server killed at once is one `server.down`
event and no client errors; a retry after a failure goes to another server."""
from __future__ import annotations

import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import admin_urlopen, free_port, wait_until
from tests.integration.test_dataplane_cluster import Balancers

SERVERS = {"A": {"server": "S1"}, "A2": {"server": "S1"}, "B": {"server": "S2"}, "C": {"server": "S3"}}


def four_backends() -> list[tuple[str, str]]:
    return [(name, f"127.0.0.1:{free_port()}") for name in ("A", "A2", "B", "C")]


def report(c, service: str = "checkout") -> dict:
    code, body = c.get("n1", f"/v1/services/{service}/resilience")
    assert code == 200, body
    return body["resilience"]


def verdicts(c) -> dict[str, str]:
    return {r["name"]: r["verdict"] for r in c.cli_json("backend", "list", "--service", "checkout")}


class Load:
    """GETs through every balancer from a few threads until stopped; counts errors."""

    def __init__(self, c, rate_per_thread: float = 0.0, threads: int = 3) -> None:
        self.client = Balancers([c.service_address(n) for n in ("n1", "n2", "n3")])
        self.stop = threading.Event()
        self.ok = 0
        self.errors: list[tuple[int, bytes]] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.run, args=(w, rate_per_thread), daemon=True)
                        for w in range(threads)]

    def run(self, w: int, rate: float) -> None:
        i = w
        deadline = time.monotonic() + 90
        while not self.stop.is_set() and time.monotonic() < deadline:
            status, _, body = self.client.request(i, "GET", "/products")
            with self.lock:
                if status == 200:
                    self.ok += 1
                else:
                    self.errors.append((status, body[:200]))
            i += 1
            if rate:
                time.sleep(1.0 / rate)

    def __enter__(self) -> "Load":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(15)


@pytest.mark.timeout(120)
def test_report_for_one_two_three_servers_with_and_without_capacities(cluster_factory):
    opts = {name: dict(v, max_rps=2.0) for name, v in SERVERS.items()}
    c = cluster_factory(backends=four_backends(), backend_options=opts)
    # a second service over two of the same processes, without declared capacity
    from halb.api.client import Client

    client = Client(c.apis, c.token, tls=c.tls)
    client.post("/v1/services", {"name": "web", "listen": f"{c.spec_of('n1').host}:{free_port()}",
                                 "backends": [{"name": "A", "address": c.backend_address("A"), "server": "S1"},
                                              {"name": "B", "address": c.backend_address("B"), "server": "S2"}]})
    # one server (S1 with A and A2): B and C are not running
    c.start_backend("A")
    c.start_backend("A2")
    wait_until(lambda: verdicts(c) == {"A": "up", "A2": "up", "B": "down", "C": "down"}, 20, 0.2, "B, C down")
    r = report(c)
    assert r["servers_healthy"] == ["S1"] and r["instances_per_server"] == {"S1": 2}
    assert r["survives_server_loss"] is False and r["status"] == "at_risk"
    assert "all 2 healthy instances of checkout run on server S1: one crash takes checkout down" in " ".join(r["warnings"])
    status = c.cli("service", "status", "checkout", check=False)
    assert status.returncode == 5 and "WARNING" in status.stdout and "S1" in status.stdout
    cluster_status = c.cli("cluster", "status").stdout
    assert "AT RISK" in cluster_status and "WARNING: " in cluster_status
    # two servers
    c.start_backend("B")
    wait_until(lambda: report(c)["servers_healthy"] == ["S1", "S2"], 20, 0.2, "S2 healthy")
    r = report(c)
    assert r["survives_server_loss"] is True and r["servers_down"] == ["S3"]
    web = report(c, "web")
    assert web["survives_server_loss"] is True and web["n_plus_one"] is None and web["status"] == "ok"
    # three servers, no load: capacity 8 rps, losing S1 leaves 4 >= 0
    c.start_backend("C")
    wait_until(lambda: report(c)["servers_healthy"] == ["S1", "S2", "S3"], 20, 0.2, "S3 healthy")
    r = report(c)
    assert r["n_plus_one"] is True and r["status"] == "ok" and r["capacity"][0]["worst_server"] == "S1"
    ok = c.cli("service", "status", "checkout")  # exit 0
    assert "survives losing any one server: yes" in ok.stdout
    assert r["server_loss_verdict"] == "survives"  # idle: nothing to carry
    assert "server S1: survives: the others carry 0.0 rps on capacity 4.0" in ok.stdout, ok.stdout
    # ~15 rps summed over the three balancers > the 4 rps left if S1 dies
    with Load(c, rate_per_thread=5) as load:
        wait_until(lambda: report(c)["n_plus_one"] is False, 25, 0.5, "N+1 fails under load")
        loaded = c.cli("service", "status", "checkout", check=False).stdout
    import re

    # the load line carries the numbers (it used to name only where they came from)
    m = re.search(r"load: ([0-9.]+) rps, (\d+) in flight; summed over n1, n2, n3", loaded)
    assert m and float(m.group(1)) > 0, loaded
    r = report(c)
    assert r["status"] == "at_risk" and r["load"]["nodes"] == ["n1", "n2", "n3"]
    s1 = next(x for x in r["server_loss"] if x["server"] == "S1")
    assert r["server_loss_verdict"] == "overloaded" and s1["answer"] == "overloaded", r["server_loss"]
    assert "server S1: overloaded: the other servers would need to carry" in loaded, loaded
    assert any("(capacity): if server S1 dies" in w for w in r["warnings"]), r["warnings"]
    assert load.errors == []
    import urllib.request

    req = urllib.request.Request(c.url("n1", "/metrics"), headers={"Authorization": f"Bearer {c.token}"})
    text = admin_urlopen(req, timeout=5).read().decode()
    assert 'halb_service_servers_healthy{node="n1",service="checkout"} 3.0' in text
    assert 'halb_service_survives_server_loss{node="n1",service="checkout"} 1.0' in text
    assert 'halb_service_n_plus_one{node="n1",service="checkout"} 0.0' in text
    assert 'halb_service_n_plus_one{node="n1",service="web"}' not in text  # unknown: left out
    # the check latency histogram (halb/metrics.py CheckLatency) of a checked backend
    assert re.search(r'halb_check_latency_seconds_count\{backend="[^"]+",node="n1",service="checkout"\} [1-9]', text)


@pytest.mark.timeout(120)
def test_killing_every_instance_of_a_server_is_one_event_and_no_client_errors(cluster_factory):
    c = cluster_factory(backends=four_backends(), backend_options=SERVERS, run_backends=True)
    c.wait_serving()
    wait_until(lambda: set(verdicts(c).values()) == {"up"}, 15, 0.2, "all up")
    since = c.status("n1")["last_event"]
    with Load(c, rate_per_thread=30) as load:
        wait_until(lambda: load.ok >= 30, 10, 0.05, "load flowing before the kill")
        for name in ("A", "A2"):
            c.backends[name].signal(signal.SIGKILL)
        wait_until(lambda: verdicts(c)["A"] == "down" and verdicts(c)["A2"] == "down", 15, 0.2, "S1 down")
        wait_until(lambda: report(c)["servers_down"] == ["S1"], 10, 0.2, "report shows S1 down")
        after = load.ok
        wait_until(lambda: load.ok >= after + 30, 10, 0.05, "load served after S1 is down")
    assert load.ok > 50 and load.errors == [], load.errors[:5]
    events = [e for e in c.cli_json("events", "--limit", "500") if e["seq"] > since]
    server_events = [e for e in events if e["kind"] == "server.down"]
    per_backend = [e for e in events if e["kind"] == "backend.verdict" and e["data"]["backend"] in ("A", "A2")]
    assert len(server_events) == 1 and per_backend == [], [(e["kind"], e["message"]) for e in events]
    assert server_events[0]["message"].startswith("server S1 DOWN (2 instances")
    assert server_events[0]["data"]["backends"] == ["checkout/A", "checkout/A2"]
    r = report(c)
    assert r["servers_healthy"] == ["S2", "S3"] and r["warnings"][0] == "server S1 is down (2 instances of checkout not healthy)"
    # back (server.up when both pass their checks close enough together, else two verdicts)
    c.start_backend("A")
    c.start_backend("A2")
    wait_until(lambda: verdicts(c)["A"] == "up" and verdicts(c)["A2"] == "up", 20, 0.3, "S1 up again")
    wait_until(lambda: report(c)["servers_healthy"] == ["S1", "S2", "S3"], 10, 0.2, "report shows S1 back")


@pytest.mark.timeout(120)
def test_retry_after_a_failure_goes_to_another_server(cluster_factory):
    # A is dead but stays in rotation (no health checks within the test, no passive ejection),
    # so every request that picks A fails to connect and is retried: never on A2 (same server)
    opts = {"outlier_consecutive_connect_failures": 0, "outlier_consecutive_failures": 0, "retry_budget_min": 1000}
    c = cluster_factory(backends=[(n, f"127.0.0.1:{free_port()}") for n in ("A", "A2", "B")],
                        backend_options={"A": {"server": "S1"}, "A2": {"server": "S1"}, "B": {"server": "S2"}},
                        service_options=opts, health={"kind": "tcp", "interval": 3600, "timeout": 1.0},
                        run_backends=True)
    c.wait_serving()
    c.backends["A"].signal(signal.SIGKILL)
    c.backends["A"].proc.wait(5)
    client = Balancers([c.service_address("n1")])
    with ThreadPoolExecutor(1) as pool:
        statuses = list(pool.map(lambda i: client.request(0, "GET", "/products")[0], range(60)))
    assert statuses.count(200) == 60
    code, stats = c.get("n1", "/v1/dataplane")
    b = stats["services"]["checkout"]["backends"]
    assert b["A"]["errors"] >= 15, b
    assert b["B"]["retries"] == b["A"]["errors"] and b["A2"]["retries"] == 0, b

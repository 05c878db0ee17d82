"""The data plane inside real nodes: kill a backend under load, idempotent checkout
under a backend crash, and drain under load."""
from __future__ import annotations

import http.client
import json
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from halb.demo.shop_db import orders_by_idempotency_key
from tests.conftest import wait_until

pytestmark = pytest.mark.timeout(180)


class Balancers:
    """A client that spreads requests over every balancer (keep-alive per thread)."""

    def __init__(self, addresses: list[str]) -> None:
        self.addresses = addresses
        self.local = threading.local()

    def conn(self, i: int) -> http.client.HTTPConnection:
        conns = getattr(self.local, "conns", None)
        if conns is None:
            conns = self.local.conns = {}
        addr = self.addresses[i % len(self.addresses)]
        if addr not in conns:
            host, port = addr.rsplit(":", 1)
            conns[addr] = http.client.HTTPConnection(host, int(port), timeout=10)
        return conns[addr]

    def request(self, i: int, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        c = self.conn(i)
        try:
            c.request(method, path, body=body, headers=headers or {})
            r = c.getresponse()
            return r.status, dict(r.getheaders()), r.read()
        except (OSError, http.client.HTTPException) as exc:
            c.close()
            return 0, {}, str(exc).encode()


def dataplane_backend(c, node: str, backend: str) -> dict:
    code, body = c.get(node, "/v1/dataplane")
    return body["services"]["checkout"]["backends"][backend]


def routable(c, node: str, backend: str) -> bool:
    return dataplane_backend(c, node, backend)["healthy"]


def backend_requests(c, node: str, backend: str) -> int:
    code, body = c.get(node, "/v1/dataplane")
    return body["services"]["checkout"]["backends"][backend]["requests"]


def test_kill_backend_under_get_load_zero_errors(cluster_factory):
    c = cluster_factory(run_backends=True)
    c.wait_serving()
    client = Balancers([c.service_address(n) for n in ("n1", "n2", "n3")])
    total, errors, served_by = 3000, [], {}
    lock = threading.Lock()
    killed = threading.Event()

    def one(i: int) -> None:
        if i == total // 2 and not killed.is_set():
            c.backends["B"].signal(signal.SIGKILL)
            killed.set()
        status, headers, body = client.request(i, "GET", "/products")
        with lock:
            if status != 200:
                errors.append((i, status, body[:200]))
            else:
                served_by[headers.get("X-Served-By")] = served_by.get(headers.get("X-Served-By"), 0) + 1

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(total)))
    assert killed.is_set()
    assert errors == [], errors[:5]
    assert set(served_by) == {"A", "B", "C"}
    # after it died (and the nodes noticed), B gets no new requests
    c.backends["B"].proc.wait(5)
    for n in ("n1", "n2", "n3"):  # every node's own checks took B out of its routing
        wait_until(lambda n=n: not routable(c, n, "B"), 10, 0.05, f"{n} stops routing to B")
    before = {n: backend_requests(c, n, "B") for n in ("n1", "n2", "n3")}
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda i: client.request(i, "GET", "/products")[0], range(300)))
    assert results.count(200) == 300
    after = {n: backend_requests(c, n, "B") for n in ("n1", "n2", "n3")}
    assert after == before
    wait_until(lambda: next(r for r in c.cli_json("backend", "list") if r["name"] == "B")["verdict"] == "down",
               10, 0.1, "cluster verdict for B: down")


def test_kill_backend_during_idempotent_checkout_exactly_once(cluster_factory):
    c = cluster_factory(run_backends=True)
    c.wait_serving()
    client = Balancers([c.service_address(n) for n in ("n1", "n2", "n3")])
    total = 600
    acked: dict[str, str] = {}
    errors = []
    lock = threading.Lock()

    def one(i: int) -> None:
        if i == total // 2:
            c.backends["B"].signal(signal.SIGKILL)
        key = f"order-{i}"
        body = json.dumps({"items": [{"sku": "sku-1", "qty": 1 + i % 3}]}).encode()
        status, headers, raw = client.request(i, "POST", "/checkout", body,
                                              {"Content-Type": "application/json", "Idempotency-Key": key})
        with lock:
            if status in (200, 201):
                acked[key] = json.loads(raw)["order"]["id"]
            else:
                errors.append((key, status, raw[:200]))

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(total)))
    assert errors == [], errors[:5]
    ledger = orders_by_idempotency_key(c.db)
    assert set(acked) <= set(ledger)
    for key, order_id in acked.items():
        assert ledger[key] == [order_id], (key, ledger[key])
    assert all(len(ids) == 1 for ids in ledger.values())


def test_drain_backend_under_load(cluster_factory):
    c = cluster_factory(run_backends=True, backend_flags=("--delay-ms", "400"))
    c.wait_serving()
    client = Balancers([c.service_address(n) for n in ("n1", "n2", "n3")])
    results: list[tuple[float, float, int, str]] = []
    lock = threading.Lock()
    stop = threading.Event()

    def worker(w: int) -> None:
        i = w
        deadline = time.monotonic() + 30
        while not stop.is_set() and time.monotonic() < deadline:
            t0 = time.monotonic()
            status, headers, _ = client.request(i, "GET", "/products")
            with lock:
                results.append((t0, time.monotonic(), status, headers.get("X-Served-By", "")))
            i += 3

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(12)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: any(backend_requests(c, n, "B") > 0 and
                               c.get(n, "/v1/dataplane")[1]["services"]["checkout"]["backends"]["B"]["in_flight"] > 0
                               for n in ("n1", "n2", "n3")), 10, 0.02, "requests in flight on B")
        c.cli("backend", "drain", "B")
        drained_at = time.monotonic()
        for n in ("n1", "n2", "n3"):  # the drain committed and reached every node's routing snapshot
            wait_until(lambda n=n: dataplane_backend(c, n, "B")["admin_state"] == "drain", 10, 0.02,
                       f"{n} routes with B drained")
        fenced_at = time.monotonic()
        # drain completes: no request in flight on B on any node
        wait_until(lambda: all(r["in_flight"] == 0 for r in c.cli_json("backend", "list") if r["name"] == "B"),
                   10, 0.1, "drain complete")

        def started_after_fence() -> int:
            with lock:
                return sum(1 for r in results if r[0] > fenced_at)

        # enough traffic after the fence for "none of it went to B" to mean something
        wait_until(lambda: started_after_fence() >= 60, 20, 0.1, "60 requests after the drain reached every node")
    finally:
        stop.set()
        for t in threads:
            t.join(15)
    assert all(status == 200 for _, _, status, _ in results), [r for r in results if r[2] != 200][:5]
    # requests that B was serving when the drain landed completed successfully on B
    assert any(who == "B" and start < drained_at < end for start, end, _, who in results)
    # nothing that started after the drain reached every node went to B
    assert not [r for r in results if r[3] == "B" and r[0] > fenced_at]
    row = next(r for r in c.cli_json("backend", "list") if r["name"] == "B")
    assert row["admin_state"] == "drain" and row["in_flight"] == 0

"""Capacity limits with real processes: a halb node in front of demo backends that have a
real capacity (`halb demo backend --capacity N`). Concurrent bursts through the node, and
the proof from the backends' own /stats that no backend ever had more requests in flight
than its limit; limits changed live with `halb backend set`."""
from __future__ import annotations

import asyncio
import time
import json
import urllib.request

import aiohttp
import pytest

from tests.conftest import admin_urlopen, free_port, wait_until


def backend_stats(c, name: str) -> dict:
    with urllib.request.urlopen(f"http://{c.backend_address(name)}/stats", timeout=5) as r:
        return json.loads(r.read())


def dataplane_backend(c, name: str, node: str = "n1") -> dict:
    code, body = c.get(node, "/v1/dataplane")
    assert code == 200, body
    return body["services"]["checkout"]["backends"][name]


async def _burst(url: str, n: int, path: str = "/products") -> list[tuple[int, dict, str]]:
    """n requests at once, each on its own connection; (status, headers, body)."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True)) as s:
        async def one() -> tuple[int, dict, str]:
            try:
                async with s.get(url + path, timeout=aiohttp.ClientTimeout(total=30)) as r:
                    return r.status, dict(r.headers), await r.text()
            except aiohttp.ClientError as exc:
                return 0, {}, repr(exc)
        return await asyncio.gather(*(one() for _ in range(n)))


def burst(c, n: int, path: str = "/products") -> list[tuple[int, dict, str]]:
    return asyncio.run(_burst(f"http://{c.service_address('n1')}", n, path))


def one_node(cluster_factory, limits: dict[str, dict], capacity: dict[str, int], work_ms: int = 100,
             **service_options: object):
    backends = [(name, f"127.0.0.1:{free_port()}") for name in sorted(limits)]
    c = cluster_factory(n=1, start=False, backends=backends, backend_options=limits,
                        service_options=service_options)
    for name in sorted(limits):
        c.start_backend(name, "--capacity", str(capacity[name]), "--work-ms", str(work_ms))
    c.start_all()
    c.leader()
    c.wait_serving()
    for name in sorted(limits):
        wait_until(lambda name=name: dataplane_backend(c, name)["healthy"], 20, 0.1, f"{name} healthy")
    return c


@pytest.mark.timeout(120)
def test_max_conns_holds_at_the_backend_and_changes_live(cluster_factory):
    # the backends could take 6 at once; halb must hold them to 2 each
    c = one_node(cluster_factory, {"A": {"max_conns": 2}, "B": {"max_conns": 2}}, {"A": 6, "B": 6},
                 queue_timeout=10.0)
    assert dataplane_backend(c, "A")["limit_conns"] == 2
    got = burst(c, 24)
    statuses = [s for s, _, _ in got]
    assert statuses == [200] * 24, got  # the excess waited in the queue instead of failing
    for name in ("A", "B"):
        st = backend_stats(c, name)
        assert st["max_in_flight"] == 2, (name, st)  # used to the limit, never above
    assert sum(backend_stats(c, n)["served"] for n in ("A", "B")) == 24
    code, body = c.get("n1", "/v1/dataplane")
    q = body["services"]["checkout"]["queue"]
    assert q["admitted"] >= 16 and q["length"] == 0 and q["timed_out"] == 0 and q["wait_s_max"] > 0.1, q

    out = c.cli("backend", "set", "A", "--max-conns", "4", "--max-rps", "0")
    assert "max_conns 4" in out.stdout, out.stdout
    wait_until(lambda: dataplane_backend(c, "A")["limit_conns"] == 4, 10, 0.1, "new limit applied")
    got = burst(c, 24)
    st = backend_stats(c, "A")
    assert 3 <= st["max_in_flight"] <= 4, st  # the new limit was used, and held
    assert backend_stats(c, "B")["max_in_flight"] <= 2
    events = [e["kind"] for e in c.cli_json("events")]  # audited like every change
    assert "backend.limits" in events

    bad = c.cli("backend", "set", "A", check=False)
    assert bad.returncode != 0 and "--max-conns" in bad.stderr
    bad = c.cli("backend", "set", "nope", "--max-conns", "1", check=False)
    assert bad.returncode != 0
    code, body = c.get("n1", "/v1/services/checkout/backends")
    assert code == 200
    assert {b["name"]: b["max_conns"] for b in body["backends"]} == {"A": 4, "B": 2}


@pytest.mark.timeout(60)
def test_tcp_max_conns_counts_connections() -> None:
    """TCP: max_conns is open connections to the backend; one more is refused (closed) by
    the balancer, and a slot frees when a connection ends."""
    from halb.dataplane.engine import DataPlane
    from halb.dataplane.origin import Origin
    from halb.dataplane.snapshot import BackendRoute
    from halb.dataplane.testing import run, service, snapshot

    async def main() -> None:
        echo = Origin("echo")
        dp = DataPlane("t")
        try:
            port = await echo.start(tcp=True)
            be = BackendRoute(name="b0", host="127.0.0.1", port=port, weight=1, server="s0", max_conns=2)
            await dp.start(snapshot(service("tcp", [be], mode="tcp")))
            lport = dp.bound_port("tcp")

            async def opened() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
                r, w = await asyncio.open_connection("127.0.0.1", lport)
                w.write(b"ping")
                await w.drain()
                return r, w

            held = [await opened() for _ in range(2)]
            for r, _ in held:
                assert await asyncio.wait_for(r.readexactly(4), 10) == b"ping"
            r3, w3 = await opened()
            assert await asyncio.wait_for(r3.read(100), 10) == b""  # refused: closed, nothing relayed
            w3.close()
            s = dp.stats()["services"]["tcp"]
            assert s["backends"]["b0"]["in_flight"] == 2 and s["saturated"] >= 1
            held[0][1].close()
            await asyncio.sleep(0.3)
            r4, w4 = await opened()
            assert await asyncio.wait_for(r4.readexactly(4), 10) == b"ping"
            for _, w in (held[1], (r4, w4)):
                w.close()
        finally:
            await dp.stop()
            echo.close()

    run(main())


@pytest.mark.timeout(120)
def test_queue_bounds_answer_503_with_retry_after_and_a_reason(cluster_factory):
    """One backend, limit 1, 400 ms per request; a queue of 3 with a 1 s timeout: of 12 at
    once, 1 runs, 3 wait (the third would start at 1.2 s: too long), 8 are refused at once."""
    c = one_node(cluster_factory, {"A": {"max_conns": 1}}, {"A": 4}, work_ms=400,
                 queue_timeout=1.0, max_queue=3, retry_after_s=2)
    got = burst(c, 12)
    statuses = [s for s, _, _ in got]
    refused = [(h, json.loads(b)) for s, h, b in got if s == 503]
    reasons = sorted(doc["reason"] for _, doc in refused)
    assert statuses.count(200) + len(refused) == 12, got
    assert reasons.count("queue_full") == 8, reasons
    assert "queue_timeout" in reasons  # the third waiter would start after 1.2 s
    assert 2 <= statuses.count(200) <= 3
    for h, doc in refused:
        assert h["Retry-After"] == "2" and doc["error"] == "service_unavailable"
        assert "capacity limit" in doc["message"] and doc["request_id"]
    assert backend_stats(c, "A")["max_in_flight"] == 1

    code, body = c.get("n1", "/v1/dataplane")
    q = body["services"]["checkout"]["queue"]
    assert q["full"] == 8 and q["timed_out"] == reasons.count("queue_timeout") and q["length"] == 0
    req = urllib.request.Request(c.url("n1", "/metrics"), headers={"Authorization": f"Bearer {c.token}"})
    metrics = admin_urlopen(req, timeout=5).read().decode()
    assert 'halb_service_queue_length{node="n1",service="checkout"} 0.0' in metrics
    assert 'halb_service_queue_refused_total{node="n1",reason="queue_full",service="checkout"} 8.0' in metrics
    assert "halb_service_queue_wait_seconds_sum" in metrics
    out = c.cli("service", "status", "checkout", check=False).stdout
    assert "0 waiting" in out and "8 refused (queue full)" in out, out


@pytest.mark.timeout(180)
def test_cluster_share_keeps_the_sum_over_three_serving_nodes_within_max_conns(cluster_factory):
    """Requests arrive through all three nodes at once (each node's own address, as with DNS
    or shared addresses); with `capacity_share = "cluster"` each node enforces its share of
    A's max_conns 6, so A (which could take 18) never holds more than 6."""
    import threading

    nodes = ("n1", "n2", "n3")
    c = cluster_factory(n=3, start=False, backends=[("A", f"127.0.0.1:{free_port()}")],
                        backend_options={"A": {"max_conns": 6}}, service_options={"queue_timeout": 10.0},
                        dataplane_extra={n: {"capacity_share": "cluster"} for n in nodes})
    c.start_backend("A", "--capacity", "18", "--work-ms", "100")
    c.start_all()
    c.leader()
    c.wait_serving()
    for n in nodes:
        wait_until(lambda n=n: dataplane_backend(c, "A", n)["healthy"], 20, 0.1, f"A healthy on {n}")
    # idle everywhere: an even split (6 / 3) before any traffic
    wait_until(lambda: all(dataplane_backend(c, "A", n)["limit_conns"] == 2 for n in nodes), 15, 0.2,
               "even split while idle")

    stop = threading.Event()

    def trickle(node: str) -> None:  # one request at a time per node: load every node reports
        url = f"http://{c.service_address(node)}/products"
        deadline = time.monotonic() + 120
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                urllib.request.urlopen(url, timeout=10).read()
            except OSError:
                pass
    threads = [threading.Thread(target=trickle, args=(n,), daemon=True) for n in nodes]
    for t in threads:
        t.start()
    try:
        def limits() -> list[int]:
            return [dataplane_backend(c, "A", n)["limit_conns"] for n in nodes]
        time.sleep(5)  # the nodes' windows fill with their (equal) traffic
        assert sum(limits()) <= 6, limits()

        async def everywhere() -> list[tuple[int, dict, str]]:
            parts = await asyncio.gather(*(_burst(f"http://{c.service_address(n)}", 10) for n in nodes))
            return [r for p in parts for r in p]
        got = asyncio.run(everywhere())
        assert [s for s, _, _ in got] == [200] * 30, got
        assert sum(limits()) <= 6, limits()
    finally:
        stop.set()
        for t in threads:
            t.join(15)
    st = backend_stats(c, "A")
    assert st["max_in_flight"] <= 6, st  # the cluster-wide limit held, from the backend's side


@pytest.mark.timeout(60)
def test_a_client_that_leaves_the_queue_frees_its_place_and_never_reaches_the_backend() -> None:
    """In-process data plane over real sockets: limit 1, the slot held by /sleep; a second
    request queues, its client hangs up; the queue drops it (cancelled) and the backend
    never sees it; a third request then gets the slot after the first ends."""
    from halb.dataplane.engine import DataPlane
    from halb.dataplane.origin import Origin
    from halb.dataplane.snapshot import BackendRoute
    from halb.dataplane.testing import run, service, snapshot

    async def get(port: int, path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        await w.drain()
        return r, w

    async def main() -> None:
        origin = Origin("A")
        dp = DataPlane("t")
        try:
            oport = await origin.start()
            be = BackendRoute(name="A", host="127.0.0.1", port=oport, weight=1, server="A", max_conns=1)
            await dp.start(snapshot(service("web", [be], queue_timeout=5.0)))
            port = dp.bound_port("web")
            r1, w1 = await get(port, "/sleep/0.6")
            await asyncio.sleep(0.1)
            r2, w2 = await get(port, "/count")
            await asyncio.sleep(0.1)
            q = dp.stats()["services"]["web"]["queue"]
            assert q["length"] == 1 and q["by_priority"]["normal"] == 1
            w2.close()  # the queued client gives up
            await asyncio.sleep(0.1)
            r3, w3 = await get(port, "/count")
            head1 = await asyncio.wait_for(r1.read(65536), 5)
            assert head1.startswith(b"HTTP/1.1 200")
            body3 = await asyncio.wait_for(r3.read(65536), 5)
            assert body3.startswith(b"HTTP/1.1 200")
            q = dp.stats()["services"]["web"]["queue"]
            assert q["cancelled"] == 1 and q["admitted"] == 1 and q["length"] == 0
            assert origin.counts["GET /count"] == 1  # the one that left never reached the backend
            for w in (w1, w3):
                w.close()
        finally:
            await dp.stop()
            origin.close()

    run(main())


@pytest.mark.timeout(60)
def test_a_retry_waits_for_a_full_backend_instead_of_failing() -> None:
    """A refuses connections (not ejected: outlier detection off), B is at its limit of 1:
    a request that fails on A waits in the queue for B instead of getting a 503."""
    from halb.dataplane.engine import DataPlane
    from halb.dataplane.origin import Origin
    from halb.dataplane.snapshot import BackendRoute
    from halb.dataplane.testing import free_port as dp_free_port
    from halb.dataplane.testing import run, service, snapshot

    async def main() -> None:
        origin = Origin("B")
        dp = DataPlane("t")
        try:
            oport = await origin.start()
            dead = BackendRoute(name="A", host="127.0.0.1", port=dp_free_port(), weight=1, server="A")
            b = BackendRoute(name="B", host="127.0.0.1", port=oport, weight=1, server="B", max_conns=1)
            await dp.start(snapshot(service("web", [dead, b], queue_timeout=5.0, outlier_consecutive_failures=0,
                                            outlier_consecutive_connect_failures=0)))
            port = dp.bound_port("web")
            r1, w1 = await asyncio.open_connection("127.0.0.1", port)
            w1.write(b"GET /sleep/0.6 HTTP/1.1\r\nHost: x\r\n\r\n")
            await asyncio.sleep(0.2)  # on B now (directly, or after A refused it)
            assert dp.stats()["services"]["web"]["backends"]["B"]["in_flight"] == 1
            r2, w2 = await asyncio.open_connection("127.0.0.1", port)
            w2.write(b"GET /count HTTP/1.1\r\nHost: x\r\n\r\n")  # B full: goes to A, refused, waits
            resp2 = await asyncio.wait_for(r2.read(65536), 5)
            assert resp2.startswith(b"HTTP/1.1 200") and b"X-Backend: B" in resp2, resp2
            assert (await asyncio.wait_for(r1.read(65536), 5)).startswith(b"HTTP/1.1 200")
            s = dp.stats()["services"]["web"]
            assert s["queue"]["admitted"] >= 1 and s["retries"] >= 1 and s["backends"]["B"]["in_flight"] == 0
            for w in (w1, w2):
                w.close()
        finally:
            await dp.stop()
            origin.close()

    run(main())


@pytest.mark.timeout(120)
def test_worker_processes_split_a_limit_and_together_never_exceed_it(cluster_factory):
    """`workers = 2`: two processes share the listener (SO_REUSEPORT), each enforces its part
    of max_conns 3 (2 + 1); their sum held at the backend, and the queue still empties."""
    backends = [("A", f"127.0.0.1:{free_port()}")]
    c = cluster_factory(n=1, start=False, backends=backends, backend_options={"A": {"max_conns": 3}},
                        service_options={"queue_timeout": 10.0}, dataplane_extra={"n1": {"workers": 2}})
    c.start_backend("A", "--capacity", "10", "--work-ms", "100")
    c.start_all()
    c.leader()
    c.wait_serving()
    wait_until(lambda: dataplane_backend(c, "A")["healthy"], 20, 0.1, "A healthy")
    wait_until(lambda: len(c.get("n1", "/v1/dataplane")[1]["workers"]) == 2, 20, 0.2, "two processes")
    # 2 + 1, summed over the processes (the worker reports every 0.5 s)
    wait_until(lambda: dataplane_backend(c, "A")["limit_conns"] == 3, 10, 0.2, "both processes' limits")
    got = burst(c, 24)
    assert [s for s, _, _ in got] == [200] * 24, got
    st = backend_stats(c, "A")
    assert st["max_in_flight"] <= 3 and st["served"] == 24, st

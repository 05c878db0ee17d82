"""Failures that need real processes: SIGKILLed backends, non-replay of POST, bounded
memory on large streams (proxy in its own process), and multi-worker serving."""
from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from typing import AsyncIterator

import aiohttp
import pytest

from halb.dataplane.engine import DataPlane
from halb.dataplane.snapshot import BackendRoute
from halb.dataplane.testing import processes, raw_request, rss_bytes, run, service, snapshot, spawn_origin, spawn_proxy


def _routes(procs) -> list[BackendRoute]:
    return [BackendRoute(name=p.name, host="127.0.0.1", port=p.port, weight=1, server=f"srv-{p.name}") for p in procs]


@pytest.mark.timeout(90)
def test_get_retried_on_other_backend_when_one_is_sigkilled_midway() -> None:
    with processes() as procs:
        for n in ("A", "B", "C"):
            procs.append(spawn_origin(n))

        async def main() -> None:
            dp = DataPlane("t")
            events: list[tuple] = []
            dp.on_ejection.append(lambda *a: events.append(a))
            await dp.start(snapshot(service("shop", _routes(procs))))
            try:
                port = dp.bound_port("shop")
                statuses: list[int] = []
                backends: list[str] = []
                done = 0
                killed = asyncio.Event()
                queue: asyncio.Queue[int] = asyncio.Queue()
                for i in range(500):
                    queue.put_nowait(i)

                async def client(session: aiohttp.ClientSession) -> None:
                    nonlocal done
                    while True:
                        try:
                            queue.get_nowait()
                        except asyncio.QueueEmpty:
                            return
                        async with session.get(f"http://127.0.0.1:{port}/sleep/0.005") as r:
                            await r.read()
                            statuses.append(r.status)
                            backends.append(r.headers.get("X-Backend", "?"))
                        done += 1
                        if done == 150 and not killed.is_set():
                            killed.set()
                            procs[1].kill()  # SIGKILL B with requests in flight

                conn = aiohttp.TCPConnector(limit=10)
                async with aiohttp.ClientSession(connector=conn) as session:
                    await asyncio.gather(*(client(session) for _ in range(10)))
                assert killed.is_set()
                assert len(statuses) == 500
                assert statuses.count(200) == 500, [s for s in statuses if s != 200]
                after = backends[200:]
                assert "B" not in after[50:]  # ejected at the first refused connect
                assert {"A", "C"} <= set(after)
                s = dp.stats()["services"]["shop"]
                print("kill-test stats", json.dumps(s))
                assert s["errors"] == 0
                assert s["backends"]["B"]["ejections"] >= 1 and s["backends"]["B"]["errors"] >= 1
                assert any(e[1] == "B" and e[2] for e in events)
            finally:
                await dp.stop()

        run(main(), timeout=80)


@pytest.mark.timeout(60)
def test_post_without_idempotency_key_is_never_replayed() -> None:
    with processes() as procs:
        procs.append(spawn_origin("A"))
        procs.append(spawn_origin("B"))

        async def count(path: str) -> int:
            total = 0
            for p in procs:
                r = await raw_request(p.port, b"GET /count HTTP/1.1\r\nHost: x\r\n\r\n")
                total += json.loads(r.body).get(path, 0)
            return total

        async def main() -> None:
            dp = DataPlane("t")
            await dp.start(snapshot(service("shop", _routes(procs), outlier_consecutive_failures=100)))
            try:
                port = dp.bound_port("shop")
                body = b'{"order": 1}'
                req = (b"POST /close-mid HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
                r = await raw_request(port, req)
                assert r.status == 502 and json.loads(r.body)["error"] == "bad_gateway"
                assert await count("POST /close-mid") == 1  # reached one backend, exactly once
                r = await raw_request(port, b"POST /reset-mid HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi")
                assert r.status == 502
                assert await count("POST /reset-mid") == 1
                # the same with an Idempotency-Key is safe to replay on the other backend
                req_k = req.replace(b"Content-Type", b"Idempotency-Key: order-1\r\nContent-Type")
                r = await raw_request(port, req_k)
                assert r.status == 502
                assert await count("POST /close-mid") == 1 + 2
                assert dp.stats()["services"]["shop"]["retries"] == 1
            finally:
                await dp.stop()

        run(main(), timeout=50)


@pytest.mark.timeout(90)
def test_64mib_streams_both_ways_with_bounded_proxy_rss() -> None:
    size = 64 * 1024 * 1024
    with processes() as procs:
        origin = spawn_origin("A")
        procs.append(origin)
        proxy = spawn_proxy("--listen", "127.0.0.1:0", "--backend", f"A=127.0.0.1:{origin.port}")
        procs.append(proxy)
        peak = [0]
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                try:
                    peak[0] = max(peak[0], rss_bytes(proxy.pid))
                except OSError:
                    return
                time.sleep(0.02)

        async def main() -> None:
            # warm up (imports, pools, buffers) before taking the baseline
            for _ in range(3):
                assert (await raw_request(proxy.port, b"GET /bytes/1000000 HTTP/1.1\r\nHost: x\r\n\r\n")).status == 200
            base = rss_bytes(proxy.pid)
            t = threading.Thread(target=sample, daemon=True)
            t.start()
            try:
                # upload: 64 MiB request body, streamed
                reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
                writer.write(b"POST /sink HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size)
                block = b"u" * (1024 * 1024)
                for _ in range(64):
                    writer.write(block)
                    await writer.drain()
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
                n = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                assert json.loads(await reader.readexactly(n))["received"] == size
                # download: 64 MiB response body, read slowly at first to exercise back-pressure
                writer.write(b"GET /bytes/%d HTTP/1.1\r\nHost: x\r\n\r\n" % size)
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
                assert b" 200 " in head.split(b"\r\n")[0] + b" "
                got = 0
                slow_until = 4 * 1024 * 1024
                while got < size:
                    chunk = await asyncio.wait_for(reader.read(1024 * 1024), 30)
                    assert chunk
                    got += len(chunk)
                    if got < slow_until:
                        await asyncio.sleep(0.01)
                writer.close()
            finally:
                stop.set()
                t.join(2)
            growth = peak[0] - base
            print(f"proxy RSS base {base / 1e6:.1f} MB peak {peak[0] / 1e6:.1f} MB")
            assert growth < 16 * 1024 * 1024, f"proxy RSS grew by {growth / 1e6:.1f} MB for a {size >> 20} MiB body"

        run(main(), timeout=80)


@contextlib.asynccontextmanager
async def two_workers(procs) -> AsyncIterator[DataPlane]:
    """A DataPlane with one forked worker besides the parent, serving "shop" on procs."""
    dp = DataPlane("t", workers=2)
    await dp.start(snapshot(service("shop", _routes(procs))))
    try:
        yield dp
    finally:
        await dp.stop()


@pytest.mark.timeout(60)
def test_two_workers_both_serve() -> None:
    with processes() as procs:
        procs.append(spawn_origin("A"))

        async def main() -> None:
            async with two_workers(procs) as dp:
                worker_procs = [w.proc for w in dp._pool_supervisor.workers]
                port = dp.bound_port("shop")
                for _ in range(80):  # new connection each time: SO_REUSEPORT spreads them
                    r = await raw_request(port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    assert r.status == 200
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:
                    st = dp.stats()
                    if st["services"]["shop"]["requests"] == 80:
                        break
                    await asyncio.sleep(0.2)
                workers = st["workers"]
                assert len(workers) == 2
                assert all(w["requests"] > 0 for w in workers), workers
                assert st["services"]["shop"]["backends"]["A"]["requests"] == 80
                # snapshots reach the worker too: put A in maint -> both answer 503
                dp.update(snapshot(service("shop", [BackendRoute("A", "127.0.0.1", procs[0].port, 1,
                                                                 admin_state="maint")]), version=2))
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:  # every worker reports running snapshot 2
                    versions = [w["version"] for w in dp._pool_supervisor.worker_stats()]
                    if versions and all(v == 2 for v in versions):
                        break
                    await asyncio.sleep(0.05)
                assert versions and all(v == 2 for v in versions), versions
                codes = set()
                for _ in range(30):
                    r = await raw_request(port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    codes.add(r.status)
                assert codes == {503}
            assert worker_procs and all(p.poll() is not None for p in worker_procs)  # stop() ends the workers

        run(main(), timeout=50)


@pytest.mark.timeout(60)
def test_killed_worker_is_replaced() -> None:
    import os
    import signal as sig

    with processes() as procs:
        procs.append(spawn_origin("A"))

        async def main() -> None:
            async with two_workers(procs) as dp:
                pool = dp._pool_supervisor
                old = pool.workers[0].proc.pid
                os.kill(old, sig.SIGKILL)
                # (connections already queued on the dying worker's socket are lost: kernel SO_REUSEPORT)
                for _ in range(100):
                    if pool.workers[0].proc.poll() is not None or pool.workers[0].proc.pid != old:
                        break
                    await asyncio.sleep(0.05)
                port = dp.bound_port("shop")
                for _ in range(20):  # the survivors keep serving meanwhile
                    r = await raw_request(port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    assert r.status == 200
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline:
                    pids = [w["pid"] for w in dp.stats()["workers"]]
                    if len(pids) == 2 and old not in pids:
                        break
                    await asyncio.sleep(0.2)
                assert len(pids) == 2 and old not in pids, pids

        run(main(), timeout=50)

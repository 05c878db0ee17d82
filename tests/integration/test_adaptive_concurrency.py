"""Adaptive concurrency against a real server: the gradient limit (halb/dataplane/adaptive.py)
driving a saturating client against `halb demo backend --capacity N --work-ms W` (a real
process with N workers; requests above N wait inside it) settles near N, and the
server's own /stats shows it was pushed only a little above its capacity.

The client keeps exactly `limit` requests in flight (demand always fills the limit, the
hardest case for a limit), feeds every latency to the limit with the real clock, and
records the limit once per window."""
from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path

import aiohttp
import pytest
import requests

from halb.dataplane.adaptive import GradientLimit, GradientParams
from tests.integration.test_demo_backend import start_backend


async def drive(url: str, lim: GradientLimit, seconds: float) -> list[tuple[float, int]]:
    """Saturating closed loop bounded in time; returns (time, limit) after every update."""
    in_flight = 0
    history: list[tuple[float, int]] = []
    done = asyncio.Event()
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def one() -> None:  # counted in flight by the dispatcher, before it runs
            nonlocal in_flight
            start = time.monotonic()
            try:
                async with session.get(url, timeout=aiohttp.ClientTimeout(total=10)) as r:
                    await r.read()
            finally:
                now = time.monotonic()
                if lim.sample(now, now - start, in_flight):
                    history.append((now, lim.limit))
                in_flight -= 1
                done.set()

        end = time.monotonic() + seconds
        tasks: set[asyncio.Task[None]] = set()
        while time.monotonic() < end:
            while in_flight < lim.limit and len(tasks) < 500:
                in_flight += 1
                t = asyncio.create_task(one())
                tasks.add(t)
                t.add_done_callback(tasks.discard)
            done.clear()
            try:
                await asyncio.wait_for(done.wait(), 1.0)
            except asyncio.TimeoutError:
                pass
        await asyncio.gather(*tasks, return_exceptions=True)
    return history


@pytest.mark.timeout(90)
@pytest.mark.parametrize("capacity", [6, 16])
def test_gradient_limit_converges_near_a_demo_backends_capacity(tmp_path: Path, capacity: int) -> None:
    be = start_backend("K", tmp_path / "shop.db", tmp_path, "--capacity", str(capacity), "--work-ms", "50")
    try:
        lim = GradientLimit(GradientParams(initial_limit=2))
        t0 = time.monotonic()
        history = asyncio.run(drive(be.url + "/products", lim, 10.0))
        late = [limit for t, limit in history if t - t0 >= 5.0]  # after the ramp
        assert len(late) >= 10, history
        typical = statistics.median(late)
        assert capacity * 0.8 <= typical <= capacity * 1.5, (capacity, late)
        st = requests.get(be.url + "/stats", timeout=5).json()
        assert st["max_working"] == capacity  # the server was used to its capacity ...
        assert st["max_in_flight"] <= capacity * 1.6 + 2, st  # ... and pushed only a little past it
        assert lim.min_rtt is not None and 0.045 <= lim.min_rtt <= 0.2
    finally:
        assert be.stop() == 0


async def _closed_loop(url: str, clients: int, seconds: float) -> list[int]:
    """`clients` concurrent clients, each sending its next request when the previous ends,
    for `seconds` (bounded in time); returns every status."""
    statuses: list[int] = []
    end = time.monotonic() + seconds
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        async def client() -> None:
            while time.monotonic() < end:
                try:
                    async with s.get(url, timeout=aiohttp.ClientTimeout(total=10)) as r:
                        await r.read()
                        statuses.append(r.status)
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    statuses.append(0)
        await asyncio.gather(*(client() for _ in range(clients)))
    return statuses


@pytest.mark.timeout(120)
def test_service_option_learns_the_backends_capacity_through_a_node(cluster_factory) -> None:
    """`adaptive_concurrency = true` on a service with no max_conns: 30 clients at once
    against a backend with 6 workers; the node learns a limit near 6, queues the rest, and
    the backend's own /stats shows it was never flooded with 30."""
    from tests.integration.test_capacity_limits import backend_stats, dataplane_backend, one_node

    c = one_node(cluster_factory, {"A": {}}, {"A": 6}, work_ms=50, adaptive_concurrency=True, queue_timeout=5.0)
    assert dataplane_backend(c, "A")["adaptive_limit"] == 4  # the initial limit, before any latency
    statuses = asyncio.run(_closed_loop(f"http://{c.service_address('n1')}/products", 30, 8.0))
    assert len(statuses) > 300 and set(statuses) == {200}, sorted(set(statuses))
    be = dataplane_backend(c, "A")
    assert 4 <= be["adaptive_limit"] <= 10, be  # learned: near the 6 workers
    assert be["limit_conns"] == be["adaptive_limit"] and 45 <= be["adaptive_min_rtt_ms"] <= 150, be
    code, body = c.get("n1", "/v1/services/checkout/backends")  # the report's "learned" capacity
    assert code == 200 and 4 <= body["backends"][0]["learned_conns"] <= 10, body
    st = backend_stats(c, "A")
    assert st["max_working"] == 6, st  # its capacity was used ...
    assert st["max_in_flight"] <= 12, st  # ... and 30 clients never reached it at once

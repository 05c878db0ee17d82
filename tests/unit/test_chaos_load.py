"""The load generator is open loop: a stalled server costs latency and errors, not requests."""
from __future__ import annotations

import asyncio
import socket
import time

from aiohttp import web

from halb.chaos.load import ClientAddresses, LoadConfig, LoadGenerator, buckets, percentile, summarize


async def start_server(stall: dict[str, float]) -> tuple[web.AppRunner, str]:
    async def handler(request: web.Request) -> web.Response:
        if stall["until"] > time.monotonic() > stall["from"]:
            await asyncio.sleep(stall.get("sleep", 5))  # stalled: hold the request far beyond the client timeout
        if request.method == "POST":
            body = await request.json()
            assert body["items"]
            return web.json_response({"order": {"id": "o-" + request.headers["Idempotency-Key"]}}, status=201)
        return web.json_response({"products": []})

    app = web.Application()
    app.router.add_get("/products", handler)
    app.router.add_post("/checkout", handler)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"127.0.0.1:{port}"


def dead_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"  # closed again: connect is refused


def run_load(addresses: list[str], cfg: LoadConfig, stall_window: tuple[float, float] | None = None,
             stall_s: float = 5.0) -> LoadGenerator:
    async def main() -> LoadGenerator:
        now = time.monotonic()
        stall = {"from": now + (stall_window[0] if stall_window else 1e9),
                 "until": now + (stall_window[1] if stall_window else 0), "sleep": stall_s}
        runner, addr = await start_server(stall)
        try:
            gen = LoadGenerator(ClientAddresses("balancers", [a if a != "LIVE" else addr for a in addresses]), cfg,
                                seed=1)
            await asyncio.wait_for(gen.run(asyncio.Event()), cfg.max_duration + cfg.request_timeout + 5)
            return gen
        finally:
            await runner.cleanup()

    return asyncio.run(main())


def test_stalled_server_shows_as_latency_and_errors_not_fewer_requests() -> None:
    cfg = LoadConfig(rate=50, max_duration=2.0, attempt_timeout=0.3, request_timeout=0.3, client_retry="connect")
    gen = run_load(["LIVE"], cfg, stall_window=(0.6, 1.4))
    outs = gen.outcomes
    assert len(outs) == 101  # i/rate <= 2.0 for i = 0..100: exactly the schedule, stall or not
    # requests keep being sent at the fixed rate during the stall (by scheduled time)
    per_half_second = [sum(b["sent"] for b in buckets(outs, 0.5)[i:i + 1]) for i in range(4)]
    assert all(24 <= n <= 26 for n in per_half_second), per_half_second
    stalled = [o for o in outs if 0.7 <= o.scheduled <= 1.2]
    assert stalled and all(o.error.startswith("timeout") for o in stalled), [o.error for o in stalled]
    assert all(o.ok for o in outs if o.scheduled < 0.5 or o.scheduled > 1.6)
    # send times followed the schedule: the generator did not wait for the stalled answers
    assert max(o.scheduled for o in outs) == 2.0
    s = summarize(outs)
    assert s["errors"] >= 20 and s["p99_ms"] >= 290


def test_latency_is_measured_from_the_scheduled_time() -> None:
    cfg = LoadConfig(rate=40, max_duration=1.0, attempt_timeout=3, request_timeout=3)
    gen = run_load(["LIVE"], cfg, stall_window=(0.3, 0.5), stall_s=1.0)
    slow = [o for o in gen.outcomes if 0.35 <= o.scheduled <= 0.45]
    assert slow and all(o.ok and o.latency_ms >= 950 for o in slow), [(o.error, o.latency_ms) for o in slow]
    assert len(gen.outcomes) == 41


def test_connect_failure_goes_to_next_balancer_and_keys_are_unique() -> None:
    cfg = LoadConfig(rate=100, max_duration=0.5, checkout_share=0.5)
    gen = run_load([dead_address(), "LIVE"], cfg)
    outs = gen.outcomes
    assert outs and all(o.ok for o in outs), [o.error for o in outs if not o.ok]
    first_dead = [o for o in outs if o.seq % 2 == 0]
    assert all(o.attempts == 2 and o.retried and "connect" in o.retried[0] for o in first_dead)
    keys = [o.key for o in outs if o.kind == "checkout"]
    assert keys and len(set(keys)) == len(keys) and all(k.startswith(gen.key_prefix) for k in keys)
    assert all(o.order_id == "o-" + o.key for o in outs if o.kind == "checkout")


def test_all_balancers_dead_is_a_client_visible_error() -> None:
    cfg = LoadConfig(rate=20, max_duration=0.2)
    gen = run_load([dead_address(), dead_address()], cfg)
    assert gen.outcomes and all(not o.ok and o.attempts == 2 and o.error.startswith("connect") for o in gen.outcomes)


def test_percentile() -> None:
    assert percentile([], 99) == 0.0
    assert percentile(list(range(1, 101)), 50) == 50
    assert percentile(list(range(1, 101)), 99) == 99
    assert percentile([5.0], 99) == 5.0

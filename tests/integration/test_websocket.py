"""WebSocket through the balancers (issue 13, "WebSocket and Upgrade"): the handshake is
forwarded with its Upgrade and Connection headers, after the backend's 101 both sides are
relayed as bytes; a backend killed under an open WebSocket closes that client's
connection, and new WebSockets reach another backend. Clients: the `websockets` library."""
from __future__ import annotations

import asyncio
import json
import signal

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.conftest import Cluster, admin_urlopen

pytestmark = pytest.mark.timeout(120)


async def echo_session(address: str, messages: list[str | bytes]) -> tuple[str, list[str | bytes]]:
    async with connect(f"ws://{address}/ws", open_timeout=5, close_timeout=2) as ws:
        hello = json.loads(await asyncio.wait_for(ws.recv(), 5))
        out = []
        for m in messages:
            await ws.send(m)
            out.append(await asyncio.wait_for(ws.recv(), 5))
        return hello["instance"], out


def metric(c: Cluster, node: str, name: str) -> float:
    import urllib.request

    req = urllib.request.Request(c.url(node, "/metrics"), headers={"Authorization": f"Bearer {c.token}"})
    text = admin_urlopen(req, timeout=5).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") and 'service="checkout"' in line)


def test_websocket_echo_through_every_balancer(cluster_factory):
    c = cluster_factory(n=3, run_backends=True)
    c.wait_serving()
    big = bytes(range(256)) * 200  # 50 KiB (the demo backend takes messages up to its max_body, 64 KiB)
    seen = set()
    for n in c.nodes:
        for _ in range(3):
            instance, echoed = asyncio.run(echo_session(c.service_address(n), ["hello", "ünïcode", big]))
            assert echoed == ["hello", "ünïcode", big]
            seen.add(instance)
        assert metric(c, n, "halb_service_websockets_switched_total") >= 3
        assert metric(c, n, "halb_service_websockets_open") == 0  # every one ended and was counted out
    assert len(seen) >= 2, seen  # spread over the backends like other requests


def test_a_killed_backend_closes_its_websockets_and_new_ones_go_elsewhere(cluster_factory):
    c = cluster_factory(n=3, run_backends=True)
    c.wait_serving()
    address = c.service_address("n1")

    async def scenario() -> None:
        ws = await connect(f"ws://{address}/ws", open_timeout=5, close_timeout=2)
        victim = json.loads(await asyncio.wait_for(ws.recv(), 5))["instance"]
        await ws.send("before")
        assert await asyncio.wait_for(ws.recv(), 5) == "before"
        c.backends[victim].signal(signal.SIGKILL)
        c.backends[victim].proc.wait(5)
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 5)  # closed promptly, not hung
        for _ in range(4):
            instance, echoed = await echo_session(address, ["after"])
            assert instance != victim and echoed == ["after"]

    asyncio.run(scenario())

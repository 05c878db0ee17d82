"""Deep accept queues are drained at once (accept_burst.py), within max_connections.

The clients connect while the proxy's event loop is blocked, so the kernel queues them all
on the listening socket; libuv alone would then take one per loop iteration.
"""
from __future__ import annotations

import asyncio
import socket
import threading

import pytest

from halb.dataplane.engine import DataPlane
from halb.dataplane.origin import Origin
from halb.dataplane.testing import run, service, snapshot

pytestmark = pytest.mark.timeout(60)

N = 200
GET = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n"


def connect_all(port: int, out: list[socket.socket]) -> None:
    for _ in range(N):
        out.append(socket.create_connection(("127.0.0.1", port), timeout=10))


async def queued_clients(port: int) -> list[socket.socket]:
    """N connections made while this loop is blocked: all wait in the accept queue."""
    socks: list[socket.socket] = []
    t = threading.Thread(target=connect_all, args=(port, socks))
    t.start()
    t.join()  # blocks the loop on purpose: nothing is accepted meanwhile
    return socks


async def ask(loop: asyncio.AbstractEventLoop, s: socket.socket) -> bytes:
    s.setblocking(False)
    await loop.sock_sendall(s, GET)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await asyncio.wait_for(loop.sock_recv(s, 65536), 20)
        if not chunk:
            break
        data += chunk
    return data


def test_a_full_accept_queue_is_taken_in_one_go_and_served() -> None:
    async def main() -> None:
        origin = Origin("o")
        dp = DataPlane("t")
        try:
            oport = await origin.start()
            await dp.start(snapshot(service("s", [("127.0.0.1", oport)])))
            lst = dp.listeners["s"]
            assert lst.burst is not None  # uvloop: libuv accepts one connection per iteration
            socks = await queued_clients(dp.bound_port("s"))
            loop = asyncio.get_running_loop()
            answers = await asyncio.gather(*(ask(loop, s) for s in socks))
            assert all(a.startswith(b"HTTP/1.1 200") for a in answers)
            assert lst.burst.accepted >= N // 2, lst.burst.accepted  # not one per iteration
            for s in socks:
                s.close()
        finally:
            await dp.stop()
            origin.close()

    run(main())


def test_the_burst_never_accepts_past_max_connections() -> None:
    async def main() -> None:
        origin = Origin("o")
        dp = DataPlane("t")
        try:
            oport = await origin.start()
            await dp.start(snapshot(service("s", [("127.0.0.1", oport)], max_connections=20)))
            lst = dp.listeners["s"]
            socks = await queued_clients(dp.bound_port("s"))
            loop = asyncio.get_running_loop()
            answers = await asyncio.gather(*(ask(loop, s) for s in socks))
            ok = [a for a in answers if a.startswith(b"HTTP/1.1 200")]
            refused = [a for a in answers if a.startswith(b"HTTP/1.1 503")]
            assert len(ok) == 20 and len(refused) == N - 20, (len(ok), len(refused))
            assert 0 < lst.burst.accepted <= 20, lst.burst.accepted  # type: ignore[union-attr]
            for s in socks:
                s.close()
        finally:
            await dp.stop()
            origin.close()

    run(main())

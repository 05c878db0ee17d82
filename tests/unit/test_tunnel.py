"""Upgraded connections on a real data plane against a raw origin: what is forwarded, the
bytes around the switch, half-close, the service option, and the idle limit."""
from __future__ import annotations

import asyncio

from halb.dataplane.engine import DataPlane
from halb.dataplane.testing import run, service, snapshot

HANDSHAKE = (b"GET /ws HTTP/1.1\r\nHost: shop\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
             b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")


class Origin:
    """Answers a handshake with 101 + a greeting in the same write, then echoes upper-cased
    bytes; on EOF from the proxy it writes "BYE" and closes. Without Upgrade: a 200."""

    def __init__(self) -> None:
        self.heads: list[bytes] = []
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        head = await r.readuntil(b"\r\n\r\n")
        self.heads.append(head)
        if b"\r\nUpgrade: websocket" not in head:
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nplain")
            await w.drain()
            w.close()
            return
        w.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\nHELLO;")
        while True:
            data = await r.read(65536)
            if not data:
                w.write(b"BYE")
                await w.drain()
                w.close()
                return
            w.write(data.upper())
            await w.drain()


async def read_until(reader: asyncio.StreamReader, marker: bytes, timeout: float = 5) -> bytes:
    return await asyncio.wait_for(reader.readuntil(marker), timeout)


def test_switch_relays_both_ways_with_early_bytes_and_half_close():
    async def main() -> None:
        origin = Origin()
        port = await origin.start()
        dp = DataPlane("t")
        await dp.start(snapshot(service("shop", [("127.0.0.1", port)])))
        try:
            r, w = await asyncio.open_connection("127.0.0.1", dp.bound_port("shop"))
            w.write(HANDSHAKE + b"early;")  # bytes right behind the head reach the backend after the switch
            head = await read_until(r, b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 101") and b"Upgrade: websocket" in head and b"Connection: Upgrade" in head
            assert await read_until(r, b"HELLO;") == b"HELLO;"  # the backend's bytes in the 101's packet
            assert await read_until(r, b"EARLY;") == b"EARLY;"
            sent = b"x" * 300_000  # several buffers' worth: flow control both ways
            w.write(sent + b";")
            got = await asyncio.wait_for(r.readexactly(len(sent) + 1), 10)
            assert got == sent.upper() + b";"
            fwd = origin.heads[0]
            assert b"Upgrade: websocket" in fwd and b"Connection: Upgrade" in fwd and b"Sec-WebSocket-Key" in fwd
            st = dp.stats()["services"]["shop"]
            assert st["websockets"] == 1 and st["websockets_total"] == 1
            assert st["backends"]["b0"]["in_flight"] == 1  # least-connections sees the open tunnel
            w.write_eof()  # half-close: the backend sees EOF, still answers, then closes
            assert await asyncio.wait_for(r.read(), 5) == b"BYE"
            w.close()
            for _ in range(100):
                st = dp.stats()["services"]["shop"]
                if st["websockets"] == 0 and st["connections"] == 0:
                    break
                await asyncio.sleep(0.02)
            assert st["websockets"] == 0 and st["connections"] == 0 and st["backends"]["b0"]["in_flight"] == 0
        finally:
            await dp.stop()
            origin.server.close()

    run(main())


def test_service_option_off_forwards_a_plain_request_and_closes():
    async def main() -> None:
        origin = Origin()
        port = await origin.start()
        dp = DataPlane("t")
        await dp.start(snapshot(service("shop", [("127.0.0.1", port)], websocket=False)))
        try:
            r, w = await asyncio.open_connection("127.0.0.1", dp.bound_port("shop"))
            w.write(HANDSHAKE)
            data = await asyncio.wait_for(r.read(), 5)  # the proxy closes after the answer
            assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"plain")
            assert b"Upgrade" not in origin.heads[0] and dp.stats()["services"]["shop"]["websockets_total"] == 0
            w.close()
        finally:
            await dp.stop()
            origin.server.close()

    run(main())


def test_an_idle_tunnel_is_closed_after_tunnel_timeout():
    async def main() -> None:
        origin = Origin()
        port = await origin.start()
        dp = DataPlane("t")
        await dp.start(snapshot(service("shop", [("127.0.0.1", port)], tunnel_timeout=0.5)))
        try:
            r, w = await asyncio.open_connection("127.0.0.1", dp.bound_port("shop"))
            w.write(HANDSHAKE)
            await read_until(r, b"HELLO;")
            t0 = asyncio.get_running_loop().time()
            assert await asyncio.wait_for(r.read(), 5) == b""  # closed by the proxy
            assert asyncio.get_running_loop().time() - t0 < 3
            w.close()
        finally:
            await dp.stop()
            origin.server.close()

    run(main())


def test_a_drained_backend_keeps_its_tunnels_for_the_grace_then_closes_them():
    import dataclasses

    async def main() -> None:
        origin = Origin()
        port = await origin.start()
        dp = DataPlane("t")
        svc = service("shop", [("127.0.0.1", port)], tunnel_drain_grace=1.0)
        await dp.start(snapshot(svc))
        try:
            r, w = await asyncio.open_connection("127.0.0.1", dp.bound_port("shop"))
            w.write(HANDSHAKE)
            await read_until(r, b"HELLO;")
            drained = dataclasses.replace(svc, backends=(dataclasses.replace(svc.backends[0], admin_state="drain"),))
            dp.update(snapshot(drained, version=2))
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            w.write(b"still;")  # within the grace the tunnel works
            assert await read_until(r, b"STILL;") == b"STILL;"
            assert await asyncio.wait_for(r.read(), 5) == b""  # then it is closed
            assert 0.7 <= loop.time() - t0 < 3
            w.close()
        finally:
            await dp.stop()
            origin.server.close()

    run(main())

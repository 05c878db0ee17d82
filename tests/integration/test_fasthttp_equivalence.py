"""Byte-for-byte: the C head fast path and the llhttp path send the same request heads to
the backend and the same responses to the client (real sockets, in-process DataPlane)."""
from __future__ import annotations

import asyncio
import re

import pytest

from halb.dataplane import http_proxy
from halb.dataplane.engine import DataPlane
from halb.dataplane.testing import run, service, snapshot

pytestmark = pytest.mark.timeout(60)

BIG = b"z" * (300 * 1024)
RESPONSES = {
    b"/a": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: keep-alive\r\nX-A: 1\r\n\r\nhello",
    b"/b": b"HTTP/1.0 404 Not Found\r\nKeep-Alive: timeout=5\r\nConnection: keep-alive\r\nContent-Length: 3\r\n\r\nno!",
    b"/c": b"HTTP/1.1 201 Created\r\nUpgrade: h2c\r\nTrailer: X\r\nContent-Length: 0\r\nSet-Cookie: s=1; Path=/\r\n\r\n",
    b"/big": b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(BIG), BIG),
}
REQUESTS = [
    b"GET /a HTTP/1.1\r\nHost: shop\r\n\r\n",
    b"GET /b HTTP/1.1\r\nHost: shop\r\nUser-Agent: curl/7.88.1\r\nAccept: */*\r\n\r\n",
    b"DELETE /c HTTP/1.1\r\nHost: shop\r\nIdempotency-Key: k1\r\nX-Request-Id: client-id\r\n"
    b"X-Forwarded-For: 203.0.113.7\r\nCookie: a=b\r\nKeep-Alive: 5\r\nTE: trailers\r\n\r\n",
    b"GET /a HTTP/1.0\r\nHost: shop\r\nConnection: keep-alive\r\n\r\n",
    b"GET /a HTTP/1.0\r\nHost: shop\r\n\r\n",
    b"GET /big HTTP/1.1\r\nhost: shop\r\nConnection: close\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: evil\r\n\r\n",
    b"OPTIONS /a?x=1 HTTP/1.1\r\nHost: shop\r\nProxy-Authorization: Basic eA==\r\n\r\n",
]


class RecordingOrigin(asyncio.Protocol):
    """Records each raw request head and answers with the canned response for its path."""

    heads: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while b"\r\n\r\n" in self.buf:
            head, self.buf = self.buf.split(b"\r\n\r\n", 1)
            RecordingOrigin.heads.append(head)
            path = head.split(b" ")[1].split(b"?")[0]
            self.transport.write(RESPONSES[path])  # type: ignore[attr-defined]


async def exchange(port: int, req: bytes) -> bytes:
    """One request on a fresh connection; the whole response as bytes."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    try:
        w.write(req)
        head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)
        m = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
        body = await asyncio.wait_for(r.readexactly(int(m.group(1))), 10) if m else b""
        return head + body
    finally:
        w.close()


async def through_proxy(accel: bool) -> tuple[list[bytes], list[bytes]]:
    loop = asyncio.get_running_loop()
    RecordingOrigin.heads = []
    server = await loop.create_server(RecordingOrigin, "127.0.0.1", 0)
    oport = server.sockets[0].getsockname()[1]
    saved = http_proxy.fast_request, http_proxy.fast_response
    if not accel:
        http_proxy.fast_request = http_proxy.fast_response = None
    dp = DataPlane("eq")
    try:
        await dp.start(snapshot(service("web", [("127.0.0.1", oport)])))
        port = dp.bound_port("web")
        responses = [await exchange(port, req) for req in REQUESTS]
    finally:
        http_proxy.fast_request, http_proxy.fast_response = saved
        await dp.stop()
        server.close()
    # proxy-made request ids differ (a per-process counter); the client's own is kept
    heads = [re.sub(rb"X-Request-Id: eq-[^\r]*", b"X-Request-Id: <generated>", h) for h in RecordingOrigin.heads]
    return heads, responses


def test_fast_path_and_llhttp_path_forward_identical_bytes() -> None:
    if not http_proxy.accelerated():
        pytest.skip("halb.dataplane._fasthttp is not built here")

    async def main() -> None:
        fast = await through_proxy(True)
        slow = await through_proxy(False)
        assert len(fast[0]) == len(REQUESTS)
        assert fast[0] == slow[0]
        assert fast[1] == slow[1]
        # and what both forward is what the proxy promises
        assert b"X-Request-Id: client-id" in fast[0][2] and b"X-Forwarded-For: 203.0.113.7, 127.0.0.1" in fast[0][2]
        assert b"Keep-Alive" not in fast[0][2] and b"TE:" not in fast[0][2] and b"evil" not in fast[0][5]
        assert fast[1][1].startswith(b"HTTP/1.1 404 Not Found\r\n") and b"Keep-Alive" not in fast[1][1]
        assert b"Upgrade" not in fast[1][2] and b"Set-Cookie: s=1; Path=/" in fast[1][2]
        assert fast[1][5].endswith(BIG)

    run(main())

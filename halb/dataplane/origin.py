"""A small, fast HTTP/1.1 origin server with misbehaviours on demand, for tests and bench.

Real upstream processes are needed to test what a proxy does when a backend is SIGKILLed,
resets or never answers; this one starts in ~0.2 s, is fast enough to benchmark against
(asyncio Protocol + httptools, keep-alive) and answers by path:

  /                       200 "ok <name>"             /bytes/N     N bytes, streamed
  /status/N               status N                    /sink        count the body, JSON
  /echo                   stream the body back        /headers     request headers as JSON
  /sleep/S                answer after S seconds      /never       never answer
  /close-mid              partial head, then FIN      /reset-mid   partial head, then RST
  /reset-body             head + part of body, RST    /count       requests seen, JSON
Every response carries ``X-Backend: <name>``.

``--tcp`` turns it into a TCP echo server that, on the client's EOF, writes
"EOF after N bytes" and closes (to test half-close through the proxy).

Run: ``python -m halb.dataplane.origin --port P --name A [--tcp]`` (prints READY port).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import socket
import struct
import sys
from collections import Counter
from typing import Any

import httptools

from halb.aio import run

CHUNK = 256 * 1024


class Origin:
    def __init__(self, name: str) -> None:
        self.name = name.encode()
        self.counts: Counter[str] = Counter()
        self.server: asyncio.AbstractServer | None = None

    async def start(self, host: str = "127.0.0.1", port: int = 0, tcp: bool = False) -> int:
        loop = asyncio.get_running_loop()
        factory = (lambda: _TcpEcho()) if tcp else (lambda: _OriginConn(self))
        self.server = await loop.create_server(factory, host, port, reuse_address=True, backlog=4096)
        return self.server.sockets[0].getsockname()[1]

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


class _TcpEcho(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = transport
        self.n = 0

    def data_received(self, data: bytes) -> None:
        self.n += len(data)
        self.t.write(data)  # type: ignore[attr-defined]

    def eof_received(self) -> bool:
        self.t.write(b"EOF after %d bytes\n" % self.n)  # type: ignore[attr-defined]
        self.t.close()
        return True


class _OriginConn(asyncio.Protocol):
    def __init__(self, origin: Origin) -> None:
        self.o = origin
        self.parser = httptools.HttpRequestParser(self)
        self.t: asyncio.Transport | None = None
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body_n = 0
        self.mode = ""
        self.can_write = asyncio.Event()
        self.can_write.set()
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.can_write.set()

    def pause_writing(self) -> None:
        self.can_write.clear()
        if self.mode == "echo":
            self.t.pause_reading()  # type: ignore[union-attr]

    def resume_writing(self) -> None:
        self.can_write.set()
        if self.mode == "echo":
            self.t.resume_reading()  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.t.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")  # type: ignore[union-attr]
            self.t.close()  # type: ignore[union-attr]

    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = []
        self.body_n = 0
        self.mode = ""

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def _head(self, status: int, extra: bytes = b"", length: int | None = 0) -> bytes:
        framing = b"Transfer-Encoding: chunked\r\n" if length is None else b"Content-Length: %d\r\n" % length
        return b"HTTP/1.1 %d X\r\nX-Backend: %s\r\n%s%s\r\n" % (status, self.o.name, extra, framing)

    def on_headers_complete(self) -> None:
        method = self.parser.get_method().decode()
        path = self.url.split(b"?")[0].decode()
        self.o.counts[f"{method} {path}"] += 1
        if path == "/echo":
            self.mode = "echo"
            self.t.write(self._head(200, length=None))  # type: ignore[union-attr]

    def on_body(self, body: bytes) -> None:
        self.body_n += len(body)
        if self.mode == "echo":
            self.t.writelines((b"%x\r\n" % len(body), body, b"\r\n"))  # type: ignore[union-attr]

    def on_message_complete(self) -> None:
        method = self.parser.get_method()
        path = self.url.split(b"?")[0].decode()
        parts = path.strip("/").split("/")
        t = self.t
        assert t is not None
        head_only = method == b"HEAD"
        if self.mode == "echo":
            t.write(b"0\r\n\r\n")
        elif parts[0] == "bytes" and len(parts) > 1:
            n = int(parts[1])
            t.write(self._head(200, length=n))
            if not head_only:
                asyncio.get_running_loop().create_task(self._stream(n))
        elif parts[0] == "status" and len(parts) > 1:
            body = b"status %s from %s\n" % (parts[1].encode(), self.o.name)
            t.write(self._head(int(parts[1]), length=len(body)) + body)
        elif parts[0] == "sink":
            body = json.dumps({"received": self.body_n, "backend": self.o.name.decode()}).encode()
            t.write(self._head(200, b"Content-Type: application/json\r\n", len(body)) + body)
        elif parts[0] == "headers":
            body = json.dumps([[k.decode("latin-1"), v.decode("latin-1")] for k, v in self.headers]).encode()
            t.write(self._head(200, b"Content-Type: application/json\r\n", len(body)) + body)
        elif parts[0] == "count":
            body = json.dumps(dict(self.o.counts)).encode()
            t.write(self._head(200, b"Content-Type: application/json\r\n", len(body)) + body)
        elif parts[0] == "sleep" and len(parts) > 1:
            asyncio.get_running_loop().call_later(float(parts[1]), self._ok)
        elif parts[0] == "never":
            pass
        elif parts[0] == "close-mid":
            t.write(b"HTTP/1.1 200 OK\r\nContent-Le")
            t.close()
        elif parts[0] == "reset-mid":
            t.write(b"HTTP/1.1 200 OK\r\nContent-Le")
            _rst(t)
        elif parts[0] == "reset-body":
            t.write(self._head(200, length=100000) + b"x" * 1000)
            asyncio.get_running_loop().call_later(0.05, _rst, t)
        else:
            self._ok()

    def _ok(self) -> None:
        if self.closed:
            return
        body = b"ok " + self.o.name + b"\n"
        if self.parser.get_method() == b"HEAD":
            self.t.write(self._head(200, length=len(body)))  # type: ignore[union-attr]
        else:
            self.t.write(self._head(200, length=len(body)) + body)  # type: ignore[union-attr]

    async def _stream(self, n: int) -> None:
        block = b"x" * CHUNK
        while n > 0 and not self.closed:
            await self.can_write.wait()
            k = min(n, CHUNK)
            self.t.write(block if k == CHUNK else block[:k])  # type: ignore[union-attr]
            n -= k


def _rst(t: Any) -> None:
    sock = t.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    t.abort()


async def _main(args: argparse.Namespace) -> None:
    o = Origin(args.name)
    port = await o.start(args.host, args.port, tcp=args.tcp)
    print(f"READY {port}", flush=True)
    await asyncio.Event().wait()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--name", default="origin")
    ap.add_argument("--tcp", action="store_true")
    ap.add_argument("--no-uvloop", action="store_true")
    args = ap.parse_args(argv)
    try:
        run(_main(args), use_uvloop=not args.no_uvloop)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main(sys.argv[1:])

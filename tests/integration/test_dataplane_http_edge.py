"""HTTP edge cases of issue 11 (items 9 and 10) over real sockets on 127.0.0.1, on both head
paths (C fast path and llhttp alone): slow request bodies, Host / request-target rules of
RFC 9112 3.2, request header count, upstream head size in one read, 1xx limits and retries."""
from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any, AsyncIterator, Callable

import pytest

from halb.dataplane.engine import DataPlane
from halb.dataplane.origin import Origin
from halb.dataplane.snapshot import BackendRoute, RoutingSnapshot
from halb.dataplane.testing import raw_request, run, service, snapshot

from tests.integration.head_paths import head_path  # noqa: F401  (autouse: both head paths)

pytestmark = pytest.mark.timeout(60)


@contextlib.asynccontextmanager
async def origin(name: str = "A") -> AsyncIterator[tuple[Origin, int]]:
    o = Origin(name)
    try:
        yield o, await o.start()
    finally:
        o.close()


@contextlib.asynccontextmanager
async def dataplane(snap: RoutingSnapshot) -> AsyncIterator[DataPlane]:
    dp = DataPlane("edge")
    try:
        await dp.start(snap)
        yield dp
    finally:
        await dp.stop()


def backend(port: int, name: str = "A") -> BackendRoute:
    return BackendRoute(name=name, host="127.0.0.1", port=port, weight=1, server=f"srv-{name}")


class RawBackend(asyncio.Protocol):
    """A backend answering each request head with `answer(n)`: (bytes to write in one
    write, close afterwards); n counts the requests seen by all backends sharing `seen`."""

    def __init__(self, seen: list[bytes], mine: list[bytes], answer: Callable[[int], tuple[bytes, bool]]) -> None:
        self.seen = seen
        self.mine = mine
        self.answer = answer
        self.buf = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t: Any = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while b"\r\n\r\n" in self.buf:
            head, self.buf = self.buf.split(b"\r\n\r\n", 1)
            self.seen.append(head)
            self.mine.append(head)
            out, close = self.answer(len(self.seen))
            self.t.write(out)
            if close:
                self.t.close()
                return


@contextlib.asynccontextmanager
async def raw_backends(n: int, answer: Callable[[int], tuple[bytes, bool]]) -> AsyncIterator[tuple[list[int], list[list[bytes]]]]:
    """n RawBackends; yields their ports and the request heads each one received."""
    loop = asyncio.get_running_loop()
    seen: list[bytes] = []
    per: list[list[bytes]] = [[] for _ in range(n)]
    servers = []
    try:
        for i in range(n):
            servers.append(await loop.create_server(lambda mine=per[i]: RawBackend(seen, mine, answer), "127.0.0.1", 0))
        yield [s.sockets[0].getsockname()[1] for s in servers], per
    finally:
        for s in servers:
            s.close()


async def read_all(port: int, req: bytes, timeout: float = 10.0) -> bytes:
    """Send one request (with Connection: close) and read until the proxy closes."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    try:
        w.write(req)
        data = b""
        while True:
            chunk = await asyncio.wait_for(r.read(65536), timeout)
            if not chunk:
                return data
            data += chunk
    finally:
        w.close()


# ------------------------------------------------------------------ item 9: slow request bodies


def test_body_below_minimum_rate_gets_408_and_releases_the_upstream() -> None:
    """1 byte every 0.2 s never trips the idle timeout (it restarts on every byte); the
    minimum rate does, shortly after the grace, for Content-Length and chunked bodies."""
    async def main() -> None:
        async with origin() as (o, oport), dataplane(snapshot(service(
                "web", [backend(oport)], idle_timeout=30.0, body_min_rate_bps=100, body_rate_grace_s=1.0))) as dp:
            port = dp.bound_port("web")
            loop = asyncio.get_running_loop()
            bodies = {
                "content-length": [b"POST /sink HTTP/1.1\r\nHost: x\r\nContent-Length: 60\r\n\r\n"] + [b"x"] * 60,
                # de-chunked bytes count: slow chunk framing is no progress
                "chunked": [b"POST /sink HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"]
                + [b"1\r\n", b"x", b"\r\n"] * 20 + [b"0\r\n\r\n"],
            }
            for kind, pieces in bodies.items():
                t0 = loop.time()
                r = await raw_request(port, pieces, delay=0.2, timeout=20)
                took = loop.time() - t0
                assert r is not None and r.status == 408, (kind, r)
                assert "slower than 100 bytes/s" in json.loads(r.body)["message"], r.body
                assert took < 6.0, (kind, took)  # the client would have needed 12 s
                st = dp.stats()["services"]["web"]["backends"]["A"]
                assert st["in_flight"] == 0 and st["idle_pool"] == 0, st  # upstream closed, not pooled
            # a body at a decent rate passes the same service
            ok = await raw_request(port, [b"POST /sink HTTP/1.1\r\nHost: x\r\nContent-Length: 3000\r\n\r\n"]
                                   + [b"y" * 1000] * 3, delay=0.3, timeout=20)
            assert ok.status == 200 and json.loads(ok.body)["received"] == 3000

    run(main())


def test_body_deadline_bounds_a_body_that_keeps_the_rate() -> None:
    async def main() -> None:
        async with origin() as (o, oport), dataplane(snapshot(service(
                "web", [backend(oport)], idle_timeout=30.0, body_timeout_s=1.5, body_min_rate_bps=0))) as dp:
            port = dp.bound_port("web")
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            pieces = [b"PUT /sink HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"] + [b"z"] * 100
            r = await raw_request(port, pieces, delay=0.1, timeout=20)
            assert r is not None and r.status == 408 and "within 1.5s" in json.loads(r.body)["message"]
            assert loop.time() - t0 < 5.0  # the client would have needed 10 s
            assert dp.stats()["services"]["web"]["backends"]["A"]["in_flight"] == 0

    run(main())


class StallingSink(asyncio.Protocol):
    """A backend that reads nothing for `stall` seconds, then takes a Content-Length body
    and answers with its size: slow to take the body, not the client's fault."""

    stall = 3.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t: Any = transport
        self.buf = b""
        self.need = -1
        self.got = 0
        self.stalled = False

    def data_received(self, data: bytes) -> None:
        if not self.stalled:  # (uvloop ignores pause_reading() in connection_made)
            self.stalled = True
            self.t.pause_reading()
            asyncio.get_running_loop().call_later(self.stall, self.t.resume_reading)
        if self.need < 0:
            self.buf += data
            if b"\r\n\r\n" not in self.buf:
                return
            head, data = self.buf.split(b"\r\n\r\n", 1)
            self.need = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        self.got += len(data)
        if self.got >= self.need:
            body = b'{"received": %d}' % self.got
            self.t.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))


def test_a_backend_slow_to_take_the_body_does_not_get_the_client_a_408() -> None:
    """The client sends 16 MiB as fast as it can; the backend reads nothing for 3 s, so the
    proxy stops reading the client (flow control). That time is not the client's: with a
    minimum rate of 16 MB/s after 0.5 s the body is still accepted."""
    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(StallingSink, "127.0.0.1", 0)
        try:
            sport = server.sockets[0].getsockname()[1]
            async with dataplane(snapshot(service("web", [backend(sport)], idle_timeout=30.0, body_timeout_s=0,
                                                  body_min_rate_bps=16_000_000, body_rate_grace_s=0.5))) as dp:
                size = 16 * 1024 * 1024
                r = await raw_request(dp.bound_port("web"), b"PUT /up HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
                                      % size + b"u" * size, timeout=30)
                assert r is not None and r.status == 200, r
                assert json.loads(r.body)["received"] == size
        finally:
            server.close()

    run(main())


# ------------------------------------------------------------------ item 10: Host and request target


def test_host_rules_of_rfc9112() -> None:
    async def main() -> None:
        async with origin() as (o, oport), dataplane(snapshot(service("web", [backend(oport)]))) as dp:
            port = dp.bound_port("web")
            r = await raw_request(port, b"GET / HTTP/1.1\r\nUser-Agent: t\r\n\r\n")
            assert r.status == 400 and "without Host" in json.loads(r.body)["message"]
            r = await raw_request(port, b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
            assert r.status == 400 and "more than one Host" in json.loads(r.body)["message"]
            r = await raw_request(port, b"GET / HTTP/1.1\r\nHost: a\r\nhost: a\r\n\r\n")
            assert r.status == 400
            for bad in (b"GET ftp://a/x HTTP/1.1\r\nHost: a\r\n\r\n", b"GET http://u@a/x HTTP/1.1\r\nHost: a\r\n\r\n",
                        b"GET http:///x HTTP/1.1\r\nHost: a\r\n\r\n",
                        b"GET http://a/x HTTP/1.1\r\nUser-Agent: t\r\n\r\n"):  # absolute-form, still no Host
                assert (await raw_request(port, bad)).status == 400, bad
            assert sum(o.counts.values()) == 0  # none of them reached the backend
            # HTTP/1.0 needs no Host
            r = await raw_request(port, b"GET / HTTP/1.0\r\n\r\n")
            assert r.status == 200
            # absolute-form: the URI's authority wins over Host; the backend gets origin-form
            r = await raw_request(port, b"GET http://shop.example:8080/headers?q=1 HTTP/1.1\r\nHost: evil.example\r\n"
                                        b"X-A: 1\r\n\r\n")
            assert r.status == 200
            got = {k.lower(): v for k, v in json.loads(r.body)}
            assert got["host"] == "shop.example:8080" and got["x-forwarded-host"] == "shop.example:8080"
            assert got["x-a"] == "1"
            assert o.counts["GET /headers"] == 1
            r = await raw_request(port, b"GET HTTP://shop.example HTTP/1.0\r\n\r\n")  # no path, no Host line
            assert r.status == 200 and o.counts["GET /"] == 2

    run(main())


def test_header_count_limit_431_for_thousands_of_empty_headers() -> None:
    """6,400 empty header lines fit max_header_bytes (32 KiB) and used to be forwarded after
    a quadratic concatenation; the header-count limit answers 431 first."""
    async def main() -> None:
        async with origin() as (o, oport), dataplane(snapshot(service("web", [backend(oport)]))) as dp:
            port = dp.bound_port("web")
            empty = b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X:\r\n" * 6400 + b"\r\n"
            r = await raw_request(port, empty)
            assert r.status == 431 and "too many request headers" in json.loads(r.body)["message"]
            hundred = b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(99)) + b"\r\n"
            assert (await raw_request(port, hundred)).status == 200  # 100 lines: the default limit
            over = hundred.replace(b"\r\n\r\n", b"\r\nX-Last: v\r\n\r\n")
            assert (await raw_request(port, over)).status == 431
            # lines the proxy drops or merges into one count too (all within max_header_bytes)
            for name in (b"X-Forwarded-For: 1.2.3.4", b"Cookie: a=b", b"Connection: keep-alive", b"TE: x"):
                r = await raw_request(port, b"GET / HTTP/1.1\r\nHost: x\r\n" + (name + b"\r\n") * 1000 + b"\r\n")
                assert r.status == 431 and "too many" in json.loads(r.body)["message"], name
            assert o.counts["GET /"] == 1

    run(main())


def test_upstream_head_over_the_limit_in_one_read_is_502() -> None:
    head = b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 6000 + b"\r\nContent-Length: 2\r\n\r\nok"

    async def main() -> None:
        async with raw_backends(1, lambda n: (head, False)) as (ports, per), dataplane(snapshot(service(
                "web", [backend(ports[0])], max_header_bytes=4096))) as dp:
            r = await raw_request(dp.bound_port("web"), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert r.status == 502 and "head too large" in json.loads(r.body)["message"]
            assert len(per[0]) == 1

    run(main())


def test_interim_responses_are_capped() -> None:
    many = b"HTTP/1.1 100 Continue\r\n\r\n" * 50 + b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

    async def main() -> None:
        async with raw_backends(1, lambda n: (many, False)) as (ports, per), dataplane(snapshot(service(
                "web", [backend(ports[0])]))) as dp:
            data = await read_all(dp.bound_port("web"), b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert data.count(b"HTTP/1.1 100 Continue\r\n") == 10  # max_interim_responses
            assert b"HTTP/1.1 502 " in data and b"HTTP/1.1 200 " not in data

    run(main())


def test_no_retry_once_an_interim_response_reached_the_client() -> None:
    """The first backend sends 103 Early Hints and dies; the GET is idempotent, but the
    client already has bytes of this attempt, so it gets a 502, not a second backend's 200."""
    def answer(n: int) -> tuple[bytes, bool]:
        if n == 1:
            return b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n", True
        return b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", False

    async def main() -> None:
        async with raw_backends(2, answer) as (ports, per), dataplane(snapshot(service(
                "web", [backend(ports[0], "A"), backend(ports[1], "B")], outlier_consecutive_failures=100))) as dp:
            data = await read_all(dp.bound_port("web"), b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert data.startswith(b"HTTP/1.1 103 Early Hints\r\n"), data
            assert b"HTTP/1.1 502 " in data and b"HTTP/1.1 200 " not in data, data
            assert sorted(len(p) for p in per) == [0, 1]  # never sent to the second backend
            assert dp.stats()["services"]["web"]["retries"] == 0

    def answer_silent(n: int) -> tuple[bytes, bool]:
        return (b"", True) if n == 1 else answer(n)

    async def control() -> None:
        # the same failure without an interim response is still retried: nothing reached the client
        async with raw_backends(2, answer_silent) as (ports, per), dataplane(snapshot(service(
                "web", [backend(ports[0], "A"), backend(ports[1], "B")], outlier_consecutive_failures=100))) as dp:
            data = await read_all(dp.bound_port("web"), b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert data.startswith(b"HTTP/1.1 200 OK\r\n") and sorted(len(p) for p in per) == [1, 1], data

    run(main())
    run(control())

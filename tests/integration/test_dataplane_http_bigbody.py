"""Large Content-Length bodies relayed from halb's own read buffers (body_relay.py) over real
sockets on 127.0.0.1, on both head paths: every byte checked end to end while a slow client
with a small receive buffer keeps the proxy's client transport backed up (so buffers are
both reused and handed over to the transport), and a backend cut mid-body."""
from __future__ import annotations

import asyncio
import contextlib
import random
import re
import socket
import ssl
from pathlib import Path
from typing import AsyncIterator

import pytest

from halb.dataplane import body_relay
from halb.dataplane.engine import DataPlane
from halb.dataplane.snapshot import BackendRoute
from halb.dataplane.testing import free_port, processes, raw_request, run, service, snapshot, spawn_proxy

from tests.certs_util import make_ca, make_leaf
from tests.integration.head_paths import head_path  # noqa: F401  (autouse: both head paths)

pytestmark = pytest.mark.timeout(120)


def body_of(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


async def serve_bodies(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """GET /<seed>/<size>[/cut]: a Content-Length response of body_of(seed, size), written in
    random pieces (so the proxy's reads have random sizes); /cut stops half-way and closes."""
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            m = re.match(rb"GET /(\d+)/(\d+)(/cut)? ", head)
            assert m is not None, head
            seed, size, cut = int(m[1]), int(m[2]), m[3] is not None
            body = body_of(seed, size)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
            rng = random.Random(seed ^ 0x5A5A)
            pos, stop = 0, (size // 2 if cut else size)
            while pos < stop:
                n = min(rng.choice((1, 7, 1000, 4096, 65536, 100_000, 300_000)), stop - pos)
                writer.write(body[pos:pos + n])
                pos += n
                await writer.drain()
                if rng.random() < 0.2:
                    await asyncio.sleep(0.001)
            if cut:
                writer.close()
                return
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


@contextlib.asynccontextmanager
async def proxy() -> AsyncIterator[int]:
    server = await asyncio.start_server(serve_bodies, "127.0.0.1", 0)
    bport = server.sockets[0].getsockname()[1]
    dp = DataPlane("bigbody")
    try:
        port = free_port()
        await dp.start(snapshot(service("web", [BackendRoute(name="A", host="127.0.0.1", port=bport, weight=1)],
                                        port=port)))
        yield port
    finally:
        await dp.stop()
        server.close()


async def slow_client(port: int, requests: list[tuple[int, int]], rng: random.Random,
                      tls: ssl.SSLContext | None = None) -> None:
    """One keep-alive connection with a 4 KiB receive buffer, reading in random small pieces
    with pauses, checking every body byte against what the backend sent."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.setblocking(False)
    await asyncio.get_running_loop().sock_connect(s, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=s, limit=1 << 16, ssl=tls,
                                                   server_hostname="big.example" if tls else None)
    try:
        for seed, size in requests:
            writer.write(b"GET /%d/%d HTTP/1.1\r\nHost: t\r\n\r\n" % (seed, size))
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200"), head
            assert b"content-length: %d\r\n" % size in head.lower(), head
            want = body_of(seed, size)
            pos = 0
            while pos < size:
                piece = await reader.read(min(rng.randrange(1, 20_000), size - pos))
                assert piece, f"connection closed at {pos} of {size}"
                assert piece == want[pos:pos + len(piece)], f"byte mismatch in [{pos}, {pos + len(piece)}) of seed {seed}"
                pos += len(piece)
                if rng.random() < 0.05:
                    await asyncio.sleep(0.002)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


def test_large_bodies_byte_exact_under_backpressure_with_buffers_reused_and_handed_over(
        monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {"reused": 0, "handed_over": 0}
    orig = body_relay.BodyRelay.buffer_updated

    def spy(self: body_relay.BodyRelay, nbytes: int) -> None:  # records which ownership path ran
        buf = self.buf
        orig(self, nbytes)
        if buf is not None and self.buf is None and buf not in body_relay._spare:
            seen["handed_over"] += 1
        elif self.buf is buf:
            seen["reused"] += 1

    monkeypatch.setattr(body_relay.BodyRelay, "buffer_updated", spy)

    async def main() -> None:
        async with proxy() as port:
            rng = random.Random(7)
            sizes = [body_relay.MIN_BODY - 1, body_relay.MIN_BODY, 1 << 20, 3 * (1 << 20) + 12345, 700_001]
            clients = [slow_client(port, [(c * 100 + i, sizes[(c + i) % len(sizes)]) for i in range(4)],
                                   random.Random(rng.random())) for c in range(3)]
            await asyncio.gather(*clients)
            # the proxy still answers small requests on a pooled connection afterwards
            r = await raw_request(port, b"GET /1/10 HTTP/1.1\r\nHost: t\r\n\r\n")
            assert r is not None and r.status == 200 and r.body == body_of(1, 10)

    run(main(), 100)
    assert seen["handed_over"] > 0, seen  # the client transport kept a buffer: a fresh one was taken
    assert seen["reused"] > 0, seen
    assert len(body_relay._spare) <= body_relay.SPARE_MAX


def test_backend_cut_mid_body_closes_the_client_after_the_bytes_it_sent() -> None:
    async def main() -> None:
        async with proxy() as port:
            size = 2 * (1 << 20)
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(b"GET /5/%d/cut HTTP/1.1\r\nHost: t\r\n\r\n" % size)
                head = await reader.readuntil(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 200")
                got = await asyncio.wait_for(reader.read(), 20)  # until the proxy closes
                assert got == body_of(5, size)[:size // 2]
            finally:
                writer.close()
            r = await raw_request(port, b"GET /6/%d HTTP/1.1\r\nHost: t\r\n\r\n" % size)
            assert r is not None and r.complete and r.body == body_of(6, size)

    run(main(), 60)


def test_large_bodies_byte_exact_through_a_tls_frontend_under_backpressure(tmp_path: Path) -> None:
    """The client transport is uvloop's TLS transport. It encrypts what it is given at once
    (OpenSSL copies it into its memory BIO; only in a handshake would it keep it in a backlog,
    counted in get_write_buffer_size), so buffers are reused; every byte still arrives."""
    ca = make_ca()
    leaf = make_leaf(ca, ["big.example"])
    (tmp_path / "chain.pem").write_text(leaf.cert_pem + ca.cert_pem)
    (tmp_path / "key.pem").write_text(leaf.key_pem())
    client = ssl.create_default_context(cadata=ca.cert_pem)

    async def main() -> None:
        server = await asyncio.start_server(serve_bodies, "127.0.0.1", 0)
        bport = server.sockets[0].getsockname()[1]
        try:
            with processes() as procs:
                proxy_proc = spawn_proxy("--listen", f"127.0.0.1:{free_port()}", "--backend", f"A=127.0.0.1:{bport}",
                                         "--tls-cert", str(tmp_path / "chain.pem"), "--tls-key", str(tmp_path / "key.pem"))
                procs.append(proxy_proc)
                rng = random.Random(11)
                await asyncio.gather(*[
                    slow_client(proxy_proc.port, [(c * 10 + i, (1 << 20) + c * 77_777 + i) for i in range(3)],
                                random.Random(rng.random()), client) for c in range(2)])
        finally:
            server.close()

    run(main(), 100)

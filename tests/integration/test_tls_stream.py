"""halb's TLS transport for frontend connections (halb/dataplane/tls_stream.py), with the C
core and the Python core alike, against real TLS clients (Python's ssl sockets) over real
sockets on uvloop: the handshake comes before the application, records of any size pass
both ways, reading pauses and resumes, close sends close_notify, a client's close_notify
is an EOF, and failed or stalled handshakes and tampered records close the connection
without reaching (or after telling) the application."""
from __future__ import annotations

import asyncio
import socket
import ssl
import time
from pathlib import Path
from typing import Any

import pytest
import uvloop

from halb.certs.tls import load_context
from halb.dataplane import tls_stream
from tests.certs_util import make_ca, make_leaf

pytestmark = pytest.mark.timeout(60)
CORES = [tls_stream.TlsStream, tls_stream.PyTlsStream]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, Path]:
    d = tmp_path_factory.mktemp("pki")
    ca = make_ca()
    leaf = make_leaf(ca, ["tls.example", "127.0.0.1"])
    (d / "ca.pem").write_text(ca.cert_pem)
    return load_context(leaf.cert_pem + ca.cert_pem, leaf.key_pem().encode()), d / "ca.pem"


class App(asyncio.Protocol):
    """Echoes what it gets (unless `echo` is off) and records what happened to it."""

    def __init__(self, echo: bool = True) -> None:
        self.echo = echo
        self.transport: Any = None
        self.events: list[str] = []
        self.data = bytearray()
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.events.append("made")

    def data_received(self, data: bytes) -> None:
        self.data += data
        self.events.append(f"data {len(data)}")
        if self.echo:
            self.transport.write(data)

    def eof_received(self) -> None:
        self.events.append("eof")

    def connection_lost(self, exc: Exception | None) -> None:
        self.events.append("lost")
        if not self.lost.done():
            self.lost.set_result(exc)


def client_context(ca: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def run(coro: Any) -> Any:
    return uvloop.run(coro)


async def serve(stream_cls: type, ctx: ssl.SSLContext, apps: list[App], timeout: float = 10.0,
                echo: bool = True) -> tuple[asyncio.AbstractServer, int]:
    loop = asyncio.get_running_loop()

    def make() -> Any:
        app = App(echo)
        apps.append(app)
        return stream_cls(loop, ctx, app, timeout)

    server = await loop.create_server(make, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def tls_connect(port: int, ca: Path) -> ssl.SSLSocket:
    """A TLS client for which an end without close_notify is an error (SSLEOFError), not b""."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    return client_context(ca).wrap_socket(raw, server_hostname="tls.example", suppress_ragged_eofs=False)


def recv_exactly(s: ssl.SSLSocket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            break
        out += chunk
    return bytes(out)


@pytest.mark.parametrize("stream_cls", CORES, ids=lambda c: c.__name__)
def test_records_of_any_size_both_ways_and_close_notify_from_the_server(stream_cls: type, pki: Any) -> None:
    ctx, ca = pki

    async def main() -> None:
        apps: list[App] = []
        server, port = await serve(stream_cls, ctx, apps)

        def client() -> tuple[list[bytes], bytes, str, str | None]:
            with tls_connect(port, ca) as s:
                got = []
                for size in (1, 200, 16384, 16385, 40_000, 300_000):  # one record, several, many
                    payload = bytes((i * 7 + size) % 251 for i in range(size))
                    s.sendall(payload)
                    got.append(recv_exactly(s, size) == payload)
                s.sendall(b"bye")
                recv_exactly(s, 3)
                return got, s.recv(10), s.version() or "", s.selected_alpn_protocol()

        fut = asyncio.get_running_loop().run_in_executor(None, client)
        while not apps or b"bye" not in apps[0].data:
            await asyncio.sleep(0.01)
        app = apps[0]
        assert app.transport.get_extra_info("ssl_object").version() in ("TLSv1.2", "TLSv1.3")
        assert app.transport.get_extra_info("peername")[0] == "127.0.0.1"
        assert app.transport.get_extra_info("ssl_object").selected_alpn_protocol() == "http/1.1"
        app.transport.close()  # close_notify: the client's recv returns b"" cleanly
        oks, after_close, version, alpn = await fut
        assert all(oks) and after_close == b"" and version in ("TLSv1.2", "TLSv1.3") and alpn == "http/1.1"
        assert await asyncio.wait_for(app.lost, 5) is None
        assert app.events[0] == "made" and app.events[-1] == "lost" and "eof" not in app.events
        assert max(int(e.split()[1]) for e in app.events if e.startswith("data")) <= tls_stream.RECORD
        server.close()

    run(main())


@pytest.mark.parametrize("stream_cls", CORES, ids=lambda c: c.__name__)
def test_paused_reading_delivers_nothing_until_resumed(stream_cls: type, pki: Any) -> None:
    ctx, ca = pki

    async def main() -> None:
        apps: list[App] = []
        server, port = await serve(stream_cls, ctx, apps, echo=False)
        s = await asyncio.to_thread(tls_connect, port, ca)
        try:
            while not apps:
                await asyncio.sleep(0.01)
            app = apps[0]
            app.transport.pause_reading()
            assert not app.transport.is_reading()
            await asyncio.to_thread(s.sendall, b"x" * 50_000)
            await asyncio.sleep(0.3)
            assert app.data == b""  # not one record while paused
            app.transport.resume_reading()
            for _ in range(200):
                if len(app.data) == 50_000:
                    break
                await asyncio.sleep(0.01)
            assert app.data == b"x" * 50_000
        finally:
            s.close()
        await asyncio.wait_for(app.lost, 5)
        server.close()

    run(main())


@pytest.mark.parametrize("stream_cls", CORES, ids=lambda c: c.__name__)
def test_close_notify_from_the_client_is_an_eof(stream_cls: type, pki: Any) -> None:
    ctx, ca = pki

    async def main() -> None:
        apps: list[App] = []
        server, port = await serve(stream_cls, ctx, apps)

        def client() -> None:
            s = tls_connect(port, ca)
            s.sendall(b"hello")
            recv_exactly(s, 5)
            raw = s.unwrap()  # sends close_notify
            raw.close()

        await asyncio.to_thread(client)
        app = apps[0]
        await asyncio.wait_for(app.lost, 5)
        assert app.events == ["made", "data 5", "eof", "lost"]
        server.close()

    run(main())


@pytest.mark.parametrize("stream_cls", CORES, ids=lambda c: c.__name__)
def test_failed_and_stalled_handshakes_never_reach_the_application(stream_cls: type, pki: Any) -> None:
    ctx, ca = pki

    async def main() -> None:
        apps: list[App] = []
        server, port = await serve(stream_cls, ctx, apps, timeout=0.5)

        def plain_http() -> bytes:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                out = b""
                while True:
                    chunk = s.recv(4096)
                    if not chunk:
                        return out
                    out += chunk

        answer = await asyncio.to_thread(plain_http)
        assert answer[:1] in (b"", b"\x15")  # nothing, or a TLS alert record; then closed

        def silent() -> float:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                t0 = time.monotonic()
                try:
                    s.recv(10)
                except ConnectionResetError:
                    pass
                return time.monotonic() - t0

        waited = await asyncio.to_thread(silent)
        assert 0.3 < waited < 3.0, waited  # aborted at the handshake timeout
        assert all("made" not in a.events for a in apps) and len(apps) == 2
        server.close()

    run(main())


@pytest.mark.parametrize("stream_cls", CORES, ids=lambda c: c.__name__)
def test_a_tampered_record_aborts_and_the_application_is_told(stream_cls: type, pki: Any) -> None:
    ctx, ca = pki

    async def main() -> None:
        apps: list[App] = []
        server, port = await serve(stream_cls, ctx, apps)
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        cli = client_context(ca).wrap_bio(incoming, outgoing, server_hostname="tls.example")
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while True:  # the handshake over memory BIOs, so the record can be changed on the wire
            try:
                cli.do_handshake()
                break
            except ssl.SSLWantReadError:
                if outgoing.pending:
                    writer.write(outgoing.read())
                incoming.write(await asyncio.wait_for(reader.read(65536), 5))
        if outgoing.pending:
            writer.write(outgoing.read())
        cli.write(b"a secret request")
        record = bytearray(outgoing.read())
        record[-3] ^= 0x55  # in the authentication tag
        writer.write(bytes(record))
        while not apps or "made" not in apps[0].events:
            await asyncio.sleep(0.01)
        exc = await asyncio.wait_for(apps[0].lost, 5)
        assert apps[0].data == b"" and apps[0].events[-1] == "lost", (apps[0].events, exc)
        writer.close()
        server.close()

    run(main())


@pytest.mark.parametrize("stream_cls", CORES, ids=lambda c: c.__name__)
def test_set_protocol_hands_the_stream_to_another_protocol(stream_cls: type, pki: Any) -> None:
    ctx, ca = pki

    async def main() -> None:
        apps: list[App] = []
        server, port = await serve(stream_cls, ctx, apps, echo=False)
        s = await asyncio.to_thread(tls_connect, port, ca)
        try:
            await asyncio.to_thread(s.sendall, b"one")
            while not apps or apps[0].data != b"one":
                await asyncio.sleep(0.01)
            second = App(echo=True)
            t = apps[0].transport
            t.set_protocol(second)
            second.transport = t
            assert t.get_protocol() is second
            await asyncio.to_thread(s.sendall, b"two")
            assert await asyncio.to_thread(recv_exactly, s, 3) == b"two"
            assert apps[0].data == b"one" and second.data == b"two"
        finally:
            s.close()
        await asyncio.wait_for(second.lost, 5)
        server.close()

    run(main())


def test_the_c_core_is_in_use_when_tlsdirect_is() -> None:
    from halb.certs.tls import tls_direct
    assert (tls_stream.core_in_use() != "Python") == tls_direct()

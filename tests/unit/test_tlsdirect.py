"""halb/certs/_tlsdirect.c: a TLS server connection's per-record calls (read, write,
pending) made by halb's C extension must behave exactly like CPython's ssl.SSLObject:
same bytes, the same exceptions for want-read, close_notify and a tampered record, and
reads of data spanning several records. Each scenario runs on real OpenSSL connections over
memory BIOs, once with DirectSSLObject (the C path) and once with a plain ssl.SSLObject,
and the two transcripts must be equal."""
from __future__ import annotations

import os
import ssl
from typing import Any, Callable

import pytest

from halb.certs import tls
from tests.certs_util import make_ca, make_leaf

pytest.importorskip("halb.certs._tlsdirect")
pytestmark = pytest.mark.skipif(not tls.tls_direct(), reason="_tlsdirect found no libssl through _ssl "
                                                              "(or HALB_TLS_DIRECT=0)")


class Pair:
    """A client and a server SSLObject joined by memory BIOs, handshake done."""

    def __init__(self, direct: bool) -> None:
        ca = make_ca()
        leaf = make_leaf(ca, ["shop.example"])
        ctx = tls.load_context(leaf.cert_pem + ca.cert_pem, leaf.key_pem().encode())
        if not direct:
            ctx.sslobject_class = ssl.SSLObject
        self.c_in, self.c_out, self.s_in, self.s_out = (ssl.MemoryBIO() for _ in range(4))
        self.server = ctx.wrap_bio(self.s_in, self.s_out, server_side=True)
        assert (type(self.server.read.__self__).__name__ == "Direct") == direct
        self.client = ssl.create_default_context(cadata=ca.cert_pem).wrap_bio(
            self.c_in, self.c_out, server_hostname="shop.example")
        for _ in range(10):
            for obj in (self.client, self.server):
                try:
                    obj.do_handshake()
                except ssl.SSLWantReadError:
                    pass
            self.to_server()
            self.to_client()

    def to_server(self, tamper: bool = False) -> None:
        data = self.c_out.read()
        if tamper and data:
            data = data[:-1] + bytes([data[-1] ^ 1])  # the last byte of the AEAD tag
        self.s_in.write(data)

    def to_client(self) -> None:
        self.c_in.write(self.s_out.read())


def outcome(fn: Callable[[], Any]) -> Any:
    try:
        return ("ok", fn())
    except ssl.SSLError as exc:
        return ("raise", type(exc).__name__, getattr(exc, "reason", None))
    except Exception as exc:
        return ("raise", type(exc).__name__)


def transcript(direct: bool) -> list[Any]:
    out: list[Any] = []
    p = Pair(direct)
    s = p.server
    out.append(outcome(lambda: s.read(262144)))  # nothing there: want-read
    p.client.write(b"GET / HTTP/1.1\r\nHost: shop.example\r\n\r\n")
    p.client.write(b"second record")
    p.to_server()
    out.append(outcome(lambda: s.read(262144)))  # one record per read
    out.append(outcome(s.pending))
    out.append(outcome(lambda: s.read(5)))  # part of a record: the rest is pending
    out.append(outcome(s.pending))
    out.append(outcome(lambda: s.read(262144)))
    big = os.urandom(40000)
    p.client.write(big)
    p.to_server()
    got = b""
    while True:  # uvloop's loop: read while the incoming BIO or OpenSSL hold data
        r = outcome(lambda: s.read(262144))
        if r[0] != "ok":
            out.append(r)
            break
        got += r[1]
        if not p.s_in.pending and not s.pending():
            break
    out.append(got == big)
    out.append(outcome(lambda: s.write(b"HTTP/1.1 200 OK\r\n\r\n")))
    out.append(outcome(lambda: s.write(memoryview(b"abc")[1:])))
    out.append(outcome(lambda: s.write(bytearray(b"xyz"))))
    out.append(outcome(lambda: s.write("text")))  # type: ignore[arg-type]
    out.append(outcome(lambda: s.write(b"")))
    p.to_client()
    out.append(outcome(lambda: p.client.read(1000)))
    buf = bytearray(64)
    p.client.write(b"into a buffer")
    p.to_server()
    out.append(outcome(lambda: s.read(64, buf)))
    out.append(bytes(buf[:13]))
    out.append(outcome(lambda: s.read(0)))
    p.client.write(b"partial")
    data = p.c_out.read()
    p.s_in.write(data[:7])  # half a record: want-read, then the rest
    out.append(outcome(lambda: s.read(1024)))
    p.s_in.write(data[7:])
    out.append(outcome(lambda: s.read(1024)))
    return out


def test_the_c_path_gives_what_cpython_gives() -> None:
    direct, cpython = transcript(True), transcript(False)
    assert direct == cpython
    assert direct[0][1] == "SSLWantReadError" and direct[1] == ("ok", b"GET / HTTP/1.1\r\nHost: shop.example\r\n\r\n")
    assert direct[3] == ("ok", b"secon") and direct[4] == ("ok", 8)


@pytest.mark.parametrize("direct", [True, False])
def test_close_notify_reads_empty_and_a_tampered_record_raises(direct: bool) -> None:
    p = Pair(direct)
    p.client.write(b"hello")
    p.to_server(tamper=True)
    r = outcome(lambda: p.server.read(1024))
    assert r[0] == "raise" and r[1] == "SSLError" and r[2] == "DECRYPTION_FAILED_OR_BAD_RECORD_MAC", r
    q = Pair(direct)
    try:
        q.client.unwrap()
    except ssl.SSLWantReadError:
        pass
    q.to_server()
    assert q.server.read(1024) == b""  # close_notify: uvloop starts its shutdown on b""


def test_bind_refuses_what_is_not_cpythons_ssl_connection() -> None:
    from halb.certs import _tlsdirect

    assert _tlsdirect.bind(object(), len, len) is None
    p = Pair(True)
    assert _tlsdirect.bind(p.client._sslobj, len, len) is not None  # type: ignore[attr-defined]
    assert _tlsdirect.load("/nonexistent/_ssl.so") is False

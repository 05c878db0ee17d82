"""The PROXY protocol (HAProxy's spec, versions 1 and 2): tell a backend who the client is,
and learn it from a load balancer in front of halb.

Sending (`send_proxy = "v1" | "v2"` per service): one header at the start of each backend
connection, with the client's address and the address it connected to. Because a header
describes one client connection, HTTP mode then never shares a backend connection between
clients (no pooling: HAProxy marks such connections private for the same reason), and TCP
mode runs on the asyncio path (the C relay has no place for a header).

Receiving (`accept_proxy = true`): `ProxyHeaderGate` sits in front of the real protocol
until a complete, valid header has arrived (within `header_timeout`); a connection without
one is closed. Then the real protocol takes the transport over and the header's source
address is the client's (X-Forwarded-For, hashing, logs). `UNKNOWN` (v1) and `LOCAL` (v2,
health checks of the balancer in front) keep the socket's own addresses.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import struct
from typing import Any, Callable

from halb.dataplane.local_errors import RateLimitedLog

log = logging.getLogger(__name__)
rejected_log = RateLimitedLog(logging.WARNING)

V2_SIG = b"\r\n\r\n\x00\r\nQUIT\n"
V1_MAX = 107  # the spec's longest v1 line, CRLF included
V2_MAX = 16 + 1024  # signature, version/command, family, length + addresses and TLVs we accept
VERSIONS = ("v1", "v2")

Address = tuple[str, int]
Addresses = tuple[Address, Address]  # (source = the client, destination = what it connected to)


class ProxyHeaderError(ValueError):
    """Not a valid PROXY header: the connection is closed."""


def header(version: str, addrs: Addresses) -> bytes:
    """The header announcing `addrs` to a backend."""
    (sip, sport), (dip, dport) = addrs
    src, dst = ipaddress.ip_address(sip), ipaddress.ip_address(dip)
    if src.version != dst.version:  # e.g. a v4 client on a dual-stack listener: map to v6
        src, dst = (ipaddress.IPv6Address(f"::ffff:{a}") if a.version == 4 else a for a in (src, dst))
    if version == "v1":
        return b"PROXY %s %s %s %d %d\r\n" % (b"TCP4" if src.version == 4 else b"TCP6", str(src).encode(),
                                              str(dst).encode(), sport, dport)
    if src.version == 4:
        body = src.packed + dst.packed + struct.pack("!HH", sport, dport)
        return V2_SIG + b"\x21\x11" + struct.pack("!H", len(body)) + body
    body = src.packed + dst.packed + struct.pack("!HH", sport, dport)
    return V2_SIG + b"\x21\x21" + struct.pack("!H", len(body)) + body


def parse(buf: bytes) -> tuple[int, Addresses | None] | None:
    """(bytes the header took, its addresses or None for UNKNOWN/LOCAL), or None while
    `buf` is still a prefix of a header. Raises ProxyHeaderError for anything else."""
    if not buf:
        return None
    if buf[:1] == b"P":
        return _parse_v1(buf)
    if buf[:12] == V2_SIG[:len(buf[:12])]:
        return _parse_v2(buf)
    raise ProxyHeaderError("no PROXY protocol header")


def _parse_v1(buf: bytes) -> tuple[int, Addresses | None] | None:
    if buf[:6] != b"PROXY "[:len(buf[:6])]:
        raise ProxyHeaderError("no PROXY protocol header")
    end = buf.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(buf) >= V1_MAX:
            raise ProxyHeaderError("PROXY v1 line longer than 107 bytes")
        return None
    parts = buf[:end].split(b" ")
    if parts[0] != b"PROXY" or len(parts) < 2:
        raise ProxyHeaderError("malformed PROXY v1 line")
    if parts[1] == b"UNKNOWN":
        return end + 2, None
    if parts[1] not in (b"TCP4", b"TCP6") or len(parts) != 6:
        raise ProxyHeaderError("malformed PROXY v1 line")
    try:
        src, dst = ipaddress.ip_address(parts[2].decode()), ipaddress.ip_address(parts[3].decode())
        sport, dport = int(parts[4]), int(parts[5])
    except (ValueError, UnicodeDecodeError):
        raise ProxyHeaderError("bad address or port in PROXY v1 line") from None
    if (src.version, dst.version) != ((4, 4) if parts[1] == b"TCP4" else (6, 6)) \
            or not (0 <= sport <= 65535 and 0 <= dport <= 65535) or parts[4] != str(sport).encode() \
            or parts[5] != str(dport).encode():
        raise ProxyHeaderError("bad address or port in PROXY v1 line")
    return end + 2, ((str(src), sport), (str(dst), dport))


def _parse_v2(buf: bytes) -> tuple[int, Addresses | None] | None:
    if len(buf) < 16:
        return None
    ver_cmd, fam = buf[12], buf[13]
    (length,) = struct.unpack("!H", buf[14:16])
    if ver_cmd >> 4 != 2 or ver_cmd & 0xF not in (0, 1):
        raise ProxyHeaderError("unsupported PROXY v2 version or command")
    if 16 + length > V2_MAX:
        raise ProxyHeaderError(f"PROXY v2 header longer than {V2_MAX} bytes")
    if len(buf) < 16 + length:
        return None
    total = 16 + length
    if ver_cmd & 0xF == 0:  # LOCAL: the balancer in front speaking for itself
        return total, None
    body = buf[16:total]
    if fam == 0x11 and length >= 12:
        src, dst = ipaddress.IPv4Address(body[0:4]), ipaddress.IPv4Address(body[4:8])
        sport, dport = struct.unpack("!HH", body[8:12])
    elif fam == 0x21 and length >= 36:
        src, dst = ipaddress.IPv6Address(body[0:16]), ipaddress.IPv6Address(body[16:32])
        sport, dport = struct.unpack("!HH", body[32:36])
    elif fam & 0xF0 in (0x00, 0x30):  # UNSPEC or UNIX: no IP address to take
        return total, None
    else:
        raise ProxyHeaderError("PROXY v2 address block too short or of an unknown family")
    return total, ((str(src), sport), (str(dst), dport))


def connection_addrs(transport: asyncio.BaseTransport) -> Addresses | None:
    """The client's and our side of a connection, as the kernel sees them."""
    peer, sock = transport.get_extra_info("peername"), transport.get_extra_info("sockname")
    if not peer or not sock:
        return None
    return (peer[0], peer[1]), (sock[0], sock[1])


class ProxyHeaderGate(asyncio.Protocol):
    """Reads the PROXY header of an accepted connection, then hands the transport to the
    real protocol (`inner`), telling it the client's address with `inner.set_proxied`."""

    def __init__(self, inner: Any, timeout: float, on_reject: Callable[[str], None]) -> None:
        self.inner = inner
        self.timeout = timeout
        self.on_reject = on_reject
        self.buf = b""
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.timer = asyncio.get_running_loop().call_later(self.timeout, self._reject, "no PROXY header in time")

    def data_received(self, data: bytes) -> None:
        self.buf += data
        try:
            got = parse(self.buf)
        except ProxyHeaderError as e:
            self._reject(str(e))
            return
        if got is None:
            return
        n, addrs = got
        rest, self.buf = self.buf[n:], b""
        if self.timer is not None:
            self.timer.cancel()
        t = self.transport
        assert t is not None
        t.set_protocol(self.inner)
        self.inner.set_proxied(addrs or connection_addrs(t))
        self.inner.connection_made(t)
        if rest and not t.is_closing():
            self.inner.data_received(rest)

    def eof_received(self) -> bool | None:
        self._reject("closed before a PROXY header")
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.transport = None

    def _reject(self, why: str) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.transport is not None and not self.transport.is_closing():
            self.on_reject(why)
            self.transport.close()


def gate_for(lst: Any) -> Callable[[Any], ProxyHeaderGate]:
    """Wraps a listener's new protocol in a gate with the listener's header_timeout; a
    connection without a valid header is counted in the listener's `rejected` and logged
    (rate-limited) before the gate closes it. Outermost: before TLS, on a TLS frontend."""
    who = f"frontend {lst.frontend}" if lst.frontend else f"service {lst.rt.route.name}"

    def rejected(why: str) -> None:
        lst.rt.rejected += 1
        rejected_log("%s: connection closed: %s (accept_proxy is on)", who, why)

    def gate(inner: Any) -> ProxyHeaderGate:
        return ProxyHeaderGate(inner, lst.rt.opts.header_timeout, rejected)

    return gate

"""A tiny authoritative DNS responder for the service name (DNS announcement mode).

Why: where a floating VIP is not possible (no L2 segment, cloud networks), every node
answers the service name with the lease holder's address (or all healthy balancers) with
a 1 s TTL, so clients follow a failover within about a second of their next lookup.

Behaviour, as an authoritative server for one zone would:

* A for a name the resolver knows -> its IPv4 addresses, AAAA -> its IPv6 addresses, ANY ->
  both; TTL ``ttl``, AA set. The resolver returns both families mixed.
* A name in the zone the resolver does not know (returns None) -> NXDOMAIN + SOA.
* Other types (MX, ...), or A/AAAA when the name has no address of that family -> NOERROR
  with no answers (NODATA) + SOA, so a dual-stack client's AAAA lookup fails fast and it
  uses the A answer (and the other way round).
* SOA at the zone apex -> the SOA.
* Names outside the zone, or classes other than IN -> REFUSED.
* Opcodes other than QUERY -> NOTIMP; not exactly one question -> FORMERR.
* Garbage, responses (QR=1), oversized datagrams -> dropped silently.

Never amplify: a reply is at most 512 bytes (answers cut and TC set if needed), carries
no EDNS options, and errors are never bigger than the question they echo.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from typing import Callable

from dnslib import AAAA, A, CLASS, DNSHeader, DNSLabel, DNSQuestion, DNSRecord, OPCODE, QTYPE, RCODE, RR, SOA

log = logging.getLogger(__name__)

Resolver = Callable[[str], "list[str] | None"]

MAX_QUERY_BYTES = 4096      # ignore anything bigger outright
MAX_REPLY_BYTES = 512       # classic UDP limit; we never send more


def normalize(name: str) -> str:
    """Lower-case, no trailing dot: the form handed to the resolver."""
    return name.rstrip(".").lower()


class DnsResponder:
    """Asyncio UDP DNS server. ``zone_resolver(name)`` gets e.g. ``"checkout.halb"``.

    The resolver runs on the event loop for every query, so it must be a quick lookup
    in memory (the node's current announcement view), not I/O.
    """

    def __init__(self, bind_host: str, bind_port: int, zone_resolver: Resolver, ttl: int = 1,
                 zone: str = "halb", freebind: bool = False) -> None:
        self.bind_host = bind_host
        self.bind_port = bind_port
        self.resolver = zone_resolver
        self.ttl = int(ttl)
        self.zone = normalize(zone)
        self.freebind = freebind
        self._transport: asyncio.DatagramTransport | None = None
        self.stats = {"queries": 0, "answered": 0, "dropped": 0, "errors": 0}
        self._soa = RR(DNSLabel(self.zone + "."), QTYPE.SOA, ttl=self.ttl,
                       rdata=SOA(f"ns.{self.zone}.", f"hostmaster.{self.zone}.",
                                 (1, 3600, 600, 86400, self.ttl)))

    # ---- lifecycle ----------------------------------------------------------------
    @property
    def port(self) -> int:
        """The bound port (useful with ``bind_port=0``)."""
        if self._transport is None:
            return self.bind_port
        return self._transport.get_extra_info("sockname")[1]

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        from halb.takeover import take_inherited

        sock = take_inherited("udp", self.bind_host, self.bind_port)  # hot restart: the replaced process's
        if sock is None and self.freebind:
            from .vip import freebind_socket

            sock = freebind_socket(self.bind_host, self.bind_port, kind=socket.SOCK_DGRAM)
        if sock is not None:
            transport, _ = await loop.create_datagram_endpoint(lambda: _Protocol(self), sock=sock)
        else:
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _Protocol(self), local_addr=(self.bind_host, self.bind_port))
        self._transport = transport  # type: ignore[assignment]
        log.info("DNS responder for zone %s on %s:%d", self.zone, self.bind_host, self.port)

    def udp_socket(self) -> socket.socket | None:
        """The bound UDP socket (a hot restart hands it over, halb/takeover.py)."""
        return self._transport.get_extra_info("socket") if self._transport is not None else None

    async def stop(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    async def __aenter__(self) -> "DnsResponder":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ---- the protocol logic (pure; tested directly too) ---------------------------
    def in_zone(self, name: str) -> bool:
        return name == self.zone or name.endswith("." + self.zone)

    def handle(self, data: bytes) -> bytes | None:
        """Reply bytes for one datagram, or None to drop it."""
        if len(data) < 12 or len(data) > MAX_QUERY_BYTES:
            return None
        try:
            req = DNSRecord.parse(data)
        except Exception:  # dnslib raises assorted errors (DNSError, struct, Unicode...) on garbage
            return None
        h = req.header
        if h.qr:  # a response: never answer it (no reflection loops)
            return None
        if h.opcode != OPCODE.QUERY:
            return self._error(h, None, RCODE.NOTIMP)
        if len(req.questions) != 1:
            return self._error(h, None, RCODE.FORMERR)
        q = req.questions[0]
        name = normalize(str(q.qname))
        if q.qclass != CLASS.IN or not self.in_zone(name):
            return self._error(h, q, RCODE.REFUSED, aa=False)
        reply = DNSRecord(DNSHeader(id=h.id, qr=1, aa=1, ra=0, rd=h.rd, opcode=h.opcode), q=q)
        if name == self.zone:
            if q.qtype in (QTYPE.SOA, QTYPE.ANY):
                reply.add_answer(self._soa)
            else:
                reply.add_auth(self._soa)
            return self._pack(reply)
        try:
            addrs = self.resolver(name)
        except Exception:
            log.exception("DNS resolver failed for %s", name)
            self.stats["errors"] += 1
            return self._error(h, q, RCODE.SERVFAIL)
        if addrs is None:
            reply.header.rcode = RCODE.NXDOMAIN
            reply.add_auth(self._soa)
            return self._pack(reply)
        want_a, want_aaaa = q.qtype in (QTYPE.A, QTYPE.ANY), q.qtype in (QTYPE.AAAA, QTYPE.ANY)
        if want_a or want_aaaa:
            for addr in addrs:
                try:
                    ip = ipaddress.ip_address(addr)
                except ValueError:
                    log.warning("resolver returned %r for %s, not an address; skipped", addr, name)
                    continue
                if ip.version == 4 and want_a:
                    reply.add_answer(RR(q.qname, QTYPE.A, rdata=A(str(ip)), ttl=self.ttl))
                elif ip.version == 6 and want_aaaa:
                    reply.add_answer(RR(q.qname, QTYPE.AAAA, rdata=AAAA(str(ip)), ttl=self.ttl))
        if not reply.rr:
            reply.add_auth(self._soa)  # NODATA: the name exists, not with this type
        return self._pack(reply)

    def _error(self, h: DNSHeader, q: DNSQuestion | None, rcode: int, aa: bool = True) -> bytes:
        reply = DNSRecord(DNSHeader(id=h.id, qr=1, aa=int(aa), ra=0, rd=h.rd, opcode=h.opcode,
                                    rcode=rcode), q=q)
        return self._pack(reply)

    @staticmethod
    def _pack(reply: DNSRecord) -> bytes:
        packed = reply.pack()
        if len(packed) <= MAX_REPLY_BYTES:
            return packed
        # too many answers for plain UDP: keep what fits and set TC, as RFC 1035 says
        reply.auth = []
        while reply.rr and len(packed) > MAX_REPLY_BYTES:
            reply.rr.pop()
            reply.header.tc = 1
            packed = reply.pack()
        return packed


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, server: DnsResponder) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        stats = self.server.stats
        stats["queries"] += 1
        if addr[1] == 0:  # source port 0 cannot be a real resolver: drop
            stats["dropped"] += 1
            return
        try:
            reply = self.server.handle(data)
        except Exception:  # never let one packet take the server down
            log.exception("DNS handler failed")
            stats["errors"] += 1
            reply = None
        if reply is None:
            stats["dropped"] += 1
            return
        stats["answered"] += 1
        if self.transport is not None:
            self.transport.sendto(reply, addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("DNS socket error: %s", exc)

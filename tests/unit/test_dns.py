"""DnsResponder over real UDP sockets on 127.0.0.1 (no root needed)."""
from __future__ import annotations

import asyncio
import os
import random
import socket
import struct

import pytest
from dnslib import DNSRecord, QTYPE, RCODE

from halb.announce.dns import MAX_REPLY_BYTES, DnsResponder

pytestmark = pytest.mark.timeout(30)

ZONE_DATA: dict[str, list[str]] = {
    "checkout.shop.test": ["10.99.0.10"],
    "aa.shop.test": ["10.0.0.1", "10.0.0.2", "10.0.0.3"],
    "empty.shop.test": [],
    "many.shop.test": [f"10.1.{i // 250}.{i % 250}" for i in range(100)],
    "bad.shop.test": ["not-an-ip", "10.0.0.9"],
    "dual.shop.test": ["10.99.0.10", "fd00:99::10", "10.99.0.11", "fd00:99::11"],
    "six.shop.test": ["fd00:99::10"],
}


def resolver(name: str) -> list[str] | None:
    if name == "boom.shop.test":
        raise RuntimeError("resolver bug")
    return ZONE_DATA.get(name)


async def _query(port: int, payload: bytes, timeout: float = 1.0) -> bytes | None:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, ("127.0.0.1", port))
        await loop.sock_sendall(sock, payload)
        try:
            return await asyncio.wait_for(loop.sock_recv(sock, 65535), timeout)
        except asyncio.TimeoutError:
            return None
    finally:
        sock.close()


def run_with_server(body, ttl: int = 1):
    async def main():
        async with DnsResponder("127.0.0.1", 0, resolver, ttl=ttl, zone="shop.test.") as srv:
            assert srv.port != 0
            return await body(srv)
    return asyncio.run(main())


def ask(srv: DnsResponder, name: str, qtype: str = "A"):
    async def go():
        raw = await _query(srv.port, DNSRecord.question(name, qtype).pack())
        assert raw is not None, f"no reply for {name} {qtype}"
        return DNSRecord.parse(raw)
    return go()


def test_a_record_known_name_ttl_and_flags():
    async def body(srv):
        rep = await ask(srv, "checkout.shop.test")
        assert rep.header.rcode == RCODE.NOERROR
        assert rep.header.aa == 1 and rep.header.qr == 1 and rep.header.ra == 0
        assert [str(rr.rdata) for rr in rep.rr] == ["10.99.0.10"]
        assert all(rr.ttl == 1 for rr in rep.rr)
        # case-insensitive, answer echoes the question's spelling
        rep2 = await ask(srv, "CheckOut.Shop.Test.")
        assert [str(rr.rdata) for rr in rep2.rr] == ["10.99.0.10"]
        rep3 = await ask(srv, "aa.shop.test")
        assert sorted(str(rr.rdata) for rr in rep3.rr) == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
    run_with_server(body)


def test_unknown_name_in_zone_is_nxdomain_with_soa():
    async def body(srv):
        rep = await ask(srv, "nope.shop.test")
        assert rep.header.rcode == RCODE.NXDOMAIN
        assert rep.header.aa == 1 and not rep.rr
        assert rep.auth and rep.auth[0].rtype == QTYPE.SOA
    run_with_server(body)


def test_outside_zone_is_refused():
    async def body(srv):
        for name in ("example.com", "shop.test.evil", "xshop.test"):
            rep = await ask(srv, name)
            assert rep.header.rcode == RCODE.REFUSED, name
            assert not rep.rr and rep.header.aa == 0
    run_with_server(body)


def test_non_a_types_are_nodata_and_apex_soa():
    async def body(srv):
        rep = await ask(srv, "checkout.shop.test", "AAAA")
        assert rep.header.rcode == RCODE.NOERROR and not rep.rr
        assert rep.auth[0].rtype == QTYPE.SOA
        rep = await ask(srv, "checkout.shop.test", "MX")
        assert rep.header.rcode == RCODE.NOERROR and not rep.rr
        rep = await ask(srv, "nope.shop.test", "AAAA")
        assert rep.header.rcode == RCODE.NXDOMAIN
        rep = await ask(srv, "shop.test", "SOA")
        assert rep.header.rcode == RCODE.NOERROR and rep.rr[0].rtype == QTYPE.SOA
        rep = await ask(srv, "empty.shop.test", "A")  # known name, no address now
        assert rep.header.rcode == RCODE.NOERROR and not rep.rr
        rep = await ask(srv, "checkout.shop.test", "ANY")
        assert [str(rr.rdata) for rr in rep.rr] == ["10.99.0.10"]
    run_with_server(body)


def test_non_query_opcode_notimp_and_resolver_error_servfail():
    async def body(srv):
        q = DNSRecord.question("checkout.shop.test")
        q.header.opcode = 5  # UPDATE
        raw = await _query(srv.port, q.pack())
        assert DNSRecord.parse(raw).header.rcode == RCODE.NOTIMP
        rep = await ask(srv, "boom.shop.test")
        assert rep.header.rcode == RCODE.SERVFAIL
        rep = await ask(srv, "bad.shop.test")  # invalid entries skipped, valid kept
        assert [str(rr.rdata) for rr in rep.rr] == ["10.0.0.9"]
    run_with_server(body)


def test_large_answer_truncated_within_512_bytes():
    async def body(srv):
        raw = await _query(srv.port, DNSRecord.question("many.shop.test").pack())
        assert raw is not None and len(raw) <= MAX_REPLY_BYTES
        rep = DNSRecord.parse(raw)
        assert rep.header.tc == 1 and 0 < len(rep.rr) < 100
    run_with_server(body)


def test_garbage_is_dropped_and_server_survives():
    rng = random.Random(1234)
    good_id = 0x4242
    packets = [b"", b"\x00", b"\xff" * 11, os.urandom(12), b"\x00" * 5000]
    packets += [bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 300))) for _ in range(300)]
    # a response (QR=1) must never be answered: no reflection loops
    resp = DNSRecord.question("checkout.shop.test").reply()
    packets.append(resp.pack())
    # compression-pointer loop in the question name
    hdr = struct.pack("!HHHHHH", 7, 0x0100, 1, 0, 0, 0)
    packets.append(hdr + b"\xc0\x0c" + b"\x00\x01\x00\x01")
    # question count 0 and 2
    packets.append(struct.pack("!HHHHHH", 8, 0x0100, 0, 0, 0, 0))
    two = DNSRecord.question("checkout.shop.test")
    two.add_question(DNSRecord.question("aa.shop.test").q)
    packets.append(two.pack())

    async def body(srv):
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", srv.port))
        total_in = total_out = 0
        for p in packets:
            await loop.sock_sendall(sock, p)
            total_in += len(p)
        # a sentinel query after the garbage: the server handles datagrams in order and
        # loopback delivers its replies in order, so once the sentinel's reply is here every
        # reply to the garbage is too (no fixed sleep). UDP may drop some of the burst
        # (including a sentinel): resend it until answered.
        sentinel = DNSRecord.question("sentinel.shop.test")
        sentinel.header.id = 0x5151

        def is_sentinel(raw: bytes) -> bool:
            try:
                rec = DNSRecord.parse(raw)
            except Exception:
                return False
            return rec.header.id == 0x5151 and str(rec.q.qname) == "sentinel.shop.test."

        replies = []
        answered = False
        for _ in range(20):
            await loop.sock_sendall(sock, sentinel.pack())
            deadline = loop.time() + 0.5
            while not answered and loop.time() < deadline:
                try:
                    raw = sock.recv(65535)
                except BlockingIOError:
                    await asyncio.sleep(0.005)
                    continue
                if is_sentinel(raw):
                    answered = True
                else:
                    replies.append(raw)
            if answered:
                break
        assert answered, "the server never answered the sentinel query"
        sock.close()
        total_out = sum(len(r) for r in replies)
        for r in replies:  # whatever was answered is a well-formed, small reply
            assert len(r) <= MAX_REPLY_BYTES
            DNSRecord.parse(r)
        assert total_out <= total_in  # never amplify
        # the server still answers properly afterwards
        q = DNSRecord.question("checkout.shop.test")
        q.header.id = good_id
        raw = await _query(srv.port, q.pack())
        rep = DNSRecord.parse(raw)
        assert rep.header.id == good_id and [str(rr.rdata) for rr in rep.rr] == ["10.99.0.10"]
        assert srv.stats["dropped"] >= len(packets) // 2
    run_with_server(body)
    # per packet: an answer to garbage is never bigger than the garbage itself
    srv = DnsResponder("127.0.0.1", 0, resolver, zone="shop.test")
    for p in packets:
        out = srv.handle(p)
        assert out is None or len(out) <= len(p), p


def test_qdcount_mismatch_is_formerr_not_bigger():
    srv = DnsResponder("127.0.0.1", 0, resolver, zone="shop.test")
    two = DNSRecord.question("checkout.shop.test")
    two.add_question(DNSRecord.question("aa.shop.test").q)
    out = srv.handle(two.pack())
    assert out is not None and DNSRecord.parse(out).header.rcode == RCODE.FORMERR
    assert len(out) <= len(two.pack())
    assert srv.handle(DNSRecord.question("checkout.shop.test").reply().pack()) is None


def test_dual_stack_name_answers_a_with_ipv4_and_aaaa_with_ipv6():
    async def body(srv):
        rep = await ask(srv, "dual.shop.test", "A")
        assert rep.header.rcode == RCODE.NOERROR and rep.header.aa == 1
        assert [(QTYPE[rr.rtype], str(rr.rdata)) for rr in rep.rr] == [("A", "10.99.0.10"), ("A", "10.99.0.11")]
        rep = await ask(srv, "dual.shop.test", "AAAA")
        assert rep.header.rcode == RCODE.NOERROR
        assert [(QTYPE[rr.rtype], str(rr.rdata)) for rr in rep.rr] == [("AAAA", "fd00:99::10"), ("AAAA", "fd00:99::11")]
        assert all(rr.ttl == 1 for rr in rep.rr)
        rep = await ask(srv, "dual.shop.test", "ANY")
        assert sorted(QTYPE[rr.rtype] for rr in rep.rr) == ["A", "A", "AAAA", "AAAA"]
    run_with_server(body)


def test_ipv6_only_name_a_query_is_nodata_and_aaaa_answers():
    async def body(srv):
        rep = await ask(srv, "six.shop.test", "A")
        assert rep.header.rcode == RCODE.NOERROR and not rep.rr  # NODATA, not NXDOMAIN
        assert rep.auth and rep.auth[0].rtype == QTYPE.SOA
        rep = await ask(srv, "six.shop.test", "AAAA")
        assert [str(rr.rdata) for rr in rep.rr] == ["fd00:99::10"]
        rep = await ask(srv, "checkout.shop.test", "AAAA")  # IPv4-only name: NODATA for AAAA
        assert rep.header.rcode == RCODE.NOERROR and not rep.rr and rep.auth[0].rtype == QTYPE.SOA
    run_with_server(body)


def test_responder_binds_ipv6_with_freebind():
    """A DNS-mode node may answer on an IPv6 address (bound with IPV6_FREEBIND)."""
    if not socket.has_ipv6:
        pytest.skip("no IPv6 in this kernel")

    async def main():
        async with DnsResponder("::1", 0, resolver, zone="shop.test", freebind=True) as srv:
            loop = asyncio.get_running_loop()
            sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, ("::1", srv.port))
                await loop.sock_sendall(sock, DNSRecord.question("six.shop.test", "AAAA").pack())
                raw = await asyncio.wait_for(loop.sock_recv(sock, 65535), 1.0)
            finally:
                sock.close()
            return DNSRecord.parse(raw)
    try:
        rep = asyncio.run(main())
    except OSError as exc:
        pytest.skip(f"IPv6 loopback unavailable: {exc}")
    assert [str(rr.rdata) for rr in rep.rr] == ["fd00:99::10"]

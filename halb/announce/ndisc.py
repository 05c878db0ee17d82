"""Unsolicited IPv6 neighbour advertisements: what gratuitous ARP is for an IPv4 VIP.

Why: a client keeps the old holder's MAC for an IPv6 VIP in its neighbour cache until
neighbour unreachability detection gives up on it (several seconds: reachable_time, then
delay_first_probe_time 5 s, then probes). RFC 4861 section 7.2.6 lets the new holder send
up to MAX_NEIGHBOR_ADVERTISEMENT unsolicited advertisements to all-nodes with the
Override flag set, so every client that has an entry replaces the link-layer address at
once (Linux: the entry goes to STALE with the new MAC and traffic follows immediately).
Like GARP it only updates existing entries; a client without one resolves normally.

Why raw Ethernet frames (AF_PACKET) rather than a raw ICMPv6 socket: the same socket the
GARP path already opens on the VIP worker thread sends them, the frame does not depend on
the state of the address in the kernel (tentative, deprecated or already expiring), and a
test can parse every byte. The checksum is computed here (RFC 4443 section 2.3).

Fields (RFC 4861 section 4.4): IPv6 hop limit 255 (a receiver drops anything else),
source = the VIP itself (as Linux's own unsolicited NA does), destination ff02::1 on MAC
33:33:00:00:00:01, ICMPv6 type 136 code 0, flags R=0 S=0 O=1, target = the VIP, and a
Target Link-Layer Address option (type 2, length 1 = 8 bytes) carrying our MAC.
"""
from __future__ import annotations

import ipaddress
import struct

ETH_P_IPV6 = 0x86DD
IPPROTO_ICMPV6 = 58
ICMPV6_NA = 136
ND_OPT_TARGET_LL_ADDR = 2
NA_FLAG_ROUTER = 0x80000000
NA_FLAG_SOLICITED = 0x40000000
NA_FLAG_OVERRIDE = 0x20000000
ALL_NODES = "ff02::1"
ALL_NODES_MAC = b"\x33\x33\x00\x00\x00\x01"
HOP_LIMIT = 255


def multicast_mac(group: str) -> bytes:
    """33:33 + the low 32 bits of an IPv6 multicast group (RFC 2464 section 7)."""
    return b"\x33\x33" + ipaddress.IPv6Address(group).packed[-4:]


def icmpv6_checksum(src: bytes, dst: bytes, message: bytes) -> int:
    """The Internet checksum over the IPv6 pseudo-header and ``message`` (checksum field 0)."""
    pseudo = src + dst + struct.pack("!I3xB", len(message), IPPROTO_ICMPV6)
    data = pseudo + message
    if len(data) % 2:
        data += b"\x00"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def na_message(target: str, mac: bytes, src: str | None = None, dst: str = ALL_NODES,
               flags: int = NA_FLAG_OVERRIDE) -> bytes:
    """The ICMPv6 Neighbor Advertisement (with checksum) announcing ``target`` at ``mac``."""
    if len(mac) != 6:
        raise ValueError(f"need a 6-byte MAC, got {mac!r}")
    tgt = ipaddress.IPv6Address(target).packed
    s = ipaddress.IPv6Address(src or target).packed
    d = ipaddress.IPv6Address(dst).packed
    option = struct.pack("!BB", ND_OPT_TARGET_LL_ADDR, 1) + mac
    body = struct.pack("!I", flags) + tgt + option
    checksum = icmpv6_checksum(s, d, struct.pack("!BBH", ICMPV6_NA, 0, 0) + body)
    return struct.pack("!BBH", ICMPV6_NA, 0, checksum) + body


def unsolicited_na_frame(mac: bytes, target: str) -> bytes:
    """Ethernet + IPv6 + ICMPv6 NA: "``target`` is at ``mac``", to all nodes, Override set."""
    message = na_message(target, mac)
    src = ipaddress.IPv6Address(target).packed
    dst = ipaddress.IPv6Address(ALL_NODES).packed
    ip6 = struct.pack("!IHBB", 6 << 28, len(message), IPPROTO_ICMPV6, HOP_LIMIT) + src + dst
    return ALL_NODES_MAC + mac + struct.pack("!H", ETH_P_IPV6) + ip6 + message

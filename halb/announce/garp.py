"""Gratuitous ARP and ARP probing over raw AF_PACKET sockets.

Why raw sockets: fresh machines have no `arping`, and without GARP clients keep the old
holder's MAC until their neighbour entry expires (48.6 s measured). Linux treats an ARP
packet as gratuitous (and so overrides the 1 s neighbour lock time) when sender IP ==
target IP; for the *reply* form it also requires target MAC == sender MAC. We send both
forms, like ``arping -U`` and ``arping -A``, because switches and other stacks differ in
which one they honour.

GARP only *updates* existing neighbour entries (unless the receiver sets arp_accept); a
client without an entry resolves the VIP normally and gets the holder's answer.
"""
from __future__ import annotations

import ipaddress
import select
import socket
import struct
import time
from dataclasses import dataclass

ETH_P_ARP = 0x0806
ETH_P_IP = 0x0800
ARPOP_REQUEST = 1
ARPOP_REPLY = 2
BROADCAST_MAC = b"\xff" * 6
ZERO_MAC = b"\x00" * 6


def mac_to_str(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def arp_frame(op: int, src_mac: bytes, sender_ip: str, target_mac: bytes, target_ip: str,
              dst_mac: bytes = BROADCAST_MAC) -> bytes:
    """An Ethernet + ARP frame (IPv4 over Ethernet), padded to the 60-byte minimum."""
    eth = dst_mac + src_mac + struct.pack("!H", ETH_P_ARP)
    arp = struct.pack("!HHBBH", 1, ETH_P_IP, 6, 4, op)
    arp += src_mac + ipaddress.IPv4Address(sender_ip).packed
    arp += target_mac + ipaddress.IPv4Address(target_ip).packed
    frame = eth + arp
    return frame + b"\x00" * max(0, 60 - len(frame))


def garp_frames(mac: bytes, vip: str) -> list[bytes]:
    """The two gratuitous forms: request (tha=0) and reply (tha=own MAC)."""
    return [
        arp_frame(ARPOP_REQUEST, mac, vip, ZERO_MAC, vip),
        arp_frame(ARPOP_REPLY, mac, vip, mac, vip),
    ]


def open_arp_socket(ifname: str) -> tuple[socket.socket, bytes]:
    """Open a raw ARP socket bound to ``ifname`` in the *calling thread's* namespace.

    Returns the socket and the interface MAC (read back from the bound address, so no
    extra netlink round trip is needed).
    """
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP))
    try:
        sock.bind((ifname, ETH_P_ARP))
        mac = sock.getsockname()[4]
    except BaseException:
        sock.close()
        raise
    if len(mac) != 6:
        sock.close()
        raise OSError(f"{ifname} has no Ethernet address (got {mac!r})")
    return sock, mac


def send_rounds(sock: socket.socket, frames: list[bytes], count: int = 3, interval: float = 0.05) -> int:
    """Send ``count`` rounds of ``frames`` (GARPs, unsolicited NAs), ``interval`` apart;
    returns the number of frames sent."""
    sent = 0
    for i in range(count):
        for frame in frames:
            sock.send(frame)
            sent += 1
        if i + 1 < count and interval > 0:
            time.sleep(interval)
    return sent


@dataclass(frozen=True)
class ArpAnswer:
    mac: str
    sender_ip: str
    after_s: float


def arp_probe(ifname: str, target_ip: str, sender_ip: str, timeout: float = 0.5,
              count: int = 2) -> list[ArpAnswer]:
    """Ask "who has target_ip" and collect every distinct answer until ``timeout``.

    Run it in the prober's namespace (see :func:`halb.announce.sysctl.run_in_netns`).
    Unlike the kernel's resolver it reports *all* answering MACs, which is what a test
    for "only the holder answers" needs. It does not touch the neighbour table.
    """
    sock, mac = open_arp_socket(ifname)
    answers: dict[str, ArpAnswer] = {}
    target_packed = ipaddress.IPv4Address(target_ip).packed
    try:
        request = arp_frame(ARPOP_REQUEST, mac, sender_ip, ZERO_MAC, target_ip)
        start = time.monotonic()
        deadline = start + timeout
        next_send = start
        sent = 0
        while True:
            now = time.monotonic()
            if now >= deadline:
                break
            if sent < count and now >= next_send:
                sock.send(request)
                sent += 1
                next_send = now + timeout / max(count, 1) / 2
            wait = max(0.0, min(deadline, next_send if sent < count else deadline) - now)
            ready, _, _ = select.select([sock], [], [], wait)
            if not ready:
                continue
            frame = sock.recv(2048)
            if len(frame) < 42 or struct.unpack("!H", frame[12:14])[0] != ETH_P_ARP:
                continue
            op = struct.unpack("!H", frame[20:22])[0]
            sha, spa = frame[22:28], frame[28:32]
            if op == ARPOP_REPLY and spa == target_packed:
                key = mac_to_str(sha)
                answers.setdefault(key, ArpAnswer(key, target_ip, time.monotonic() - start))
    finally:
        sock.close()
    return list(answers.values())

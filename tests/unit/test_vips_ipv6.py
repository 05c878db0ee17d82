"""Several VIPs and IPv6: config parsing, the unsolicited NA frame, the VIP set's frames.

The NA frame is parsed back field by field against RFC 4861 section 4.4 / 7.2.6 and
RFC 2460/8200 (a parser written here from the RFCs, independent of halb.announce.ndisc,
and the checksum verified the receiver's way: summing with the checksum in gives 0xffff).
"""
from __future__ import annotations

import ipaddress
import struct

import pytest

from halb.announce import garp, ndisc
from halb.announce.lease import LeaseParams
from halb.announce.settings import KERNEL_EXPIRY_MAX_V6_S, AnnounceConfigError, parse_announce
from halb.announce.vip import VipAnnouncer, vip_set

MAC = bytes.fromhex("02aabbccdd01")


def _ones_sum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def parse_na(frame: bytes) -> dict:
    """Ethernet II + IPv6 + ICMPv6 NA -> fields; raises AssertionError on anything malformed."""
    dst_mac, src_mac, ethertype = frame[:6], frame[6:12], struct.unpack("!H", frame[12:14])[0]
    assert ethertype == 0x86DD
    ip6 = frame[14:54]
    vtf, plen, nxt, hlim = struct.unpack("!IHBB", ip6[:8])
    assert vtf >> 28 == 6
    src, dst = ip6[8:24], ip6[24:40]
    icmp = frame[54:54 + plen]
    assert len(icmp) == plen == len(frame) - 54
    assert _ones_sum(src + dst + struct.pack("!I3xB", plen, 58) + icmp) == 0xFFFF, "bad ICMPv6 checksum"
    typ, code, _ck, flags = struct.unpack("!BBHI", icmp[:8])
    target = icmp[8:24]
    options, opts = icmp[24:], {}
    while options:
        otype, olen = options[0], options[1]
        assert olen > 0
        opts[otype] = options[2:olen * 8]
        options = options[olen * 8:]
    return {"dst_mac": dst_mac, "src_mac": src_mac, "next_header": nxt, "hop_limit": hlim,
            "src": str(ipaddress.IPv6Address(src)), "dst": str(ipaddress.IPv6Address(dst)),
            "type": typ, "code": code, "router": bool(flags >> 31), "solicited": bool(flags >> 30 & 1),
            "override": bool(flags >> 29 & 1), "reserved": flags & 0x1FFFFFFF,
            "target": str(ipaddress.IPv6Address(target)), "options": opts}


def test_unsolicited_na_frame_matches_rfc4861() -> None:
    na = parse_na(ndisc.unsolicited_na_frame(MAC, "fd00:99:0:0::10"))
    assert na["dst_mac"] == bytes.fromhex("333300000001") and na["src_mac"] == MAC
    assert na["next_header"] == 58 and na["hop_limit"] == 255      # receivers drop hop limit != 255
    assert na["type"] == 136 and na["code"] == 0
    assert na["override"] and not na["solicited"] and not na["router"] and na["reserved"] == 0
    assert na["dst"] == "ff02::1" and na["src"] == "fd00:99::10" and na["target"] == "fd00:99::10"
    assert na["options"] == {2: MAC}                               # Target Link-Layer Address


def test_checksum_differs_per_target_and_mac() -> None:
    a = ndisc.na_message("fd00::1", MAC)
    b = ndisc.na_message("fd00::2", MAC)
    c = ndisc.na_message("fd00::1", bytes.fromhex("02aabbccdd02"))
    assert len({a[2:4], b[2:4], c[2:4]}) == 3
    with pytest.raises(ValueError):
        ndisc.na_message("fd00::1", b"\x01\x02")
    with pytest.raises(ValueError):
        ndisc.na_message("10.0.0.1", MAC)


def test_multicast_mac() -> None:
    assert ndisc.multicast_mac("ff02::1:ff00:10") == bytes.fromhex("3333ff000010")


def test_vip_set_mixed_and_errors() -> None:
    s = vip_set(["10.99.0.10", "FD00:99::0010"])
    assert [(a.address, a.prefixlen, a.v6) for a in s] == [("10.99.0.10", 32, False), ("fd00:99::10", 128, True)]
    assert [a.address for a in vip_set("10.0.0.1")] == ["10.0.0.1"]
    with pytest.raises(ValueError):
        vip_set(["10.0.0.1", "10.0.0.1"])
    with pytest.raises(ValueError):
        vip_set([])
    with pytest.raises(ValueError):
        vip_set(["nope"])


def test_announce_frames_cover_every_vip_by_family() -> None:
    """One round = both GARP forms per IPv4 VIP, one unsolicited NA per IPv6 VIP."""
    ann = VipAnnouncer("eth0", ["10.99.0.10", "fd00:99::10", "fd00:99::11"])
    try:
        assert ann.vip == "10.99.0.10" and ann.vips == ["10.99.0.10", "fd00:99::10", "fd00:99::11"]
        frames = ann.announce_frames(MAC)
    finally:
        ann.close()
    assert frames[:2] == garp.garp_frames(MAC, "10.99.0.10")
    assert [parse_na(f)["target"] for f in frames[2:]] == ["fd00:99::10", "fd00:99::11"]


# ---- settings -------------------------------------------------------------------------
def _vip(**kw):
    return parse_announce({"mode": "vip", "interface": "eth0", **kw})


def test_vips_list_mixed_families_and_old_single_key() -> None:
    c = _vip(vips=["10.99.0.10/32", "fd00:99::10/128", "10.99.0.11"])
    assert c.vips == ["10.99.0.10", "fd00:99::10", "10.99.0.11"] and c.vip == "10.99.0.10"
    assert c.lease.kernel_expiry_max_s == KERNEL_EXPIRY_MAX_V6_S  # IPv6's coarser kernel timer
    old = _vip(vip="10.99.0.10")
    assert old.vips == ["10.99.0.10"] and old.vip == "10.99.0.10"
    assert old.lease.kernel_expiry_max_s == LeaseParams().kernel_expiry_max_s  # IPv4 only: unchanged
    six = _vip(vip="fd00:99::10")
    assert six.vips == ["fd00:99::10"] and six.lease.kernel_expiry_max_s == KERNEL_EXPIRY_MAX_V6_S


@pytest.mark.parametrize("kw,key,words", [
    ({"vips": []}, "vips", "at least one"),
    ({"vips": ["10.0.0.1", "10.0.0.1/32"]}, "vips[1]", "twice"),
    ({"vips": ["fd00::1", "FD00:0::1"]}, "vips[1]", "twice"),
    ({"vips": ["10.0.0.1/24"]}, "vips[0]", "/32"),
    ({"vips": ["fd00::1/64"]}, "vips[0]", "/128"),
    ({"vips": ["10.0.0.1/128"]}, "vips[0]", "/32"),
    ({"vips": ["fe80::1"]}, "vips[0]", "link-local"),
    ({"vips": ["::"]}, "vips[0]", "unspecified"),
    ({"vips": ["10.0.0.1", 7]}, "vips[1]", "IPv4 or IPv6"),
    ({"vips": ["10.0.0.1", "x"]}, "vips[1]", "IPv4 or IPv6"),
    ({"vips": "10.0.0.1"}, "vips", ""),
    ({"vip": "10.0.0.1", "vips": ["10.0.0.2"]}, "vips", "not both"),
    ({}, "vip", "required"),
])
def test_bad_vips_give_clear_errors(kw, key, words) -> None:
    with pytest.raises(AnnounceConfigError) as ei:
        _vip(**kw)
    assert ei.value.key == key and words in str(ei.value), str(ei.value)


def test_ipv6_vip_with_a_lease_too_short_for_its_kernel_bound() -> None:
    # refresh_min_remaining_s 1.3 >= 1.28: fine by default; the check still runs
    assert _vip(vips=["fd00::1"], lease_s=1.4).lease.lease_s == 1.4


def test_dns_addresses_both_families() -> None:
    d = parse_announce({"mode": "dns", "bind": "[fd00:99::11]:53", "name": "checkout",
                        "addresses": ["10.99.0.11", "fd00:99::11"]})
    assert d.addresses == ["10.99.0.11", "fd00:99::11"] and d.address == "10.99.0.11"
    d = parse_announce({"mode": "dns", "bind": "10.0.0.1:53", "name": "checkout"}, listen_host="fd00::5")
    assert d.addresses == ["fd00::5"]
    for raw, key in [
        ({"address": "10.0.0.1", "addresses": ["10.0.0.2"]}, "addresses"),
        ({"addresses": ["10.0.0.1", "10.0.0.1"]}, "addresses[1]"),
        ({"bind": "fd00::1:53"}, "bind"),
        ({"addresses": [f"fd00:1234:5678:9abc:def0:1234:5678:{i:x}" for i in range(8)]}, "addresses"),
    ]:
        with pytest.raises(AnnounceConfigError) as ei:
            parse_announce({"mode": "dns", "bind": "10.0.0.1:53", "name": "x", **raw})
        assert ei.value.key == key, str(ei.value)


# ---- the Announcement with several addresses (fake Raft, as test_announce_manager.py) --
def test_dns_mode_publishes_both_families_and_resolves_them_per_holder() -> None:
    from tests.unit.test_announce_manager import FakeClock, FakeRaft, drive

    from halb.announce.manager import Announcement

    log: list[str] = []
    raft, clock = FakeRaft(log), FakeClock()
    submitted: list[dict] = []
    orig = raft.submit

    def submit(op, args, **kw):
        submitted.append(dict(args))
        return orig(op, args, **kw)
    raft.submit = submit  # type: ignore[method-assign]
    cfg = parse_announce({"mode": "dns", "bind": "127.0.0.1:53", "name": "checkout",
                          "addresses": ["10.99.0.11", "fd00:99::11"]})
    ann = Announcement("n1", raft, cfg, clock=clock)
    ann._loop = None
    drive(ann, clock, 2.0)
    renew = [a for a in submitted if "term" in a][0]
    assert renew["address"] == "10.99.0.11,fd00:99::11"  # one field: the command schema is unchanged
    ann.on_applied({"op": "lease.renew", "id": "x", "args": renew},
                   type("Applied", (), {"result": {"ok": True}})())
    assert ann.resolve("checkout.halb") == ["10.99.0.11", "fd00:99::11"]
    assert ann.resolve("other.halb") is None


def test_vip_mode_hooks_and_status_name_every_vip() -> None:
    from tests.unit.test_announce_manager import FakeClock, FakeHooks, FakeRaft, FakeVip, drive

    from halb.announce.manager import Announcement

    log: list[str] = []
    raft, clock = FakeRaft(log), FakeClock()
    cfg = parse_announce({"mode": "vip", "vips": ["10.0.0.1", "fd00::1"], "interface": "eth0",
                          "set_arp_sysctls": False, "garp_refresh_after_s": 0, "garp_repeat_s": 0})
    ann = Announcement("n1", raft, cfg, clock=clock, vip=FakeVip(log, clock))
    hooks = FakeHooks()
    ann.hooks = hooks
    ann._loop = None
    ann._notify("BACKUP")
    drive(ann, clock, 2.5)
    assert ann.holding and [s for s, _ in hooks.calls] == ["BACKUP", "MASTER"]
    assert {v for _, v in hooks.calls} == {"10.0.0.1,fd00::1"}
    assert ann.status()["vips"] == ["10.0.0.1", "fd00::1"]


def test_lab_ipv6_configs_load_and_announce_both_vips(tmp_path) -> None:
    """`halb lab failover --ipv6`'s node configs pass the real config loader."""
    from halb.config import load_config
    from halb.lab.cluster import SERVICE_PORT6, LabCluster
    from halb.lab.topology import Lab

    lab = Lab(state_dir=tmp_path / "state")
    assert lab.vip6 == "fd00:99::10" and lab.hosts["lb1"].ip6 == "fd00:99::11"
    for p in LabCluster(lab, tmp_path / "run", ipv6=True).write_configs():
        cfg = load_config(p)
        ann = parse_announce(cfg.announce)
        assert ann.vips == [lab.vip, lab.vip6]
        assert f"[{lab.vip6}]:{SERVICE_PORT6}" in p.read_text()

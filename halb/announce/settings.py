"""The node config's ``[announce]`` table -> a validated :class:`AnnounceConfig`.

Kept free of halb.config imports (config.py calls :func:`parse_announce` and wraps
:class:`AnnounceConfigError` into its own ConfigError with the file name), so there is no
import cycle. Every error names the key and the reason.

Modes (bgp: every balancer announces the service addresses to its routers, see
:func:`_parse_bgp` and docs/config.md)::

    [announce]                      [announce]                    [announce]
    mode = "none"                   mode = "vip"                  mode = "dns"
                                    vips = ["10.99.0.10",         bind = "10.99.0.11:53"
                                            "fd00:99::10"]
                                    interface = "eth0"            zone = "halb"
                                    lease_s = 1.5                 names = ["checkout"]
                                    notify_master = "hooks/m.sh"  answer = "leader"  # or "all"
                                    notify_backup = ...           address = "10.99.0.11"
                                    notify_fault = ...            lease_s = 1.5
                                                                  # or addresses = [v4, v6]

``vip = "X"`` is the one-address form of ``vips = ["X"]``. Any mix of IPv4 and IPv6 is
allowed; each is a single host address (``/32``, ``/128`` or no suffix). With an IPv6 VIP
the lease's ``kernel_expiry_max_s`` rises to :data:`KERNEL_EXPIRY_MAX_V6_S`, because the
kernel's IPv6 address-lifetime timer is coarser (measured, docs/failover.md).
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from halb.announce.bgp import (BgpSettings, RouterPeer, ServiceAddress, is_ipv4, parse_community, valid_asn)
from halb.announce.lease import LeaseParams
from halb.dataplane.selfcheck import SelfCheckParams

from halb.tomltable import Table

MODES = ("none", "vip", "dns", "bgp")
BGP_LEASE_S = 3.0
# IPv6 valid_lft 1 is removed 1.00-1.25 s after the last refresh (addrconf's timer rounds up
# to a whole second when that costs < HZ/4; measured max 1.198 s with the CPUs awake), IPv4
# 1.00-1.15 s. IPv6's check is a *deferrable* timer: on an idle machine it can run later
# (measured up to 2.7 s); docs/failover.md "Several VIPs and IPv6" says what that leaves open.
KERNEL_EXPIRY_MAX_V6_S = 1.28
ANSWERS = ("leader", "all")


class AnnounceConfigError(ValueError):
    """``key`` is relative to the [announce] table ("" for the table itself)."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}" if key else reason)
        self.key, self.reason = key, reason


@dataclass
class AnnounceConfig:
    mode: str = "none"
    # vip mode
    vip: str = ""                       # the first of ``vips`` (hooks, status, old callers)
    vips: list[str] = field(default_factory=list)  # every VIP, IPv4 and IPv6, in config order
    prefixlen: int = 32                 # of an IPv4 VIP; IPv6 VIPs are always /128
    interface: str = ""
    netns: str | None = None            # tests/tools only; a real node runs inside its namespace
    set_arp_sysctls: bool = True
    garp_count: int = 3
    garp_interval_s: float = 0.05
    garp_refresh_after_s: float = 2.0
    garp_repeat_s: float = 1.0          # one GARP round this often while holding (0: off)
    notify_master: str | None = None
    notify_backup: str | None = None
    notify_fault: str | None = None
    notify_timeout_s: float = 5.0
    # dns mode
    bind: str = ""
    zone: str = "halb"
    names: list[str] = field(default_factory=list)
    answer: str = "leader"
    ttl: int = 1
    address: str = ""                   # this node's advertised address (the first of ``addresses``)
    addresses: list[str] = field(default_factory=list)  # A and AAAA answers for this node
    # bgp mode (halb/announce/bgp.py)
    bgp: BgpSettings | None = None
    # lease (vip and dns; in bgp mode: the quorum contact)
    lease: LeaseParams = field(default_factory=LeaseParams)
    # data-plane self-check (vip and dns): a failing node does not hold the lease
    dataplane: SelfCheckParams = field(default_factory=SelfCheckParams)
    dataplane_holddown_s: float = 3.0  # after handing leadership away for it, not again this soon


def _host_address(key: str, value: Any, vip: bool = True) -> str:
    """One IPv4 or IPv6 host address, optionally written as /32 or /128; canonical form."""
    if not isinstance(value, str) or not value.strip():
        raise AnnounceConfigError(key, f"must be an IPv4 or IPv6 address, got {value!r}")
    addr, slash, plen = value.strip().partition("/")
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        raise AnnounceConfigError(key, f"must be an IPv4 or IPv6 address, got {value!r}") from None
    if slash and plen != str(ip.max_prefixlen):
        raise AnnounceConfigError(key, f"must be a single address (/{ip.max_prefixlen} for IPv{ip.version}), "
                                       f"got {value!r}")
    if vip and (ip.is_unspecified or ip.is_multicast or ip.is_loopback or (ip.version == 6 and ip.is_link_local)):
        raise AnnounceConfigError(key, f"{value!r} cannot be announced (unspecified, multicast, loopback "
                                       "or link-local)")
    return str(ip)


def parse_addresses(t: "_T", one: str, many: str, why: str, required: bool = True, vip: bool = True) -> list[str]:
    """``one = "X"`` or ``many = ["X", "Y"]`` (not both) -> canonical, duplicate-free list."""
    if one in t.data and many in t.data:
        raise AnnounceConfigError(many, f"give either {one} or {many}, not both")
    if many in t.data:
        raw = t.take(many, list)
        if not raw:
            raise AnnounceConfigError(many, "must name at least one address")
        items = [(f"{many}[{i}]", v) for i, v in enumerate(raw)]
    elif one in t.data:
        items = [(one, t.take(one, str))]
    elif required:
        raise AnnounceConfigError(one, f"is required {why} (or {many} = [...])")
    else:
        return []
    out: list[str] = []
    for key, value in items:
        addr = _host_address(key, value, vip)
        if addr in out:
            raise AnnounceConfigError(key, f"{value!r} is listed twice")
        out.append(addr)
    return out


def has_ipv6(addresses: list[str]) -> bool:
    return any(":" in a for a in addresses)


class _T(Table):
    """The shared TOML table reader, with this section's error type and messages."""

    def __init__(self, data: dict[str, Any]) -> None:
        super().__init__(Path("."), "", data, lambda _file, key, reason: AnnounceConfigError(key, reason))

    def required(self, name: str, kind: type, why: str) -> Any:
        if name not in self.data:
            raise AnnounceConfigError(name, f"is required {why}")
        return self.take(name, kind)

    def done(self, mode: str) -> None:  # type: ignore[override]
        for name in self.data:
            raise AnnounceConfigError(name, f"unknown key for mode {mode!r}")


def _ipv6_lease(params: LeaseParams) -> LeaseParams:
    """The lease with the IPv6 kernel-expiry bound (a refresh must finish earlier)."""
    out = replace(params, kernel_expiry_max_s=max(params.kernel_expiry_max_s, KERNEL_EXPIRY_MAX_V6_S))
    problems = out.check()
    if problems:
        raise AnnounceConfigError("vips", "with an IPv6 VIP: " + "; ".join(problems))
    return out


def parse_announce(raw: dict[str, Any] | None, base_dir: Path | None = None,
                   listen_host: str = "") -> AnnounceConfig:
    """Validate the raw table; relative hook paths are resolved against ``base_dir``."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise AnnounceConfigError("", "must be a table")
    t = _T(raw)
    cfg = AnnounceConfig()
    cfg.mode = t.take("mode", str, "none")
    if cfg.mode not in MODES:
        raise AnnounceConfigError("mode", f"must be one of {', '.join(MODES)}, got {cfg.mode!r}")
    if cfg.mode == "none":
        t.done("none")
        return cfg

    # bgp: every node needs a commit to keep announcing, so a leaderless spell longer than the
    # lease withdraws *every* balancer; 3 s rides out slow elections (docs/failover.md)
    lease_s = t.take("lease_s", float, BGP_LEASE_S if cfg.mode == "bgp" else LeaseParams.lease_s)
    renew = t.take("renew_interval_s", float, LeaseParams.renew_interval_s)
    wait_from = t.take("wait_from", str, LeaseParams.wait_from)
    params = LeaseParams(lease_s=lease_s, renew_interval_s=renew, wait_from=wait_from)
    problems = params.check()
    if problems:
        key = "wait_from" if "wait_from" in problems[0] else "lease_s"
        raise AnnounceConfigError(key, "; ".join(problems))
    cfg.lease = params
    d = SelfCheckParams
    cfg.dataplane = SelfCheckParams(
        enabled=t.take("dataplane_check", bool, d.enabled),
        bind_grace_s=t.take("dataplane_bind_grace_s", float, d.bind_grace_s),
        max_worker_deaths=t.take("dataplane_worker_deaths", int, d.max_worker_deaths),
        worker_window_s=t.take("dataplane_worker_window_s", float, d.worker_window_s),
        recover_s=t.take("dataplane_recover_s", float, d.recover_s))
    problems = cfg.dataplane.check()
    if problems:
        raise AnnounceConfigError("dataplane_check", "; ".join(problems))
    cfg.dataplane_holddown_s = t.take("dataplane_holddown_s", float, 3.0)
    if cfg.dataplane_holddown_s < 0:
        raise AnnounceConfigError("dataplane_holddown_s", "must be >= 0")

    if cfg.mode == "vip":
        why = "for mode \"vip\""
        cfg.vips = parse_addresses(t, "vip", "vips", why)
        cfg.vip = cfg.vips[0]
        if has_ipv6(cfg.vips):
            cfg.lease = _ipv6_lease(cfg.lease)
        cfg.interface = t.required("interface", str, why)
        if not cfg.interface or len(cfg.interface) > 15 or "/" in cfg.interface:
            raise AnnounceConfigError("interface", f"not a valid interface name: {cfg.interface!r}")
        cfg.set_arp_sysctls = t.take("set_arp_sysctls", bool, True)
        cfg.garp_count = t.take("garp_count", int, 3)
        if not 1 <= cfg.garp_count <= 20:
            raise AnnounceConfigError("garp_count", "must be between 1 and 20")
        cfg.garp_refresh_after_s = t.take("garp_refresh_after_s", float, 2.0)
        cfg.garp_repeat_s = t.take("garp_repeat_s", float, 1.0)
        if cfg.garp_refresh_after_s < 0 or cfg.garp_repeat_s < 0:
            raise AnnounceConfigError("garp_repeat_s", "GARP intervals must be >= 0")
        for state in ("master", "backup", "fault"):
            script = t.take(f"notify_{state}", str, "")
            if script:
                path = Path(script)
                if base_dir is not None and not path.is_absolute():
                    path = base_dir / path
                setattr(cfg, f"notify_{state}", str(path))
        cfg.notify_timeout_s = t.take("notify_timeout_s", float, 5.0)
        if cfg.notify_timeout_s <= 0:
            raise AnnounceConfigError("notify_timeout_s", "must be > 0")
        t.done("vip")
        return cfg

    if cfg.mode == "bgp":
        cfg.bgp = _parse_bgp(t, listen_host)
        t.done("bgp")
        return cfg

    # dns
    cfg.bind = t.required("bind", str, "for mode \"dns\" (HOST:PORT to answer on)")
    host, sep, port = cfg.bind.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise AnnounceConfigError("bind", f"must be HOST:PORT, got {cfg.bind!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise AnnounceConfigError("bind", f"write an IPv6 address in brackets, [ADDR]:PORT; got {cfg.bind!r}")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise AnnounceConfigError("bind", f"must be an IPv4 or [IPv6] address with a port, got {cfg.bind!r}") from None
    cfg.zone = t.take("zone", str, "halb").rstrip(".").lower()
    if not cfg.zone:
        raise AnnounceConfigError("zone", "must not be empty")
    names = t.take("names", list, [])
    name = t.take("name", str, "")
    if name:
        names = [name, *names]
    if not names:
        raise AnnounceConfigError("names", "give at least one service name (name = \"checkout\")")
    for i, n in enumerate(names):
        if not isinstance(n, str) or not n or " " in n:
            raise AnnounceConfigError(f"names[{i}]", f"not a DNS name: {n!r}")
    cfg.names = [n.rstrip(".").lower() for n in names]
    cfg.answer = t.take("answer", str, "leader")
    if cfg.answer not in ANSWERS:
        raise AnnounceConfigError("answer", f"must be one of {', '.join(ANSWERS)}, got {cfg.answer!r}")
    cfg.ttl = t.take("ttl", int, 1)
    if not 0 <= cfg.ttl <= 300:
        raise AnnounceConfigError("ttl", "must be between 0 and 300")
    cfg.addresses = parse_addresses(t, "address", "addresses", "", required=False, vip=False)
    if not cfg.addresses:
        if not listen_host:
            raise AnnounceConfigError("address", "is required for mode \"dns\" unless [dataplane] listen_host is set")
        cfg.addresses = [_host_address("address", listen_host, vip=False)]
    if len(",".join(cfg.addresses)) > 255:  # renewals carry them in one 255-character field
        raise AnnounceConfigError("addresses", "too many addresses (at most 255 characters, comma-separated)")
    cfg.address = cfg.addresses[0]
    t.done("dns")
    return cfg


def _parse_bgp(t: _T, listen_host: str) -> BgpSettings:
    """``mode = "bgp"``: local AS, routers, service addresses, timers, BFD, MED/communities."""
    why = 'for mode "bgp"'
    local_as = t.required("local_as", int, why)
    if not valid_asn(local_as):
        raise AnnounceConfigError("local_as", f"must be an AS number 1-4294967294 (not 23456), got {local_as}")
    routers_raw = t.required("routers", list, why + " (a list of {address, as} tables: [[announce.routers]])")
    if not routers_raw:
        raise AnnounceConfigError("routers", "give at least one router")
    routers = []
    names: set[str] = set()
    for i, r in enumerate(routers_raw):
        key = f"routers[{i}]"
        if not isinstance(r, dict):
            raise AnnounceConfigError(key, f"must be a table {{address = ..., as = ...}}, got {r!r}")
        r = dict(r)
        addr = r.pop("address", None)
        asn = r.pop("as", None)
        name = r.pop("name", "")
        password = r.pop("password", None)
        for k in r:
            raise AnnounceConfigError(f"{key}.{k}", "unknown key (known: address, as, name, password)")
        if not isinstance(addr, str) or not is_ipv4(addr):
            raise AnnounceConfigError(f"{key}.address", f"must be an IPv4 address, got {addr!r}")
        if isinstance(asn, bool) or not isinstance(asn, int) or not valid_asn(asn):
            raise AnnounceConfigError(f"{key}.as", f"must be an AS number 1-4294967294, got {asn!r}")
        if not isinstance(name, str) or (name and not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]{0,31}", name)):
            raise AnnounceConfigError(f"{key}.name",
                                      f"must be letters, digits and _ (a BIRD protocol name), got {name!r}")
        if password is not None and (not isinstance(password, str) or not password
                                     or any(c in password for c in '"\\\n')):
            raise AnnounceConfigError(f"{key}.password",
                                      "must be a non-empty string without quotes, backslashes or newlines")
        pname = name or f"router{i + 1}"
        if pname in names or pname.startswith("halb_"):
            raise AnnounceConfigError(f"{key}.name", f"protocol name {pname!r} is used twice or reserved")
        names.add(pname)
        routers.append(RouterPeer(str(addr), int(asn), name, password))
    addrs_raw = t.required("addresses", list, why + ' (the service addresses: ["10.99.100.10"] or '
                           '[{address = "...", services = ["checkout"]}])')
    if not addrs_raw:
        raise AnnounceConfigError("addresses", "give at least one service address")
    addresses = []
    for i, a in enumerate(addrs_raw):
        key = f"addresses[{i}]"
        services: list[Any] = []
        if isinstance(a, dict):
            a = dict(a)
            addr = a.pop("address", None)
            services = a.pop("services", [])
            for k in a:
                raise AnnounceConfigError(f"{key}.{k}", "unknown key (known: address, services)")
        else:
            addr = a
        if isinstance(addr, str) and addr.endswith("/32"):
            addr = addr[:-3]
        if not isinstance(addr, str) or not is_ipv4(addr):
            raise AnnounceConfigError(key, f"must be an IPv4 address (a /32 every balancer announces), got {addr!r}")
        if not isinstance(services, list) or not all(isinstance(s, str) and s for s in services):
            raise AnnounceConfigError(f"{key}.services", "must be a list of service names")
        if any(x.address == addr for x in addresses):
            raise AnnounceConfigError(key, f"address {addr} is listed twice")
        addresses.append(ServiceAddress(addr, tuple(services)))
    local_address = t.take("local_address", str, "") or listen_host
    if local_address and not is_ipv4(local_address):
        raise AnnounceConfigError("local_address", f"must be an IPv4 address, got {local_address!r}")
    router_id = t.take("router_id", str, "") or local_address
    if not router_id or not is_ipv4(router_id):
        raise AnnounceConfigError("router_id", "must be an IPv4 address; required unless local_address "
                                  "(or [dataplane] listen_host) is set")
    hold = t.take("hold_time_s", int, 9)
    if not (hold == 0 or 3 <= hold <= 65535):
        raise AnnounceConfigError("hold_time_s", f"must be 0 or 3-65535 (RFC 4271), got {hold}")
    bfd = t.take("bfd", bool, True)
    interval = t.take("bfd_interval_ms", int, 100)
    if not 10 <= interval <= 10000:
        raise AnnounceConfigError("bfd_interval_ms", f"must be 10-10000, got {interval}")
    mult = t.take("bfd_multiplier", int, 3)
    if not 1 <= mult <= 255:
        raise AnnounceConfigError("bfd_multiplier", f"must be 1-255, got {mult}")
    med = t.take("med", int, -1)
    if med != -1 and not 0 <= med <= 4294967295:
        raise AnnounceConfigError("med", f"must be 0-4294967295, got {med}")
    communities = []
    for i, c in enumerate(t.take("communities", list, [])):
        if not isinstance(c, str):
            raise AnnounceConfigError(f"communities[{i}]", f"must be a string \"ASN:VALUE\", got {c!r}")
        try:
            communities.append(parse_community(c))
        except ValueError as exc:
            raise AnnounceConfigError(f"communities[{i}]", str(exc)) from None
    interface = t.take("interface", str, "lo")
    if not interface or len(interface) > 15 or "/" in interface or '"' in interface:
        raise AnnounceConfigError("interface", f"not a valid interface name: {interface!r}")
    wait = t.take("withdraw_wait_s", float, 0.5)
    if not 0 <= wait <= 60:
        raise AnnounceConfigError("withdraw_wait_s", f"must be 0-60, got {wait:g}")
    grace = t.take("drain_grace_s", float, 5.0)
    if not 0 <= grace <= 3600:
        raise AnnounceConfigError("drain_grace_s", f"must be 0-3600, got {grace:g}")
    drop_syns = t.take("drain_drop_syns", bool, True)
    bird = t.take("bird", str, "")
    birdc = t.take("birdc", str, "")
    return BgpSettings(local_as=local_as, routers=tuple(routers), addresses=tuple(addresses),
                       local_address=local_address, router_id=router_id, hold_time_s=hold, bfd=bfd,
                       bfd_interval_ms=interval, bfd_multiplier=mult, med=None if med == -1 else med,
                       communities=tuple(communities), interface=interface, withdraw_wait_s=wait,
                       drain_grace_s=grace, drain_drop_syns=drop_syns, bird=bird, birdc=birdc)

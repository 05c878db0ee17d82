"""A network-namespace lab where a real VIP can float between balancers with GARP.

Why namespaces: a VIP drill needs several hosts on one L2 segment (ARP, GARP, neighbour
caches) but must never touch the machine's own interfaces. Every host here is a
namespace with one veth (``eth0``) plugged into a bridge that itself lives in a switch
namespace, so nothing — not even a veth end — appears in the host's namespace, and the
subnet is routed nowhere outside the namespaces.

Layout (prefix ``halb-`` by default, configurable so concurrent test runs never collide)::

    {prefix}sw       bridge br0, one port per host (port name = host name)
    {prefix}lb1..3   balancers   10.99.0.11-13
    {prefix}be1..3   backends    10.99.0.21-23
    {prefix}client   client      10.99.0.100
    VIP              10.99.0.10  (owned by nobody until a balancer holds it)

Every host is dual-stack: ``fd00:99::/64`` with the same host numbers written in hex digits
(lb1 ``fd00:99::11``, client ``fd00:99::100``, IPv6 VIP ``fd00:99::10``). IPv6 duplicate
address detection is off in every lab namespace (``accept_dad=0`` before the links come
up, addresses added ``nodad``): otherwise every address would be unusable ("tentative")
for about a second after ``lab up``. Forwarding stays off (hosts, not routers), and the
bridge does no multicast snooping, so neighbour solicitations reach whoever holds the VIP
without waiting for MLD reports.

MACs are deterministic (02:99:00:00:00:<last octet>) so logs and tests can tell hosts
apart at a glance. Everything is done with iproute2 (always present on the target
machines), which keeps each step visible and reproducible by hand.
"""
from __future__ import annotations

import ipaddress
import json
import os
import re
import signal
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from halb.announce.sysctl import write_sysctls

DEFAULT_PREFIX = "halb-"
DEFAULT_SUBNET = "10.99.0.0/24"
DEFAULT_SUBNET6 = "fd00:99::/64"
DEFAULT_STATE_DIR = Path("/run/halb-lab")
SWITCH = "sw"
BRIDGE = "br0"
HOST_IFNAME = "eth0"

# host offsets inside the subnet (the host part of each address)
VIP_OFFSET = 10
LB_OFFSET = 10   # lb1 = .11
BE_OFFSET = 20   # be1 = .21
CLIENT_OFFSET = 100

# constants for the default subnet, for callers that just want "the lab addresses"
VIP = "10.99.0.10"
LB_ADDRS = {"lb1": "10.99.0.11", "lb2": "10.99.0.12", "lb3": "10.99.0.13"}
BE_ADDRS = {"be1": "10.99.0.21", "be2": "10.99.0.22", "be3": "10.99.0.23"}
CLIENT_ADDR = "10.99.0.100"

TOPOLOGIES = ("flat", "bgp")
ROUTER_OFFSET = 1      # topology bgp: the router's leg on the balancers' segment (10.99.0.1)
SERVICE_OFFSET = 10    # topology bgp: service address = this host in the second block after the subnet
ROUTER_AS = 65000
BALANCER_AS = 65001


# IPv6 in every lab namespace: no duplicate address detection, no forwarding
_NO_DAD = {f"net.ipv6.conf.{dev}.{key}": value
           for dev in ("all", "default") for key, value in (("accept_dad", 0), ("forwarding", 0))}


class LabError(RuntimeError):
    """A lab operation failed; the message says which command and why."""


@dataclass(frozen=True)
class Host:
    name: str   # short name: lb1, be2, client
    role: str   # lb | be | client
    ns: str     # full namespace name: {prefix}{name}
    ip: str
    mac: str
    ifname: str = HOST_IFNAME
    ip6: str = ""


def _ip(argv: Sequence[str], check: bool = True, timeout: float = 15.0) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *argv], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise LabError(f"ip {' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def list_netns() -> list[str]:
    """Names of all named network namespaces (``ip netns list``)."""
    proc = _ip(["netns", "list"], check=False)
    return [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]


def require_root() -> None:
    if os.geteuid() != 0:
        raise LabError("the lab needs root (network namespaces, veth, bridges)")


@dataclass
class Lab:
    """The topology plus operations on it. ``Lab()`` uses the defaults above."""

    prefix: str = DEFAULT_PREFIX
    subnet: str = DEFAULT_SUBNET
    subnet6: str = DEFAULT_SUBNET6
    n_lb: int = 3
    n_be: int = 3
    state_dir: Path = DEFAULT_STATE_DIR
    topology: str = "flat"   # flat: everyone on one bridge (VIP drills); bgp: see bgp_router.py
    router_hash: str = "ecmp"  # topology bgp: "ecmp" (BIRD's multipath route) or "resilient" (ResilientSync)
    hosts: dict[str, Host] = field(init=False)
    router_pid: int | None = field(init=False, default=None)
    _router_proc: Any = field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        if self.topology not in TOPOLOGIES:
            raise LabError(f"unknown lab topology {self.topology!r} (known: {', '.join(TOPOLOGIES)})")
        if self.router_hash not in ("ecmp", "resilient"):
            raise LabError(f"router_hash must be ecmp or resilient, not {self.router_hash!r}")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.prefix):
            raise LabError(f"bad lab prefix {self.prefix!r}")
        net = ipaddress.IPv4Network(self.subnet)
        if net.prefixlen > 24:
            raise LabError("lab subnet must be /24 or larger")
        self.state_dir = Path(self.state_dir)
        self.hosts = {}
        specs = [(f"lb{i}", "lb", LB_OFFSET + i) for i in range(1, self.n_lb + 1)]
        specs += [(f"be{i}", "be", BE_OFFSET + i) for i in range(1, self.n_be + 1)]
        if self.topology == "bgp":
            specs.append(("router", "router", ROUTER_OFFSET))
        else:
            specs.append(("client", "client", CLIENT_OFFSET))
        net6 = ipaddress.IPv6Network(self.subnet6)
        if net6.prefixlen != 64:
            raise LabError("lab IPv6 subnet must be a /64")
        for name, role, off in specs:
            self.hosts[name] = Host(name, role, self.prefix + name, str(net[off]),
                                    f"02:99:00:00:00:{off:02x}", ip6=self._ip6(off))
        if self.topology == "bgp":  # the client sits behind the router, on its own link
            cnet = self.client_network
            self.hosts["client"] = Host("client", "client", self.prefix + "client", str(cnet[CLIENT_OFFSET]),
                                        "02:99:00:00:01:64")

    def _ip6(self, offset: int) -> str:
        """Host number ``offset`` written with the same digits in hex (11 -> ::11)."""
        return str(ipaddress.IPv6Network(self.subnet6)[int(str(offset), 16)])

    @classmethod
    def load(cls, prefix: str = DEFAULT_PREFIX, subnet: str = DEFAULT_SUBNET,
             state_dir: Path = DEFAULT_STATE_DIR) -> "Lab":
        """The lab as its state file describes it (topology), else a flat one."""
        lab = cls(prefix=prefix, subnet=subnet, state_dir=state_dir)
        st = lab._read_state() or {}
        topo = st.get("topology", "flat")
        if topo != lab.topology and topo in TOPOLOGIES:
            lab = cls(prefix=prefix, subnet=str(st.get("subnet", subnet)), state_dir=state_dir, topology=str(topo))
        return lab

    @property
    def client_network(self) -> ipaddress.IPv4Network:
        """topology bgp: the client's link to the router, the /24 right after the lab subnet."""
        net = self.network
        return ipaddress.IPv4Network((int(net.network_address) + net.num_addresses, 24))

    @property
    def service_addresses(self) -> list[str]:
        """topology bgp: the address every balancer announces (outside every lab subnet)."""
        if self.topology != "bgp":
            return []
        net = self.network
        return [str(ipaddress.IPv4Address(int(net.network_address) + 2 * net.num_addresses + SERVICE_OFFSET))]

    @property
    def router_client_ip(self) -> str:
        return str(self.client_network[1])

    # ---- names and addresses ------------------------------------------------------
    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(self.subnet)

    @property
    def vip(self) -> str:
        return str(self.network[VIP_OFFSET])

    @property
    def vip6(self) -> str:
        return self._ip6(VIP_OFFSET)

    @property
    def switch_ns(self) -> str:
        return self.prefix + SWITCH

    @property
    def namespaces(self) -> list[str]:
        return [self.switch_ns] + [h.ns for h in self.hosts.values()]

    @property
    def state_file(self) -> Path:
        return self.state_dir / f"{self.prefix}lab.json"

    def ns(self, name: str) -> str:
        """Full namespace name for a short host name (``lb1``) or a full name."""
        if name in self.hosts:
            return self.hosts[name].ns
        if name == SWITCH:
            return self.switch_ns
        if name in self.namespaces:
            return name
        raise LabError(f"unknown lab host {name!r} (known: {', '.join(self.hosts)})")

    def host(self, name: str) -> Host:
        for h in self.hosts.values():
            if name in (h.name, h.ns):
                return h
        raise LabError(f"unknown lab host {name!r}")

    def ip_of(self, name_or_ip: str) -> str:
        try:
            return str(ipaddress.IPv4Address(name_or_ip))
        except ValueError:
            return self.host(name_or_ip).ip

    def _ours(self, ns: str) -> bool:
        """Does a namespace name look like one this lab (same prefix) creates?"""
        rest = ns[len(self.prefix):] if ns.startswith(self.prefix) else None
        return rest is not None and re.fullmatch(r"sw|lb\d+|be\d+|client|router", rest) is not None

    # ---- lifecycle ----------------------------------------------------------------
    def up(self) -> dict[str, object]:
        """Build the topology (cleaning leftovers of a crashed run first); returns state.

        Any failure tears down what was built and raises :class:`LabError`.
        """
        require_root()
        self.down()
        created: list[str] = []
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            # write the state file first so a crash mid-way is still cleaned by `down`
            self._write_state(created, complete=False)
            sw = self.switch_ns
            _ip(["netns", "add", sw])
            created.append(sw)
            self._write_state(created, complete=False)
            _ip(["-n", sw, "link", "set", "dev", "lo", "up"])
            _ip(["-n", sw, "link", "add", "name", BRIDGE, "type", "bridge", "stp_state", "0",
                 "mcast_snooping", "0"])
            _ip(["-n", sw, "link", "set", "dev", BRIDGE, "up"])
            prefixlen = str(self.network.prefixlen)
            for h in self.hosts.values():
                _ip(["netns", "add", h.ns])
                created.append(h.ns)
                self._write_state(created, complete=False)
                _ip(["-n", h.ns, "link", "set", "dev", "lo", "up"])
                write_sysctls(_NO_DAD, h.ns)  # before eth0 exists: it inherits "default"
                if self.topology == "bgp" and h.role == "client":
                    continue  # linked to the router below, not to the bridge
                # both veth ends are created directly inside namespaces: the host
                # namespace never sees them, even for a moment
                _ip(["-n", sw, "link", "add", "name", h.name, "type", "veth",
                     "peer", "name", h.ifname, "netns", h.ns])
                _ip(["-n", h.ns, "link", "set", "dev", h.ifname, "address", h.mac])
                _ip(["-n", h.ns, "addr", "add", f"{h.ip}/{prefixlen}", "dev", h.ifname])
                _ip(["-n", h.ns, "addr", "add", f"{h.ip6}/64", "dev", h.ifname, "nodad"])
                _ip(["-n", h.ns, "link", "set", "dev", h.ifname, "up"])
                _ip(["-n", sw, "link", "set", "dev", h.name, "master", BRIDGE])
                _ip(["-n", sw, "link", "set", "dev", h.name, "up"])
            if self.topology == "bgp":
                from halb.lab.bgp_router import build_router

                self.router_pid = build_router(self)
            return self._write_state(created, complete=True)
        except BaseException:
            self.down()
            raise

    def down(self, all_with_prefix: bool = False) -> list[str]:
        """Remove every namespace of this lab; idempotent; works without a state file.

        Finds namespaces from the state file *and* by name pattern
        (``{prefix}sw|lbN|beN|client``), so leftovers of a crashed run are removed too.
        ``all_with_prefix=True`` removes any namespace starting with the prefix — with
        the default prefix that includes other runs' ``halb-t<pid>-...`` labs, so it is
        opt-in. Processes still running inside are killed first (by pid), otherwise
        they would keep the namespace alive after its name is gone.
        """
        wanted: set[str] = set()
        recorded = self._read_state()
        if recorded:
            wanted.update(str(n) for n in recorded.get("namespaces", []))  # type: ignore[union-attr]
        existing = list_netns()
        for ns in existing:
            if self._ours(ns) or (all_with_prefix and ns.startswith(self.prefix)):
                wanted.add(ns)
        removed: list[str] = []
        present = set(existing)
        targets = [ns for ns in wanted if ns in present]
        # hosts first, switch last (not required, but keeps the bridge until the end)
        targets.sort(key=lambda n: n == self.switch_ns)
        for ns in targets:
            self._kill_ns_processes(ns)
        if self._router_proc is not None:  # reap the router's BIRD if this process started it
            self._router_proc.poll()
            self._router_proc = None
        for ns in targets:
            proc = _ip(["netns", "del", ns], check=False)
            if proc.returncode == 0 or ns not in list_netns():
                removed.append(ns)
        try:
            self.state_file.unlink()
        except FileNotFoundError:
            pass
        still = [ns for ns in targets if ns in list_netns()]
        if still:
            raise LabError(f"could not remove namespaces: {', '.join(still)}")
        return removed

    @staticmethod
    def _kill_ns_processes(ns: str, grace_s: float = 2.0) -> None:
        pids = _ns_pids(ns)
        if not pids:
            return
        for pid in pids:
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and _ns_pids(ns):
            time.sleep(0.05)
        for pid in _ns_pids(ns):
            _signal(pid, signal.SIGKILL)

    def status(self) -> dict[str, object]:
        """Which namespaces exist, with their addresses; plus the state file contents."""
        existing = set(list_netns())
        hosts = []
        for h in self.hosts.values():
            row: dict[str, object] = {**asdict(h), "exists": h.ns in existing}
            if h.ns in existing:
                proc = _ip(["-n", h.ns, "-o", "addr", "show", "dev", h.ifname, "scope", "global"], check=False)
                row["addrs"] = [line.split()[3] for line in proc.stdout.splitlines()
                                if len(line.split()) > 3]
            hosts.append(row)
        stray = sorted(ns for ns in existing
                       if ns.startswith(self.prefix) and ns not in self.namespaces)
        return {
            "prefix": self.prefix, "subnet": self.subnet, "vip": self.vip,
            "subnet6": self.subnet6, "vip6": self.vip6,
            "switch": {"ns": self.switch_ns, "exists": self.switch_ns in existing},
            "hosts": hosts, "state_file": str(self.state_file),
            "state": self._read_state(), "other_namespaces_with_prefix": stray,
            "up": all(ns in existing for ns in self.namespaces),
            "topology": self.topology,
            "namespaces": self.namespace_map(),
            "service_addresses": self.service_addresses,
        }

    def namespace_map(self) -> dict[str, object]:
        """{"router": ns|None, "client": ns, "switch": ns, "nodes": {node id: ns}} (node nN on lbN)."""
        return {"router": self.hosts["router"].ns if "router" in self.hosts else None,
                "client": self.hosts["client"].ns, "switch": self.switch_ns,
                "nodes": {f"n{h.name[2:]}": h.ns for h in self.hosts.values() if h.role == "lb"},
                "backends": {h.name: h.ns for h in self.hosts.values() if h.role == "be"}}

    def is_up(self) -> bool:
        existing = set(list_netns())
        return all(ns in existing for ns in self.namespaces)

    def _write_state(self, created: list[str], complete: bool) -> dict[str, object]:
        state: dict[str, object] = {
            "prefix": self.prefix, "subnet": self.subnet, "vip": self.vip,
            "subnet6": self.subnet6, "vip6": self.vip6,
            "topology": self.topology, "service_addresses": self.service_addresses,
            "namespaces_by_role": self.namespace_map(), "router_pid": self.router_pid,
            "bridge": {"ns": self.switch_ns, "name": BRIDGE},
            "namespaces": list(created),
            "hosts": {n: asdict(h) for n, h in self.hosts.items()},
            "complete": complete, "pid": os.getpid(), "time": time.time(),
        }
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        tmp.replace(self.state_file)
        return state

    def _read_state(self) -> dict[str, object] | None:
        try:
            return json.loads(self.state_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    # ---- running things inside ----------------------------------------------------
    def argv(self, name: str, argv: Sequence[str]) -> list[str]:
        """The command line that runs ``argv`` inside the host's namespace."""
        return ["ip", "netns", "exec", self.ns(name), *argv]

    def exec(self, name: str, argv: Sequence[str], check: bool = True, timeout: float = 30.0,
             input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run a command in a lab host and wait (output captured as text)."""
        proc = subprocess.run(self.argv(name, argv), capture_output=True, text=True,
                              timeout=timeout, input=input)
        if check and proc.returncode != 0:
            raise LabError(f"[{name}] {' '.join(argv)} failed ({proc.returncode}): "
                           f"{proc.stderr.strip()}")
        return proc

    def spawn(self, name: str, argv: Sequence[str], **popen_kwargs: object) -> subprocess.Popen:
        """Start a command in a lab host without waiting; the caller owns the Popen."""
        return subprocess.Popen(self.argv(name, argv), **popen_kwargs)  # type: ignore[call-overload]

    def ip(self, name: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``ip -n <ns> args...`` for a lab host."""
        return _ip(["-n", self.ns(name), *args], check=check)

    # ---- faults ---------------------------------------------------------------------
    def partition(self, name: str, peers: Iterable[str], both_ways: bool = True) -> None:
        """Cut ``name`` off from ``peers`` (host names or IPs) with blackhole routes.

        Why blackhole routes: they need only iproute2 (no iptables on fresh machines).
        A connect to a cut peer fails at once (EINVAL) instead of timing out. ARP still
        crosses, like with an iptables L3 partition. With ``both_ways`` (peers given by
        host name) the peers get the reverse route too.
        """
        for peer in peers:
            self.ip(name, "route", "replace", "blackhole", f"{self.ip_of(peer)}/32")
            if both_ways and not _is_ip(peer):
                self.ip(peer, "route", "replace", "blackhole", f"{self.ip_of(name)}/32")

    def heal(self, name: str, peers: Iterable[str] | None = None, both_ways: bool = True) -> None:
        """Remove blackhole routes added by :meth:`partition` (all of them if ``peers`` is None)."""
        if peers is None:
            for dst in self.blackholes(name):
                self.ip(name, "route", "del", "blackhole", dst, check=False)
            if both_ways:
                me = f"{self.ip_of(name)}/32"
                for other in self.hosts.values():
                    if other.ns != self.ns(name) and me in self.blackholes(other.name):
                        self.ip(other.name, "route", "del", "blackhole", me, check=False)
            return
        for peer in peers:
            self.ip(name, "route", "del", "blackhole", f"{self.ip_of(peer)}/32", check=False)
            if both_ways and not _is_ip(peer):
                self.ip(peer, "route", "del", "blackhole", f"{self.ip_of(name)}/32", check=False)

    def blackholes(self, name: str) -> list[str]:
        """Destinations currently blackholed in a host (``a.b.c.d/32`` strings)."""
        out = self.ip(name, "-4", "route", "show", "type", "blackhole").stdout
        dsts = []
        for line in out.splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "blackhole":
                dsts.append(parts[1] if "/" in parts[1] else parts[1] + "/32")
        return dsts


def _is_ip(text: str) -> bool:
    try:
        ipaddress.IPv4Address(text)
        return True
    except ValueError:
        return False


def _ns_pids(ns: str) -> list[int]:
    proc = _ip(["netns", "pids", ns], check=False)
    return [int(p) for p in proc.stdout.split() if p.isdigit() and int(p) != os.getpid()]


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass

"""BGP mode's decisions, without I/O: "should this node announce service address X now?"

Every balancer announces the same service addresses to the routers (active-active, the
routers spread flows with ECMP), so there is no single holder and no successor wait. What
remains of the VIP lease is the *quorum contact*: each node submits a ``lease.contact``
command through Raft every ``renew_interval_s``; when it commits, the node knows a majority
still accepted its writes at the moment it submitted it. ``contact_at`` is that submit time
(taken before the submit, so it is never later than the majority's acknowledgement), and
the node may announce only until ``contact_at + lease_s``. A node cut off from the majority
(partitioned, or the loser of a split) cannot get a contact committed, so it stops
announcing within ``lease_s`` of its last contact, even while its BGP session to the router
stays up. Why commits and not "I heard the leader's heartbeat": a heartbeat from a deposed
leader proves nothing in a five-node cluster, a commit proves a majority in any size.

Announce rule (docs/failover.md#bgp-mode): an address is announced only while
(a) quorum contact is fresh, (b) the data-plane self-check passes, (c) at least one of the
address's services has an eligible backend on this node, (d) the node is not draining and
not stopping. The kernel is the dead-man switch: the address sits on ``lo`` with
``valid_lft 1`` and BIRD's ``direct`` protocol exports it, so a frozen or dead halb process
withdraws within ~1.15 s even if BIRD lives on. A refresh is allowed only while
``contact_until - now > refresh_min_remaining_s`` and re-checked after the netlink call
(the same margins as the VIP lease: :class:`~halb.announce.lease.LeaseParams`).

Draining keeps the address on ``lo`` (in-flight flows that still arrive before the router
applied the withdrawal are served) and withdraws at the BGP level instead; see
:func:`decide`'s ``accept`` versus ``announce``.
"""
from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass, field
from typing import Mapping

from halb.announce.lease import LeaseParams


@dataclass(frozen=True)
class RouterPeer:
    """One BGP neighbour (a router) of this balancer."""

    address: str
    asn: int
    name: str = ""                # BIRD protocol name; derived from the index when empty
    password: str | None = None   # TCP MD5 (RFC 2385) when the router wants it; never logged


@dataclass(frozen=True)
class ServiceAddress:
    """An address every balancer announces (/32), and the services whose health gate it.

    ``services`` empty means "any service": the address is announced while at least one
    service on this node has an eligible backend.
    """

    address: str
    services: tuple[str, ...] = ()


@dataclass(frozen=True)
class BgpSettings:
    local_as: int
    routers: tuple[RouterPeer, ...]
    addresses: tuple[ServiceAddress, ...]
    local_address: str = ""            # source address of the BGP sessions ("" : BIRD chooses)
    router_id: str = ""                # BIRD router id ("" : local_address)
    hold_time_s: int = 9               # BGP hold time (BFD does the fast detection)
    bfd: bool = True
    bfd_interval_ms: int = 100         # BFD tx/rx interval; a dead peer is noticed after ~multiplier x
    bfd_multiplier: int = 3
    med: int | None = None
    communities: tuple[tuple[int, int], ...] = ()
    interface: str = "lo"              # where service addresses are added while announced
    withdraw_wait_s: float = 0.5       # shutdown: BGP withdrawn, then this long before the address goes
    drain_grace_s: float = 5.0         # drain/shutdown: at most this long for client connections to end before withdrawing
    drain_drop_syns: bool = True       # drain: new SYNs dropped (clients retry in ~1 s) from when the old flows ended
    bird: str = ""                     # path of the bird binary ("" : find it; Debian package bird2)
    birdc: str = ""

    def address_strings(self) -> list[str]:
        return [a.address for a in self.addresses]


def parse_community(text: str) -> tuple[int, int]:
    """``"65000:100"`` -> (65000, 100); ValueError with the reason otherwise."""
    left, sep, right = text.partition(":")
    if not sep or not left.isdigit() or not right.isdigit():
        raise ValueError(f"must be ASN:VALUE (two numbers 0-65535), got {text!r}")
    a, b = int(left), int(right)
    if a > 65535 or b > 65535:
        raise ValueError(f"both halves must be 0-65535, got {text!r}")
    return a, b


def valid_asn(value: int) -> bool:
    return 1 <= value <= 4294967294 and value != 23456  # 23456: AS_TRANS


def is_ipv4(text: str) -> bool:
    try:
        ipaddress.IPv4Address(text)
        return True
    except ValueError:
        return False


# ---- quorum contact -------------------------------------------------------------------

@dataclass
class QuorumContact:
    """Submit times of this node's own ``lease.contact`` commands and which ones committed.

    Every method takes ``now`` (CLOCK_BOOTTIME in production); nothing reads a clock.
    """

    params: LeaseParams
    contact_at: float | None = None     # submit time of the newest committed contact
    last_submit: float = -math.inf
    outstanding: dict[str, float] = field(default_factory=dict)  # cid -> submit time

    def due(self, now: float) -> bool:
        """Time to submit another contact? Bounded in flight: a partitioned node's
        submissions never get an answer, and must not pile up without limit."""
        for cid, t in list(self.outstanding.items()):
            if now - t >= 5.0:
                del self.outstanding[cid]  # never answered: it cannot extend anything anyway
        return (now - self.last_submit >= self.params.renew_interval_s
                and len(self.outstanding) < self.params.max_outstanding)

    def begin(self, cid: str, now: float) -> float:
        """Call right before submitting; returns the submit time to hand back with the result."""
        self.outstanding[cid] = now
        self.last_submit = now
        return now

    def on_result(self, cid: str, submitted_at: float, ok: bool) -> bool:
        """A contact's callback: True when it moved ``contact_at`` forward."""
        self.outstanding.pop(cid, None)
        if not ok:
            return False
        if self.contact_at is not None and submitted_at <= self.contact_at:
            return False  # an older one answered late: it proves nothing newer
        self.contact_at = submitted_at
        return True

    @property
    def until(self) -> float | None:
        return None if self.contact_at is None else self.contact_at + self.params.lease_s

    def fresh(self, now: float) -> bool:
        end = self.until
        return end is not None and now < end

    def may_refresh(self, now: float) -> bool:
        """May the address's kernel lifetime be renewed now (it then outlives the contact by
        at most the kernel's removal delay, which refresh_min_remaining_s covers)?"""
        end = self.until
        return end is not None and end - now > self.params.refresh_min_remaining_s

    def refresh_was_safe(self, finished_at: float) -> bool:
        end = self.until
        return end is not None and end - finished_at > self.params.kernel_expiry_max_s

    def remaining(self, now: float) -> float:
        end = self.until
        return 0.0 if end is None else max(0.0, end - now)


# ---- the decision -------------------------------------------------------------------

@dataclass(frozen=True)
class Inputs:
    """Everything the decision depends on, sampled at one moment."""

    quorum: bool                        # QuorumContact.fresh(now)
    dataplane_ok: bool
    dataplane_reason: str
    eligible: Mapping[str, bool]        # service -> has at least one eligible backend here
    draining: bool = False
    stopping: bool = False


@dataclass(frozen=True)
class Decision:
    accept: bool     # keep the address on this node (traffic that reaches us is served)
    announce: bool   # advertise it to the routers
    reason: str      # why not (or "ok")


def service_ready(addr: ServiceAddress, eligible: Mapping[str, bool]) -> tuple[bool, str]:
    names = addr.services or tuple(sorted(eligible))
    if not names:
        return False, "no service is configured on this node"
    if any(eligible.get(n, False) for n in names):
        return True, "ok"
    unknown = [n for n in names if n not in eligible]
    if unknown and len(unknown) == len(names):
        return False, f"service {', '.join(unknown)} does not exist (or has no listener) here"
    return False, f"no eligible backend in {', '.join(names)}"


def decide(addr: ServiceAddress, inp: Inputs) -> Decision:
    """The announce rule for one address. Order of reasons = what an operator fixes first."""
    if inp.stopping:
        return Decision(False, False, "stopping")
    if not inp.quorum:
        return Decision(False, False, "no contact with a Raft majority within the lease")
    if not inp.dataplane_ok:
        return Decision(False, False, f"data plane self-check fails: {inp.dataplane_reason}")
    ready, why = service_ready(addr, inp.eligible)
    if not ready:
        return Decision(False, False, why)
    if inp.draining:
        return Decision(True, False, "draining")
    return Decision(True, True, "ok")


def eligible_services(routes: Mapping[str, object]) -> dict[str, bool]:
    """service name -> any backend eligible, from the node's ServiceRoutes (routing cache)."""
    out = {}
    for name, route in routes.items():
        out[name] = any(getattr(b, "eligible", False) for b in getattr(route, "backends", ()))
    return out

"""Floating VIP primitives: add/renew with a short kernel lifetime, release, GARP / NA.

One announcer handles a *set* of VIPs on one interface, any mix of IPv4 and IPv6: every
operation covers all of them in one worker-thread call, so they are added, renewed, fenced
and deleted together (one lease, one holder). IPv4 VIPs are announced with gratuitous ARP
(garp.py), IPv6 VIPs with unsolicited neighbour advertisements (ndisc.py), both as raw
Ethernet frames from one AF_PACKET socket.

IPv6 VIPs are added as /128 with ``nodad`` (duplicate address detection would keep the
address tentative, unusable, for about a second after every takeover; the quorum lease is
what guarantees one holder), ``noprefixroute`` and ``preferred_lft 0``: a deprecated
address still accepts connections but is never picked as the source of the node's own
outgoing traffic (Raft, health checks), which would break whenever the VIP moves.

This module is the *mechanism*; the quorum lease decides *whether* to call it.

Why a short kernel lifetime: the VIP is added with ``valid_lft``/``preferred_lft`` of 1 s
and renewed every ~200 ms while the lease allows. If the holder crashes, freezes or loses
its lease logic, the kernel deletes the address by itself about 1.0–1.15 s later, so a
dead holder cannot keep answering for the VIP.

Threading model: every netlink operation runs on one dedicated worker thread owned by the
announcer. That thread enters the target namespace once (``netns=NAME``), so the netlink
socket, the raw ARP socket and sysctl writes all live there without forking. Sync methods
(``hold``, ``release``...) may be called from any thread *except* an asyncio loop thread
(they block for ~1 ms normally, at most ``op_timeout``); the ``a*`` coroutines run the same
operations on the worker without blocking the loop. GARP bursts sleep between rounds, so
they use a second thread and never delay a renewal queued behind them.

Typical caller (the lease logic)::

    vip = VipAnnouncer("eth0", "10.99.0.10")
    await vip.acquire()           # add + GARP burst + refresh burst a few seconds later
    while lease_valid():          # every ~200 ms
        await vip.ahold()
    await vip.arelease()          # on lease loss, shutdown, SIGTERM
"""
from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import socket
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Sequence, TypeVar

from . import garp as _garp
from . import ndisc as _ndisc
from .sysctl import enter_netns, set_vip_arp_sysctls

log = logging.getLogger(__name__)
T = TypeVar("T")

IP_FREEBIND = 15  # <linux/in.h>; not exported by Python's socket module
IPV6_FREEBIND = 78  # <linux/in6.h> (Linux >= 4.15)
IFA_F_NODAD = 0x02
IFA_F_NOPREFIXROUTE = 0x200


class VipError(RuntimeError):
    """A netlink or packet operation on the VIP failed."""


def freebind_socket(host: str, port: int, kind: int = socket.SOCK_STREAM,
                    backlog: int = 128, reuse_port: bool = False) -> socket.socket:
    """A listening (or bound UDP) socket on ``host:port`` that may bind an absent address.

    Why: with IP_FREEBIND a standby listens on the VIP *before* it holds it, so the
    first connection after a failover is accepted instead of reset. No sysctl needed
    (the process-wide alternative is :func:`halb.announce.sysctl.enable_nonlocal_bind`).
    Pass the socket to ``asyncio``'s ``create_server(sock=...)`` or aiohttp's
    ``SockSite``.
    """
    v6 = ":" in host
    sock = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, kind)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if v6:
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_FREEBIND, 1)
        else:
            sock.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
        sock.bind((host, port))
        if kind == socket.SOCK_STREAM:
            sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


@dataclass(frozen=True)
class VipAddress:
    """One VIP of the set: its family decides prefix length, flags and announcement."""

    address: str
    prefixlen: int

    @property
    def v6(self) -> bool:
        return ":" in self.address


def vip_set(vips: str | Sequence[str], prefixlen: int = 32) -> tuple[VipAddress, ...]:
    """Validate ``vips`` (one address or several, IPv4 and/or IPv6) -> canonical, unique."""
    items = [vips] if isinstance(vips, str) else list(vips)
    if not items:
        raise ValueError("no VIP given")
    out: list[VipAddress] = []
    for raw in items:
        ip = ipaddress.ip_address(raw)  # ValueError names the bad address
        entry = VipAddress(str(ip), 128 if ip.version == 6 else prefixlen)
        if entry in out:
            raise ValueError(f"VIP {raw} given twice")
        out.append(entry)
    return tuple(out)


class VipAnnouncer:
    """Add/renew, release, read back and announce a set of VIPs on one interface.

    ``vip`` is one address or a list (IPv4 and IPv6 mixed); ``prefixlen`` applies to the
    IPv4 ones. ``netns`` names a namespace in /run/netns (lab and tests); production nodes
    run inside their namespace already and pass None.
    """

    def __init__(self, ifname: str, vip: str | Sequence[str], prefixlen: int = 32, netns: str | None = None,
                 op_timeout: float = 2.0) -> None:
        self.addresses = vip_set(vip, prefixlen)  # validate early, clear error
        self.ifname = ifname
        self.vips = [a.address for a in self.addresses]
        self.vip = self.vips[0]  # the first one: log lines and single-VIP callers
        self.prefixlen = prefixlen
        self.netns = netns
        self.op_timeout = op_timeout
        # one worker thread, so it can stay inside the namespace for its whole life
        self._nl = ThreadPoolExecutor(1, thread_name_prefix=f"vip-nl-{ifname}")
        self._worker_state = threading.local()
        self._tx = ThreadPoolExecutor(1, thread_name_prefix=f"vip-garp-{ifname}")
        self._ipr: Any = None
        self._ifindex: int | None = None
        self._arp: tuple[socket.socket, bytes] | None = None
        self._refresh_task: asyncio.Task[None] | None = None
        self._closed = False
        self._lock = threading.Lock()

    # ---- worker-thread internals -------------------------------------------------
    def _in_worker(self, fn: Callable[[], T]) -> Callable[[], T]:
        """Wrap ``fn`` so it first moves the worker thread into the namespace (once).

        Done lazily rather than as a pool initializer so a namespace that does not exist
        yet gives a clear VipError now and works on a later call.
        """
        def call() -> T:
            if self.netns is not None and not getattr(self._worker_state, "in_ns", False):
                try:
                    enter_netns(self.netns)
                except OSError as exc:
                    raise VipError(f"cannot enter netns {self.netns!r}: {exc}") from exc
                self._worker_state.in_ns = True
            return fn()
        return call

    def _iproute(self) -> Any:
        if self._ipr is None:
            from pyroute2 import IPRoute  # imported lazily: keeps CLI start fast

            self._ipr = IPRoute()  # created on the worker thread, inside the namespace
        return self._ipr

    def _index(self) -> int:
        if self._ifindex is None:
            found = self._iproute().link_lookup(ifname=self.ifname)
            if not found:
                raise VipError(f"interface {self.ifname!r} not found"
                               + (f" in netns {self.netns}" if self.netns else ""))
            self._ifindex = found[0]
        return self._ifindex

    def _run(self, fn: Callable[[], T]) -> T:
        if self._closed:
            raise VipError("announcer is closed")
        fut: Future[T] = self._nl.submit(self._in_worker(fn))
        return fut.result(timeout=self.op_timeout)

    def _do_hold(self, valid_lft: int) -> None:
        """Add/renew every VIP; the first failure stops and raises (the caller then releases all)."""
        for a in self.addresses:
            self._do_hold_one(a, valid_lft)

    def _do_hold_one(self, a: VipAddress, valid_lft: int) -> None:
        try:
            if a.v6:
                self._iproute().addr("replace", index=self._index(), address=a.address,
                                     prefixlen=a.prefixlen, valid_lft=valid_lft, preferred_lft=0,
                                     IFA_FLAGS=IFA_F_NODAD | IFA_F_NOPREFIXROUTE)
            else:
                self._iproute().addr("replace", index=self._index(), address=a.address,
                                     prefixlen=a.prefixlen, valid_lft=valid_lft,
                                     preferred_lft=valid_lft)
        except VipError:
            raise
        except Exception as exc:
            self._ifindex = None  # interface may have been recreated
            raise VipError(f"adding {a.address}/{a.prefixlen} on {self.ifname} failed: {exc}") from exc

    def _do_release(self) -> bool:
        """Delete every VIP, even after one delete failed (then raise the first error).
        True if at least one was still there."""
        removed, first_error = False, None
        for a in self.addresses:
            try:
                removed = self._do_release_one(a) or removed
            except VipError as exc:
                first_error = first_error or exc
        if first_error is not None:
            raise first_error
        return removed

    def _do_release_one(self, a: VipAddress) -> bool:
        try:
            self._iproute().addr("del", index=self._index(), address=a.address, prefixlen=a.prefixlen)
            return True
        except Exception as exc:
            code = getattr(exc, "code", None)
            if code in (errno.EADDRNOTAVAIL, errno.ENODEV, errno.ENOENT):
                return False  # already gone (expired or never added): release is done
            raise VipError(f"removing {a.address} from {self.ifname} failed: {exc}") from exc

    def _do_lifetimes(self) -> dict[str, int]:
        """address -> remaining kernel valid lifetime (s), for the VIPs configured now."""
        wanted = {(a.address, a.prefixlen) for a in self.addresses}
        out: dict[str, int] = {}
        for msg in self._iproute().addr("dump", index=self._index()):
            addr = msg.get("IFA_ADDRESS")
            if addr is not None:
                addr = str(ipaddress.ip_address(addr))
            if (addr, msg.get("prefixlen")) in wanted:
                info = msg.get("IFA_CACHEINFO") or {}
                out[addr] = int(info.get("ifa_valid", 0xFFFFFFFF))
        return out

    def _do_lifetime(self) -> int | None:
        """The shortest remaining lifetime if *every* VIP is configured, else None."""
        found = self._do_lifetimes()
        if len(found) < len(self.addresses):
            return None
        return min(found.values())

    def _do_open_arp(self) -> tuple[socket.socket, bytes]:
        if self._arp is None:
            self._arp = _garp.open_arp_socket(self.ifname)
        return self._arp

    # ---- sync API (any thread except an event loop's) ----------------------------
    def hold(self, valid_lft: int = 1) -> None:
        """Add the VIP, or renew it if present, with a kernel lifetime of ``valid_lft`` s.

        Idempotent (netlink NEWADDR with CREATE|REPLACE). Callers renew every ~200 ms;
        if they stop, the kernel deletes the address ~``valid_lft`` s after the last call.
        """
        self._run(lambda: self._do_hold(valid_lft))

    def release(self) -> bool:
        """Remove the VIP now. Returns False if it was not there. Safe to call twice."""
        return self._run(self._do_release)

    def is_held(self) -> bool:
        """True if every VIP is configured on the interface right now."""
        return self._run(self._do_lifetime) is not None

    def held_addresses(self) -> list[str]:
        """The VIPs configured on the interface right now (any subset of :attr:`vips`)."""
        return sorted(self._run(self._do_lifetimes))

    def valid_lifetime(self) -> int | None:
        """Remaining kernel valid lifetime in whole seconds, or None if not held."""
        return self._run(self._do_lifetime)

    def mac(self) -> str:
        """The interface's MAC address, as GARP announces it."""
        return _garp.mac_to_str(self._run(self._do_open_arp)[1])

    def send_garp(self, count: int = 3, interval: float = 0.05) -> int:
        """Send ``count`` rounds of gratuitous ARP (request and reply forms) for the IPv4
        VIPs and of unsolicited neighbour advertisements for the IPv6 ones.

        Blocks for about ``(count-1)*interval``. Returns the number of frames sent.
        """
        sock, mac = self._run(self._do_open_arp)
        return self._burst(sock, mac, count, interval)

    def _burst(self, sock: socket.socket, mac: bytes, count: int, interval: float) -> int:
        frames = self.announce_frames(mac)
        with self._lock:
            try:
                return _garp.send_rounds(sock, frames, count, interval)
            except OSError as exc:
                # interface gone or recreated: drop the cached socket so the next
                # call reopens it on the new interface
                if self._arp is not None and self._arp[0] is sock:
                    self._arp = None
                    sock.close()
                raise VipError(f"GARP on {self.ifname} failed: {exc}") from exc

    def announce_frames(self, mac: bytes) -> list[bytes]:
        """One announcement round: both GARP forms per IPv4 VIP, one unsolicited NA per IPv6 VIP.

        Sent as raw frames on the ARP packet socket (a SOCK_RAW packet socket sends any
        EtherType; its bound protocol only filters what it receives).
        """
        frames: list[bytes] = []
        for a in self.addresses:
            if a.v6:
                frames.append(_ndisc.unsolicited_na_frame(mac, a.address))
            else:
                frames.extend(_garp.garp_frames(mac, a.address))
        return frames

    def set_arp_sysctls(self) -> None:
        """arp_ignore=1 / arp_announce=2 (all + interface) in the announcer's namespace."""
        set_vip_arp_sysctls(self.ifname, self.netns)

    def close(self, release: bool = False) -> None:
        """Stop the worker threads; with ``release=True`` remove the VIP first."""
        if self._closed:
            return
        try:
            if release:
                try:
                    self.release()
                except Exception:
                    log.exception("releasing %s on close failed", self.vip)
            if self._refresh_task is not None:
                self._refresh_task.cancel()

            def shutdown() -> None:
                if self._ipr is not None:
                    self._ipr.close()
                    self._ipr = None
                if self._arp is not None:
                    self._arp[0].close()
                    self._arp = None

            try:
                self._run(shutdown)
            except Exception:
                log.debug("closing netlink resources failed", exc_info=True)
        finally:
            self._closed = True
            self._nl.shutdown(wait=False)
            self._tx.shutdown(wait=False)

    def __enter__(self) -> "VipAnnouncer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- async API (never blocks the loop) ---------------------------------------
    async def _arun(self, fn: Callable[[], T], executor: ThreadPoolExecutor | None = None) -> T:
        if self._closed:
            raise VipError("announcer is closed")
        loop = asyncio.get_running_loop()
        call = fn if executor is not None else self._in_worker(fn)
        return await asyncio.wait_for(loop.run_in_executor(executor or self._nl, call),
                                      self.op_timeout)

    async def ahold(self, valid_lft: int = 1) -> None:
        await self._arun(lambda: self._do_hold(valid_lft))

    async def arelease(self) -> bool:
        """Cancel a pending GARP refresh and remove the VIP now."""
        if self._refresh_task is not None:
            self._refresh_task.cancel()
            self._refresh_task = None
        return await self._arun(self._do_release)

    async def ahold_fenced(self, clock: Callable[[], float], not_after: float, undo_after: float,
                           valid_lft: int = 1) -> bool:
        """Add/renew only if ``clock() <= not_after`` on the worker thread right before the
        netlink call, and delete again at once if ``clock() > undo_after`` right after it.

        Why on the worker: a process frozen (SIGSTOP, VM pause) between the caller's lease
        check and the queued netlink call would otherwise apply a stale refresh when it
        resumes, long after its lease ended. Checking next to the syscall shrinks that window
        to microseconds, and the check after it bounds what a freeze inside it can cause.
        Returns True if the VIP was added and kept.

        Several VIPs: the checks surround *each* address's syscall, not the whole set, so a
        freeze anywhere in the call can make at most one stale add (the one whose syscall it
        interrupted), exactly as with one VIP; that address is deleted first. A lab freeze
        trial with two VIPs and one check around the set caught a two-holder sample after
        SIGCONT: the resumed worker finished the remaining adds before its check undid them.
        A False return (refused or undone) makes the caller delete the whole set.
        """
        def op() -> bool:
            for a in self.addresses:
                if clock() > not_after:
                    return False
                self._do_hold_one(a, valid_lft)
                if clock() > undo_after:
                    try:
                        self._do_release_one(a)  # the possibly stale one first
                    finally:
                        self._do_release()
                    return False
            return True
        return await self._arun(op)

    async def asend_garp_fenced(self, clock: Callable[[], float], not_after: float, count: int = 1,
                                interval: float = 0.0) -> int:
        """Like :meth:`asend_garp`, but sends nothing once ``clock() > not_after`` (checked
        on the sending thread, before every round): a frozen ex-holder must not announce."""
        sock, mac = await self._arun(self._do_open_arp)

        def op() -> int:
            sent = 0
            for i in range(count):
                if clock() > not_after:
                    break
                sent += self._burst(sock, mac, 1, 0.0)
                if i + 1 < count and interval > 0:
                    time.sleep(interval)
            return sent
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._tx, op)

    async def ais_held(self) -> bool:
        return (await self._arun(self._do_lifetime)) is not None

    async def asend_garp(self, count: int = 3, interval: float = 0.05) -> int:
        sock, mac = await self._arun(self._do_open_arp)

        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._tx, self._burst, sock, mac, count, interval)

    async def acquire(self, valid_lft: int = 1, garp_count: int = 3, garp_interval: float = 0.05,
                      refresh_after: float | None = 2.0, refresh_count: int = 2) -> None:
        """Take the VIP: add it, send a GARP burst, schedule a refresh burst.

        Why the refresh: a GARP sent while a switch port or client is still busy (or
        lost) leaves a stale entry; a second burst a few seconds later catches those.
        The refresh is skipped if the VIP is no longer held by then, and cancelled by
        :meth:`arelease`.
        """
        await self.ahold(valid_lft)
        try:
            await self.asend_garp(garp_count, garp_interval)
        except Exception:
            log.exception("GARP for %s on %s failed (VIP is held; clients may lag)",
                          self.vip, self.ifname)
        if self._refresh_task is not None:
            self._refresh_task.cancel()
            self._refresh_task = None
        if refresh_after is not None:
            self._refresh_task = asyncio.create_task(
                self._refresh(refresh_after, refresh_count, garp_interval))

    async def _refresh(self, delay: float, count: int, interval: float) -> None:
        try:
            await asyncio.sleep(delay)
            if await self.ais_held():
                await self.asend_garp(count, interval)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("GARP refresh for %s failed", self.vip)

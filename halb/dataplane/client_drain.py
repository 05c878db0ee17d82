"""Graceful client drain of one data-plane process (bgp mode's ``halb node drain``).

A drained balancer must let its own client flows finish *before* the routers stop sending it
packets: stateless ECMP re-hashes the flows of a withdrawn next hop onto the other
balancers, which have no socket for them and reset them. So the node drains in phases
(driven by ``halb/announce/bgp_manager.py``):

``closing``
    every response says ``Connection: close`` and idle keep-alive connections are closed
    (the same machinery as ``DataPlane.stop``); new connections are still accepted and get
    one request each, so nobody waits;
``refusing``
    additionally a drop-all classic BPF filter (SO_ATTACH_FILTER) sits on every listening
    socket: the kernel runs a listener's filter on an incoming SYN *before* the handshake
    and drops it without answering (no RST, no SYN-ACK; established connections have their
    own sockets and are not filtered). The client retransmits its SYN after its initial RTO
    (1 s on Linux) and by then the routers have withdrawn this node, so the retransmit is
    hashed to another balancer. This phase is kept short: only from "the connections
    from before the drain are gone" until the routers applied the withdrawal;
``off``
    filters detached, keep-alive as usual (``--undo``).

Verified on Linux 6.18: with the filter, ``connect`` times out (no ECONNREFUSED); an
accepted connection keeps working; after SO_DETACH_FILTER the client's SYN retransmit
(1.0 s) connects.
"""
from __future__ import annotations

import ctypes
import errno
import logging
import socket
from dataclasses import dataclass
from typing import Any, Callable, Iterable

log = logging.getLogger(__name__)

SO_ATTACH_FILTER = 26  # asm-generic/socket.h (not exported by the socket module)
SO_DETACH_FILTER = 27
PHASES = ("off", "closing", "refusing")
# a connection accepted during the drain that has not sent its request yet is left this long
# (its request is usually on its way: closing it would reset it); its first response says
# Connection: close anyway, so it never becomes an idle keep-alive connection
FRESH_IDLE_S = 1.0


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


_BPF_RET_K = 0x06  # BPF_RET | BPF_K: "accept k bytes"; k = 0 drops the packet
_DROP_ALL = (_SockFilter * 1)(_SockFilter(_BPF_RET_K, 0, 0, 0))
_DROP_ALL_PROG = bytes(_SockFprog(1, _DROP_ALL))  # the kernel copies the program on attach


def refuse_syns(sock: socket.socket) -> None:
    """Drop every packet the kernel would deliver to this listener (its SYNs), silently."""
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, _DROP_ALL_PROG)


def accept_syns(sock: socket.socket) -> None:
    """Undo :func:`refuse_syns` (no filter attached is fine)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_FILTER, 0)
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            raise


@dataclass
class DrainCounts:
    """Client connections of one process while draining: ``from_before`` are those that
    were open when the drain began (the node's "own flows")."""

    phase: str = "off"
    connections: int = 0
    from_before: int = 0

    def wire(self) -> dict[str, Any]:
        return {"p": self.phase, "c": self.connections, "b": self.from_before}

    @classmethod
    def from_wire(cls, d: Any) -> "DrainCounts":
        if not isinstance(d, dict):
            return cls()
        return cls(str(d.get("p", "off")), int(d.get("c", 0)), int(d.get("b", 0)))


class ClientDrain:
    """The drain state of one DataPlane (one attribute there: DataPlane stays small)."""

    def __init__(self) -> None:
        self.phase = "off"
        self._before: set[Any] = set()  # pruned at every count (connections use __slots__: no weakrefs)
        self._fresh: dict[Any, float] = {}  # accepted during the drain, idle since (first seen idle)

    def set_phase(self, phase: str, conns: Iterable[Any], listeners: Iterable[socket.socket]) -> None:
        if phase not in PHASES:
            raise ValueError(f"client drain phase must be one of {PHASES}, got {phase!r}")
        if self.phase == "off" and phase != "off":
            self._before = set(conns)
        if phase == "off":
            self._before = set()
            self._fresh = {}
        self.phase = phase
        self.apply_filters(listeners)

    def apply_filters(self, listeners: Iterable[socket.socket]) -> None:
        """Attach (refusing) or detach (otherwise) on every listener; idempotent, so it is
        also called after the data plane bound a new listener."""
        for s in listeners:
            try:
                (refuse_syns if self.phase == "refusing" else accept_syns)(s)
            except OSError as exc:  # a listener closed meanwhile: nothing to filter
                log.warning("client drain: %s filter on %s failed: %s",
                            "attaching" if self.phase == "refusing" else "detaching", s, exc)

    def close_idle(self, conns: Iterable[Any], now: float, idle: Callable[[Any], bool]) -> None:
        """Close idle keep-alive connections: those from before the drain at once, those
        accepted since only after FRESH_IDLE_S without a request."""
        for c in list(conns):
            if not idle(c):
                continue
            if c in self._before or now - self._fresh.setdefault(c, now) >= FRESH_IDLE_S:
                c.close()

    def counts(self, conns: Iterable[Any]) -> DrainCounts:
        live = set(conns)  # a connection leaves DataPlane.conns when it closes
        self._before &= live
        if self._fresh:
            self._fresh = {c: t for c, t in self._fresh.items() if c in live}
        return DrainCounts(self.phase, len(live), len(self._before))

"""Listening sockets: one per service, shared across worker processes by SO_REUSEPORT.

IP_FREEBIND lets a node bind its service VIP before it holds it, so a VIP takeover only
has to add the address (no listener restart on the critical path).
"""
from __future__ import annotations

import asyncio
import logging
import socket
from dataclasses import dataclass, field
from typing import Any

from halb.dataplane import tls_stream
from halb.dataplane.accept_burst import BurstAcceptor
from halb.dataplane.accept_burst import attach as attach_burst
from halb.dataplane.routing import ServiceRuntime

log = logging.getLogger(__name__)

IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)  # Linux value; not exported by Python
BACKLOG = 4096
TLS_HANDSHAKE_TIMEOUT = 10.0  # s; a connection is counted (max_connections) only once its handshake is done


def tls_factory(loop: asyncio.AbstractEventLoop, ctx: Any, factory: Any) -> Any:
    """A protocol factory that terminates TLS (tls_stream.TlsStream) in front of `factory`'s
    protocols."""
    def make() -> tls_stream.TlsStream:
        return tls_stream.TlsStream(loop, ctx, factory(), TLS_HANDSHAKE_TIMEOUT)

    return make


def gated(factory: Any, gate: Any) -> Any:
    def make() -> Any:
        return gate(factory())

    return make


def make_listen_socket(host: str, port: int, backlog: int = BACKLOG) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            s.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
        except OSError:  # not Linux: binding a foreign address will fail loudly instead
            pass
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.bind((host, port))
        s.listen(backlog)
        s.setblocking(False)
    except BaseException:
        s.close()
        raise
    return s


def relay_suits(opts: Any) -> bool:
    """TCP mode runs on the C relay unless a PROXY header must be sent or read (the relay
    has no place for one; the asyncio path does both)."""
    return opts.send_proxy == "off" and not opts.accept_proxy


def listen_socket(host: str, port: int) -> socket.socket:
    """The listener the process this one replaces handed over for host:port (hot restart,
    halb/takeover.py: its accept queue and SO_REUSEPORT slot come with it), else a new one."""
    from halb.takeover import take_inherited

    return take_inherited("tcp", host, port) or make_listen_socket(host, port)


@dataclass(eq=False)
class Listener:
    """A bound service: its socket, its asyncio server (or, TCP mode on the C relay, its
    RelayAcceptor) and its routing runtime."""

    engine: Any
    rt: ServiceRuntime
    key: tuple[str, str, int]  # (mode, host, requested port)
    sock: socket.socket
    server: asyncio.AbstractServer | None = None
    port: int = 0
    closed: bool = False
    conns: set[Any] = field(default_factory=set)
    burst: BurstAcceptor | None = None  # drains deep accept queues (see accept_burst.py)
    acceptor: Any = None  # TCP mode on the C relay: tcp_relay.RelayAcceptor instead of a server
    ssl: Any = None  # an ssl.SSLContext: TLS is terminated here (frontends, frontend.py)
    frontend: str | None = None  # the frontend's name (frontend.py), for the access log
    # wraps each new connection's protocol, outermost (a frontend's PROXY header gate: before TLS)
    proxy_gate: Any = None

    async def serve(self, factory: Any) -> None:
        if self.closed:
            return
        loop = self.engine.loop
        relay = self.engine.tcp_relay() if self.key[0] == "tcp" and relay_suits(self.rt.opts) else None
        if relay is not None:  # accepts in batches itself: no server, no BurstAcceptor
            self.acceptor = relay.listen(self)
            return
        tls: dict[str, Any] = {}
        # halb's own TLS transport (tls_stream.py); uvloop's SSL protocol with HALB_TLS_STREAM=0,
        # except behind a PROXY header gate, which must read before the handshake starts
        if self.ssl is not None and (tls_stream.enabled() or self.proxy_gate is not None):
            factory = tls_factory(loop, self.ssl, factory)
        elif self.ssl is not None:
            tls = {"ssl": self.ssl, "ssl_handshake_timeout": TLS_HANDSHAKE_TIMEOUT}
        if self.proxy_gate is not None:
            factory = gated(factory, self.proxy_gate)
        self.server = await loop.create_server(factory, sock=self.sock, backlog=BACKLOG, **tls)
        if self.closed:
            self.server.close()
            return
        self.burst = attach_burst(loop, self.sock, factory, self._room, tls)

    def _room(self) -> int:
        mc = self.rt.opts.max_connections
        return mc - self.rt.connections if mc else 1 << 30

    def close(self) -> None:
        self.closed = True
        if self.burst is not None:
            self.burst.close()
            self.burst = None
        if self.acceptor is not None:
            self.acceptor.close()  # before the socket closes: its fd number may be reused
            self.acceptor = None
        if self.server is not None:
            self.server.close()
        else:
            try:
                self.sock.close()
            except OSError:
                pass

"""TCP mode: a byte relay between a client and one backend, on asyncio Protocols.

Half-close is preserved (a client that shuts down its sending side still receives the
backend's answer): an EOF is forwarded with write_eof and the connection closes only
when both directions ended or one side closed. Flow control pairs pause_writing on one
side with pause_reading on the other, so a fast sender cannot fill the proxy's memory.
A connect failure tries the next backend (up to tcp_connect_attempts), because nothing
has been sent yet and the client cannot tell.
"""
from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from halb.dataplane.connect import PendingConnect, open_connection
from halb.dataplane.local_errors import report_rejected
from halb.dataplane.proxy_protocol import Addresses, connection_addrs, header
from halb.dataplane.routing import BackendState, ServiceRuntime
from halb.dataplane.tcp_attempts import account_failed_connect, next_backend

if TYPE_CHECKING:  # pragma: no cover
    from halb.dataplane.listeners import Listener

EARLY_MAX = 65536  # client bytes held while the backend connection is being opened


class TcpUpstream(asyncio.Protocol):
    def __init__(self, client: "TcpClientConn") -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        c = self.client
        c.active = True
        if not c.closed:
            c.transport.write(data)  # type: ignore[union-attr]

    def eof_received(self) -> bool:
        self.eof = True
        c = self.client
        if c.closed:
            return False
        if c.eof:
            c.close()
            return False
        if c.transport.can_write_eof():  # type: ignore[union-attr]
            c.transport.write_eof()  # type: ignore[union-attr]
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.upstream_lost(self)
        self.transport = None  # no protocol <-> transport cycle: freed by refcount, not the GC

    def pause_writing(self) -> None:
        if not self.client.closed:
            self.client.transport.pause_reading()  # type: ignore[union-attr]

    def resume_writing(self) -> None:
        if not self.client.closed:
            self.client.transport.resume_reading()  # type: ignore[union-attr]


class TcpClientConn(asyncio.Protocol):
    """One client connection and its backend connection.

    The backend connect runs on callbacks (halb.dataplane.connect), not in a Task: with a
    new connection per request it is the per-connection fixed cost that decides the rate.
    """

    def __init__(self, listener: "Listener") -> None:
        self.listener = listener
        self.engine = listener.engine
        self.loop: asyncio.AbstractEventLoop = listener.engine.loop
        self.transport: asyncio.Transport | None = None
        self.up: TcpUpstream | None = None
        self.rt: ServiceRuntime | None = None
        self.backend: BackendState | None = None
        self.closed = False
        self.eof = False
        self.active = True
        self.last_active = 0.0
        self.peer = b""
        self.early: list[bytes] = []  # bytes that arrived before the backend connection
        self.early_size = 0
        self.early_paused = False
        self.pending: PendingConnect | None = None
        self.attempt: BackendState | None = None  # backend being connected to
        self.attempts_left = 0
        self.tried: set[BackendState] | None = None  # only after a failed attempt
        self.servers: set[str] | None = None
        self.t0 = 0.0
        self.proxied: Addresses | None = None  # the client's addresses from a PROXY header (accept_proxy)

    def set_proxied(self, addrs: Addresses | None) -> None:
        """Before connection_made: the client's addresses a PROXY header gave (proxy_protocol.py)."""
        self.proxied = addrs

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        rt = self.listener.rt
        mc = rt.opts.max_connections
        if mc and rt.connections >= mc:
            rt.rejected += 1
            self.closed = True
            transport.close()
            report_rejected(rt.route.name, mc)
            return
        self.rt = rt
        rt.connections += 1
        rt.requests += 1
        if rt.uses_key:
            peer = self.proxied[0] if self.proxied is not None else transport.get_extra_info("peername")
            self.peer = peer[0].encode() if peer else b""
        self.last_active = self.engine.now
        self.engine.conns.add(self)
        self.attempts_left = max(1, rt.opts.tcp_connect_attempts)
        # Reading is not paused here: bytes that arrive before the backend connection are
        # kept up to EARLY_MAX (then reading pauses), which spares a pause/resume pair per
        # connection for the usual small first request.
        self._attempt(rt)

    def _attempt(self, rt: ServiceRuntime) -> None:
        """Connect to the next backend, or give up (close the client)."""
        if self.closed:
            return
        b = next_backend(rt, self)
        if b is None:
            self._give_up(rt)
            return
        if rt.track_latency:
            self.t0 = self.loop.time()
        self.pending = open_connection(self.loop, lambda: TcpUpstream(self), b.host, b.port,
                                       rt.opts.connect_timeout, self._connected)

    def _give_up(self, rt: ServiceRuntime) -> None:
        rt.errors += 1
        self.close()

    def _connected(self, up: "TcpUpstream | None", exc: BaseException | None) -> None:
        """The attempt ended. It is accounted even when the client left meanwhile (a backend
        that hangs on connect must still be detected), and then goes no further."""
        self.pending = None
        b = self.attempt
        self.attempt = None
        if b is None:  # pragma: no cover - defensive
            return
        rt = self.listener.rt
        if up is None:
            if account_failed_connect(rt, self, b, exc):
                self._attempt(rt)
            return
        rt.record_success(b, self.loop.time() - self.t0 if rt.track_latency else None)
        if self.closed or up.transport is None:  # client gone, or backend closed at once
            b.in_flight -= 1
            if up.transport is not None:
                up.transport.close()
            self.close()
            return
        self.up = up
        self.backend = b
        if rt.opts.send_proxy != "off":  # the header goes before any client byte
            addrs = self.proxied or connection_addrs(self.transport)  # type: ignore[arg-type]
            if addrs is not None:
                up.transport.write(header(rt.opts.send_proxy, addrs))  # type: ignore[union-attr]
        if self.early:
            up.transport.writelines(self.early)  # type: ignore[union-attr]
            self.early = []
            self.early_size = 0
        if self.eof:
            if up.transport.can_write_eof():  # type: ignore[union-attr]
                up.transport.write_eof()  # type: ignore[union-attr]
        elif self.early_paused:
            self.early_paused = False
            self.transport.resume_reading()  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        self.active = True
        up = self.up
        if up is not None:
            up.transport.write(data)  # type: ignore[union-attr]
        else:  # the backend connection is not there yet
            self.early.append(data)
            self.early_size += len(data)
            if self.early_size >= EARLY_MAX and not self.early_paused:
                self.early_paused = True
                self.transport.pause_reading()  # type: ignore[union-attr]

    def eof_received(self) -> bool:
        self.eof = True
        up = self.up
        if up is None:
            return True  # forwarded once the backend connection exists
        if up.eof:
            self.close()
            return False
        if up.transport.can_write_eof():  # type: ignore[union-attr]
            up.transport.write_eof()  # type: ignore[union-attr]
        return True

    def pause_writing(self) -> None:
        if self.up is not None and self.up.transport is not None:
            self.up.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.up is not None and self.up.transport is not None:
            self.up.transport.resume_reading()

    def upstream_lost(self, up: TcpUpstream) -> None:
        self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.transport.close()  # type: ignore[union-attr]
        up = self.up
        if up is not None and up.transport is not None and not up.transport.is_closing():
            up.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.engine.conns.discard(self)
        if self.rt is not None:
            self.rt.connections -= 1
            self.rt = None
        if self.backend is not None:
            self.backend.in_flight -= 1
            self.backend = None
        up = self.up
        if up is not None and up.transport is not None and not up.transport.is_closing():
            up.transport.close()
        # Break the reference cycles (client <-> upstream, protocol <-> transport) so a
        # finished connection is freed at once by refcounting rather than by the cyclic GC.
        self.up = None
        self.transport = None

    def check(self, now: float) -> None:
        if self.active:
            self.active = False
            self.last_active = now
        elif now - self.last_active > self.listener.rt.opts.idle_timeout:
            self.close()

"""Upgraded HTTP connections (WebSocket): after a backend's `101 Switching Protocols`, the
client and backend connections are relayed as bytes until either side closes.

Why a protocol pair of its own: once switched, nothing on either connection is HTTP any
more, so the HttpClientConn / UpstreamConn parsers are taken off the transports
(`transport.set_protocol`) and two small relaying protocols take over. Flow control like
TCP mode: when one side's transport buffer is full, the other side stops being read; a
half-close is passed on (write_eof) and the tunnel ends when both directions have ended or
either connection is lost. The backend keeps counting the tunnel as in flight (least
connections sees it) until it ends.

Limits: `tunnel_timeout` (no byte either way -> close, HAProxy's `timeout tunnel`), and
`tunnel_drain_grace`: once the backend is no longer active (drain, maint, removed, or the
service is stopping) an open tunnel may continue this long, then it is closed.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any

log = logging.getLogger(__name__)


class _Side(asyncio.Protocol):
    """One connection of a tunnel: what it reads goes to the other side."""

    def __init__(self, tunnel: "Tunnel", name: str) -> None:
        self.tunnel = tunnel
        self.name = name
        self.transport: asyncio.Transport | None = None
        self.peer: "_Side | None" = None
        self.eof = False  # this side sent EOF (its direction is done)
        self.lost = False
        self.paused = False
        self.received = 0  # bytes read on this side (the upstream side's: sent to the client)

    def data_received(self, data: bytes) -> None:
        self.tunnel.last_active = self.tunnel.loop.time()
        self.received += len(data)
        peer = self.peer
        if peer is not None and not peer.lost:
            peer.transport.write(data)  # type: ignore[union-attr]

    def eof_received(self) -> bool | None:
        self.eof = True
        peer = self.peer
        if peer is not None and not peer.lost and peer.transport.can_write_eof():  # type: ignore[union-attr]
            peer.transport.write_eof()  # type: ignore[union-attr]
        if peer is not None and peer.eof:
            self.tunnel.close()
            return None
        return True  # keep the other direction open (half-close)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.tunnel.close()

    # the *other* side reads only while this side can take more
    def pause_writing(self) -> None:
        peer = self.peer
        if peer is not None and not peer.lost and not peer.paused:
            peer.paused = True
            peer.transport.pause_reading()  # type: ignore[union-attr]

    def resume_writing(self) -> None:
        peer = self.peer
        if peer is not None and not peer.lost and peer.paused:
            peer.paused = False
            peer.transport.resume_reading()  # type: ignore[union-attr]


class Tunnel:
    """A switched client/backend connection pair; registered with the engine (stats, sweeper, stop)."""

    def __init__(self, engine: Any, rt: Any, backend: Any, client_transport: asyncio.Transport,
                 upstream_transport: asyncio.Transport, *, on_end: Any, listener: Any = None) -> None:
        self.engine = engine
        self.rt = rt
        self.backend = backend
        self.loop: asyncio.AbstractEventLoop = engine.loop
        self.last_active = self.loop.time()
        self.inactive_since: float | None = None  # when the backend stopped being active
        self.closed = False
        self.on_end = on_end
        self.client = _Side(self, "client")
        self.upstream = _Side(self, "upstream")
        self.client.peer, self.upstream.peer = self.upstream, self.client
        self.client.transport, self.upstream.transport = client_transport, upstream_transport
        # the same fields the engine's stop() looks at to know a connection is busy
        self.cur: Any = True
        self.listener = listener  # a retired listener's connections are closed after stop_grace

    def start(self, client_early: bytes, upstream_early: bytes) -> None:
        """Take both transports over; bytes either side sent right after the switch (already
        read by the HTTP parsers) are delivered first."""
        ct, ut = self.client.transport, self.upstream.transport
        ct.set_protocol(self.client)  # type: ignore[union-attr]
        ut.set_protocol(self.upstream)  # type: ignore[union-attr]
        self.engine.conns.add(self)
        self.rt.tunnels += 1
        self.rt.tunnels_total += 1
        if upstream_early:
            ct.write(upstream_early)  # type: ignore[union-attr]
        if client_early:
            ut.write(client_early)  # type: ignore[union-attr]
        ct.resume_reading()  # type: ignore[union-attr]
        ut.resume_reading()  # type: ignore[union-attr]
        if ct.is_closing() or ut.is_closing():  # type: ignore[union-attr]
            self.close()

    def check(self, now: float) -> None:
        """Called by the engine's sweeper: idle and drain limits."""
        opts = self.rt.opts
        if now - self.last_active > opts.tunnel_timeout:
            log.info("service %s: closing a WebSocket idle for %.0fs (tunnel_timeout)", self.rt.route.name,
                     now - self.last_active)
            self.close()
            return
        b = self.backend
        active = b.route is not None and b.route.admin_state == "active" and not self.rt_retired()
        if active:
            self.inactive_since = None
        elif self.inactive_since is None:
            self.inactive_since = now
        elif now - self.inactive_since >= opts.tunnel_drain_grace:
            log.info("service %s: closing a WebSocket to %s after the drain grace (%.0fs)", self.rt.route.name,
                     b.name, opts.tunnel_drain_grace)
            self.close()

    def rt_retired(self) -> bool:
        return self.backend.removed

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.cur = None
        self.engine.conns.discard(self)
        self.rt.tunnels -= 1
        for side in (self.client, self.upstream):
            if not side.lost and side.transport is not None:
                side.transport.close()
        self.on_end()


# --- the HTTP side: forwarding the handshake and switching (called from http_proxy.py) ---

def handshake_headers(ex: Any, opts: Any, hdrs: bytes) -> bytes:
    """The forwarded header lines of a request carrying Upgrade: with `Connection: Upgrade`
    and its Upgrade line added back when it is a WebSocket handshake the service allows
    (GET, HTTP/1.1, Connection names upgrade); otherwise the Upgrade is dropped as before
    and the request is an ordinary one."""
    tokens = ex.conn_tokens or ()
    if (not opts.websocket or ex.method != b"GET" or ex.version != "1.1" or b"upgrade" not in tokens
            or b"websocket" not in ex.upgrade.lower()):
        ex.upgrade = None
        return hdrs
    ex.retryable = False  # the handshake is sent once: a backend may already have switched
    return hdrs + b"Connection: Upgrade\r\nUpgrade: " + ex.upgrade + b"\r\n"


def send_switch(client: Any, ex: Any, block: bytes) -> None:
    """Send the backend's 101 head to the client as it came (its Upgrade, Connection and
    Sec-WebSocket-* lines are the handshake), on HTTP/1.1."""
    if not block.startswith(b"HTTP/1.1"):
        block = b"HTTP/1.1" + block[8:]
    ex.response_started = True
    ex.status, ex.head_out = 101, block
    client._w(block)


def begin(client: Any, up: Any, ex: Any, upstream_early: bytes) -> None:
    """Both sides are switched: hand the two transports to a Tunnel. The HTTP connection
    objects step aside (no pool, no request timeout); the tunnel's end settles the
    accounting they would have done (backend in flight, client connection count)."""
    rt, b = ex.rt, ex.backend
    engine = client.engine
    up.ex = None
    up.client = None
    up.closed = True  # never pooled again: it belongs to the tunnel
    ex.upstream = None
    if client.closed:
        up.transport.close()
        client.finish(ex, b)  # detach the backend; logged like any request (the 101 went out)
        return
    engine.conns.discard(client)

    def end() -> None:
        client.closed = True  # before finish: the tunnel closes the transports itself
        # the access log's line of a WebSocket is written when it ends: the bytes the client
        # got through it and the tunnel's whole duration
        ex.sent += t.upstream.received + len(upstream_early)
        client.finish(ex, b)
        client.cur = None
        if client.rt_conn is not None:
            client.rt_conn.connections -= 1
            client.rt_conn = None

    t = Tunnel(engine, rt, b, client.transport, up.transport, on_end=end, listener=client.listener)
    early, client.early = client.early, b""
    t.start(early, upstream_early)

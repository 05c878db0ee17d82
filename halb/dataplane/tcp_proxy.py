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

from halb.dataplane.routing import BackendState, ServiceRuntime

if TYPE_CHECKING:  # pragma: no cover
    from halb.dataplane.listeners import Listener


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

    def pause_writing(self) -> None:
        if not self.client.closed:
            self.client.transport.pause_reading()  # type: ignore[union-attr]

    def resume_writing(self) -> None:
        if not self.client.closed:
            self.client.transport.resume_reading()  # type: ignore[union-attr]


class TcpClientConn(asyncio.Protocol):
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

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        rt = self.listener.rt
        mc = rt.opts.max_connections
        if mc and rt.connections >= mc:
            rt.rejected += 1
            self.closed = True
            transport.close()
            return
        self.rt = rt
        rt.connections += 1
        rt.requests += 1
        peer = transport.get_extra_info("peername")
        self.peer = peer[0].encode() if peer else b""
        self.last_active = self.loop.time()
        self.engine.conns.add(self)
        transport.pause_reading()  # type: ignore[attr-defined]
        self.loop.create_task(self._connect(rt))

    async def _connect(self, rt: ServiceRuntime) -> None:
        tried: set[BackendState] = set()
        servers: set[str] = set()
        opts = rt.opts
        key = self.peer if rt.uses_key else None
        for _ in range(max(1, opts.tcp_connect_attempts)):
            if self.closed:
                return
            b = rt.pick(key, exclude=tried, avoid_servers=servers)
            if b is None:
                break
            if tried:
                b.retries += 1
                rt.retries += 1
            tried.add(b)
            if b.server:
                servers.add(b.server)
            b.in_flight += 1
            b.requests += 1
            t0 = self.loop.time()
            try:
                _, up = await asyncio.wait_for(
                    self.loop.create_connection(lambda: TcpUpstream(self), b.host, b.port), opts.connect_timeout)
            except (OSError, asyncio.TimeoutError) as e:
                b.in_flight -= 1
                rt.record_failure(b, True, "connect timeout" if isinstance(e, asyncio.TimeoutError) else f"connect failed: {e}")
                continue
            rt.record_success(b, self.loop.time() - t0)
            if self.closed:
                b.in_flight -= 1
                up.transport.close()  # type: ignore[union-attr]
                return
            self.up = up  # type: ignore[assignment]
            self.backend = b
            if self.early:
                up.transport.writelines(self.early)  # type: ignore[union-attr]
                self.early = []
            if self.eof:
                if up.transport.can_write_eof():  # type: ignore[union-attr]
                    up.transport.write_eof()  # type: ignore[union-attr]
            else:
                self.transport.resume_reading()  # type: ignore[union-attr]
            return
        rt.errors += 1
        self.close()

    def data_received(self, data: bytes) -> None:
        self.active = True
        up = self.up
        if up is not None:
            up.transport.write(data)  # type: ignore[union-attr]
        else:  # pause_reading in connection_made may come too late for the first bytes
            self.early.append(data)
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

    def check(self, now: float) -> None:
        if self.active:
            self.active = False
            self.last_active = now
        elif now - self.last_active > self.listener.rt.opts.idle_timeout:
            self.close()

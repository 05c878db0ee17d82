"""Proxies: a TCP listener per proxy that relays each connection through toxics.

Model (the real server's, see docs/toxiproxy.md): on accept the proxy dials the
upstream at once; the connection then has two independent links, each reading its
source socket, running the chunks through the toxic stages of its direction and
writing them to its destination. There is no half-close: when a link's source ends,
the link drains, then fully closes its destination, which ends the other link's
source, so the whole connection goes down.

Relaying uses asyncio Protocols. A link without toxics writes straight from
``data_received`` to the other transport (flow control by pausing the reader while the
writer's buffer is full); with toxics, chunks queue up and one task per link runs them
through the stages.
"""
from __future__ import annotations

import asyncio
import collections
import ipaddress
import logging
import socket
import struct
from dataclasses import dataclass
from typing import Any, cast

from .toxics import DOWNSTREAM, UPSTREAM, Stage, ToxicConfig

log = logging.getLogger("halb.chaos.toxiproxy")

QUEUE_MAX_BYTES = 4 * 1024 * 1024  # pause reading the source beyond this much queued data
QUEUE_MAX_CHUNKS = 1024  # the real latency toxic buffers 1024 chunks


class AddressError(ValueError):
    """A host:port string that cannot be parsed (we answer 400)."""


class ProxyError(RuntimeError):
    """An operational failure such as a bind error or an unresolvable host (500)."""


# ---------------------------------------------------------------- addresses

def split_host_port(address: str) -> tuple[str, str]:
    """Split ``host:port`` like Go's net.SplitHostPort (``[v6]:port`` supported)."""
    if address.startswith("["):
        end = address.find("]")
        if end < 0:
            raise AddressError(f"address {address}: missing ']' in address")
        host, rest = address[1:end], address[end + 1:]
        if not rest.startswith(":"):
            raise AddressError(f"address {address}: missing port in address")
        port = rest[1:]
        if "[" in host or "]" in port or "[" in port:
            raise AddressError(f"address {address}: unexpected '[' in address")
        return host, port
    colon = address.rfind(":")
    if colon < 0:
        raise AddressError(f"address {address}: missing port in address")
    host, port = address[:colon], address[colon + 1:]
    if ":" in host:
        raise AddressError(f"address {address}: too many colons in address")
    return host, port


def parse_port(address: str, port: str, allow_service: bool) -> int | str:
    if port.isdigit() and len(port) <= 5 and int(port) <= 65535:
        return int(port)
    if allow_service and port.isalpha() and port.isascii():
        return port
    raise AddressError(f"address {address}: invalid port")


def check_listen(listen: str) -> None:
    """Reject a listen string that can never be bound (400 instead of 500)."""
    if listen == "":
        return
    _host, port = split_host_port(listen)
    parse_port(listen, port, allow_service=False)


def check_upstream(upstream: str) -> None:
    """Reject an upstream that can never be dialled. Resolution still happens per dial."""
    _host, port = split_host_port(upstream)
    parse_port(upstream, port, allow_service=True)


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


WILDCARDS = {"", "0.0.0.0", "::"}


@dataclass(frozen=True)
class ListenTarget:
    """A resolved listen address: what to bind, and how to report it."""

    host: str  # "" = dual-stack wildcard
    port: int

    def text(self) -> str:
        return format_address("::" if self.host == "" else self.host, self.port)


async def resolve_listen(listen: str) -> ListenTarget:
    """Resolve a listen string to an IP (IPv4 preferred, as Go's "tcp" does)."""
    if listen == "":
        return ListenTarget("", 0)
    host, port_text = split_host_port(listen)
    port = int(parse_port(listen, port_text, allow_service=False))
    if host in WILDCARDS:
        return ListenTarget("", port)
    try:
        return ListenTarget(str(ipaddress.ip_address(host)), port)
    except ValueError:
        pass
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise ProxyError(f"listen tcp: lookup {host}: no such host") from exc
    infos.sort(key=lambda info: info[0] != socket.AF_INET)
    return ListenTarget(infos[0][4][0], port)


def bind_socket(target: ListenTarget) -> socket.socket:
    """Bind a listening socket; the wildcard is dual-stack like Go's ``[::]``."""
    if target.host == "":
        try:
            sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            addr: tuple[Any, ...] = ("::", target.port)
        except OSError:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            addr = ("0.0.0.0", target.port)
    else:
        family = socket.AF_INET6 if ":" in target.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        addr = (target.host, target.port)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(1024)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        reason = exc.strerror.lower() if exc.strerror else str(exc)
        raise ProxyError(f"listen tcp {target.text()}: bind: {reason}") from exc
    return sock


# ---------------------------------------------------------------- relay

class Side(asyncio.Protocol):
    """One socket of a proxied connection: feeds the link reading it, writes for the other."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.transport: asyncio.Transport | None = None
        self.reader: Link | None = None  # link whose source is this socket
        self.writer: Link | None = None  # link whose destination is this socket
        self.closed = False
        self.writable = asyncio.Event()
        self.writable.set()
        self.conn: Connection | None = None
        self.early: list[bytes | None] = []

    # -- asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, so no isinstance check
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass

    def data_received(self, data: bytes) -> None:
        if self.reader is not None:
            self.reader.feed(data)
        else:
            # uvloop starts reading right after connection_made even if it paused;
            # hold early bytes until the link exists
            self.early.append(data)
            if self.transport is not None:
                self.transport.pause_reading()

    def eof_received(self) -> bool:
        if self.reader is not None:
            self.reader.feed(None)
        else:
            self.early.append(None)
        return True  # keep the socket open: the other link may still write to it

    def attach_reader(self, link: "Link") -> None:
        self.reader = link
        early, self.early = self.early, []
        for item in early:
            link.feed(item)
        if self.transport is not None and not self.closed and not self.transport.is_reading():
            # Paused for the early bytes: resume through the link (unless it paused for its
            # own reasons meanwhile), or a FIN that came after them is never read and the
            # other side never sees the end (an upstream that answers and closes before
            # dial() attached its link hung the client).
            link.pause_reasons.add("early")
            link.src_resume("early")

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.writable.set()
        if self.reader is not None:
            self.reader.feed(None)
        elif None not in self.early:
            # lost (e.g. reset) before its link exists: the link must still see the end,
            # or the other side is never closed (seen as a hang under load)
            self.early.append(None)
        if self.conn is not None:
            self.conn.side_lost()

    def pause_writing(self) -> None:
        self.writable.clear()
        if self.writer is not None:
            self.writer.src_pause("dst")

    def resume_writing(self) -> None:
        self.writable.set()
        if self.writer is not None:
            self.writer.src_resume("dst")

    # -- our API
    def write(self, data: bytes) -> bool:
        if self.closed or self.transport is None or self.transport.is_closing():
            return False
        self.transport.write(data)
        return True

    def close(self) -> None:
        """Full close (after flushing what is buffered); the reading link sees EOF."""
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()
        if self.reader is not None:
            self.reader.feed(None)

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def set_linger_zero(self) -> None:
        sock = self.transport.get_extra_info("socket") if self.transport else None
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass


class Link:
    """One direction of a connection: source -> toxic stages -> destination."""

    def __init__(self, conn: "Connection", direction: str, src: Side, dst: Side, configs: list[ToxicConfig]) -> None:
        self.conn = conn
        self.direction = direction
        self.src = src
        self.dst = dst
        dst.writer = self
        self.stages: list[Stage] = []
        self.queue: collections.deque[tuple[bytes | None, float, int]] = collections.deque()
        self.queued_bytes = 0
        self.wakeup = asyncio.Event()
        self.processing = False
        self.input_closed = False  # EOF seen or injected: further input is dropped
        self.ended = False  # the destination has been closed
        self.pause_reasons: set[str] = set()
        self.loop = asyncio.get_running_loop()
        self.task: asyncio.Task[None] | None = None
        for config in configs:
            self.stages.append(Stage(config, self))
        src.attach_reader(self)

    # -- StageOwner
    def stage_index(self, stage: Stage) -> int:
        try:
            return self.stages.index(stage)
        except ValueError:
            return -1

    def inject_eof(self, start_index: int) -> None:
        """End the stream from stage ``start_index`` on; queued input is dropped."""
        if self.ended:
            return
        self.input_closed = True
        self.queue.clear()
        self.queued_bytes = 0
        self.src_resume("queue")
        self.queue.append((None, self.loop.time(), max(0, start_index)))
        self._kick()

    # -- input
    def feed(self, data: bytes | None) -> None:
        if self.input_closed or self.ended:
            return
        if data is None:
            self.input_closed = True
        elif not self.stages and not self.queue and not self.processing:
            # fast path: no toxics, nothing pending
            if not self.dst.write(data):
                self._end()
            return
        self.queue.append((data, self.loop.time(), 0))
        if data is not None:
            self.queued_bytes += len(data)
            if self.queued_bytes > QUEUE_MAX_BYTES or len(self.queue) > QUEUE_MAX_CHUNKS:
                self.src_pause("queue")
        self._kick()

    def _kick(self) -> None:
        if self.task is None:
            self.task = self.loop.create_task(self._run())
        self.wakeup.set()

    def src_pause(self, reason: str) -> None:
        if not self.pause_reasons and self.src.transport is not None and not self.src.closed:
            try:
                self.src.transport.pause_reading()
            except RuntimeError:
                pass
        self.pause_reasons.add(reason)

    def src_resume(self, reason: str) -> None:
        if reason not in self.pause_reasons:
            return
        self.pause_reasons.discard(reason)
        if not self.pause_reasons and self.src.transport is not None and not self.src.closed:
            try:
                self.src.transport.resume_reading()
            except RuntimeError:
                pass

    # -- processing
    async def _run(self) -> None:
        try:
            while not self.ended:
                if not self.queue:
                    self.wakeup.clear()
                    await self.wakeup.wait()
                    continue
                data, ts, start = self.queue.popleft()
                if data is not None:
                    self.queued_bytes -= len(data)
                    if self.queued_bytes <= QUEUE_MAX_BYTES // 2 and len(self.queue) <= QUEUE_MAX_CHUNKS // 2:
                        self.src_resume("queue")
                self.processing = True
                try:
                    ended = await self._through(list(self.stages), start, data, ts)
                finally:
                    self.processing = False
                if ended:
                    self._end()
        except asyncio.CancelledError:
            raise
        except Exception:  # never let a toxic bug kill the server; drop this connection
            log.exception("link %s of proxy %s failed", self.direction, self.conn.proxy.name)
            self.conn.teardown()

    async def _through(self, stages: list[Stage], index: int, data: bytes | None, ts: float) -> bool:
        while index < len(stages) and (stages[index].removed or not stages[index].active):
            index += 1
        if index >= len(stages):
            if data is None:
                return True
            return not await self._write(data)
        stage = stages[index]
        nxt = index + 1

        async def forward(chunk: bytes | None, chunk_ts: float) -> bool:
            return await self._through(stages, nxt, chunk, chunk_ts)

        return await stage.behaviour.pipe(stage, data, ts, forward)

    async def _write(self, data: bytes) -> bool:
        if not data:
            return not self.dst.closed
        if not self.dst.writable.is_set():
            await self.dst.writable.wait()
        return self.dst.write(data)

    def _end(self) -> None:
        """The stream reached the destination's end: close it fully."""
        if self.ended:
            return
        self.ended = True
        self.input_closed = True
        self.queue.clear()
        for stage in self.stages:
            stage.cancel_timer()
        self.dst.close()

    def stop(self) -> None:
        self.ended = True
        for stage in self.stages:
            stage.cancel_timer()
        if self.task is not None and not self.task.done() and self.task is not asyncio.current_task():
            self.task.cancel()

    # -- live toxic changes
    def add_toxic(self, config: ToxicConfig) -> None:
        if self.ended:
            return
        if self.stages:
            self.stages[-1].restart()  # the real server restarts the previous stub
        self.stages.append(Stage(config, self))

    def update_toxic(self, config: ToxicConfig) -> None:
        for stage in self.stages:
            if stage.config is config:
                stage.restart()

    def remove_toxic(self, config: ToxicConfig) -> None:
        for index, stage in enumerate(self.stages):
            if stage.config is config:
                if not self.ended:
                    stage.behaviour.on_remove(stage)
                stage.remove()
                del self.stages[index]
                if index > 0 and not self.ended:
                    self.stages[index - 1].restart()
                return


class Connection:
    """A client socket, its upstream socket and the two links between them."""

    def __init__(self, proxy: "Proxy", client: Side) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream: Side | None = None
        self.links: dict[str, Link] = {}
        self.dial_task: asyncio.Task[None] | None = None
        self.done = False
        client.conn = self

    async def dial(self) -> None:
        loop = asyncio.get_running_loop()
        host, port = split_host_port(self.proxy.upstream)
        try:
            _, protocol = await loop.create_connection(lambda: Side("upstream"), host or "127.0.0.1", port)
        except (OSError, ValueError, UnicodeError) as exc:
            log.warning("proxy %s: unable to open connection to upstream %s: %s", self.proxy.name, self.proxy.upstream, exc)
            self.teardown()
            return
        if self.done:
            protocol.abort()
            return
        self.upstream = protocol
        protocol.conn = self
        configs = self.proxy.toxics
        if any(t.type == "reset_peer" for t in configs[UPSTREAM] + configs[DOWNSTREAM]):
            self.client.set_linger_zero()
            protocol.set_linger_zero()
        self.links[UPSTREAM] = Link(self, UPSTREAM, self.client, protocol, list(configs[UPSTREAM]))
        self.links[DOWNSTREAM] = Link(self, DOWNSTREAM, protocol, self.client, list(configs[DOWNSTREAM]))
        if self.client.closed:
            self.teardown()
            return
        assert self.client.transport is not None
        self.client.transport.resume_reading()

    def side_lost(self) -> None:
        if self.client.closed and (self.upstream is None or self.upstream.closed) and self.links:
            self._forget()

    def _forget(self) -> None:
        if not self.done:
            self.done = True
        for link in self.links.values():
            link.stop()
        self.proxy.connections.discard(self)

    def teardown(self) -> None:
        """Close both sockets now (disable, delete, errors)."""
        self.done = True
        if self.dial_task is not None and not self.dial_task.done() and self.dial_task is not asyncio.current_task():
            self.dial_task.cancel()
        for link in self.links.values():
            link.stop()
        self.client.abort()
        if self.upstream is not None:
            self.upstream.abort()
        self.proxy.connections.discard(self)


class Proxy:
    """One named proxy: its settings, listener, live connections and toxics."""

    def __init__(self, name: str, listen: str, upstream: str) -> None:
        self.name = name
        self.listen = listen
        self.upstream = upstream
        self.enabled = False
        self.toxics: dict[str, list[ToxicConfig]] = {UPSTREAM: [], DOWNSTREAM: []}
        self.connections: set[Connection] = set()
        self._server: asyncio.AbstractServer | None = None

    # -- JSON
    def toxic_list(self) -> list[ToxicConfig]:
        return self.toxics[UPSTREAM] + self.toxics[DOWNSTREAM]

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "listen": self.listen,
            "upstream": self.upstream,
            "enabled": self.enabled,
            "toxics": [t.to_json() for t in self.toxic_list()],
        }

    # -- lifecycle
    async def start(self) -> None:
        """Bind the listener; the stored listen becomes the real bound address."""
        if self.enabled:
            return
        target = await resolve_listen(self.listen)
        sock = bind_socket(target)
        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_server(self._accept_protocol, sock=sock)
        except OSError as exc:
            sock.close()
            raise ProxyError(f"listen tcp {target.text()}: {exc}") from exc
        bound = sock.getsockname()
        self.listen = format_address("::" if target.host == "" else bound[0], bound[1])
        self.enabled = True
        log.info("proxy %s listening on %s, upstream %s", self.name, self.listen, self.upstream)

    def stop(self) -> None:
        """Close the listener and every live connection (clients see EOF)."""
        if not self.enabled:
            return
        self.enabled = False
        if self._server is not None:
            self._server.close()
            self._server = None
        for conn in list(self.connections):
            conn.teardown()
        log.info("proxy %s stopped", self.name)

    def _accept_protocol(self) -> Side:
        return _ClientSide(self)

    # -- toxics
    def find_toxic(self, name: str) -> ToxicConfig | None:
        for toxic in self.toxic_list():
            if toxic.name == name:
                return toxic
        return None

    def _links(self, direction: str) -> list[Link]:
        return [c.links[direction] for c in self.connections if direction in c.links]

    def add_toxic(self, config: ToxicConfig) -> None:
        self.toxics[config.direction].append(config)
        for link in self._links(config.direction):
            link.add_toxic(config)

    def update_toxic(self, config: ToxicConfig) -> None:
        for link in self._links(config.direction):
            link.update_toxic(config)

    def remove_toxic(self, config: ToxicConfig) -> None:
        self.toxics[config.direction].remove(config)
        for link in self._links(config.direction):
            link.remove_toxic(config)

    def remove_all_toxics(self) -> None:
        for config in self.toxic_list():
            self.remove_toxic(config)


class _ClientSide(Side):
    """The accepted socket: on connect, pause it and dial the upstream."""

    def __init__(self, proxy: Proxy) -> None:
        super().__init__("client")
        self.proxy = proxy

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert self.transport is not None
        if not self.proxy.enabled:
            self.transport.abort()
            return
        self.transport.pause_reading()
        conn = Connection(self.proxy, self)
        self.proxy.connections.add(conn)
        conn.dial_task = asyncio.get_running_loop().create_task(conn.dial())

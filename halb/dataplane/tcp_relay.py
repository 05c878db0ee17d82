"""TCP mode on the C relay (halb.dataplane._tcprelay): Python decides, C moves the bytes.

With a new connection per request, the per-connection fixed cost decides TCP mode's rate.
On uvloop that cost was ~25 system calls (libuv's getsockname/getpeername, epoll_ctl
MOD/DEL, ...) and a Protocol, a Transport and handles per side: 0.53x HAProxy's rate. The
C relay accepts in bulk, connects, relays (edge-triggered epoll, half-close, bounded
buffers) and enforces the timeouts; it is driven by this loop (its epoll fd is watched
with ``add_reader``), so there is no thread and no locking.

Python keeps every decision, exactly as in the asyncio path (tcp_proxy.TcpClientConn):
max_connections, the backend pick (all algorithms, hash keys, slow start, panic, server
avoidance on retry), the retry on connect failure up to tcp_connect_attempts, outlier
accounting (``record_success`` with the connect latency / ``record_failure``), local
resource errors that are nobody's fault, and the counters.

The extension is optional (Linux, a C compiler). ``HALB_TCP_RELAY=python`` selects the
asyncio path; the tests run the TCP behaviour tests on both.
"""
from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
from typing import TYPE_CHECKING, Any

from halb.dataplane.local_errors import (LOCAL_RESOURCE_ERRNOS, RateLimitedLog,
                                         report_local_error, report_rejected)
from halb.dataplane.routing import BackendState, ServiceRuntime
from halb.dataplane.tcp_attempts import account_failed_connect, next_backend

if TYPE_CHECKING:  # pragma: no cover
    from halb.dataplane.listeners import Listener

Relay: Any = None
CONNECTED = FAILED = TIMEOUT = CLOSED = 0
if os.environ.get("HALB_TCP_RELAY", "c") != "python":
    try:
        from halb.dataplane._tcprelay import CLOSED, CONNECTED, FAILED, TIMEOUT, Relay  # noqa: F811
    except ImportError:  # not built (no C compiler, not Linux): the asyncio path serves TCP mode
        pass

log = logging.getLogger(__name__)
accept_log = RateLimitedLog(logging.ERROR)

RELAY_BUFSIZE = 65536  # bytes one direction of one connection may hold in the proxy (tests shrink it)
ACCEPT_BATCH = 64  # connections accepted per readiness of a listening socket (the loop stays fair)
ACCEPT_PAUSE = 0.1  # s without accepting after EMFILE & co. (level-triggered: it would spin)


def available() -> bool:
    """Whether TCP mode runs on the C relay (extension built and not turned off)."""
    return Relay is not None


_numeric: dict[str, bool] = {}


def is_numeric(host: str) -> bool:
    """An IP literal the relay can connect to without a name lookup (cached per host)."""
    v = _numeric.get(host)
    if v is None:
        v = False
        for fam in (socket.AF_INET, socket.AF_INET6):
            try:
                socket.inet_pton(fam, host)
                v = True
                break
            except OSError:
                pass
        if len(_numeric) > 10000:
            _numeric.clear()
        _numeric[host] = v
    return v


class RelayConn:
    """Python's side of one relayed connection: what it decided and what it holds."""

    __slots__ = ("owner", "listener", "rt", "fd", "peer", "attempt", "backend", "attempts_left", "tried",
                 "servers", "closed", "up")

    def __init__(self, owner: "TcpRelay", listener: "Listener", fd: int, peer: bytes | None) -> None:
        self.owner = owner
        self.listener = listener
        self.rt: ServiceRuntime = listener.rt
        self.fd = fd
        self.peer = peer or b""
        self.attempt: BackendState | None = None  # backend being connected to (counted in its in_flight)
        self.backend: BackendState | None = None  # connected backend (counted in its in_flight)
        self.attempts_left = max(1, self.rt.opts.tcp_connect_attempts)
        self.tried: set[BackendState] | None = None  # only after a failed attempt
        self.servers: set[str] | None = None
        self.closed = False
        self.up: bool | None = None  # True once connected (engine.stop waits for these)

    def close(self) -> None:
        self.owner.close(self)

    def check(self, now: float) -> None:
        """Timeouts are the relay's (TcpRelay.expire, once per sweep for all connections)."""


class TcpRelay:
    """The C relay of one DataPlane (one event loop) and the handling of its records."""

    def __init__(self, engine: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.engine = engine
        self.loop = loop
        self.relay = Relay(bufsize=RELAY_BUFSIZE)
        self.closed = False
        loop.add_reader(self.relay.fileno(), self._ready)

    # ------------------------------------------------------------------ loop callbacks
    def _ready(self) -> None:
        if self.closed:
            return
        self._handle(self.relay.run())
        if self.relay.backlog:  # a connection used its per-run budget: continue next iteration
            self.loop.call_soon(self._ready)

    def expire(self) -> None:
        """connect_timeout and idle_timeout of every connection (called by the engine's sweep)."""
        if not self.closed:
            self._handle(self.relay.expire())

    def _handle(self, records: list[tuple[RelayConn, int, int]]) -> None:
        for c, kind, value in records:
            try:
                if kind == CLOSED:
                    self._closed(c)
                elif kind == CONNECTED:
                    self._connected(c, value)
                elif kind == TIMEOUT:
                    self._failed(c, asyncio.TimeoutError())
                else:
                    self._failed(c, OSError(value, os.strerror(value)))
            except Exception:  # a bug here must not drop the other records of the batch
                log.exception("TCP relay: handling %s of a connection failed", kind)

    # ------------------------------------------------------------------ per connection
    def accepted(self, lst: "Listener", fd: int, peer: bytes | None) -> None:
        rt = lst.rt
        mc = rt.opts.max_connections
        if mc and rt.connections >= mc:
            rt.rejected += 1
            os.close(fd)
            report_rejected(rt.route.name, mc)
            return
        c = RelayConn(self, lst, fd, peer)
        try:
            self.relay.add(fd, c, rt.opts.idle_timeout)  # the relay owns fd from here on
        except OSError as e:
            rt.errors += 1
            report_local_error(rt.route.name, "(none picked yet)", e)
            return
        rt.connections += 1
        rt.requests += 1
        self.engine.conns.add(c)
        self._attempt(c)

    def _attempt(self, c: RelayConn) -> None:
        """Connect to the next backend, or give up (close the client)."""
        if c.closed:
            return
        b = next_backend(c.rt, c)
        if b is None:
            self._give_up(c)
            return
        if is_numeric(b.host):
            self._connect(c, b, b.host)
        else:  # a host name: resolve off the loop (rare; the relay takes addresses only)
            fut = asyncio.ensure_future(self.loop.getaddrinfo(b.host, b.port, type=socket.SOCK_STREAM))
            fut.add_done_callback(lambda f: self._resolved(c, b, f))

    def _resolved(self, c: RelayConn, b: BackendState, fut: "asyncio.Future[Any]") -> None:
        if c.attempt is not b:  # closed meanwhile
            return
        exc = fut.exception()
        if exc is not None or not fut.result():
            self._failed(c, exc if isinstance(exc, OSError) else OSError(errno.EHOSTUNREACH, f"cannot resolve {b.host}"))
            return
        self._connect(c, b, fut.result()[0][4][0])

    def _connect(self, c: RelayConn, b: BackendState, host: str) -> None:
        try:
            alive = self.relay.connect(c.fd, c, host, b.port, c.rt.opts.connect_timeout)
        except OSError as e:  # failed at once (no fd left, unreachable, ...)
            self._failed(c, e)
            return
        except ValueError as e:  # an address the relay cannot take (e.g. an IPv6 scope id)
            self._failed(c, OSError(errno.EAFNOSUPPORT, f"{e} (the asyncio path, HALB_TCP_RELAY=python, takes it)"))
            return
        if not alive:  # the client reset while the previous attempt ran: the relay closed it
            self._closed(c)

    def _connected(self, c: RelayConn, us: int) -> None:
        b = c.attempt
        if b is None or c.closed:  # pragma: no cover - defensive
            return
        c.attempt = None
        rt = c.rt
        rt.record_success(b, us / 1e6 if rt.track_latency else None)
        c.backend = b
        c.up = True

    def _failed(self, c: RelayConn, exc: OSError) -> None:
        """The attempt failed. It is accounted even when the client left meanwhile (a backend
        that hangs on connect must still be detected), and then goes no further."""
        b = c.attempt
        if b is None:  # pragma: no cover - defensive
            return
        c.attempt = None
        if account_failed_connect(c.rt, c, b, exc):
            self._attempt(c)

    def _give_up(self, c: RelayConn) -> None:
        c.rt.errors += 1
        self.close(c)

    def close(self, c: RelayConn) -> None:
        """Close a connection from Python (give up, retire, stop): no record follows."""
        if c.closed:
            return
        if not self.closed:
            self.relay.close(c.fd, c)
        self._closed(c)

    def _closed(self, c: RelayConn) -> None:
        if c.closed:
            return
        c.closed = True
        self.engine.conns.discard(c)
        c.rt.connections -= 1
        if c.backend is not None:
            c.backend.in_flight -= 1
            c.backend = None
        if c.attempt is not None:  # closed by Python while connecting: not the backend's doing
            c.attempt.in_flight -= 1
            c.attempt = None
        c.up = None

    # ------------------------------------------------------------------ listeners
    def listen(self, lst: "Listener") -> "RelayAcceptor":
        return RelayAcceptor(self, lst)

    def close_relay(self) -> None:
        """Close every connection still open and the relay itself (engine stop)."""
        if self.closed:
            return
        for c in [c for c in self.engine.conns if isinstance(c, RelayConn)]:
            self.close(c)
        self.closed = True
        try:
            self.loop.remove_reader(self.relay.fileno())
        except (ValueError, RuntimeError, OSError):  # loop already closed
            pass
        self.relay.shutdown()


class RelayAcceptor:
    """Accepts a TCP service's connections in C, in batches, from a loop reader callback."""

    def __init__(self, owner: TcpRelay, lst: "Listener") -> None:
        self.owner = owner
        self.lst = lst
        self.fd = lst.sock.fileno()
        self.closed = False
        self.paused: asyncio.TimerHandle | None = None
        owner.loop.add_reader(self.fd, self._ready)

    def _ready(self) -> None:
        lst = self.lst
        owner = self.owner
        if owner.closed:
            return
        try:
            got = owner.relay.accept(self.fd, ACCEPT_BATCH, lst.rt.uses_key)
        except OSError as e:
            if e.errno in LOCAL_RESOURCE_ERRNOS:
                accept_log("service %s: cannot accept: %s; accepting pauses for %.1fs (raise RLIMIT_NOFILE "
                           "or lower max_connections)", lst.rt.route.name, e, ACCEPT_PAUSE)
            else:
                log.warning("service %s: accept failed: %s", lst.rt.route.name, e)
            self._pause()
            return
        for fd, peer in got:
            try:
                owner.accepted(lst, fd, peer)
            except Exception:  # one connection's bug must not leave the rest of the batch unserved
                log.exception("service %s: setting up an accepted connection failed", lst.rt.route.name)

    def _pause(self) -> None:
        self.owner.loop.remove_reader(self.fd)
        self.paused = self.owner.loop.call_later(ACCEPT_PAUSE, self._resume)

    def _resume(self) -> None:
        self.paused = None
        if not self.closed:
            self.owner.loop.add_reader(self.fd, self._ready)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.paused is not None:
            self.paused.cancel()
            self.paused = None
        try:
            self.owner.loop.remove_reader(self.fd)
        except (ValueError, RuntimeError, OSError):  # loop already closed
            pass

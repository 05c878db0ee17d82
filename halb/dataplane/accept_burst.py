"""Drain a deep accept queue at once; libuv takes one connection per loop iteration.

uvloop's server (libuv ``uv__server_io``) accepts a single connection each time the event
loop polls. With 1,000 clients connecting together on a busy proxy, each iteration also
serves hundreds of ready connections (tens of ms under load), so the last clients waited
seconds in the kernel's accept queue: wrk counted them as timeouts (2 s) at p99 of a few
hundred ms. Measured with ``ss -ltn``: the queue drained at ~30 connections/s.

``BurstAcceptor`` watches a ``dup`` of the listening socket (a second epoll registration of
the same socket). At most every CHECK_INTERVAL it reads the queue length (TCP_INFO
``tcpi_unacked`` of a listening socket) and, when more than QUEUE_THRESHOLD connections
wait, accepts them all (up to MAX_BATCH) and hands each to the loop with
``connect_accepted_socket``, driven by callbacks (connect.PendingConnect), not a Task.
Below the threshold it does nothing, so an ordinary load keeps libuv's cheaper native
path (no extra system call per connection).
"""
from __future__ import annotations

import asyncio
import errno
import logging
import socket
import ssl
import struct
from typing import Any, Callable

from halb.dataplane.connect import PendingConnect
from halb.dataplane.local_errors import LOCAL_RESOURCE_ERRNOS

log = logging.getLogger(__name__)

CHECK_INTERVAL = 0.005  # s between two queue-length checks (one getsockopt each)
QUEUE_THRESHOLD = 16  # connections waiting before the burst path takes over
MAX_BATCH = 1024  # accepted per check at most
TCP_INFO = getattr(socket, "TCP_INFO", 11)


def accept_queue_length(sock: socket.socket) -> int | None:
    """Connections waiting in a listening socket's accept queue (Linux), or None."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, TCP_INFO, 32)
    except OSError:
        return None
    return struct.unpack_from("I", info, 24)[0] if len(info) >= 28 else None  # tcpi_unacked


def wanted(loop: asyncio.AbstractEventLoop) -> bool:
    """Only libuv accepts one connection per iteration; asyncio's own loop accepts in bulk."""
    return "uvloop" in type(loop).__module__


class BurstAcceptor:
    def __init__(self, loop: asyncio.AbstractEventLoop, listen_sock: socket.socket,
                 factory: Callable[[], asyncio.Protocol], room: Callable[[], int],
                 tls: dict[str, Any] | None = None) -> None:
        self.loop = loop
        self.tls = tls or {}  # ssl= and ssl_handshake_timeout= for a TLS listener (frontends)
        self.factory = factory
        self.room = room  # connections the service still takes (max_connections - open)
        self.family = listen_sock.family
        self.sock = listen_sock.dup()  # the same socket (O_NONBLOCK included), its own fd
        self.last_check = 0.0
        self.closed = False
        self.accepted = 0  # connections taken by the burst path (stats, tests)
        loop.add_reader(self.sock.fileno(), self._ready)

    def _ready(self) -> None:
        now = self.loop.time()
        if now - self.last_check < CHECK_INTERVAL:
            return
        self.last_check = now
        q = accept_queue_length(self.sock)
        if q is not None and q <= QUEUE_THRESHOLD:
            return
        # Never more than the service takes: all of a batch is accepted before the first
        # connection_made runs, so accepting past max_connections would spend the fds the
        # accepted connections need for their backends (libuv's one-at-a-time path cannot).
        n = min(q if q is not None else MAX_BATCH, MAX_BATCH, self.room())
        for _ in range(n):
            try:
                fd, _ = self.sock._accept()  # type: ignore[attr-defined]  # raw fd: no socket object to build twice
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in LOCAL_RESOURCE_ERRNOS:  # libuv's native path sheds the rest
                    return
                if e.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                log.warning("accept failed: %s", e)
                return
            self.accepted += 1
            sock = socket.socket(self.family, socket.SOCK_STREAM, 0, fileno=fd)
            PendingConnect(self.loop, self.loop.connect_accepted_socket(self.factory, sock, **self.tls),  # type: ignore[arg-type]
                           lambda proto, exc, s=sock: self._done(s, exc), 0)

    @staticmethod
    def _done(sock: socket.socket, exc: BaseException | None) -> None:
        if exc is not None:
            if isinstance(exc, (ssl.SSLError, ConnectionError, TimeoutError, asyncio.CancelledError)):
                # a TLS client that failed its handshake or left during it (wrk stopping, a
                # scanner): ordinary on a TLS listener, and a warning each would let anyone
                # flood the log (libuv's own accept path does not log them either)
                log.debug("TLS handshake of an accepted connection failed: %r", exc)
            else:
                log.warning("accepted connection could not be set up: %r", exc)
            sock.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.loop.remove_reader(self.sock.fileno())
        except (ValueError, RuntimeError):  # loop already closed
            pass
        self.sock.close()


def attach(loop: asyncio.AbstractEventLoop, sock: socket.socket, factory: Any,
           room: Callable[[], int], tls: dict[str, Any] | None = None) -> BurstAcceptor | None:
    return BurstAcceptor(loop, sock, factory, room, tls) if wanted(loop) else None

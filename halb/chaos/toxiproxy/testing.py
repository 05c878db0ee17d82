"""Small TCP servers and helpers for exercising proxies with real sockets.

Used by the test-suite and handy for drills: a threaded echo server, a server that
sends a fixed payload and closes, and a background thread running the API server
in-process for synchronous callers.
"""
from __future__ import annotations

import asyncio
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from .server import ServerHandle, start_server


@dataclass
class TcpServer:
    """A threaded TCP server on 127.0.0.1 with a free port; ``handler(conn)`` per client."""

    handler: Callable[[socket.socket], None]
    sock: socket.socket = field(init=False)
    conns: list[socket.socket] = field(default_factory=list, init=False)
    accepted: int = field(default=0, init=False)
    _thread: threading.Thread | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return self.sock.getsockname()[1]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (socket.timeout, BlockingIOError):
                continue
            except OSError:
                return
            self.accepted += 1
            conn.settimeout(30)
            self.conns.append(conn)
            threading.Thread(target=self._run_handler, args=(conn,), daemon=True).start()

    def _run_handler(self, conn: socket.socket) -> None:
        try:
            self.handler(conn)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self.sock.close()
        for conn in self.conns:
            try:
                conn.close()
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(2)

    def __enter__(self) -> "TcpServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def echo_handler(conn: socket.socket) -> None:
    """Echo until the peer closes."""
    while True:
        data = conn.recv(65536)
        if not data:
            return
        conn.sendall(data)


def payload_handler(payload: bytes, linger_s: float = 0.0) -> Callable[[socket.socket], None]:
    """Send ``payload`` at once, then close (after ``linger_s``)."""
    def handler(conn: socket.socket) -> None:
        conn.sendall(payload)
        if linger_s:
            time.sleep(linger_s)
    return handler


def recv_until_closed(sock: socket.socket, limit: int, deadline_s: float) -> tuple[bytes, int, bool]:
    """Read until EOF, ``limit`` bytes or the deadline: (data, number of reads, saw EOF)."""
    chunks: list[bytes] = []
    reads = 0
    total = 0
    end = time.monotonic() + deadline_s
    while total < limit:
        left = end - time.monotonic()
        if left <= 0:
            return b"".join(chunks), reads, False
        sock.settimeout(left)
        try:
            data = sock.recv(65536)
        except socket.timeout:
            return b"".join(chunks), reads, False
        if not data:
            return b"".join(chunks), reads, True
        reads += 1
        total += len(data)
        chunks.append(data)
    return b"".join(chunks), reads, False


class ThreadedServer:
    """The API server on its own event loop thread, for synchronous code and tests."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(start_server(host, port), self.loop)
        try:
            self.handle: ServerHandle = future.result(20)
        except BaseException:
            self._stop_loop()
            raise

    @property
    def url(self) -> str:
        return self.handle.url

    @property
    def port(self) -> int:
        return self.handle.port

    def call(self, func: Callable[[], object]) -> object:
        """Run ``func`` on the server loop (to inspect state safely)."""
        async def run() -> object:
            return func()
        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(10)

    def _stop_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self.loop.close()

    def stop(self) -> None:
        try:
            asyncio.run_coroutine_threadsafe(self.handle.stop(), self.loop).result(10)
        finally:
            self._stop_loop()

    def __enter__(self) -> "ThreadedServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

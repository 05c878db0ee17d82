"""Helpers for data-plane tests and benchmarks: origin processes, snapshots, raw HTTP.

Kept in the package (not under tests/) so integration tests, the bench and other teams'
tests can share them. Everything that starts a process stops it, also on failure.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import httptools

from halb.dataplane.snapshot import BackendRoute, RoutingSnapshot, ServiceRoute


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


@dataclass
class Proc:
    popen: subprocess.Popen[bytes]
    port: int
    name: str = ""

    @property
    def pid(self) -> int:
        return self.popen.pid

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait(10)

    def terminate(self, timeout: float = 10) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()


def _spawn(args: list[str], timeout: float = 20) -> Proc:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    p = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + timeout
    line = b""
    try:
        while time.monotonic() < deadline:
            line = p.stdout.readline()  # type: ignore[union-attr]
            if line.startswith(b"READY") or not line:
                break
        if not line.startswith(b"READY"):
            raise RuntimeError(f"{args} did not start: {line!r}")
    except BaseException:
        p.kill()
        p.wait()
        raise
    return Proc(p, int(line.split()[1]))


def spawn_origin(name: str, port: int = 0, tcp: bool = False) -> Proc:
    args = ["-m", "halb.dataplane.origin", "--name", name, "--port", str(port)]
    if tcp:
        args.append("--tcp")
    pr = _spawn(args)
    pr.name = name
    return pr


def spawn_proxy(*args: str) -> Proc:
    return _spawn(["-m", "halb.dataplane.run", *args])


@contextlib.contextmanager
def processes() -> Iterator[list[Proc]]:
    """Collect started processes; all are killed on exit, whatever happened."""
    procs: list[Proc] = []
    try:
        yield procs
    finally:
        for p in procs:
            try:
                p.kill()
            except Exception:
                pass


def service(name: str, backends: list[tuple[str, int]] | list[BackendRoute], *, mode: str = "http",
            port: int = 0, algorithm: str = "round_robin", hash_key: str = "source",
            **options: Any) -> ServiceRoute:
    brs = []
    for i, b in enumerate(backends):
        if isinstance(b, BackendRoute):
            brs.append(b)
        else:
            brs.append(BackendRoute(name=f"b{i}", host=b[0], port=b[1], weight=1, server=f"s{i}"))
    return ServiceRoute(name=name, mode=mode, listen_host="127.0.0.1", listen_port=port, algorithm=algorithm,
                        hash_key=hash_key, backends=tuple(brs), options=tuple(sorted(options.items())))


def snapshot(*services: ServiceRoute, version: int = 1) -> RoutingSnapshot:
    return RoutingSnapshot(version=version, services=tuple(services))


@dataclass
class Response:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    complete: bool = False


class _RespParser:
    def __init__(self, head_only: bool = False) -> None:
        self.r = Response(0)
        self.parts: list[bytes] = []
        self.p = httptools.HttpResponseParser(self)
        self.head_only = head_only
        self.done = False

    def on_header(self, n: bytes, v: bytes) -> None:
        self.r.headers[n.decode().lower()] = v.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.r.status = self.p.get_status_code()
        if self.head_only:
            self.done = True

    def on_body(self, b: bytes) -> None:
        self.parts.append(b)

    def on_message_complete(self) -> None:
        if self.r.status >= 200:
            self.done = True


async def raw_request(port: int, data: bytes | list[bytes], *, timeout: float = 10.0, delay: float = 0.0,
                      head_only: bool = False, host: str = "127.0.0.1") -> Response | None:
    """Send raw bytes (a list = pieces sent `delay` apart); parse one response.

    Returns None when the connection closed before a response.
    """
    reader, writer = await asyncio.open_connection(host, port)
    rp = _RespParser(head_only)

    async def read_response() -> None:
        # reads while the request is still being sent: a server that answers early and
        # closes (408, 413) would otherwise be reset by our later writes
        while not rp.done:
            try:
                chunk = await reader.read(65536)
            except ConnectionError:
                return
            if not chunk:
                return
            try:
                rp.p.feed_data(chunk)
            except httptools.HttpParserError:
                return

    reading = asyncio.ensure_future(read_response())
    try:
        pieces = data if isinstance(data, list) else [data]
        for i, piece in enumerate(pieces):
            if i and delay:
                await asyncio.sleep(delay)
            if writer.is_closing() or reading.done():
                break
            writer.write(piece)
            try:
                await writer.drain()
            except ConnectionError:
                break
        try:
            await asyncio.wait_for(asyncio.shield(reading), timeout)
        except asyncio.TimeoutError:
            raise TimeoutError("no complete response") from None
        if rp.r.status == 0:
            return None
        rp.r.body = b"".join(rp.parts)
        rp.r.complete = rp.done
        return rp.r
    finally:
        reading.cancel()
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


def run(coro: Any, timeout: float = 60.0) -> Any:
    """Run a test coroutine on uvloop (as production does) with an overall timeout."""
    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:  # pragma: no cover
        loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(asyncio.wait_for(coro, timeout))
    finally:
        with contextlib.suppress(Exception):
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for t in pending:
                t.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.close()

"""Which backend a TCP-mode connection tries next, and what a failed connect attempt means.

TCP mode has two paths (the C relay's `tcp_relay.py` and the asyncio `tcp_proxy.py`); both
use these two functions so they pick, retry and blame backends alike: a connect failure
counts against the backend unless it is a local resource error (out of fds or memory here:
every backend would fail alike), and the next attempt avoids every backend and server that
already failed this connection.
"""
from __future__ import annotations

from typing import Protocol

from halb.dataplane.local_errors import is_local_resource_error, report_local_error
from halb.dataplane.routing import BackendState, ServiceRuntime


class TcpAttempts(Protocol):
    """What a TCP-mode connection keeps about its connect attempts."""

    peer: bytes
    attempt: BackendState | None  # backend being connected to (counted in its in_flight)
    attempts_left: int
    tried: set[BackendState] | None  # only after a failed attempt
    servers: set[str] | None
    closed: bool

    def close(self) -> None: ...


def next_backend(rt: ServiceRuntime, conn: TcpAttempts) -> BackendState | None:
    """Pick the backend of the next attempt and count it (in_flight, requests, retries), or
    None when the attempts are used up or no backend is left: the caller gives up."""
    if conn.attempts_left <= 0:
        return None
    conn.attempts_left -= 1
    tried = conn.tried
    b = rt.pick(conn.peer if rt.uses_key else None, exclude=tried, avoid_servers=conn.servers)
    if b is None:
        return None
    if tried is not None:
        b.retries += 1
        rt.retries += 1
    conn.attempt = b
    b.in_flight += 1
    b.requests += 1
    return b


def account_failed_connect(rt: ServiceRuntime, conn: TcpAttempts, b: BackendState,
                           exc: BaseException | None) -> bool:
    """The attempt at `b` failed with `exc`. It is accounted even when the client left
    meanwhile (a backend that hangs on connect must still be detected). True: try the next
    backend; False: the connection is closed (or closes here on a local resource error)."""
    b.in_flight -= 1
    if exc is not None and is_local_resource_error(exc):
        report_local_error(rt.route.name, b.name, exc)
        if not conn.closed:
            rt.errors += 1
            conn.close()
        return False
    rt.record_failure(b, True, "connect timeout" if isinstance(exc, TimeoutError)
                      else f"connect failed: {getattr(exc, 'strerror', None) or exc}")
    if conn.closed:
        return False
    if conn.tried is None:
        conn.tried, conn.servers = set(), set()
    conn.tried.add(b)
    if b.server:
        conn.servers.add(b.server)  # type: ignore[union-attr]
    return True

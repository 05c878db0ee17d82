"""A bounded HTTP/1.1 load of keep-alive and new connections, on raw sockets, for the hot
restart test: it counts every failure except the one a real client retries.

The keep-alive race: a server that closes an idle keep-alive connection can never know the
client sent a request on it at that same instant (HAProxy, nginx and halb alike). Real
clients (browsers, curl, Python's urllib3, Go's net/http) retry a request when the
connection was *reused* and *no byte of a response* arrived, because then the server
cannot have processed it. This client retries that one case, once per request, on a new
connection; anything else (refused, reset on a fresh connection, a reset after response
bytes, a timeout, a non-200) is a failure.
"""
from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, field


class NoResponse(Exception):
    """The connection ended before any byte of a response arrived."""


@dataclass
class LoadResult:
    ok: int = 0
    failed: int = 0
    retried: int = 0  # reused connection closed before any response byte: retried
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, ok: int = 0, failed: int = 0, retried: int = 0, error: str = "") -> None:
        with self.lock:
            self.ok += ok
            self.failed += failed
            self.retried += retried
            if error and len(self.errors) < 20:
                self.errors.append(error)


def _request(sock: socket.socket, host: str, path: str, close: bool) -> tuple[int, bool]:
    """(status, server closes) for one GET; NoResponse if not one byte came back."""
    req = f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{'Connection: close' + chr(13) + chr(10) if close else ''}\r\n"
    got = b""
    try:
        sock.sendall(req.encode())
        while b"\r\n\r\n" not in got:
            chunk = sock.recv(65536)
            if not chunk:
                break
            got += chunk
    except (ConnectionResetError, BrokenPipeError) as exc:
        if not got:
            raise NoResponse(str(exc)) from None
        raise
    if not got:
        raise NoResponse("closed")
    if b"\r\n\r\n" not in got:
        raise ConnectionError(f"response head cut after {len(got)} bytes")
    head, _, body = got.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("response body cut")
        body += chunk
    return status, headers.get("connection", "").lower() == "close"


def keepalive_client(address: str, path: str, until: float, count: int, result: LoadResult) -> None:
    host, port = address.rsplit(":", 1)
    sock: socket.socket | None = None
    reused = False
    done = 0
    while done < count and time.monotonic() < until:
        try:
            if sock is None:
                sock = socket.create_connection((host, int(port)), timeout=5)
                reused = False
            status, closes = _request(sock, address, path, close=False)
        except NoResponse as exc:
            if sock is not None:
                sock.close()
            sock = None
            if reused:  # the keep-alive race: retry on a new connection, as real clients do
                result.add(retried=1)
                continue
            result.add(failed=1, error=f"keep-alive, fresh connection: {exc}")
            done += 1
            continue
        except OSError as exc:
            if sock is not None:
                sock.close()
            sock = None
            result.add(failed=1, error=f"keep-alive: {type(exc).__name__}: {exc}")
            done += 1
            continue
        done += 1
        if status == 200:
            result.add(ok=1)
        else:
            result.add(failed=1, error=f"keep-alive: status {status}")
        reused = True
        if closes:
            sock.close()
            sock = None
        time.sleep(0.002)
    if sock is not None:
        sock.close()


def new_connection_client(address: str, path: str, until: float, count: int, result: LoadResult) -> None:
    host, port = address.rsplit(":", 1)
    done = 0
    while done < count and time.monotonic() < until:
        done += 1
        try:
            with socket.create_connection((host, int(port)), timeout=5) as sock:
                status, _ = _request(sock, address, path, close=True)
        except (OSError, NoResponse) as exc:
            result.add(failed=1, error=f"new connection: {type(exc).__name__}: {exc}")
            continue
        if status == 200:
            result.add(ok=1)
        else:
            result.add(failed=1, error=f"new connection: status {status}")
        time.sleep(0.002)


def start_load(address: str, path: str, *, seconds: float, keepalive: int = 4, fresh: int = 2,
               per_client: int = 5000) -> tuple[LoadResult, list[threading.Thread]]:
    """Bounded in time (`seconds`) and count (`per_client` requests per client thread)."""
    result = LoadResult()
    until = time.monotonic() + seconds
    threads = [threading.Thread(target=keepalive_client, args=(address, path, until, per_client, result), daemon=True)
               for _ in range(keepalive)]
    threads += [threading.Thread(target=new_connection_client, args=(address, path, until, per_client, result),
                                 daemon=True) for _ in range(fresh)]
    for t in threads:
        t.start()
    return result, threads

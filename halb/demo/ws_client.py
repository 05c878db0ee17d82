"""`halb demo ws`: a small WebSocket client for the demo's echo endpoint (GET /ws).

Debian's curl (7.88) has no WebSocket support and `python -m websockets` takes neither a
CA file nor an address to connect to, so the demo prints this instead: it takes curl's
`--cacert` and `--resolve HOST:PORT:ADDR[,ADDR...]`, so the HTTPS commands and the
WebSocket one read the same, and it tries the addresses in order (like curl), so it works
while a balancer is down."""
from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from typing import Callable, Iterable
from urllib.parse import urlsplit


class WsClientError(Exception):
    """A bad URL or --resolve, or a connection that failed: said in one line."""


@dataclass(frozen=True)
class Target:
    url: str
    host: str
    port: int
    secure: bool
    addresses: tuple[str, ...]  # where to connect; the URL's host when no --resolve


def parse_target(url: str, resolve: str = "") -> Target:
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise WsClientError(f"{url!r} is not a ws:// or wss:// URL")
    secure = parts.scheme == "wss"
    try:
        port = parts.port or (443 if secure else 80)
    except ValueError:
        raise WsClientError(f"{url!r} has an invalid port") from None
    addresses: tuple[str, ...] = (parts.hostname,)
    if resolve:
        try:
            r_host, r_port, r_addrs = resolve.split(":", 2)
            ok = r_host.lower() == parts.hostname.lower() and int(r_port) == port and r_addrs
        except ValueError:
            ok = False
        if not ok:
            raise WsClientError(f"--resolve {resolve!r} must be {parts.hostname}:{port}:ADDRESS[,ADDRESS...] "
                                f"for {url}")
        addresses = tuple(a.strip("[]") for a in r_addrs.split(","))
    return Target(url, parts.hostname, port, secure, addresses)


def connect_socket(target: Target, timeout: float) -> socket.socket:
    errors = []
    for addr in target.addresses:
        try:
            return socket.create_connection((addr, target.port), timeout=timeout)
        except OSError as exc:
            errors.append(f"{addr}:{target.port}: {exc.strerror or exc}")
    raise WsClientError("cannot connect: " + "; ".join(errors))


def echo(target: Target, messages: Iterable[str], out: Callable[[str], None], *, cacert: str | None = None,
         timeout: float = 5.0) -> None:
    """Connect, print the greeting (the instance that answered), then send each message and
    print its echo. Raises WsClientError with the reason on any failure."""
    from websockets.exceptions import WebSocketException
    from websockets.sync.client import connect

    ctx = ssl.create_default_context(cafile=cacert) if target.secure else None
    sock = connect_socket(target, timeout)
    try:
        with connect(target.url, sock=sock, ssl=ctx, open_timeout=timeout, close_timeout=timeout) as ws:
            out(f"< {ws.recv(timeout)}")
            for msg in messages:
                ws.send(msg)
                out(f"> {msg}")
                out(f"< {ws.recv(timeout)}")
    except ssl.SSLCertVerificationError as exc:
        raise WsClientError(f"TLS certificate not trusted ({exc.verify_message})"
                            + (f": not signed by the CA in {cacert}" if cacert else ": pass --cacert")) from None
    except (OSError, TimeoutError, WebSocketException) as exc:
        raise WsClientError(f"{target.url}: {exc}") from None
    finally:
        sock.close()

"""Active health check configuration and the single-probe functions.

A check is one attempt against one backend: an HTTP request (status range, optional body
substring, optional Host header) or a TCP connect. The Prober (prober.py) schedules
them and turns results into up/down transitions with rise/fall hysteresis.

Probes never use the data plane's connection pools: a check must open a fresh
connection, otherwise a pooled keep-alive connection could make a backend whose listener
is gone look healthy, and a check failure could poison the pool the users depend on.
"""
from __future__ import annotations

import asyncio
import ipaddress
import random
import socket
import struct
import time
from dataclasses import asdict, dataclass
from typing import Any, Mapping

import aiohttp

CHECK_KINDS = ("http", "tcp")
HTTP_METHODS = ("GET", "HEAD", "OPTIONS", "POST")
MAX_BODY_SCAN = 64 * 1024  # a body substring must appear in the first 64 KiB
USER_AGENT = "halb-health/0.1"


class CheckConfigError(ValueError):
    """A health check setting is wrong; the message names the offending key."""


def parse_status_range(value: Any, key: str = "expect_status") -> tuple[int, int]:
    """'200-399' | '200' | 204 | [200, 299] -> inclusive (low, high)."""
    low: Any
    high: Any
    if isinstance(value, bool):
        raise CheckConfigError(f"{key}: expected a status or range like '200-399', got {value!r}")
    if isinstance(value, int):
        low = high = value
    elif isinstance(value, str):
        text = value.strip()
        parts = text.split("-")
        if len(parts) == 1:
            low = high = parts[0]
        elif len(parts) == 2:
            low, high = parts
        else:
            raise CheckConfigError(f"{key}: {value!r} is not a status or range like '200-399'")
        try:
            low, high = int(str(low).strip()), int(str(high).strip())
        except ValueError:
            raise CheckConfigError(f"{key}: {value!r} is not a status or range like '200-399'") from None
    elif isinstance(value, (list, tuple)) and len(value) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        low, high = value
    else:
        raise CheckConfigError(f"{key}: expected a status or range like '200-399', got {value!r}")
    if not (100 <= low <= 599 and 100 <= high <= 599):
        raise CheckConfigError(f"{key}: statuses must be within 100-599, got {value!r}")
    if low > high:
        raise CheckConfigError(f"{key}: range {value!r} is empty (low > high)")
    return low, high


@dataclass(frozen=True)
class CheckConfig:
    """How to check one backend. Frozen so a Prober can compare configs for changes."""

    kind: str = "http"
    method: str = "GET"
    path: str = "/health"
    expect_status: tuple[int, int] = (200, 399)
    expect_body: str | None = None
    host_header: str | None = None
    interval: float = 1.0
    timeout: float = 0.5
    rise: int = 2
    fall: int = 2
    jitter: float = 0.1  # fraction of interval: each wait is interval * (1 +/- jitter)

    def __post_init__(self) -> None:
        if self.kind not in CHECK_KINDS:
            raise CheckConfigError(f"kind: must be one of {', '.join(CHECK_KINDS)}, got {self.kind!r}")
        if self.method not in HTTP_METHODS:
            raise CheckConfigError(f"method: must be one of {', '.join(HTTP_METHODS)}, got {self.method!r}")
        if not isinstance(self.path, str) or not self.path.startswith("/") or any(c in self.path for c in " \r\n"):
            raise CheckConfigError(f"path: must start with '/' and contain no spaces, got {self.path!r}")
        parse_status_range(list(self.expect_status))
        if self.expect_body is not None and (not isinstance(self.expect_body, str) or not self.expect_body):
            raise CheckConfigError(f"expect_body: must be a non-empty string, got {self.expect_body!r}")
        if self.expect_body is not None and self.method == "HEAD":
            raise CheckConfigError("expect_body: a HEAD response has no body; use GET")
        if self.host_header is not None and (not isinstance(self.host_header, str) or not self.host_header
                                             or any(c in self.host_header for c in " \r\n")):
            raise CheckConfigError(f"host: must be a non-empty header value, got {self.host_header!r}")
        for key in ("interval", "timeout"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 3600:
                raise CheckConfigError(f"{key}: must be a number of seconds in (0, 3600], got {v!r}")
        for key in ("rise", "fall"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 100:
                raise CheckConfigError(f"{key}: must be an integer 1-100, got {v!r}")
        if isinstance(self.jitter, bool) or not isinstance(self.jitter, (int, float)) or not 0 <= self.jitter <= 0.5:
            raise CheckConfigError(f"jitter: must be a fraction of interval in [0, 0.5], got {self.jitter!r}")

    # keys accepted in a config section; "host" is the Host header, "type" an alias of kind
    KEYS = ("kind", "type", "method", "path", "expect_status", "expect_body", "host",
            "interval", "timeout", "rise", "fall", "jitter")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, where: str = "health_check") -> CheckConfig:
        """Build from a config section; unknown keys are errors (a typo must not be ignored)."""
        if data is None:
            return cls()
        if not isinstance(data, Mapping):
            raise CheckConfigError(f"{where}: must be a table/dict, got {type(data).__name__}")
        unknown = sorted(set(data) - set(cls.KEYS))
        if unknown:
            raise CheckConfigError(f"{where}.{unknown[0]}: unknown key (known: {', '.join(cls.KEYS)})")
        if "kind" in data and "type" in data:
            raise CheckConfigError(f"{where}.type: give either 'kind' or 'type', not both")
        kw: dict[str, Any] = {}
        try:
            kind = data.get("kind", data.get("type", "http"))
            if not isinstance(kind, str):
                raise CheckConfigError(f"kind: must be a string, got {kind!r}")
            kw["kind"] = kind.lower()
            if "method" in data:
                if not isinstance(data["method"], str):
                    raise CheckConfigError(f"method: must be a string, got {data['method']!r}")
                kw["method"] = data["method"].upper()
            if "path" in data:
                kw["path"] = data["path"]
            if "expect_status" in data:
                kw["expect_status"] = parse_status_range(data["expect_status"])
            if "expect_body" in data:
                kw["expect_body"] = data["expect_body"]
            if "host" in data:
                kw["host_header"] = data["host"]
            for key in ("interval", "timeout", "rise", "fall", "jitter"):
                if key in data:
                    kw[key] = data[key]
            if kw["kind"] == "tcp":
                http_only = sorted(k for k in ("method", "path", "expect_status", "expect_body", "host") if k in data)
                if http_only:
                    raise CheckConfigError(f"{http_only[0]}: only applies to http checks, this one is tcp")
            return cls(**kw)
        except CheckConfigError as exc:
            raise CheckConfigError(f"{where}.{exc}") from None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["expect_status"] = f"{self.expect_status[0]}-{self.expect_status[1]}"
        d["host"] = d.pop("host_header")
        return d

    def next_delay(self, rng: random.Random) -> float:
        """Wait before the next check: interval spread by +/- jitter so nodes drift apart."""
        return self.interval * (1.0 + rng.uniform(-self.jitter, self.jitter))

    def first_delay(self, rng: random.Random) -> float:
        """Offset of a new target's first check: within jitter * interval of now.

        Small on purpose: a new target is assumed up, so its first verdict should come
        quickly; the per-interval jitter then keeps nodes and targets from staying in step.
        """
        return rng.uniform(0.0, self.jitter * self.interval)


@dataclass(frozen=True)
class CheckResult:
    ok: bool
    latency: float  # seconds from start of the attempt to its verdict
    detail: str  # human text: "status 200" or why it failed
    status: int | None = None  # HTTP status when one was received
    at: float = 0.0  # wall-clock time the attempt finished


async def http_check(session: aiohttp.ClientSession, host: str, port: int, cfg: CheckConfig) -> CheckResult:
    """One HTTP check; ``session`` must be a prober-owned session without keep-alive."""
    start = time.monotonic()
    hostport = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    url = f"http://{hostport}{cfg.path}"
    headers = {"User-Agent": USER_AGENT, "Connection": "close"}
    if cfg.host_header:
        headers["Host"] = cfg.host_header
    status: int | None = None
    try:
        async with asyncio.timeout(cfg.timeout):
            async with session.request(cfg.method, url, headers=headers, allow_redirects=False) as resp:
                status = resp.status
                low, high = cfg.expect_status
                if not low <= status <= high:
                    return _result(False, start, f"status {status} not in {low}-{high}", status)
                if cfg.expect_body is not None:
                    body = await resp.content.read(MAX_BODY_SCAN)
                    if cfg.expect_body.encode() not in body:
                        return _result(False, start, f"status {status} but body lacks {cfg.expect_body!r}", status)
                return _result(True, start, f"status {status}", status)
    except TimeoutError:
        return _result(False, start, f"timeout after {cfg.timeout:g}s", status)
    except aiohttp.ClientError as exc:
        return _result(False, start, describe_error(exc), status)
    except OSError as exc:
        return _result(False, start, describe_error(exc), status)


async def tcp_check(host: str, port: int, cfg: CheckConfig) -> CheckResult:
    """One TCP connect check: success means the backend accepted a connection.

    For an IP literal this is a bare non-blocking socket: connect, then close with an RST
    (SO_LINGER 0, as HAProxy's checks do) so no TIME_WAIT piles up on the balancer. At
    10,000 targets that was a third of the cost of asyncio.open_connection (transport,
    protocol, stream reader and a graceful close per check). Host names keep the stream
    path, which resolves them.
    """
    start = time.monotonic()
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        return await _tcp_check_stream(host, port, cfg, start)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
        async with asyncio.timeout(cfg.timeout):
            await asyncio.get_running_loop().sock_connect(sock, (host, port))
    except TimeoutError:
        return _result(False, start, f"connect timeout after {cfg.timeout:g}s")
    except OSError as exc:
        return _result(False, start, describe_error(exc))
    finally:
        sock.close()
    return _result(True, start, "connected")


LINGER_RST = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST


async def _tcp_check_stream(host: str, port: int, cfg: CheckConfig, start: float) -> CheckResult:
    try:
        async with asyncio.timeout(cfg.timeout):
            _reader, writer = await asyncio.open_connection(host, port)
    except TimeoutError:
        return _result(False, start, f"connect timeout after {cfg.timeout:g}s")
    except OSError as exc:
        return _result(False, start, describe_error(exc))
    result = _result(True, start, "connected")
    writer.close()
    try:
        async with asyncio.timeout(cfg.timeout):
            await writer.wait_closed()
    except (TimeoutError, OSError):
        pass
    return result


def _result(ok: bool, start: float, detail: str, status: int | None = None) -> CheckResult:
    return CheckResult(ok=ok, latency=time.monotonic() - start, detail=detail, status=status, at=time.time())


def describe_error(exc: BaseException) -> str:
    """Human text for a failed check's exception (also the prober's bare-socket path)."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        inner = exc.os_error
        return f"connect failed: {inner.strerror or inner}" if inner is not None else f"connect failed: {exc}"
    if isinstance(exc, ConnectionRefusedError):
        return "connect failed: connection refused"
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"

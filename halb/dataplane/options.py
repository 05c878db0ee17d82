"""Per-service data-plane options, parsed once per snapshot from ``ServiceRoute.options``.

The snapshot carries options as free-form pairs so the control plane does not need to know
the data plane's knobs; this module is the single place that names them, gives defaults and
validates types, so a typo in one service's config cannot crash the proxy (an unknown key
is logged and ignored, a bad value falls back to the default with a warning).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from typing import Any

from halb.dataplane.snapshot import ServiceRoute

log = logging.getLogger(__name__)

FAIL_POLICIES = ("panic", "closed")


@dataclass(frozen=True)
class ServiceOptions:
    """Every knob of one service. Times are seconds, sizes bytes, shares 0..1."""

    # --- timeouts -------------------------------------------------------------------
    connect_timeout: float = 3.0  # TCP connect to a backend; a timeout counts as connect failure
    header_timeout: float = 10.0  # client must finish sending request headers (408 after)
    idle_timeout: float = 60.0  # no byte in either direction on a connection -> close
    request_timeout: float = 30.0  # request start -> upstream response headers (504 after)
    upstream_keepalive: float = 15.0  # idle pooled upstream connection is closed after this
    stop_grace: float = 5.0  # on stop()/service removal, in-flight work may finish this long
    # --- limits ---------------------------------------------------------------------
    max_header_bytes: int = 32768  # request line + headers; 431 beyond (502 for a response)
    max_body_bytes: int = 0  # request body; 0 = unlimited; 413 beyond
    max_connections: int = 0  # concurrent client connections per service per worker; 0 = unlimited
    pool_max_idle: int = 256  # idle keep-alive upstream connections kept per backend
    # --- retries --------------------------------------------------------------------
    retries: int = 2  # extra attempts after the first, each on a different backend
    retry_budget: float = 0.2  # token bucket: each request deposits this many retry tokens
    retry_budget_min: float = 10.0  # retries always allowed per 10 s window (quiet services)
    retry_buffer_bytes: int = 65536  # request bodies up to this size are kept for replay
    retry_on_status: tuple[int, ...] = (502, 503, 504)  # upstream statuses retried (if replayable)
    server_aware: bool = True  # a retry prefers a backend on a different `server`
    server_balance: bool = False  # pick a server first, then an instance on it (server_spread.py)
    # --- passive outlier detection ---------------------------------------------------
    outlier_consecutive_failures: int = 5  # consecutive 5xx / resets / timeouts -> eject
    outlier_consecutive_connect_failures: int = 1  # consecutive connect failures -> eject
    outlier_base_ejection_s: float = 2.0  # n-th consecutive ejection lasts base * 2**n
    outlier_max_ejection_s: float = 60.0  # cap of the ejection duration
    outlier_max_ejection_percent: float = 0.5  # share of backends that may be ejected at once
    # --- too few backends ------------------------------------------------------------
    panic_threshold: float = 0.0  # healthy share below this -> route to all active, healthy or not (panic); 0: only when none
    fail_policy: str = "panic"  # "panic" or "closed" (503 + Retry-After when none eligible)
    retry_after_s: int = 1  # Retry-After value on generated 503s
    # --- slow start -------------------------------------------------------------------
    slow_start_s: float = 0.0  # weight ramps linearly over this after becoming eligible; 0 = off
    slow_start_min_weight: float = 0.1  # share of the weight given at the start of the ramp
    # --- TCP ----------------------------------------------------------------------------
    tcp_connect_attempts: int = 3  # backends tried for one TCP client connection
    # --- peak EWMA ----------------------------------------------------------------------
    ewma_decay_s: float = 10.0  # time constant of the latency average

    @classmethod
    def from_route(cls, route: ServiceRoute) -> "ServiceOptions":
        """Parse and validate; never raises for bad operator input (logs and defaults)."""
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, raw in route.options:
            f = known.get(key)
            if f is None:
                log.warning("service %s: unknown option %r ignored", route.name, key)
                continue
            default = f.default
            try:
                values[key] = _coerce(raw, default)
            except (TypeError, ValueError):
                log.warning("service %s: bad value %r for %s, using %r", route.name, raw, key, default)
        if values.get("fail_policy", "panic") not in FAIL_POLICIES:
            log.warning("service %s: fail_policy must be one of %s", route.name, FAIL_POLICIES)
            values.pop("fail_policy")
        return cls(**values)


def _coerce(raw: Any, default: Any) -> Any:
    if isinstance(default, bool):
        if isinstance(raw, str):
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        return bool(raw)
    if isinstance(default, int):
        v = int(raw)
        if v < 0:
            raise ValueError(raw)
        return v
    if isinstance(default, float):
        v = float(raw)
        if v < 0:
            raise ValueError(raw)
        return v
    if isinstance(default, tuple):
        if isinstance(raw, str):
            raw = [x for x in raw.replace(",", " ").split() if x]
        return tuple(int(x) for x in raw)
    if isinstance(default, str):
        return str(raw)
    return raw

"""Per-service options: the one place that names them, gives defaults and valid ranges.

Neutral module (imports nothing from halb) because two layers need it and must not import
each other: the model validates a service's `options` strictly when a command is written
(an unknown key or a bad value is a 400, never a frozen data plane), and the data plane
parses them per snapshot with `ServiceOptions.from_route`, which stays tolerant (defence in
depth: a value that slipped in through an old snapshot is logged and defaulted, never a crash).

Option families:
- data-plane knobs: the fields of `ServiceOptions` (docs/dataplane.md);
- control-plane knobs read inside the state machine: `flap_*` (docs/health.md);
- `health`: the nested active-check table. Its full schema belongs to halb/health/checks.py,
  which the model may not import; here it is only checked to be a small JSON object
  (`validate_options(..., health=...)` lets an upper layer plug the full check in).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, fields
from typing import Any, Callable, Mapping

log = logging.getLogger("halb.dataplane.options")

FAIL_POLICIES = ("panic", "closed")
PRIORITIES = ("critical", "normal", "low")  # halb/dataplane/admission.py: best first
PROXY_VERSIONS = ("off", "v1", "v2")  # send_proxy
DAY = 86400.0


class OptionError(ValueError):
    """A service option that cannot be accepted; the message names the key and the reason."""


@dataclass(frozen=True)
class ServiceOptions:
    """Every data-plane knob of one service. Times are seconds, sizes bytes, shares 0..1."""

    # --- timeouts -------------------------------------------------------------------
    connect_timeout: float = 3.0  # TCP connect to a backend; a timeout counts as connect failure
    header_timeout: float = 10.0  # client must finish sending request headers (408 after)
    body_timeout_s: float = 300.0  # whole request body within this after its head; 0 = off (408 after)
    body_min_rate_bps: int = 1024  # average body bytes/s owed after the grace; 0 = off (408 below)
    body_rate_grace_s: float = 10.0  # the minimum rate is not enforced during this first part of a body
    idle_timeout: float = 60.0  # no byte in either direction on a connection -> close
    request_timeout: float = 30.0  # request start -> upstream response headers (504 after)
    upstream_keepalive: float = 15.0  # idle pooled upstream connection is closed after this
    stop_grace: float = 5.0  # on stop()/service removal, in-flight work may finish this long
    # --- limits ---------------------------------------------------------------------
    max_header_bytes: int = 32768  # request line + headers; 431 beyond (502 for a response)
    max_headers: int = 100  # request header lines; 431 beyond (HAProxy: 101, Envoy: 100)
    max_interim_responses: int = 10  # 1xx responses forwarded before the final one; 502 beyond
    max_body_bytes: int = 0  # request body; 0 = unlimited; 413 beyond
    max_connections: int = 0  # concurrent client connections per service per worker; 0 = unlimited;
    # unset in the route: derived from RLIMIT_NOFILE (halb/dataplane/options.py, fdlimit.py)
    pool_max_idle: int = 256  # idle keep-alive upstream connections kept per backend;
    # unset in the route: max(256, max_connections / 2) (halb/dataplane/options.py)
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
    # --- capacity: queue while every backend is at its limit (admission.py) -------------
    queue_timeout: float = 2.0  # longest wait in the queue (503 queue_timeout after); 0 = no queue
    max_queue: int = 1000  # requests waiting per service per process (503 queue_full beyond); 0 = no queue
    priority: str = "normal"  # critical | normal | low: queue order and who is shed first
    adaptive_concurrency: bool = False  # per-backend in-flight limit learned from latency (adaptive.py)
    # --- slow start -------------------------------------------------------------------
    slow_start_s: float = 0.0  # weight ramps linearly over this after becoming eligible; 0 = off
    slow_start_min_weight: float = 0.1  # share of the weight given at the start of the ramp
    # --- upgraded connections (WebSocket), halb/dataplane/tunnel.py -----------------------
    websocket: bool = True  # forward `Upgrade: websocket` requests; false: Upgrade is dropped (plain request)
    tunnel_timeout: float = 3600.0  # an upgraded connection with no byte either way is closed (HAProxy `timeout tunnel`)
    tunnel_drain_grace: float = 300.0  # after its backend leaves `active` (drain, maint, removed), a tunnel may run this long
    # --- PROXY protocol (halb/dataplane/proxy_protocol.py) --------------------------------
    send_proxy: str = "off"  # "v1" | "v2": a PROXY header with the client's address on each backend connection
    accept_proxy: bool = False  # clients are load balancers that send a PROXY header first (required)
    # --- TCP ----------------------------------------------------------------------------
    tcp_connect_attempts: int = 3  # backends tried for one TCP client connection
    # --- peak EWMA ----------------------------------------------------------------------
    ewma_decay_s: float = 10.0  # time constant of the latency average

    @classmethod
    def from_route(cls, route: Any) -> "ServiceOptions":
        """Parse a snapshot route's `options` pairs (duck-typed: `.name`, `.options`).

        Never raises for bad operator input (logs and defaults): writes are validated
        strictly by `validate_options`, this is the data plane's second line of defence.
        """
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, raw in route.options:
            f = known.get(key)
            if f is None:
                if key not in CONTROL_OPTIONS:
                    log.warning("service %s: unknown option %r ignored", route.name, key)
                continue
            default = f.default
            try:
                values[key] = _coerce(raw, default)
            except (TypeError, ValueError, OverflowError):
                log.warning("service %s: bad value %r for %s, using %r", route.name, raw, key, default)
        if values.get("fail_policy", "panic") not in FAIL_POLICIES:
            log.warning("service %s: fail_policy must be one of %s", route.name, FAIL_POLICIES)
            values.pop("fail_policy")
        if values.get("priority", "normal") not in PRIORITIES:
            log.warning("service %s: priority must be one of %s", route.name, PRIORITIES)
            values.pop("priority")
        if values.get("send_proxy", "off") not in PROXY_VERSIONS:
            log.warning("service %s: send_proxy must be one of %s", route.name, PROXY_VERSIONS)
            values.pop("send_proxy")
        cls.derive_unset(values)
        return cls(**values)

    @classmethod
    def derive_unset(cls, values: dict[str, Any]) -> None:
        """Fill options the route left unset from local facts; the data plane's subclass
        derives connection limits from the process's descriptor limit. Nothing here."""


def _coerce(raw: Any, default: Any) -> Any:
    """Tolerant conversion used by `from_route` only."""
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
        if v < 0 or not math.isfinite(v):
            raise ValueError(raw)
        return v
    if isinstance(default, tuple):
        if isinstance(raw, str):
            raw = [x for x in raw.replace(",", " ").split() if x]
        return tuple(int(x) for x in raw)
    if isinstance(default, str):
        return str(raw)
    return raw


# --- the strict write-time schema ------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """Type and range of one option. `low_open`: the low bound itself is not allowed."""

    kind: str  # "float", "int", "bool", "choice", "statuses"
    low: float = 0.0
    high: float = DAY
    low_open: bool = False
    choices: tuple[str, ...] = ()
    help: str = ""

    def describe(self) -> str:
        if self.kind == "bool":
            return "true or false"
        if self.kind == "choice":
            return "one of " + ", ".join(self.choices)
        if self.kind == "statuses":
            return "a list of 1-20 HTTP statuses (100-599)"
        noun = "an integer" if self.kind == "int" else "a number"
        return f"{noun} in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}]" + (
            f" ({self.help})" if self.help else "")


_SECONDS = Spec("float", 0.0, DAY, low_open=True)
_COUNT = Spec("int", 0, 1_000_000)
_SHARE = Spec("float", 0.0, 1.0)
_BYTES = Spec("int", 0, 1 << 40)

DATAPLANE_OPTIONS: dict[str, Spec] = {
    "connect_timeout": _SECONDS, "header_timeout": _SECONDS, "idle_timeout": _SECONDS,
    "request_timeout": _SECONDS, "upstream_keepalive": _SECONDS,
    "stop_grace": Spec("float", 0.0, 3600.0),
    "max_header_bytes": Spec("int", 256, 1 << 20),
    "body_timeout_s": Spec("float", 0.0, DAY, help="0: off"),
    "body_min_rate_bps": Spec("int", 0, 1 << 30, help="0: off"),
    "body_rate_grace_s": Spec("float", 0.0, DAY),
    "max_headers": Spec("int", 1, 10_000),
    "max_interim_responses": Spec("int", 0, 1000),
    "max_body_bytes": Spec("int", 0, 1 << 40, help="0: unlimited"),
    "max_connections": Spec("int", 0, 10_000_000, help="0: unlimited"),
    "pool_max_idle": Spec("int", 0, 100_000),
    "retries": Spec("int", 0, 100),
    "retry_budget": Spec("float", 0.0, 100.0),
    "retry_budget_min": Spec("float", 0.0, 1e9),
    "retry_buffer_bytes": _BYTES,
    "retry_on_status": Spec("statuses"),
    "server_aware": Spec("bool"), "server_balance": Spec("bool"),
    "outlier_consecutive_failures": Spec("int", 0, 1_000_000, help="0: off"),
    "outlier_consecutive_connect_failures": Spec("int", 0, 1_000_000, help="0: off"),
    "outlier_base_ejection_s": _SECONDS, "outlier_max_ejection_s": _SECONDS,
    "outlier_max_ejection_percent": _SHARE,
    "panic_threshold": _SHARE,
    "fail_policy": Spec("choice", choices=FAIL_POLICIES),
    "retry_after_s": Spec("int", 0, 3600),
    "queue_timeout": Spec("float", 0.0, 3600.0, help="0: no queue"),
    "max_queue": Spec("int", 0, 1_000_000, help="0: no queue"),
    "priority": Spec("choice", choices=PRIORITIES),
    "adaptive_concurrency": Spec("bool"),
    "slow_start_s": Spec("float", 0.0, DAY, help="0: off"),
    "slow_start_min_weight": _SHARE,
    "websocket": Spec("bool"),
    "tunnel_timeout": _SECONDS,
    "tunnel_drain_grace": Spec("float", 0.0, DAY),
    "send_proxy": Spec("choice", choices=PROXY_VERSIONS),
    "accept_proxy": Spec("bool"),
    "tcp_connect_attempts": Spec("int", 1, 100),
    "ewma_decay_s": _SECONDS,
}
# read by the state machine's flap damping (halb/control/state.py, docs/health.md)
CONTROL_OPTIONS: dict[str, Spec] = {
    "flap_window_s": _SECONDS, "flap_changes": Spec("int", 1, 1000), "flap_hold_s": _SECONDS,
    "flap_max_hold_s": _SECONDS,
}
OPTION_SPECS: dict[str, Spec] = {**DATAPLANE_OPTIONS, **CONTROL_OPTIONS}
NESTED_OPTIONS = ("health",)
KNOWN_OPTIONS = tuple(sorted(OPTION_SPECS)) + NESTED_OPTIONS
MAX_HEALTH_KEYS = 32

assert set(DATAPLANE_OPTIONS) == {f.name for f in fields(ServiceOptions)}, "schema and dataclass disagree"


def finite_number(value: Any) -> bool:
    """A JSON number that is a real value: not a bool, not NaN, not +-inf."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def check_option(key: str, value: Any, spec: Spec) -> Any:
    """One value against its spec; returns the canonical value (ints as float where a float is wanted)."""
    bad = OptionError(f"option {key}: must be {spec.describe()}, got {value!r}"[:300])
    if spec.kind == "bool":
        if not isinstance(value, bool):
            raise bad
        return value
    if spec.kind == "choice":
        if not isinstance(value, str) or value not in spec.choices:
            raise bad
        return value
    if spec.kind == "statuses":
        if not isinstance(value, (list, tuple)) or not 1 <= len(value) <= 20:
            raise bad
        for v in value:
            if isinstance(v, bool) or not isinstance(v, int) or not 100 <= v <= 599:
                raise bad
        return list(value)
    if spec.kind == "int" and (isinstance(value, bool) or not isinstance(value, int)):
        raise bad
    if not finite_number(value):
        raise bad
    if value < spec.low or (spec.low_open and value == spec.low) or value > spec.high:
        raise bad
    return float(value) if spec.kind == "float" else value


def check_health_shape(value: Any) -> dict[str, Any]:
    """The nested `health` table as far as this layer can judge: a small object of
    scalar (or [low, high]) values with finite numbers. The full check is CheckConfig's."""
    if not isinstance(value, Mapping):
        raise OptionError(f"option health: must be an object (table), got {type(value).__name__}")
    if len(value) > MAX_HEALTH_KEYS:
        raise OptionError(f"option health: more than {MAX_HEALTH_KEYS} keys")
    out: dict[str, Any] = {}
    for k, v in value.items():
        if not isinstance(k, str) or not k or len(k) > 64:
            raise OptionError(f"option health: key {k!r} must be a short string")
        items = v if isinstance(v, list) and len(v) <= 2 else [v]
        for item in items:
            if isinstance(item, float) and not math.isfinite(item):
                raise OptionError(f"option health.{k}: must be a finite number, got {item!r}")
            if item is not None and not isinstance(item, (str, int, float, bool)):
                raise OptionError(f"option health.{k}: must be a string, number or boolean, got {item!r}"[:300])
            if isinstance(item, str) and len(item) > 1024:
                raise OptionError(f"option health.{k}: longer than 1024 characters")
            if isinstance(item, int) and not finite_number(item) and not isinstance(item, bool):
                raise OptionError(f"option health.{k}: number out of range")
        out[k] = list(v) if isinstance(v, list) else v
    return out


HealthCheck = Callable[[Mapping[str, Any]], Any]


def validate_options(options: Any, *, health: HealthCheck | None = None) -> dict[str, Any]:
    """Strict write-time validation: unknown keys, wrong types, out-of-range and
    non-finite numbers are errors. Returns a canonical copy. `health`, when given, is
    called with the nested health table for its full validation (it raises ValueError)."""
    if not isinstance(options, Mapping):
        raise OptionError(f"options must be an object, got {type(options).__name__} {options!r}"[:200])
    out: dict[str, Any] = {}
    for key, value in options.items():
        if not isinstance(key, str):
            raise OptionError(f"option name {key!r} must be a string")
        if key == "health":
            out[key] = check_health_shape(value)
            if health is not None:
                health(out[key])
            continue
        spec = OPTION_SPECS.get(key)
        if spec is None:
            raise OptionError(f"unknown option {key!r} (known: {', '.join(KNOWN_OPTIONS)})"[:600])
        out[key] = check_option(key, value, spec)
    return out

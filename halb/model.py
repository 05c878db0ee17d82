"""Plain data of the replicated state, and its msgpack codec.

Everything that crosses the Raft log or lands in a snapshot is built from these
dataclasses and encoded as msgpack maps of primitive values: never pickled halb
objects, so a snapshot written by one version is readable (and auditable) by another.
"""
from __future__ import annotations

import dataclasses
import ipaddress
from dataclasses import dataclass, field
from typing import Any, Iterable

import msgpack

from halb.service_options import HealthCheck, OptionError, finite_number, validate_options

SERVICE_MODES = ("http", "tcp")
# socket family a mode binds: two services of one family cannot share a port (SO_REUSEPORT
# would let the kernel split one service's connections into the other)
MODE_FAMILY = {"http": "tcp", "tcp": "tcp"}
ALGORITHMS = ("round_robin", "least_conn", "p2c", "maglev", "peak_ewma")
# accepted on input and normalised to the canonical name (state written before the rename
# says "ewma"; Envoy and Finagle call it peak EWMA)
ALGORITHM_ALIASES = {"ewma": "peak_ewma"}
ADMIN_STATES = ("active", "drain", "maint")
HASH_KEY_HELP = "'source', 'header:NAME' or 'cookie:NAME'"


class ModelError(ValueError):
    """A value that cannot be part of the cluster state; the message says why."""


def parse_hostport(value: str, what: str = "address") -> tuple[str, int]:
    """Split and validate 'host:port' (IPv4 literal or host name, port 1-65535)."""
    if not isinstance(value, str) or ":" not in value:
        raise ModelError(f"{what} {value!r} must be HOST:PORT")
    host, _, port_s = value.rpartition(":")
    host = host.strip("[]")
    if not host:
        raise ModelError(f"{what} {value!r} has no host")
    if not host.isascii():
        raise ModelError(f"{what} {value!r} has an invalid host {host!r}")
    if not (port_s.isascii() and port_s.isdigit() and len(port_s) <= 5):
        raise ModelError(f"{what} {value!r} has a port that is not a number")
    port = int(port_s)
    if not 0 < port < 65536:
        raise ModelError(f"{what} {value!r} has port {port} outside 1-65535")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not all(part and (part.isalnum() or "-" in part) for part in host.split(".")):
            raise ModelError(f"{what} {value!r} has an invalid host {host!r}") from None
    return host, port


def check_name(value: Any, what: str) -> str:
    """Names appear in URLs, metrics labels and file names: keep them boring."""
    if not isinstance(value, str) or not value:
        raise ModelError(f"{what} must be a non-empty string")
    if len(value) > 64 or not all(c.isalnum() or c in "-_." for c in value):
        raise ModelError(f"{what} {value!r} may only contain letters, digits, '-', '_' and '.' (max 64)")
    return value


@dataclass
class Backend:
    name: str
    address: str  # host:port
    weight: int = 100
    admin_state: str = "active"
    server: str = ""  # failure domain; defaults to the host part of address
    zone: str = ""
    # declared capacity of this instance (0 = not declared); used by the N+1 resilience check
    max_rps: float = 0.0
    max_conns: int = 0

    def __post_init__(self) -> None:
        check_name(self.name, "backend name")
        host, _ = parse_hostport(self.address, "backend address")
        if not isinstance(self.weight, int) or isinstance(self.weight, bool) or not 0 <= self.weight <= 10000:
            raise ModelError(f"backend weight {self.weight!r} must be an integer 0-10000")
        if self.admin_state not in ADMIN_STATES:
            raise ModelError(f"admin state {self.admin_state!r} must be one of {', '.join(ADMIN_STATES)}")
        if not self.server:
            self.server = host
        if not isinstance(self.server, str) or len(self.server) > 128:
            raise ModelError(f"backend server {self.server!r} must be a string of at most 128 characters")
        if not isinstance(self.zone, str) or len(self.zone) > 128:
            raise ModelError(f"backend zone {self.zone!r} must be a string of at most 128 characters")
        if not finite_number(self.max_rps) or self.max_rps < 0 or self.max_rps > 1e12:
            raise ModelError(f"backend max_rps {self.max_rps!r} must be a finite number 0-1e12 (0: not declared)")
        self.max_rps = float(self.max_rps)
        if isinstance(self.max_conns, bool) or not isinstance(self.max_conns, int) or not 0 <= self.max_conns <= 1 << 40:
            raise ModelError(f"backend max_conns {self.max_conns!r} must be an integer >= 0 (0: not declared)")


@dataclass
class Service:
    name: str
    mode: str = "http"
    listen: str = ""  # host:port the data plane binds on every node
    algorithm: str = "round_robin"
    hash_key: str = "source"  # maglev key: "source", "header:NAME" or "cookie:NAME"
    backends: dict[str, Backend] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_name(self.name, "service name")
        if self.mode not in SERVICE_MODES:
            raise ModelError(f"service mode {self.mode!r} must be one of {', '.join(SERVICE_MODES)}")
        if not isinstance(self.listen, str):
            raise ModelError(f"service listen address {self.listen!r} must be a HOST:PORT string")
        if self.listen:
            parse_hostport(self.listen, "service listen address")
        self.algorithm = normalise_algorithm(self.algorithm)

    def validate(self, *, health: HealthCheck | None = None) -> "Service":
        """Strict checks a *write* must pass (service.add/update, seed, API, config).

        Kept out of __post_init__ on purpose: restoring a snapshot written by an older
        version must not fail on a value that version accepted; the data plane tolerates it.
        """
        check_hash_key(self.hash_key)
        try:
            self.options = validate_options(self.options, health=health)
        except OptionError as exc:
            raise ModelError(str(exc)) from None
        except ValueError as exc:  # the health hook's error (CheckConfigError)
            raise ModelError(f"option {exc}") from None
        if not isinstance(self.backends, dict):
            raise ModelError("backends must be an object keyed by backend name")
        addresses: dict[str, str] = {}
        for key, be in self.backends.items():
            if not isinstance(be, Backend) or key != be.name:
                raise ModelError(f"backend entry {key!r} does not match its name")
            if be.address in addresses:
                raise ModelError(f"address {be.address} is listed for both backend {addresses[be.address]!r} "
                                 f"and {be.name!r}")
            addresses[be.address] = be.name
        return self


def normalise_algorithm(value: Any) -> str:
    """Canonical algorithm name; aliases (`ewma`) are accepted and rewritten."""
    if not isinstance(value, str) or ALGORITHM_ALIASES.get(value, value) not in ALGORITHMS:
        raise ModelError(f"algorithm {value!r} must be one of {', '.join(ALGORITHMS)} "
                         f"(alias: {', '.join(f'{a} = {c}' for a, c in ALGORITHM_ALIASES.items())})")
    return ALGORITHM_ALIASES.get(value, value)


def check_hash_key(value: Any) -> str:
    """Maglev's key: the client address, a request header or a cookie."""
    if not isinstance(value, str):
        raise ModelError(f"hash_key {value!r} must be {HASH_KEY_HELP}")
    if value == "source":
        return value
    kind, _, name = value.partition(":")
    if kind not in ("header", "cookie") or not name or len(name) > 128 or not all(
            c.isascii() and (c.isalnum() or c in "-_.!#$%&'*+^`|~") for c in name):
        raise ModelError(f"hash_key {value!r} must be {HASH_KEY_HELP} (NAME: a header or cookie name)")
    return value


def listen_conflict(services: Iterable[Service], listen: str, mode: str, *, exclude: str | None = None) -> str | None:
    """Why binding `listen` for a `mode` service would clash with an existing one, or None.

    Every node binds its own `listen_host` with the *port* of a service's listen address
    (api/views.py services_view, routing_builder), so the host in `listen` does not separate two
    services: the same port in the same socket family clashes on every node, and with
    SO_REUSEPORT the kernel would silently split one service's connections into the other.
    `exclude` is the service being changed. One function so a later frontend (several
    hostnames on one port) has a single place to relax the rule.
    """
    if not listen:
        return None
    _, port = parse_hostport(listen, "service listen address")
    family = MODE_FAMILY.get(mode, mode)
    for other in services:
        if other.name == exclude or not other.listen:
            continue
        _, other_port = parse_hostport(other.listen, "service listen address")
        if other_port == port and MODE_FAMILY.get(other.mode, other.mode) == family:
            return (f"listen {listen} clashes with service {other.name!r} on {other.listen}: every node binds "
                    f"its own listen host with a service's port, so two services cannot both use {family.upper()} "
                    f"port {port}, whatever the host part of listen")
    return None


def check_json_value(value: Any, what: str, depth: int = 0) -> None:
    """Free-form data stored in the state (event data): JSON types, str keys, finite numbers."""
    if depth > 8:
        raise ModelError(f"{what} is nested too deeply")
    if value is None or isinstance(value, (str, bool)):
        return
    if isinstance(value, (int, float)):
        if not finite_number(value):
            raise ModelError(f"{what} holds a number that is not finite: {value!r}"[:200])
        return
    if isinstance(value, list):
        for v in value:
            check_json_value(v, what, depth + 1)
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise ModelError(f"{what} has a key that is not a string: {k!r}"[:200])
            check_json_value(v, what, depth + 1)
        return
    raise ModelError(f"{what} holds a {type(value).__name__}, not a JSON value")


@dataclass
class Member:
    id: str
    raft: str  # host:port of the Raft port
    api: str  # host:port of the admin API
    listen_host: str = ""  # host the node's data plane binds service listeners on ("" = as configured)


@dataclass
class Event:
    seq: int
    at: float  # wall-clock time the command was *submitted* (never read inside apply)
    by: str  # who asked (operator, node id, "config-seed")
    node: str  # node that submitted the command
    kind: str  # e.g. backend.added, member.removed
    message: str
    data: dict[str, Any] = field(default_factory=dict)


def to_primitive(obj: Any) -> Any:
    """Dataclass trees -> dicts/lists/primitives suitable for msgpack and JSON."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_primitive(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_primitive(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_primitive(v) for v in obj]
    return obj


def backend_from(d: dict[str, Any]) -> Backend:
    return Backend(**{k: d[k] for k in d if k in Backend.__dataclass_fields__})


def service_from(d: dict[str, Any]) -> Service:
    data = {k: d[k] for k in d if k in Service.__dataclass_fields__ and k != "backends"}
    svc = Service(**data)
    for b in d.get("backends", {}).values() if isinstance(d.get("backends"), dict) else d.get("backends", []):
        be = backend_from(b)
        svc.backends[be.name] = be
    return svc


def packb(obj: Any) -> bytes:
    return msgpack.packb(to_primitive(obj), use_bin_type=True)


def unpackb(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)

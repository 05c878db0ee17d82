"""Plain data of the replicated state, and its msgpack codec.

Everything that crosses the Raft log or lands in a snapshot is built from these
dataclasses and encoded as msgpack maps of primitive values: never pickled halb
objects, so a snapshot written by one version is readable (and auditable) by another.
"""
from __future__ import annotations

import dataclasses
import ipaddress
from dataclasses import dataclass, field
from typing import Any

import msgpack

SERVICE_MODES = ("http", "tcp")
ALGORITHMS = ("round_robin", "least_conn", "p2c", "maglev", "ewma")
ADMIN_STATES = ("active", "drain", "maint")


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
    try:
        port = int(port_s)
    except ValueError:
        raise ModelError(f"{what} {value!r} has a port that is not a number") from None
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
        if isinstance(self.max_rps, bool) or not isinstance(self.max_rps, (int, float)) or self.max_rps < 0:
            raise ModelError(f"backend max_rps {self.max_rps!r} must be a number >= 0 (0: not declared)")
        self.max_rps = float(self.max_rps)
        if isinstance(self.max_conns, bool) or not isinstance(self.max_conns, int) or self.max_conns < 0:
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
        if self.listen:
            parse_hostport(self.listen, "service listen address")
        if self.algorithm not in ALGORITHMS:
            raise ModelError(f"algorithm {self.algorithm!r} must be one of {', '.join(ALGORITHMS)}")


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

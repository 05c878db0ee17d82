"""Immutable routing state handed from the node to the data plane.

Frozen dataclasses of primitives only, so a snapshot can be shared between threads
without locks and sent to worker processes (to_wire/from_wire, msgpack) unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgpack


@dataclass(frozen=True)
class BackendRoute:
    name: str
    host: str
    port: int
    weight: int  # configured weight; 0 means "never pick"
    admin_state: str = "active"  # active | drain | maint
    healthy: bool = True  # the node's effective view: local checks AND cluster verdict
    server: str = ""  # failure domain (physical/virtual host)
    zone: str = ""
    max_conns: int = 0  # capacity the data plane enforces: requests/connections in flight; 0 none
    max_rps: float = 0.0  # new requests/connections per second; 0 none

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def eligible(self) -> bool:
        """May receive *new* requests/connections."""
        return self.admin_state == "active" and self.healthy and self.weight > 0


@dataclass(frozen=True)
class ServiceRoute:
    name: str
    mode: str  # http | tcp
    listen_host: str
    listen_port: int
    algorithm: str = "round_robin"
    hash_key: str = "source"
    backends: tuple[BackendRoute, ...] = ()
    # free-form per-service options (timeouts, retry budget, panic threshold, ...);
    # stored as a sorted tuple of pairs so the dataclass stays hashable/immutable
    options: tuple[tuple[str, Any], ...] = ()

    def option(self, key: str, default: Any = None) -> Any:
        for k, v in self.options:
            if k == key:
                return v
        return default


@dataclass(frozen=True)
class RoutingSnapshot:
    version: int = 0
    services: tuple[ServiceRoute, ...] = field(default_factory=tuple)
    # ACME HTTP-01 answers every HTTP listener gives: ((token, key_authorization), ...)
    acme_challenges: tuple[tuple[str, str], ...] = ()

    def service(self, name: str) -> ServiceRoute | None:
        for s in self.services:
            if s.name == name:
                return s
        return None

    def to_wire(self) -> bytes:
        return msgpack.packb(
            {
                "version": self.version,
                "services": [
                    {
                        "name": s.name, "mode": s.mode, "listen_host": s.listen_host,
                        "listen_port": s.listen_port, "algorithm": s.algorithm,
                        "hash_key": s.hash_key, "options": [list(kv) for kv in s.options],
                        "backends": [b.__dict__ for b in s.backends],
                    }
                    for s in self.services
                ],
                "acme_challenges": [list(kv) for kv in self.acme_challenges],
            },
            use_bin_type=True,
        )

    @classmethod
    def from_wire(cls, data: bytes) -> "RoutingSnapshot":
        d = msgpack.unpackb(data, raw=False)
        return cls(
            version=d["version"],
            services=tuple(
                ServiceRoute(
                    name=s["name"], mode=s["mode"], listen_host=s["listen_host"],
                    listen_port=s["listen_port"], algorithm=s["algorithm"], hash_key=s["hash_key"],
                    options=tuple(tuple(kv) for kv in s["options"]),
                    backends=tuple(BackendRoute(**b) for b in s["backends"]),
                )
                for s in d["services"]
            ),
            acme_challenges=tuple((str(t), str(k)) for t, k in d.get("acme_challenges", ())),
        )

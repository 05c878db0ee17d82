"""Replicated state + this node's health view -> an immutable RoutingSnapshot.

This is where the two health views meet: a backend is routable from this node only when
the cluster verdict says UP (not DOWN, not held by flap damping) *and* this node's own
checks see it up (local fast path: a node never waits for the cluster to stop sending to
a backend it cannot reach). Passive outlier ejection is applied later, inside the data
plane, per request.
"""
from __future__ import annotations

import functools
from typing import Callable

from halb.control.state import ClusterState
from halb.dataplane.snapshot import BackendRoute, RoutingSnapshot, ServiceRoute
from halb.model import Service, parse_hostport


def build_snapshot(cs: ClusterState, version: int, listen_host: str,
                   local_up: Callable[[str, str], bool], dial: dict[str, str] | None = None) -> RoutingSnapshot:
    """Every service at once (the reference the incremental RoutingCache must equal)."""
    services = []
    for svc in sorted(cs.services.values(), key=lambda s: s.name):
        route = build_service(cs, svc, listen_host, local_up, dial)
        if route is not None:
            services.append(route)
    return RoutingSnapshot(version=version, services=tuple(services))


def build_service(cs: ClusterState, svc: Service, listen_host: str, local_up: Callable[[str, str], bool],
                  dial: dict[str, str] | None = None) -> ServiceRoute | None:
    """One service's route, or None when it has no listen address. Raises on a service the
    data plane could not run (wrong types that got into the state), so the caller can skip
    just that one."""
    if not svc.listen:
        return None
    host, port = _split(svc.listen)  # memoised: this runs for every write to the service
    if not isinstance(svc.options, dict):
        raise TypeError(f"options must be a map, not {type(svc.options).__name__}")
    if not isinstance(svc.hash_key, str):
        raise TypeError(f"hash_key must be a string, not {type(svc.hash_key).__name__}")
    backends = []
    for be in sorted(svc.backends.values(), key=lambda b: b.name):
        bhost, bport = _split((dial or {}).get(be.address, be.address))
        verdict = cs.verdicts.get(f"{svc.name}/{be.name}", {}).get("verdict", "up")
        backends.append(BackendRoute(
            name=be.name, host=bhost, port=bport, weight=be.weight, admin_state=be.admin_state,
            healthy=verdict == "up" and local_up(svc.name, be.name), server=be.server, zone=be.zone,
            max_conns=int(be.max_conns or 0), max_rps=float(be.max_rps or 0.0),
        ))
    options = tuple(sorted((k, v) for k, v in svc.options.items() if k != "health" and not isinstance(v, dict)))
    return ServiceRoute(
        name=svc.name, mode=svc.mode, listen_host=listen_host or host, listen_port=port,
        algorithm=svc.algorithm, hash_key=svc.hash_key, backends=tuple(backends), options=options,
    )


@functools.lru_cache(maxsize=65536)
def _split(address: str) -> tuple[str, int]:
    """parse_hostport, memoised: a rebuild of one service re-parses all its addresses."""
    return parse_hostport(address)

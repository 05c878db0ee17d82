"""Would a service survive losing one server (or one zone)? Pure computation, no I/O.

Several instances of a service on one server give no protection against that server's
crash: what counts is how many *independent failure domains* the healthy instances span.
This module turns a list of instances (server, zone, health, declared capacity, current
load) into a report with plain-language warnings. The node feeds it replicated state plus
measured load (`halb/node.py`), and the API, the CLI (`halb service status`) and
`/metrics` show the result; the computation lives here so it can be unit tested without a
cluster.

Definitions (docs/resilience.md):

* an instance is *healthy* when its cluster verdict is UP (or still pending: routed as UP),
  its admin state is active and its weight is > 0 (drained or maintenance instances take
  no new load, so they protect nothing);
* `survives_server_loss`: the healthy instances span at least two servers;
* `survives_zone_loss`: they span at least two zones (None when any healthy instance has
  no zone: unknown);
* `n_plus_one`: for every server S, the healthy instances on the *other* servers have
  enough declared capacity (`max_rps`, `max_conns`) for the current load. None when no
  capacity is declared (or not for every healthy instance): unknown, not assumed.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Iterable


@dataclass(frozen=True)
class Instance:
    """One backend of a service as the resilience check sees it."""

    name: str
    server: str
    zone: str = ""
    healthy: bool = True
    max_rps: float = 0.0  # 0: not declared
    max_conns: int = 0  # 0: not declared
    rps: float = 0.0  # current request rate (what the load source measured)
    conns: int = 0  # current in-flight requests / open connections
    # why a not-healthy instance takes no traffic when it is not its health: "drained",
    # "in maintenance", "weight 0" ("" = its health verdict); warnings must not call an
    # operator's drain "down"
    out_of_rotation: str = ""


@dataclass
class CapacityCheck:
    """N+1 for one capacity dimension (requests per second or concurrent connections)."""

    dimension: str  # "rps" | "conns"
    load: float  # current load of the service
    capacity: float  # declared capacity of all healthy instances
    ok: bool  # the remaining servers carry the load whichever single server dies
    worst_server: str  # the server whose loss leaves the least capacity
    remaining: float  # capacity left after losing worst_server


@dataclass
class ResilienceReport:
    service: str
    instances: int
    healthy_instances: int
    servers: list[str]  # every server the service has instances on
    servers_healthy: list[str]  # servers with at least one healthy instance
    servers_down: list[str]  # servers none of whose instances is healthy
    instances_per_server: dict[str, int]  # healthy instances per server
    zones_healthy: list[str] | None  # None: zones not declared for every healthy instance
    survives_server_loss: bool
    survives_zone_loss: bool | None
    n_plus_one: bool | None  # None: capacity unknown
    capacity: list[CapacityCheck] = field(default_factory=list)
    status: str = "ok"  # ok | at_risk | down
    warnings: list[str] = field(default_factory=list)
    load: dict[str, Any] = field(default_factory=dict)  # where the load numbers came from
    rps: float = 0.0  # current request rate of the service (all instances, all load sources)
    conns: int = 0  # current in-flight requests / connections of the service

    @property
    def survives_another_server_loss(self) -> bool:
        """Topology and (when known) capacity both survive one more server crash."""
        return self.survives_server_loss and self.n_plus_one is not False

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["survives_another_server_loss"] = self.survives_another_server_loss
        return d


def _names(items: Iterable[str]) -> str:
    items = list(items)
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def _fmt(value: float) -> str:
    return f"{value:.0f}" if value >= 10 else f"{value:.1f}"


def _capacity(dimension: str, healthy: list[Instance]) -> CapacityCheck | None:
    """N+1 in one dimension, or None when not every healthy instance declares it."""
    cap_of = (lambda i: i.max_rps) if dimension == "rps" else (lambda i: float(i.max_conns))
    load_of = (lambda i: i.rps) if dimension == "rps" else (lambda i: float(i.conns))
    if not healthy or any(cap_of(i) <= 0 for i in healthy):
        return None
    per_server: dict[str, float] = {}
    load_per_server: dict[str, float] = {}
    for i in healthy:
        per_server[i.server] = per_server.get(i.server, 0.0) + cap_of(i)
        load_per_server[i.server] = load_per_server.get(i.server, 0.0) + load_of(i)
    total = sum(per_server.values())
    load = sum(load_of(i) for i in healthy)
    # worst case: the server whose loss leaves the least capacity; ties -> the busiest one
    worst = max(sorted(per_server), key=lambda s: (per_server[s], load_per_server[s]))
    remaining = total - per_server[worst]
    return CapacityCheck(dimension=dimension, load=round(load, 3), capacity=round(total, 3),
                         ok=load <= remaining, worst_server=worst, remaining=round(remaining, 3))


def assess(service: str, instances: Iterable[Instance], load_source: dict[str, Any] | None = None) -> ResilienceReport:
    """The report for one service; `load_source` is copied into the report as is."""
    insts = sorted(instances, key=lambda i: (i.server, i.name))
    healthy = [i for i in insts if i.healthy]
    servers = sorted({i.server for i in insts})
    per_server: dict[str, int] = {}
    for i in healthy:
        per_server[i.server] = per_server.get(i.server, 0) + 1
    servers_healthy = sorted(per_server)
    servers_down = [s for s in servers if s not in per_server]
    zones: list[str] | None = None
    if healthy and all(i.zone for i in healthy):
        zones = sorted({i.zone for i in healthy})
    checks = [c for c in (_capacity("rps", healthy), _capacity("conns", healthy)) if c is not None]
    n_plus_one = None if not checks else all(c.ok for c in checks)
    report = ResilienceReport(
        service=service, instances=len(insts), healthy_instances=len(healthy), servers=servers,
        servers_healthy=servers_healthy, servers_down=servers_down, instances_per_server=per_server,
        zones_healthy=zones, survives_server_loss=len(servers_healthy) >= 2,
        survives_zone_loss=None if zones is None else len(zones) >= 2, n_plus_one=n_plus_one, capacity=checks,
        load=dict(load_source or {}), rps=round(sum(i.rps for i in insts), 2),
        conns=sum(i.conns for i in insts),
    )
    report.warnings = _warnings(report, insts)
    if not healthy:
        report.status = "down"
    elif not report.survives_another_server_loss or report.survives_zone_loss is False:
        report.status = "at_risk"
    return report


def _warnings(r: ResilienceReport, insts: list[Instance]) -> list[str]:
    svc = r.service
    out: list[str] = []
    if not insts:
        return [f"{svc} has no instances"]
    if r.servers_down:
        for s in r.servers_down:
            on = [i for i in insts if i.server == s]
            n = len(on)
            parked = [i for i in on if i.out_of_rotation]
            if len(parked) == n:
                why = ", ".join(f"{i.name} {i.out_of_rotation}" for i in parked)
                out.append(f"server {s} takes no new requests ({why})")
            elif parked:
                why = ", ".join(f"{i.name} {i.out_of_rotation or 'not healthy'}" for i in on)
                out.append(f"server {s} is down or out of rotation ({why})")
            else:
                out.append(f"server {s} is down ({n} instance{'s' if n != 1 else ''} of {svc} not healthy)")
    if not r.healthy_instances:
        out.append(f"{svc} has no healthy instance: it is down")
        return out
    if len(r.servers_healthy) == 1:
        (server,) = r.servers_healthy
        n = r.instances_per_server[server]
        what = (f"all {n} healthy instances of {svc} run on server {server}" if n > 1
                else f"the only healthy instance of {svc} runs on server {server}")
        lead = f"{svc} does not survive another server loss: " if r.servers_down else ""
        out.append(f"{lead}{what}: one crash takes {svc} down")
    if r.zones_healthy is not None and len(r.zones_healthy) == 1 and r.survives_server_loss:
        out.append(f"all healthy instances of {svc} are in zone {r.zones_healthy[0]}: "
                   f"one zone outage takes {svc} down")
    for c in r.capacity:
        if c.ok:
            continue
        others = [s for s in r.servers_healthy if s != c.worst_server]
        unit = "rps" if c.dimension == "rps" else "connections"
        where = f"server{'s' if len(others) != 1 else ''} {_names(others)}" if others else "no server"
        out.append(f"{svc} does not survive another server loss (capacity): if server {c.worst_server} dies, "
                   f"{where} can carry {_fmt(c.remaining)} {unit} but {svc} takes {_fmt(c.load)} {unit} now")
    if r.survives_server_loss:
        crowded = [s for s, n in r.instances_per_server.items() if n > 1]
        for s in crowded:
            out.append(f"server {s} runs {r.instances_per_server[s]} of the {r.healthy_instances} healthy "
                       f"instances of {svc}: they fail together")
    return out


def instances_from_rows(rows: Iterable[dict[str, Any]], load: dict[str, dict[str, float]] | None = None) -> list[Instance]:
    """Backend rows (the API's backend view) -> instances; `load` maps name -> {rps, conns}."""
    out = []
    for r in rows:
        ld = (load or {}).get(r["name"], {})
        admin, weight = r.get("admin_state", "active"), int(r.get("weight", 1))
        parked = {"drain": "drained", "maint": "in maintenance"}.get(admin, "") or ("weight 0" if weight <= 0 else "")
        out.append(Instance(
            out_of_rotation=parked, name=r["name"], server=r.get("server") or r["address"].rsplit(":", 1)[0], zone=r.get("zone") or "",
            # "pending" (no majority has reported a check yet) is routed like UP, so it
            # carries load like UP (halb/health/view.py)
            healthy=r.get("verdict", "up") in ("up", "pending") and r.get("admin_state", "active") == "active"
            and int(r.get("weight", 1)) > 0,
            max_rps=float(r.get("max_rps") or 0.0), max_conns=int(r.get("max_conns") or 0),
            rps=float(ld.get("rps", 0.0)), conns=int(ld.get("conns", 0)),
        ))
    return out

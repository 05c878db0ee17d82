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
* `server_loss` (per server): the same question asked of the service's *demand*
  (arrivals, queued and shed ones included) and of the services of lower priority sharing
  its servers: `survives`, `degraded (sheds low priority)` or `overloaded`
  (:func:`server_losses`).
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
    conns_avg: float = -1.0  # in flight averaged over the load window (-1: not measured, use conns)
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
    # per server: can the others carry this service's load if it fails (capacity_on_loss)
    server_loss: list[dict[str, Any]] = field(default_factory=list)
    server_loss_verdict: str = ""  # the worst of server_loss: survives | degraded | overloaded ("" = not computed)

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


def assess(service: str, instances: Iterable[Instance], load_source: dict[str, Any] | None = None,
           losses: list["ServerLoss"] | None = None) -> ResilienceReport:
    """The report for one service; `load_source` is copied into the report as is;
    `losses` (from :func:`server_losses`) adds the per-server capacity answer."""
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
    if losses is not None:
        report.server_loss = [x.to_dict() for x in losses]
        report.server_loss_verdict = worst_verdict(losses)
        for x in losses:
            if x.verdict != "survives" and x.capacity_known:
                report.warnings.append(f"if server {x.server} fails: {x.answer}: {x.detail}")
    if not healthy:
        report.status = "down"
    elif (not report.survives_another_server_loss or report.survives_zone_loss is False
          or report.server_loss_verdict == "overloaded"):
        report.status = "at_risk"
    return report


# --- capacity on the loss of one server (issue 14) -----------------------------------

LOSS_VERDICTS = ("survives", "degraded", "overloaded")  # best first
LOSS_ANSWERS = {"survives": "survives", "degraded": "degraded (sheds low priority)", "overloaded": "overloaded"}
PRIORITY_RANK = {"critical": 0, "normal": 1, "low": 2}  # halb/service_options.py PRIORITIES, best first


@dataclass(frozen=True)
class ServiceDemand:
    """One service as the loss check sees it: its instances and what it is asked for.

    ``demand_rps`` counts the requests *arriving* at the service (queued and shed ones
    too), not those that reached a backend: under limits the served rate is capped by the
    limits themselves and would hide the overload the check must see.
    """

    service: str
    priority: str
    instances: tuple[Instance, ...]
    demand_rps: float = 0.0


@dataclass
class Need:
    """One service in one dimension, if a server fails: what it needs from the others."""

    service: str
    priority: str
    dimension: str  # rps | conns
    need: float
    capacity: float  # the healthy instances' declared capacity on the other servers

    @property
    def fits(self) -> bool:
        return self.need <= self.capacity


@dataclass
class ServerLoss:
    """The answer for one server of a service: if it fails, do the others cope?"""

    server: str
    verdict: str  # survives | degraded | overloaded
    capacity_known: bool  # False: nothing declared, the verdict is the topology's alone
    carry: list[Need] = field(default_factory=list)  # this service, per known dimension
    sheds: list[Need] = field(default_factory=list)  # lower-priority services that would not fit
    detail: str = ""

    @property
    def answer(self) -> str:
        return LOSS_ANSWERS[self.verdict]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["answer"] = self.answer
        for n in d["carry"] + d["sheds"]:
            n["need"], n["capacity"] = round(n["need"], 2), round(n["capacity"], 2)
        return d


def worst_verdict(losses: Iterable[ServerLoss]) -> str:
    verdicts = [x.verdict for x in losses]
    return max(verdicts, key=LOSS_VERDICTS.index) if verdicts else "survives"


def _needs(sd: ServiceDemand, lost: str) -> list[Need] | None:
    """The service's needs on the servers other than `lost`, per dimension whose capacity
    every healthy instance there declares; None when no healthy instance is left.

    rps: the arrival rate (or the served rate, if higher: retries). conns: the in-flight
    requests averaged over the load window, scaled up by arrivals / served when requests
    are queued or shed (Little's law: at the same latency, more requests need
    proportionally more slots)."""
    healthy = [i for i in sd.instances if i.healthy]
    others = [i for i in healthy if i.server != lost]
    if not others:
        return None
    served = sum(i.rps for i in healthy)
    demand = max(sd.demand_rps, served)
    scale = demand / served if served > 0 else 1.0
    out = []
    if all(i.max_rps > 0 for i in others):
        out.append(Need(sd.service, sd.priority, "rps", demand, sum(i.max_rps for i in others)))
    if all(i.max_conns > 0 for i in others):
        conns = sum(i.conns_avg if i.conns_avg >= 0 else float(i.conns) for i in healthy)
        out.append(Need(sd.service, sd.priority, "conns", conns * scale, float(sum(i.max_conns for i in others))))
    return out


def server_losses(target: ServiceDemand, neighbours: Iterable[ServiceDemand] = ()) -> list[ServerLoss]:
    """For every server the target service has a healthy instance on: if it fails, can the
    others carry the target's load within their declared capacity, and which services of
    lower priority on the same servers would not fit (they are shed first)?

    * ``overloaded``: the target itself does not fit (or no healthy instance is left);
    * ``degraded``: it fits, but a lower-priority service sharing its servers does not
      and would be shed (queued, then 503 + Retry-After);
    * ``survives``: everything fits. With no capacity declared the answer is the
      topology's (``capacity_known`` False).
    """
    rank = PRIORITY_RANK.get(target.priority, 1)
    servers = sorted({i.server for i in target.instances if i.healthy})
    mine = {i.server for i in target.instances}
    lower = [n for n in neighbours if n.service != target.service and PRIORITY_RANK.get(n.priority, 1) > rank
             and mine & {i.server for i in n.instances}]
    out = []
    for server in servers:
        needs = _needs(target, server)
        if needs is None:
            out.append(ServerLoss(server, "overloaded", False,
                                  detail=f"no other server has a healthy instance of {target.service}"))
            continue
        short = [n for n in needs if not n.fits]
        sheds = []
        for nb in lower:
            nb_needs = _needs(nb, server) or []
            sheds += [n for n in nb_needs if not n.fits]
        known = bool(needs)
        carried = "; ".join(f"{_fmt(n.need)} {_unit(n.dimension)} on capacity {_fmt(n.capacity)}" for n in needs)
        if short:
            verdict = "overloaded"
            detail = f"the other servers would need to carry {carried}"
        elif sheds:
            verdict = "degraded"
            detail = (f"{target.service} fits ({carried}); would be shed: "
                      + "; ".join(f"{n.service} ({n.priority}) needs {_fmt(n.need)} {_unit(n.dimension)}, "
                                  f"capacity {_fmt(n.capacity)}" for n in sheds))
        else:
            verdict = "survives"
            detail = f"the others carry {carried}" if known else "capacity not declared: topology only"
        out.append(ServerLoss(server, verdict, known, needs, sheds, detail))
    return out


def _unit(dimension: str) -> str:
    return "rps" if dimension == "rps" else "in flight"


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
            # declared capacity first; else what adaptive concurrency learned (the answering node's)
            max_rps=float(r.get("max_rps") or 0.0), max_conns=int(r.get("max_conns") or r.get("learned_conns") or 0),
            rps=float(ld.get("rps", 0.0)), conns=int(ld.get("conns", 0)),
            conns_avg=float(ld.get("conns_avg", -1.0)),
        ))
    return out

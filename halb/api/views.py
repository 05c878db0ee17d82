"""Read-only views the admin API serves (`/v1/status`, members, services, backends,
resilience, events), built from this node's copy of the replicated state and its local
parts. Moved out of halb/node.py so the node only wires parts together; the JSON is
unchanged. Everything a view reads is a field here: the node sets the parts it starts
later (data plane, health, announcement, load meter) as it starts them, and a view
answers without them (None) while the node is still starting.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any

from halb.local_issues import LocalIssues
from halb.model import parse_hostport, to_primitive

log = logging.getLogger("halb.node")  # the logger these views always logged to


@dataclass
class ClusterViews:
    """The views of one node. `raft` is its halb.control.raft.ReplicatedState."""

    node_id: str
    raft: Any
    issues: LocalIssues
    shared_hosts: list[str]
    started_at: float
    dataplane: Any = None  # halb.dataplane.engine.DataPlane
    health: Any = None  # halb.health.manager.HealthManager
    announcer: Any = None  # halb.announce.manager.Announcement (None: announce mode none)
    dp_guard: Any = None  # halb.dataplane_guard.DataPlaneGuard (data-plane self-check)
    load_meter: Any = None  # halb.load_meter.LoadMeter

    def leader_id(self) -> str | None:
        leader = self.raft.raft_status().leader
        if leader is None:
            return None
        with self.raft.read() as cs:
            for m in cs.members.values():
                if m.raft == leader:
                    return m.id
        return leader

    def raft_members(self) -> set[str]:
        """Raft addresses in this node's current Raft configuration (self included)."""
        st = self.raft.raft_status()
        return {st.self_addr, *st.partners}

    def members_view(self) -> list[dict[str, Any]]:
        st = self.raft.raft_status()
        leader = st.leader
        with self.raft.read() as cs:
            members = [to_primitive(m) for m in cs.members.values()]
        known = {m["raft"] for m in members}
        for addr in sorted(self.raft_members() - known):
            members.append({"id": None, "raft": addr, "api": None, "listen_host": ""})
        for m in members:
            m["self"] = m["raft"] == st.self_addr
            m["leader"] = m["raft"] == leader
            m["in_raft_config"] = m["raft"] in self.raft_members()
            m["connected"] = True if m["self"] else st.partners.get(m["raft"])
            if m["self"]:
                m["raft_state"] = st.state
        return sorted(members, key=lambda m: (m["id"] is None, m["id"] or m["raft"]))

    def services_view(self) -> list[dict[str, Any]]:
        with self.raft.read() as cs:
            services = [to_primitive(s) for s in cs.services.values()]
            hosts = [m.listen_host for m in cs.members.values()]
        out = []
        for svc in services:
            host, port = parse_hostport(svc["listen"]) if svc["listen"] else ("", 0)
            listen = sorted({f"{h or host}:{port}" for h in hosts}) if port else []
            svc["listen_nodes"] = listen or ([svc["listen"]] if svc["listen"] else [])
            svc["backends"] = list(svc["backends"].values())
            out.append(svc)
        return sorted(out, key=lambda s: s["name"])

    def backends_view(self, service: str | None) -> list[dict[str, Any]]:
        from halb.health import view as health_view  # "pending" until checked: see there

        rows = []
        with self.raft.read() as cs:
            observations = {k: dict(v) for k, v in cs.observations.items()}
            verdicts = {k: dict(v) for k, v in cs.verdicts.items()}
            voters = cs.voters()
        stats = self.dataplane.stats()["services"] if self.dataplane is not None else {}
        for svc in self.services_view():
            if service is not None and svc["name"] != service:
                continue
            svc_stats = stats.get(svc["name"], {}).get("backends", {})
            for be in svc["backends"]:
                key = f"{svc['name']}/{be['name']}"
                obs = observations.get(key, {})
                v = verdicts.get(key, {})
                local = self.health.local_state(svc["name"], be["name"]) if self.health else None
                bstats = svc_stats.get(be["name"], {})
                rows.append({
                    "service": svc["name"], **be,
                    "verdict": health_view.verdict_of(v, obs, voters),
                    "verdict_since": v.get("since"),
                    "hold_until": v.get("hold_until") if v.get("verdict") == "held" else None,
                    "observations": health_view.observation_states(obs, voters),
                    "observed_at": {m: obs[m]["at"] for m in obs},
                    "observation_detail": {m: obs[m]["detail"] for m in obs if obs[m].get("detail")},
                    "local": health_view.local_view(local),
                    "in_flight": bstats.get("in_flight", 0),
                    "stats": {k: bstats.get(k, 0) for k in ("requests", "errors", "retries", "ejections")},
                    "requests": bstats.get("requests", 0),
                    "ejected": bstats.get("ejected", False),
                    # adaptive concurrency: the limit this node learned (the report's "learned" capacity)
                    **({"learned_conns": bstats["adaptive_limit"]} if bstats.get("adaptive_limit") else {}),
                })
        return rows

    def resilience_view(self, service: str | None = None) -> list[dict[str, Any]]:
        """Per service: servers/zones its healthy instances span, server/zone loss, N+1
        (halb/resilience.py), with the load summed over the members that answered."""
        from halb.resilience import ServiceDemand, assess, instances_from_rows, server_losses

        meter = self.load_meter
        cluster = meter.cluster() if meter is not None else {"load": {}, "nodes": [], "unreachable": []}
        source = {"scope": "cluster", "nodes": cluster.get("nodes", []), "unreachable": cluster.get("unreachable", []),
                  "window_s": cluster.get("window_s"), "age_s": round(max(0.0, time.time() - cluster.get("at", time.time())), 1)}
        rows_by_service: dict[str, list[dict[str, Any]]] = {}
        views = self.services_view()
        names = [s["name"] for s in views]
        priority = {s["name"]: (s.get("options") or {}).get("priority", "normal") for s in views}
        for row in self.backends_view(None):  # every service: neighbours on the same servers count
            rows_by_service.setdefault(row["service"], []).append(row)
        demand = cluster.get("demand", {})
        demands = {n: ServiceDemand(n, priority[n], tuple(instances_from_rows(rows_by_service.get(n, []),
                                                                              cluster["load"].get(n, {}))),
                                    float(demand.get(n, 0.0))) for n in names}
        out = []
        for name in names:
            if service is not None and name != service:
                continue
            d = demands[name]
            losses = server_losses(d, [v for k, v in demands.items() if k != name])
            report = assess(name, list(d.instances), source, losses)
            out.append(report.to_dict())
        return out

    def events_view(self, since: int, limit: int) -> list[dict[str, Any]]:
        with self.raft.read() as cs:
            events = [to_primitive(e) for e in cs.events if e.seq > since]
        return events[:limit]

    def status_view(self) -> dict[str, Any]:
        from halb.cluster_health import assess, visible_leader

        st = self.raft.raft_status()
        with self.raft.read() as cs:
            seeded, last_event = cs.seeded, cs.event_seq
        members = self.members_view()
        leader_raft = visible_leader(st.leader, st.self_addr, st.partners)
        for m in members:  # the same rule for the per-member flag
            m["leader"] = m["raft"] == leader_raft
        health = assess(members, st.has_quorum)
        dp = self.dp_guard.view() if self.dp_guard is not None else None
        if self.dp_guard is not None:  # each member's data-plane self-check: ours now, peers' last poll
            for m in members:
                p = dp if m["id"] == self.node_id else self.dp_guard.peer(m["id"])
                m["dataplane_ok"], m["dataplane_reason"] = p.get("ok"), p.get("reason")
        if hasattr(self.announcer, "announcements"):  # bgp: each member's, peers' from their last /v1/load
            meter = self.load_meter
            for m in members:
                m["announcements"] = (self.announcer.announcements() if m["id"] == self.node_id
                                      else (meter.peer_announcements.get(m["id"]) if meter is not None else None))
        return {
            "node": self.node_id,
            "leader": self.leader_id() if leader_raft else None,
            "leader_raft": leader_raft,
            "raft_state": st.state,
            "term": st.term,
            "has_quorum": st.has_quorum,
            "health": health.pop("health"),
            "health_detail": health,
            "commit_index": st.commit_index,
            "last_applied": st.last_applied,
            "members": members,
            "services": self._status_services(),
            # this node's frontends that cannot bind and certificates it cannot load (frontend_sync.py)
            "local_warnings": [f"{i.area} on {self.node_id}: {i.message}"
                               for (area, _), i in sorted(self.issues.current.items()) if area in ("frontend", "cert")],
            "seeded": seeded,
            "last_event": last_event,
            "uptime_s": round(time.time() - self.started_at, 1),
            "pid": os.getpid(),
            "dataplane_ok": dp["ok"] if dp else None,
            "dataplane_reason": dp["reason"] if dp else None,
            "dataplane": dp,
            "announce": self.announcer.status() if self.announcer is not None else {"mode": "none"},
        }

    def _status_services(self) -> list[dict[str, Any]]:
        """Services for the status view; at-risk ones (resilience) first, with their warnings.
        `address` is the one service address that survives any one balancer (the shared host)."""
        from halb.cluster_health import shared_addresses

        try:
            reports = {r["service"]: r for r in self.resilience_view()}
        except Exception:  # the status view must answer even if the report cannot be built
            log.exception("resilience report")
            reports = {}
        out = []
        for s in self.services_view():
            r = reports.get(s["name"], {})
            shared = shared_addresses(s["listen"], self.shared_hosts)
            local = [f"{i.area} on {self.node_id}: {i.message} (since {time.strftime('%H:%M:%S', time.localtime(i.since))})"
                     for i in self.issues.for_service(s["name"])]
            out.append({"name": s["name"], "mode": s["mode"], "listen": s["listen_nodes"],
                        "address": shared[0] if shared else None, "shared_addresses": shared,
                        "algorithm": s["algorithm"], "backends": len(s["backends"]),
                        "resilience": r.get("status", "unknown"), "servers_healthy": len(r.get("servers_healthy", [])),
                        "routing": "error" if local else "ok",
                        "warnings": local + r.get("warnings", [])})
        rank = {"down": 0, "at_risk": 1}
        return sorted(out, key=lambda s: (s["routing"] == "ok", rank.get(s["resilience"], 2), s["name"]))

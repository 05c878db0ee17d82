"""Prometheus metrics for one node, read at scrape time from the node's live state.

A collector (rather than counters updated on the hot path) keeps the data plane free of
metrics bookkeeping: the proxy already counts requests per backend, and a scrape just
reads those counters. Only check latency is observed as it happens (a histogram).
"""
from __future__ import annotations

from bisect import bisect_left
from typing import Any, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric,
                                    SummaryMetricFamily)
from prometheus_client.utils import floatToGoString

RAFT_STATE_VALUES = {"follower": 0, "candidate": 1, "leader": 2}
VERDICT_VALUES = {"down": 0, "up": 1, "held": 2, "pending": 3}  # pending: no majority reported yet (routed)


class NodeCollector:
    def __init__(self, node: Any) -> None:
        self.node = node

    def collect(self) -> Iterator[Metric]:
        node = self.node
        st = node.raft.raft_status()
        labels = ["node"]
        raft_state = GaugeMetricFamily("halb_raft_state", "Raft state: 0 follower, 1 candidate, 2 leader", labels=labels)
        raft_state.add_metric([node.node_id], RAFT_STATE_VALUES.get(st.state, -1))
        yield raft_state
        g = GaugeMetricFamily("halb_raft_term", "Current Raft term", labels=labels)
        g.add_metric([node.node_id], st.term)
        yield g
        g = GaugeMetricFamily("halb_raft_has_quorum", "1 when this node sees a quorum", labels=labels)
        g.add_metric([node.node_id], 1 if st.has_quorum else 0)
        yield g
        g = GaugeMetricFamily("halb_raft_commit_index", "Raft commit index", labels=labels)
        g.add_metric([node.node_id], st.commit_index)
        yield g

        bl = ["node", "service", "backend", "server"]
        up = GaugeMetricFamily("halb_backend_up", "1 when the backend is routable from this node", labels=bl)
        verdict = GaugeMetricFamily("halb_backend_verdict", "Cluster verdict: 0 down, 1 up, 2 held (flap damping), 3 pending",
                                    labels=bl)
        local = GaugeMetricFamily("halb_backend_local_up", "1 when this node's own checks see the backend up",
                                  labels=bl)
        in_flight = GaugeMetricFamily("halb_backend_in_flight", "Requests/connections in flight", labels=bl)
        ejected = GaugeMetricFamily("halb_backend_ejected", "1 while passively ejected on this node", labels=bl)
        requests = CounterMetricFamily("halb_backend_requests", "Requests sent to the backend", labels=bl)
        errors = CounterMetricFamily("halb_backend_errors", "Failed attempts to the backend", labels=bl)
        retries = CounterMetricFamily("halb_backend_retries", "Retries that went to the backend", labels=bl)
        ejections = CounterMetricFamily("halb_backend_ejections", "Passive outlier ejections", labels=bl)
        for row in node.views.backends_view(None):
            lv = [node.node_id, row["service"], row["name"], row.get("server") or ""]
            stats = row.get("stats") or {}
            local_up = row["local"]["up"] if row.get("local") else True
            routed = row["verdict"] in ("up", "pending")  # pending is routed like up (halb/health/view.py)
            up.add_metric(lv, 1 if routed and local_up and row["admin_state"] != "maint" else 0)
            verdict.add_metric(lv, VERDICT_VALUES.get(row["verdict"], -1))
            local.add_metric(lv, 1 if local_up else 0)
            in_flight.add_metric(lv, row.get("in_flight", 0))
            ejected.add_metric(lv, 1 if row.get("ejected") else 0)
            requests.add_metric(lv, stats.get("requests", 0))
            errors.add_metric(lv, stats.get("errors", 0))
            retries.add_metric(lv, stats.get("retries", 0))
            ejections.add_metric(lv, stats.get("ejections", 0))
        yield from (up, verdict, local, in_flight, ejected, requests, errors, retries, ejections)
        yield from self.capacity()
        yield from self.resilience()

    def capacity(self) -> Iterator[Metric]:
        """Per service: the admission queue (halb/dataplane/admission.py) and backends held
        back by their capacity limits; this node's data plane, summed over its processes."""
        node = self.node
        if getattr(node, "dataplane", None) is None:
            return
        sl = ["node", "service"]
        length = GaugeMetricFamily("halb_service_queue_length", "Requests waiting for a backend below its limit",
                                   labels=sl)
        by_prio = GaugeMetricFamily("halb_service_queue_waiting", "Waiting requests per priority",
                                    labels=sl + ["priority"])
        wait = SummaryMetricFamily("halb_service_queue_wait_seconds",
                                   "Time queued requests waited before a backend took them", labels=sl)
        wait_max = GaugeMetricFamily("halb_service_queue_wait_max_seconds", "Longest wait of an admitted request",
                                     labels=sl)
        refused = CounterMetricFamily("halb_service_queue_refused", "Requests answered 503 by the queue, by reason",
                                      labels=sl + ["reason"])
        saturated = CounterMetricFamily("halb_service_saturated",
                                        "Picks that found every candidate backend at its capacity limit", labels=sl)
        ws_open = GaugeMetricFamily("halb_service_websockets_open", "Upgraded (WebSocket) connections open", labels=sl)
        ws_total = CounterMetricFamily("halb_service_websockets_switched", "Upgraded (WebSocket) connections switched",
                                       labels=sl)
        bl = ["node", "service", "backend"]
        limit = GaugeMetricFamily("halb_backend_limit_conns", "This node's enforced max_conns share", labels=bl)
        at_limit = CounterMetricFamily("halb_backend_at_limit", "Picks that passed the backend over (at a limit)",
                                       labels=bl)
        stats = node.dataplane.stats()
        alog = stats.get("access_log") or {}
        dropped = CounterMetricFamily("halb_access_log_dropped",
                                      "Access log lines dropped (the writer could not keep up, or writing failed)",
                                      labels=["node"])
        dropped.add_metric([node.node_id], alog.get("dropped", 0))
        lines = CounterMetricFamily("halb_access_log_lines", "Access log lines handed to the writer", labels=["node"])
        lines.add_metric([node.node_id], alog.get("lines", 0))
        yield from (dropped, lines)
        for name, svc in stats.get("services", {}).items():
            lv = [node.node_id, name]
            q = svc.get("queue") or {}
            length.add_metric(lv, q.get("length", 0))
            for prio, n in (q.get("by_priority") or {}).items():
                by_prio.add_metric(lv + [prio], n)
            wait.add_metric(lv, count_value=q.get("admitted", 0), sum_value=q.get("wait_s_sum", 0.0))
            wait_max.add_metric(lv, q.get("wait_s_max", 0.0))
            for reason, key in (("queue_full", "full"), ("queue_timeout", "timed_out"), ("shed", "shed")):
                refused.add_metric(lv + [reason], q.get(key, 0))
            saturated.add_metric(lv, svc.get("saturated", 0))
            ws_open.add_metric(lv, svc.get("websockets", 0))
            ws_total.add_metric(lv, svc.get("websockets_total", 0))
            for bname, b in (svc.get("backends") or {}).items():
                if b.get("limit_conns") is not None:
                    limit.add_metric(lv + [bname], b["limit_conns"])
                at_limit.add_metric(lv + [bname], b.get("at_limit", 0))
        yield from (length, by_prio, wait, wait_max, refused, saturated, ws_open, ws_total, limit, at_limit)

    def resilience(self) -> Iterator[Metric]:
        """Per service: failure domains of its healthy instances (halb/resilience.py).
        Gauges that are unknown (no zones or capacities declared) are left out, not 0."""
        node = self.node
        sl = ["node", "service"]
        fams = {
            "servers": GaugeMetricFamily("halb_service_servers_healthy",
                                         "Servers (failure domains) with at least one healthy instance", labels=sl),
            "zones": GaugeMetricFamily("halb_service_zones_healthy", "Zones with at least one healthy instance",
                                       labels=sl),
            "instances": GaugeMetricFamily("halb_service_instances_healthy", "Healthy instances", labels=sl),
            "server_loss": GaugeMetricFamily("halb_service_survives_server_loss",
                                             "1 when the healthy instances span at least two servers", labels=sl),
            "zone_loss": GaugeMetricFamily("halb_service_survives_zone_loss",
                                           "1 when the healthy instances span at least two zones", labels=sl),
            "n_plus_one": GaugeMetricFamily("halb_service_n_plus_one",
                                            "1 when the other servers can carry the current load (cluster-wide) "
                                            "if the biggest server dies", labels=sl),
        }
        for r in node.views.resilience_view(None):
            lv = [node.node_id, r["service"]]
            fams["servers"].add_metric(lv, len(r["servers_healthy"]))
            fams["instances"].add_metric(lv, r["healthy_instances"])
            fams["server_loss"].add_metric(lv, 1 if r["survives_server_loss"] else 0)
            if r["zones_healthy"] is not None:
                fams["zones"].add_metric(lv, len(r["zones_healthy"]))
                fams["zone_loss"].add_metric(lv, 1 if r["survives_zone_loss"] else 0)
            if r["n_plus_one"] is not None:
                fams["n_plus_one"].add_metric(lv, 1 if r["n_plus_one"] else 0)
        yield from fams.values()


LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class CheckLatency:
    """``halb_check_latency_seconds``: one histogram per checked backend, counted in plain
    lists and turned into a metric family at scrape time.

    Why not prometheus_client's Histogram: ``observe`` runs for every check (333 a second
    at 10,000 backends) and takes a lock per counter it touches; here it is one bisect and
    two additions in the loop thread, which is also where scrapes read it. Backends that
    are no longer checked (``current`` says which are) leave the output at the next scrape.
    """

    def __init__(self, node_id: str, current: Any = None) -> None:
        self.node_id = node_id
        self.current = current  # () -> mapping of (service, backend) still checked, or None: keep all
        self._of: dict[tuple[str, str], list[float]] = {}  # key -> [count per bucket..., +Inf count, sum]

    def observe(self, service: str, backend: str, latency: float) -> None:
        row = self._of.get((service, backend))
        if row is None:
            row = self._of[(service, backend)] = [0.0] * (len(LATENCY_BUCKETS) + 2)
        row[bisect_left(LATENCY_BUCKETS, latency)] += 1
        row[-1] += latency

    def collect(self) -> Iterator[Metric]:
        fam = HistogramMetricFamily("halb_check_latency_seconds", "Active health check latency",
                                    labels=["node", "service", "backend"])
        current = self.current() if self.current is not None else None  # None: keep all
        for key in list(self._of):
            if current is not None and key not in current:
                del self._of[key]  # no longer a target: its series ends
                continue
            row = self._of[key]
            cumulative, buckets = 0.0, []
            for bound, n in zip((*LATENCY_BUCKETS, float("inf")), row):
                cumulative += n
                buckets.append(("+Inf" if bound == float("inf") else floatToGoString(bound), cumulative))
            fam.add_metric([self.node_id, key[0], key[1]], buckets, row[-1])
        yield fam


class NodeMetrics:
    def __init__(self, node: Any) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(NodeCollector(node))
        self.node_id = node.node_id
        self.check_latency = CheckLatency(self.node_id, lambda: _checked(node))
        self.registry.register(self.check_latency)

    def observe_check(self, service: str, backend: str, result: Any) -> None:
        latency = getattr(result, "latency", None)
        if latency is not None:
            self.check_latency.observe(service, backend, latency)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _checked(node: Any) -> Any:
    """The (service, backend) pairs the node's prober checks now (None before it exists)."""
    health = getattr(node, "health", None)
    return health.prober.live_targets() if health is not None else None


"""Drill files (TOML) -> validated dataclasses.

A drill is shaped like a Chaos Toolkit experiment (title, description, steady-state
hypothesis, method, rollbacks) so people who know that tool can read it at a glance, but
it is TOML and the actions are halb's own. Every error names the file, the key (as a
dotted path, e.g. ``method[2].target``) and the reason: drills are edited by hand and
run in CI, and "invalid drill" without a location wastes a morning.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from halb.tomltable import Table, read_toml


class DrillError(Exception):
    """Invalid drill: str() is '<file>: <key>: <reason>'."""

    def __init__(self, file: str | os.PathLike[str], key: str, reason: str) -> None:
        self.file, self.key, self.reason = str(file), key, reason
        super().__init__(f"{file}: {key}: {reason}" if key else f"{file}: {reason}")


# action name -> (required args, optional args with defaults). Args are checked for type
# by ARG_TYPES; everything else in a step (at, pauses, name) is common to all actions.
BALANCER_TARGET = "node id, 'leader' or 'follower'"
ACTIONS: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    # balancers (processes)
    "kill-balancer": (("target",), {}),
    "freeze-balancer": (("target",), {}),
    "resume-balancer": (("target",), {}),
    "stop-balancer": (("target",), {}),
    "start-balancer": (("target",), {}),
    "restart-balancer": (("target",), {"graceful": True}),
    # backends (processes)
    "kill-backend": (("target",), {}),
    "start-backend": (("target",), {}),
    "restart-backend": (("target",), {}),
    # servers (every backend on a failure domain at once; [cluster.backends] server labels)
    "kill-server": (("target",), {}),
    "start-server": (("target",), {}),
    # network (fault proxy links)
    "partition-balancer": (("target",), {}),
    "heal-balancer": (("target",), {}),
    "add-toxic": (("link", "type"), {"name": "", "stream": "downstream", "toxicity": 1.0, "attributes": {}}),
    "remove-toxic": (("link",), {"name": ""}),
    # admin API
    "drain-backend": (("target",), {"expect_error": 0}),
    "enable-backend": (("target",), {"expect_error": 0}),
    "add-member": (("id",), {"expect_error": 0}),
    "remove-member": (("target",), {"expect_error": 0}),
    "transfer-leader": ((), {"to": "", "expect_error": 0}),
    # flow
    "pause": (("seconds",), {}),
    "wait-until": (("condition",), {"timeout": 15.0, "backend": "", "is": "", "target": "", "count": 0, "kind": "",
                                    "service": ""}),
}

ARG_TYPES: dict[str, type | tuple[type, ...]] = {
    "target": str, "link": str, "type": str, "name": str, "stream": str, "toxicity": float, "attributes": dict,
    "expect_error": int, "id": str, "to": str, "seconds": float, "condition": str, "timeout": float,
    "backend": str, "is": str, "count": int, "graceful": bool, "kind": str, "service": str,
}

CONDITIONS = ("leader-elected", "leader-changed", "no-quorum", "verdict", "balancer-ready", "all-ready", "members",
              "drained", "event", "resilience", "server-loss")
RESILIENCE = ("survives", "does-not-survive")  # survives_another_server_loss of the resilience report
SERVER_LOSS = ("survives", "degraded", "overloaded")  # the report's answer for losing server `target`
VERDICTS = ("up", "down", "held")
TOXIC_TYPES = ("latency", "bandwidth", "slow_close", "timeout", "reset_peer", "slicer", "limit_data", "noop")
STREAMS = ("upstream", "downstream", "both")
CLIENT_RETRY = ("connect", "idempotent")

# actions whose effect stays until a matching action (used for the shaded fault windows)
FAULT_OPENERS = {"kill-balancer", "freeze-balancer", "stop-balancer", "kill-backend", "partition-balancer",
                 "add-toxic", "drain-backend", "kill-server"}


@dataclass
class Step:
    """One entry of `method` or `rollbacks`."""

    action: str
    args: dict[str, Any]
    at: float | None = None  # seconds after the method started; the step waits until then
    pause_before: float = 0.0
    pause_after: float = 0.0
    label: str = ""
    key: str = ""  # "method[3]": where it came from, for messages

    def describe(self) -> str:
        if self.label:
            return self.label
        parts = [self.action] + [f"{k}={v}" for k, v in self.args.items() if v not in ("", 0, {}, None)
                                 and k != "timeout"]
        return " ".join(parts)


@dataclass
class Tolerance:
    max: float


@dataclass
class SteadyState:
    """The hypothesis. None means 'not checked'."""

    error_rate: Tolerance | None = field(default_factory=lambda: Tolerance(0.0))
    p99_latency_ms: Tolerance | None = None
    one_leader: bool = True
    vip_holders: Tolerance | None = field(default_factory=lambda: Tolerance(1))
    verdicts: dict[str, str] | None = None  # None: every backend "up"
    ledger: bool = True
    # overload drills (docs/chaos.md "Overload"): checked on the checkout requests only
    checkout_errors: Tolerance | None = None  # failed checkout requests (count)
    checkout_p99_ratio: Tolerance | None = None  # checkout p99 after / before the method
    shed_retry_after: bool = False  # every failed /products request is a 503 with Retry-After
    backend_capacity: bool = False  # no backend's /stats max_in_flight above its capacity


@dataclass
class LoadSpec:
    rate: float = 50.0
    checkout_share: float = 0.5
    warmup: float = 3.0
    connect_timeout: float = 0.5
    attempt_timeout: float = 2.0
    request_timeout: float = 10.0
    client_retry: str = "idempotent"
    balancers: int = 0  # how many balancer addresses clients use (0: all; 1: as behind one VIP)


@dataclass
class ClusterOverrides:
    """Settings for the cluster `--cluster local` starts for this drill (ignored otherwise)."""

    service_options: dict[str, Any] = field(default_factory=dict)
    health: dict[str, Any] = field(default_factory=dict)
    # backend name -> {server, zone, max_rps, max_conns}; empty: A, B, C on servers A, B, C
    backends: dict[str, dict[str, Any]] = field(default_factory=dict)
    # every demo backend process: {capacity, work_ms} (`halb demo backend --capacity --work-ms`)
    backend_process: dict[str, Any] = field(default_factory=dict)
    # a second service on the same backend processes that /products traffic goes to:
    # {name, options, max_conns, max_rps}; None: /products goes to the checkout service
    browse: dict[str, Any] | None = None


@dataclass
class Drill:
    path: Path
    title: str
    description: str = ""
    tags: list[str] = field(default_factory=list)
    duration: float = 20.0  # load runs at least this long (method + quiet time after it)
    steady_state: SteadyState = field(default_factory=SteadyState)
    load: LoadSpec = field(default_factory=LoadSpec)
    cluster: ClusterOverrides = field(default_factory=ClusterOverrides)
    method: list[Step] = field(default_factory=list)
    rollbacks: list[Step] = field(default_factory=list)

    @property
    def slug(self) -> str:
        return self.path.stem


class _Table(Table):
    def __init__(self, file: Path, prefix: str, data: Any) -> None:
        super().__init__(file, prefix, data, DrillError)


def load_drill(path: str | os.PathLike[str]) -> Drill:
    file = Path(path)
    raw = read_toml(file, DrillError)
    return parse_drill(file, raw)


def parse_drill(file: Path, raw: dict[str, Any]) -> Drill:
    top = _Table(file, "", raw)
    drill = Drill(path=file, title=top.take("title", str))
    if not drill.title.strip():
        raise top.error("title", "must not be empty")
    drill.description = top.take("description", str, "")
    drill.tags = top.take("tags", list, [])
    drill.duration = top.number("duration", drill.duration, 1.0, 3600.0)
    drill.steady_state = _parse_steady(file, top.take("steady_state", dict, {}))
    drill.load = _parse_load(file, top.take("load", dict, {}))
    drill.cluster = _parse_cluster(file, top.take("cluster", dict, {}))
    method = top.take("method", list, ...)
    if not method:
        raise top.error("method", "must list at least one step")
    drill.method = [_parse_step(file, f"method[{i}]", s) for i, s in enumerate(method)]
    drill.rollbacks = [_parse_step(file, f"rollbacks[{i}]", s) for i, s in enumerate(top.take("rollbacks", list, []))]
    top.done()
    last_at = -1.0
    for step in drill.method:
        if step.at is not None:
            if step.at < last_at:
                raise DrillError(file, f"{step.key}.at", f"{step.at:g} is earlier than a previous step's at ({last_at:g})")
            last_at = step.at
    return drill


def _tolerance(t: _Table, name: str, default: Tolerance | None) -> Tolerance | None:
    """`name = { max = X }`, a bare number (= max), or false (not checked)."""
    if name not in t.data:
        return default
    value = t.data.pop(name)
    if value is False:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        v = float(value)
    elif isinstance(value, dict):
        sub = _Table(t.file, t.key(name), value)
        v = sub.take("max", float)
        sub.done()
    else:
        raise t.error(name, f"must be {{ max = NUMBER }}, a number or false, got {value!r}")
    if v < 0:
        raise t.error(name, f"max must be >= 0, got {v:g}")
    return Tolerance(v)


def _parse_steady(file: Path, raw: dict[str, Any]) -> SteadyState:
    t = _Table(file, "steady_state", raw)
    ss = SteadyState()
    ss.error_rate = _tolerance(t, "error_rate", ss.error_rate)
    if ss.error_rate is not None and ss.error_rate.max > 1:
        raise t.error("error_rate", "max is a fraction of requests (0..1)")
    ss.p99_latency_ms = _tolerance(t, "p99_latency_ms", ss.p99_latency_ms)
    ss.one_leader = t.take("one_leader", bool, True)
    ss.vip_holders = _tolerance(t, "vip_holders", ss.vip_holders)
    verdicts = t.take("verdicts", (dict, str), None)
    if isinstance(verdicts, str):
        if verdicts != "all-up":
            raise t.error("verdicts", f"must be a table {{ NAME = \"up\"|\"down\"|\"held\" }} or \"all-up\", got {verdicts!r}")
        verdicts = None
    elif verdicts is not None:
        for name, v in verdicts.items():
            if v not in VERDICTS:
                raise DrillError(file, f"steady_state.verdicts.{name}", f"must be one of {', '.join(VERDICTS)}, got {v!r}")
    ss.verdicts = verdicts
    ss.ledger = t.take("ledger", bool, True)
    ss.checkout_errors = _tolerance(t, "checkout_errors", None)
    ss.checkout_p99_ratio = _tolerance(t, "checkout_p99_ratio", None)
    ss.shed_retry_after = t.take("shed_retry_after", bool, False)
    ss.backend_capacity = t.take("backend_capacity", bool, False)
    t.done()
    return ss


def _parse_load(file: Path, raw: dict[str, Any]) -> LoadSpec:
    t = _Table(file, "load", raw)
    ls = LoadSpec()
    ls.rate = t.number("rate", ls.rate, 0.0, 2000.0, low_open=True)
    ls.checkout_share = t.number("checkout_share", ls.checkout_share, 0.0, 1.0)
    ls.warmup = t.number("warmup", ls.warmup, 0.5, 60.0)
    ls.connect_timeout = t.number("connect_timeout", ls.connect_timeout, 0.0, 30.0, low_open=True)
    ls.attempt_timeout = t.number("attempt_timeout", ls.attempt_timeout, 0.0, 120.0, low_open=True)
    ls.request_timeout = t.number("request_timeout", ls.request_timeout, 0.0, 300.0, low_open=True)
    ls.client_retry = t.take("client_retry", str, ls.client_retry)
    if ls.client_retry not in CLIENT_RETRY:
        raise t.error("client_retry", f"must be one of {', '.join(CLIENT_RETRY)}, got {ls.client_retry!r}")
    ls.balancers = int(t.number("balancers", 0.0, 0.0, 64.0))
    t.done()
    return ls


def _parse_cluster(file: Path, raw: dict[str, Any]) -> ClusterOverrides:
    t = _Table(file, "cluster", raw)
    co = ClusterOverrides(service_options=t.take("service_options", dict, {}), health=t.take("health", dict, {}))
    backends = t.take("backends", dict, {})
    for name, raw_be in backends.items():
        bt = _Table(file, f"cluster.backends.{name}", raw_be)
        be = {"server": bt.take("server", str, name), "zone": bt.take("zone", str, ""),
              "max_rps": bt.number("max_rps", 0.0), "max_conns": int(bt.number("max_conns", 0.0))}
        bt.done()
        co.backends[name] = {k: v for k, v in be.items() if v not in ("", 0, 0.0)}
    proc = _Table(file, "cluster.backend_process", t.take("backend_process", dict, {}))
    co.backend_process = {"capacity": int(proc.number("capacity", 0.0, 0.0, 100000.0)),
                          "work_ms": proc.number("work_ms", 0.0, 0.0, 60000.0)}
    proc.done()
    co.backend_process = {k: v for k, v in co.backend_process.items() if v}
    browse = t.take("browse", dict, None)
    if browse is not None:
        bt = _Table(file, "cluster.browse", browse)
        co.browse = {"name": bt.take("name", str, "browse"), "options": bt.take("options", dict, {}),
                     "max_conns": int(bt.number("max_conns", 0.0)), "max_rps": bt.number("max_rps", 0.0)}
        bt.done()
        if not co.browse["name"] or co.browse["name"] == "checkout":
            raise DrillError(file, "cluster.browse.name", "must name a service other than checkout")
    t.done()
    return co


def _parse_step(file: Path, key: str, raw: Any) -> Step:
    t = _Table(file, key, raw)
    action = t.take("action", str)
    if action not in ACTIONS:
        raise t.error("action", f"unknown action {action!r}; known: {', '.join(sorted(ACTIONS))}")
    step = Step(action=action, args={}, key=key)
    step.label = t.take("name", str, "") if action not in ("add-toxic", "remove-toxic") else ""
    at = t.take("at", float, None)
    if at is not None and at < 0:
        raise t.error("at", f"must be >= 0, got {at:g}")
    step.at = at
    pauses = t.take("pauses", dict, {})
    pt = _Table(file, t.key("pauses"), pauses)
    step.pause_before = pt.number("before", 0.0, 0.0, 600.0)
    step.pause_after = pt.number("after", 0.0, 0.0, 600.0)
    pt.done()
    required, optional = ACTIONS[action]
    for name in required:
        step.args[name] = t.take(name, ARG_TYPES[name])
    for name, default in optional.items():
        step.args[name] = t.take(name, ARG_TYPES[name], default)
    t.done()
    _check_step(t, step)
    return step


def _check_step(t: _Table, step: Step) -> None:
    a = step.args
    if step.action == "pause" and not 0 <= a["seconds"] <= 600:
        raise t.error("seconds", f"must be within [0, 600], got {a['seconds']:g}")
    if "timeout" in a and not 0 < a["timeout"] <= 600:
        raise t.error("timeout", f"must be within (0, 600], got {a['timeout']:g}")
    if step.action == "wait-until":
        cond = a["condition"]
        if cond not in CONDITIONS:
            raise t.error("condition", f"unknown condition {cond!r}; known: {', '.join(CONDITIONS)}")
        if cond in ("verdict", "drained") and not a["backend"]:
            raise t.error("backend", f"is required for condition {cond!r}")
        if cond == "verdict" and a["is"] not in VERDICTS:
            raise t.error("is", f"condition 'verdict' needs is = one of {', '.join(VERDICTS)}, got {a['is']!r}")
        if cond == "balancer-ready" and not a["target"]:
            raise t.error("target", "is required for condition 'balancer-ready'")
        if cond == "members" and a["count"] < 1:
            raise t.error("count", "condition 'members' needs count >= 1")
        if cond == "event" and not a["kind"]:
            raise t.error("kind", "condition 'event' needs kind = an audit event kind, e.g. \"server.down\"")
        if cond == "server-loss" and not a["target"]:
            raise t.error("target", "condition 'server-loss' needs target = a server label, e.g. \"A\"")
        if cond == "server-loss" and a["is"] not in SERVER_LOSS:
            raise t.error("is", f"condition 'server-loss' needs is = one of {', '.join(SERVER_LOSS)}, got {a['is']!r}")
        if cond == "resilience" and a["is"] not in RESILIENCE:
            raise t.error("is", f"condition 'resilience' needs is = one of {', '.join(RESILIENCE)}, got {a['is']!r}")
    if step.action in ("add-toxic", "remove-toxic"):
        _check_link(t, a["link"])
    if step.action == "add-toxic":
        if a["type"] not in TOXIC_TYPES:
            raise t.error("type", f"unknown toxic type {a['type']!r}; known: {', '.join(TOXIC_TYPES)}")
        if a["stream"] not in STREAMS:
            raise t.error("stream", f"must be one of {', '.join(STREAMS)}, got {a['stream']!r}")
        if not 0 <= a["toxicity"] <= 1:
            raise t.error("toxicity", f"must be within [0, 1], got {a['toxicity']:g}")
    if "target" in a and step.action != "wait-until" and not a["target"]:
        raise t.error("target", "must not be empty")
    if "expect_error" in a and a["expect_error"] and not 400 <= a["expect_error"] <= 599:
        raise t.error("expect_error", f"must be an HTTP error status 400-599, got {a['expect_error']}")


def _check_link(t: _Table, link: str) -> None:
    """'backend:NAME' or 'raft:A:B' (A and B node ids, 'leader' or 'follower')."""
    parts = link.split(":")
    if parts[0] == "backend" and len(parts) == 2 and parts[1]:
        return
    if parts[0] == "raft" and len(parts) == 3 and parts[1] and parts[2] and parts[1] != parts[2]:
        return
    raise t.error("link", f"must be 'backend:NAME' or 'raft:NODE:NODE' (NODE: {BALANCER_TARGET}), got {link!r}")


def method_length(drill: Drill) -> float:
    """A lower bound of how long the method takes (for the default load duration)."""
    total = 0.0
    for s in drill.method:
        if s.at is not None:
            total = max(total, s.at)
        total += s.pause_before + s.pause_after + (s.args.get("seconds", 0.0) if s.action == "pause" else 0.0)
    return total

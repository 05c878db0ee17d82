"""SIGHUP: which differences between the running config and the file on disk can be applied
in place, and which need a hot restart (`halb node reload`, halb/takeover.py).

Live: settings read afresh on every use by this process alone, where changing them cannot
leave a half-applied state: ``log_level`` and ``api.write_timeout``; and the access log
(``dataplane.access_log``, ``dataplane.access_log_buffer``), which the node hands to its
worker processes and which SIGHUP also reopens when unchanged (logrotate). Everything else is
baked into a listener, the Raft object, a worker process or the announcer when they start;
a takeover restarts them without dropping a connection, so that is the way to change them.
``[[services]]`` only seed an empty cluster: after that the replicated state is the truth
and a change there is ignored (change services through the API).

Health-check timing lives in the replicated state (per service, `halb service`), so it is
cluster-wide and already changes live through the API, not through this file.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from halb.config import NodeConfig

LIVE = ("log_level", "api.write_timeout", "dataplane.access_log", "dataplane.access_log_buffer")
SEED_ONLY = ("services",)
IDENTITY = ("node_id", "data_dir")  # another node, not this one changed: stop it, start that one


@dataclass
class ReloadPlan:
    live: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # key -> (old, new), applied now
    needs_takeover: list[str] = field(default_factory=list)  # changed keys a takeover applies
    seed_only: list[str] = field(default_factory=list)  # changed, and ignored once seeded
    identity: list[str] = field(default_factory=list)  # the file describes another node

    @property
    def changed(self) -> bool:
        return bool(self.live or self.needs_takeover or self.seed_only or self.identity)

    def summary(self) -> str:
        if not self.changed:
            return "no changes"
        parts = []
        if self.live:
            parts.append("applied: " + ", ".join(f"{k} {o!r} -> {n!r}" for k, (o, n) in sorted(self.live.items())))
        if self.needs_takeover:
            parts.append("need `halb node reload` (takeover): " + ", ".join(self.needs_takeover))
        if self.identity:
            parts.append("cannot change in place (that is another node; a takeover refuses it too): "
                         + ", ".join(self.identity))
        if self.seed_only:
            parts.append("ignored (seed only; use the API): " + ", ".join(self.seed_only))
        return "; ".join(parts)


def flatten(cfg: NodeConfig) -> dict[str, Any]:
    """Dotted keys -> values (tables one level deep, as in the TOML file)."""
    raw = asdict(cfg)
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key in ("raft", "api", "dataplane") and isinstance(value, dict):
            for sub, v in value.items():
                out[f"{key}.{sub}"] = v
        else:
            out[key] = value
    out.pop("path", None)
    return out


def plan_reload(current: NodeConfig, new: NodeConfig) -> ReloadPlan:
    old_flat, new_flat = flatten(current), flatten(new)
    plan = ReloadPlan()
    for key in sorted(set(old_flat) | set(new_flat)):
        before, after = old_flat.get(key), new_flat.get(key)
        if before == after:
            continue
        if key in LIVE:
            plan.live[key] = (before, after)
        elif key in IDENTITY:
            plan.identity.append(key)
        elif key in SEED_ONLY:
            plan.seed_only.append(key)
        else:
            plan.needs_takeover.append(key)
    return plan

"""How one backend's health reads in the backends view (API, CLI, metrics, chaos monitor).

What routing does and what the view says are kept apart on purpose. Routing treats a
backend nobody has vouched for yet as UP, the way HAProxy starts servers (a node restart
must not take every backend out for ``rise * interval``; passive outlier detection covers a
dead one). The view must not pretend that is knowledge: a voter that has not reported a
settled check result shows ``pending``, and the verdict is ``pending`` until a majority of
voters has reported UP, unless the cluster already holds a DOWN (or flap-held) verdict.
Before, a new backend on a closed port read "up" from all three nodes beside its
"connect failed" until the checks caught up.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

from halb.health.prober import BackendHealth

PENDING = "pending"


def observation_states(obs: Mapping[str, Mapping[str, Any]], voters: Iterable[str]) -> dict[str, str]:
    """voter -> "up" | "down" | "pending" (no report from that voter yet)."""
    return {m: PENDING if m not in obs else ("up" if obs[m]["up"] else "down") for m in voters}


def verdict_of(record: Mapping[str, Any] | None, obs: Mapping[str, Mapping[str, Any]], voters: list[str]) -> str:
    """The verdict to show: the replicated one when it is down/held (those need a reported
    majority or a hold), "up" only once a majority of voters reported UP, else "pending"."""
    replicated = (record or {}).get("verdict", "up")
    if replicated != "up":
        return replicated
    reported_up = sum(1 for m in voters if m in obs and obs[m]["up"])
    return "up" if reported_up > len(voters) / 2 else PENDING


def local_view(h: BackendHealth | None) -> dict[str, Any] | None:
    """This node's own checks. ``state`` is "pending" until rise/fall checks settled it;
    ``last_error`` is the latest check's error (None once a check passes again), the
    latest failure with its time stays in ``last_failure``/``last_failure_at``."""
    if h is None:
        return None
    return {
        "state": ("up" if h.up else "down") if h.confirmed else PENDING,
        "up": h.up,  # what this node routes by
        "since": h.since_wall,
        "checks": h.checks_total,
        "last_check_at": h.last_check_wall,
        "last_check_ok": h.last_ok,
        "last_error": h.last_error or None,
        "last_failure": h.last_failure or None,
        "last_failure_at": h.last_failure_wall,
        "last_latency_ms": None if h.last_latency is None else round(h.last_latency * 1000, 2),
    }

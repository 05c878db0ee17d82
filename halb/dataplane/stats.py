"""Summing stats across worker processes: counters add up, ejected/panic are "any"."""
from __future__ import annotations

from typing import Any

_SUM = ("in_flight", "requests", "errors", "retries", "rejected", "connections", "ejections", "idle_pool",
        "saturated", "at_limit", "limit_conns", "limit_rps", "websockets", "websockets_total")


def _add(a: Any, b: Any) -> Any:
    """Counters add; None (no limit) stays None unless the other side has a number."""
    if a is None:
        return b
    if b is None:
        return a
    return a + b


def _merge_queue(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Admission-queue stats of two processes: counts add, maxima take the larger."""
    out = dict(a)
    for k, v in b.items():
        if k in ("wait_s_max", "oldest_wait_s"):
            out[k] = max(out.get(k, 0.0), v)
        elif k == "by_priority":
            out[k] = {p: out.get(k, {}).get(p, 0) + n for p, n in v.items()}
        elif k in ("max_queue", "timeout_s"):
            continue  # per process: the same option everywhere
        elif isinstance(v, (int, float)):
            out[k] = out.get(k, 0) + v
    return out


def _merge_access_log(parts: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    """Every process's access log counters, summed; the node process's path and last error
    (a worker's error is reported when the node process has none)."""
    logs = [p for p in parts if p]
    if not logs:
        return None
    out = dict(logs[0])
    for p in logs[1:]:
        for k in ("lines", "written", "dropped", "queued_bytes"):
            out[k] = out.get(k, 0) + p.get(k, 0)
        if not out.get("error") and p.get("error"):
            out["error"] = p["error"]
    out["processes"] = len(logs)
    return out


def merge_stats(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Merge `DataPlane.local_stats()` dicts; the first one gives the static fields."""
    if not parts:
        return {}
    out: dict[str, Any] = {
        "node_id": parts[0].get("node_id"), "version": parts[0].get("version"),
        "workers": [w for p in parts for w in p.get("workers", [])],
        "listen_errors": {k: v for p in parts for k, v in p.get("listen_errors", {}).items()},
        "services": {},
        "frontends": parts[0].get("frontends", {}),  # the node process serves them (frontend.py)
        "access_log": _merge_access_log([p.get("access_log") for p in parts]),
    }
    for p in parts:
        for name, svc in p.get("services", {}).items():
            cur = out["services"].get(name)
            if cur is None:
                out["services"][name] = {**svc, "backends": {b: dict(v) for b, v in svc.get("backends", {}).items()}}
                continue
            for k in _SUM:
                if k in svc:
                    cur[k] = _add(cur.get(k, 0), svc[k])
            cur["panic"] = cur.get("panic", False) or svc.get("panic", False)
            if "queue" in svc and "queue" in cur:
                cur["queue"] = _merge_queue(cur["queue"], svc["queue"])
            for bname, bs in svc.get("backends", {}).items():
                cb = cur["backends"].get(bname)
                if cb is None:
                    cur["backends"][bname] = dict(bs)
                    continue
                for k in _SUM:
                    if k in bs:
                        cb[k] = _add(cb.get(k, 0), bs[k])
                cb["ejected"] = cb.get("ejected", False) or bs.get("ejected", False)
    return out

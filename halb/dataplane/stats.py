"""Summing stats across worker processes: counters add up, ejected/panic are "any"."""
from __future__ import annotations

from typing import Any

_SUM = ("in_flight", "requests", "errors", "retries", "rejected", "connections", "ejections", "idle_pool",
        "saturated", "at_limit", "limit_conns", "limit_rps")


def _add(a: Any, b: Any) -> Any:
    """Counters add; None (no limit) stays None unless the other side has a number."""
    if a is None:
        return b
    if b is None:
        return a
    return a + b


def merge_stats(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Merge `DataPlane.local_stats()` dicts; the first one gives the static fields."""
    if not parts:
        return {}
    out: dict[str, Any] = {
        "node_id": parts[0].get("node_id"), "version": parts[0].get("version"),
        "workers": [w for p in parts for w in p.get("workers", [])],
        "listen_errors": {k: v for p in parts for k, v in p.get("listen_errors", {}).items()},
        "services": {},
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

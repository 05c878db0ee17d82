"""Who may call which admin API route: the role table and token identification.

`read` may look (every GET but the token list), `operator` may change a backend's admin state, weight and
limits (day-to-day traffic work), `admin` everything else: services, backends add/remove,
members, leadership, tokens, shutdown. A route not listed needs `read` for GET/HEAD and
`admin` otherwise, so a route added later is admin-only until someone decides otherwise.
"""
from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Any, Iterable

from halb.tokens import BOOTSTRAP_NAME, hash_token

BACKEND = "/v1/services/{svc}/backends/{name}"
OPERATOR_ROUTES = frozenset({
    ("POST", BACKEND + "/{action}"),  # drain, maint, enable
    ("PUT", BACKEND + "/weight"),
    ("PUT", BACKEND + "/limits"),
})
ADMIN_READS = frozenset({"/v1/tokens"})  # the token list names every caller
READ_METHODS = frozenset({"GET", "HEAD"})


@dataclass(frozen=True)
class Identity:
    """The caller, as its token names it: what the audit log records as "by"."""
    name: str
    role: str


def required_role(method: str, route: str | None) -> str:
    """`route` is the route's template (e.g. /v1/services/{svc}), None when nothing matched."""
    if method in READ_METHODS:
        return "admin" if route in ADMIN_READS else "read"
    if route is not None and (method, route) in OPERATOR_ROUTES:
        return "operator"
    return "admin"


def identify(given: bytes, bootstrap_hash: str, tokens: Iterable[dict[str, Any]]) -> Identity | None:
    """The identity a presented token (the bare token, no "Bearer ") belongs to, or None.

    Compares hashes with hmac.compare_digest against every entry without stopping early, so
    the time taken does not tell how much of which token matched, nor which entry did."""
    digest = hash_token(given).encode()
    found: Identity | None = None
    if hmac.compare_digest(digest, bootstrap_hash.encode()):
        found = Identity(BOOTSTRAP_NAME, "admin")
    for t in tokens:
        h = t.get("hash")
        if isinstance(h, str) and hmac.compare_digest(digest, h.encode()) and found is None:
            found = Identity(str(t.get("name")), str(t.get("role")))
    return found


__all__ = ["Identity", "OPERATOR_ROUTES", "required_role", "identify"]

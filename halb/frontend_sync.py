"""Replicated frontends and certificates -> this node's data plane.

Runs in the node's routing loop when a `frontend.*`, `route.*` or `cert.*` command was
applied (or the state was loaded): copies the frontends (with this node's listen host) and
certificate records under the state lock, then outside it opens the sealed keys and loads
the certificates (halb/certs/tls.CertSet: unchanged ones are reused, so a route change
decrypts nothing). A certificate that cannot be loaded, or a frontend that cannot bind, is
a local issue of this node (status warning, /v1/local-events, one ERROR line) and is
skipped; the others keep working. A frontend that did not bind is tried again every
RETRY_S seconds until it binds or goes away.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

from halb.certs.tls import CertSet
from halb.dataplane.frontend_routes import FrontendRoute, RouteEntry
from halb.local_issues import LocalIssues

log = logging.getLogger("halb.frontends")

EDGE_OPS = ("frontend.", "route.", "cert.")


def frontend_routes(frontends: dict[str, Any], listen_host: str) -> tuple[FrontendRoute, ...]:
    """The frontends as the data plane takes them; a malformed record is skipped (reported)."""
    out = []
    for name in sorted(frontends):
        fe = frontends[name]
        out.append(FrontendRoute(
            name=str(fe["name"]), listen_host=listen_host or "0.0.0.0", port=int(fe["port"]), tls=bool(fe["tls"]),
            http_port=int(fe.get("http_port") or 0), redirect_https=bool(fe.get("redirect_https")),
            accept_proxy=bool(fe.get("accept_proxy")),
            default_service=str(fe.get("default_service") or ""), default_cert=str(fe.get("default_cert") or ""),
            routes=tuple(RouteEntry(str(r["host"]), str(r["path_prefix"]), str(r["service"]))
                         for r in fe.get("routes") or [])))
    return tuple(out)


RETRY_S = 5.0  # a frontend port that did not bind is tried again this often


class FrontendSync:
    def __init__(self, listen_host: str, sealer: Any, issues: LocalIssues,
                 wake: Callable[[], None] = lambda: None) -> None:
        self.listen_host = listen_host
        self.sealer = sealer
        self.issues = issues
        self.wake = wake  # makes the node's routing loop run (and so `apply`) soon
        self.dirty = True
        self.certs: CertSet | None = None
        self._retry: asyncio.TimerHandle | None = None

    def mark(self, op: str | None) -> bool:
        """Whether an applied op (None: state loaded, anything) concerns frontends or certs."""
        if op is None or op.startswith(EDGE_OPS):
            self.dirty = True
        return self.dirty

    def apply(self, raft: Any, dataplane: Any) -> None:
        self.dirty = False
        with raft.read() as cs:
            frontends = {k: dict(v, routes=[dict(r) for r in v.get("routes") or []])
                         for k, v in cs.frontends.items() if isinstance(v, dict)}
            records = {k: dict(v) for k, v in cs.certs.items() if isinstance(v, dict)}
        try:
            routes = frontend_routes(frontends, self.listen_host)
        except (KeyError, TypeError, ValueError) as exc:  # state from a buggy writer: keep the last good ones
            self.issues.report("frontend", "*", f"cannot build frontends: {type(exc).__name__}: {exc}")
            return
        self.issues.clear("frontend", "*")
        certs = CertSet.build(records, self.sealer, self.certs) if (records or self.certs) else CertSet()
        self.certs = certs
        self.issues.sync("cert", {f"cert:{k}": f"certificate {k} not served: {v}" for k, v in certs.errors.items()})
        dataplane.set_frontends(routes, certs)
        errors = dataplane.frontends.errors
        self.issues.sync("frontend", {f"frontend:{k}": f"frontend {k}: {v}" for k, v in errors.items()})
        if errors and self._retry is None:  # a port held by something else may be free later
            self._retry = asyncio.get_running_loop().call_later(RETRY_S, self._again)

    def _again(self) -> None:
        self._retry = None
        self.dirty = True
        self.wake()


__all__ = ["FrontendSync", "frontend_routes", "EDGE_OPS"]

"""Incremental routing: rebuild only the services a command touched, one at a time.

Why: at 10,000 backends a full `build_snapshot` under the state lock took long enough to
stall pysyncobj's tick thread (it applies commands under the same lock), and it ran after
every write and every local health transition. Here each applied command names the
services it can have changed (`touched_services`), only those are rebuilt, and an
unchanged service keeps its `ServiceRoute` *object*, so the data plane can skip it by
identity.

Isolation: one service that cannot be built (state written before validation existed, a
bug in a builder) is skipped and reported through `LocalIssues`; every other service
keeps updating. A service that was routable and then fails keeps its last good route
(static stability: the data plane keeps doing what it did); a new one that never built
has no route.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from halb.control.state import ClusterState
from halb.dataplane.snapshot import RoutingSnapshot, ServiceRoute
from halb.local_issues import LocalIssues
from halb.routing_builder import build_service

log = logging.getLogger("halb.routing")

# ops that never change what routing or health targets are built from
# (frontend./route./cert.: the node's FrontendSync handles those, halb/frontend_sync.py;
# acme.challenge*: the node republishes the snapshot, which carries the HTTP-01 answers)
NO_ROUTING_OPS = ("lease.", "event.", "member.", "frontend.", "route.", "cert.", "token.", "acme.")


def touched_services(cmd: dict[str, Any], events: Iterable[Any] | None = None) -> set[str] | None:
    """Services an applied command may have changed; None means "any of them".

    Derived from the command (op + args), so it works for commands the state machine
    rejected too (they changed nothing; rebuilding one service is harmless). For
    `health.*` commands routing depends only on verdicts, and every verdict change is
    recorded as an event naming its service(s), so the command's `events` say exactly
    which services changed (usually none: most observations change no verdict, and a
    liveness change after a leader election must not rebuild 10,000 backends).
    Anything unexpected answers None: rebuilding everything is always correct.
    """
    op = str(cmd.get("op", ""))
    args = cmd.get("args") or {}
    try:
        if op.startswith(NO_ROUTING_OPS):
            return set()
        if op.startswith("service."):
            return {str(args["name"])}
        if op.startswith("backend."):
            return {str(args["service"])}
        if op.startswith("health.") and events is not None:
            out: set[str] = set()
            for ev in events:
                data = ev.data if hasattr(ev, "data") else ev.get("data", {})
                if "service" in data:
                    out.add(str(data["service"]))
                out.update(str(s) for s in data.get("services", ()))
            return out
        if op in ("health.observe", "health.release"):
            return {str(args["service"])}
        if op == "health.observe_many":
            return {str(item["service"]) for item in args["observations"]}
    except (KeyError, TypeError, AttributeError):
        return None
    return None  # seed, snapshot.loaded, health.liveness without events, unknown: everything


def acme_answers(cs: ClusterState) -> tuple[tuple[str, str], ...]:
    """The HTTP-01 answers the data plane serves (halb/dataplane/acme_answer.py)."""
    return tuple(sorted((t, str(c.get("key_authorization", ""))) for t, c in cs.acme_challenges.items()))


@dataclass
class RoutingCache:
    """Per-service `ServiceRoute`s, rebuilt when marked dirty; see the module docstring."""

    listen_host: str
    dial: dict[str, str] = field(default_factory=dict)
    issues: LocalIssues = field(default_factory=LocalIssues)
    routes: dict[str, ServiceRoute] = field(default_factory=dict)
    version: int = 0
    rebuilt: int = 0  # services rebuilt so far (observability, tests)
    _dirty: set[str] = field(default_factory=set)
    _all: bool = True

    def mark(self, services: Iterable[str] | None) -> None:
        if services is None:
            self._all = True
        else:
            self._dirty.update(services)

    @property
    def pending(self) -> bool:
        return self._all or bool(self._dirty)

    def build(self, cs: ClusterState, local_up: Callable[[str, str], bool]) -> RoutingSnapshot:
        """Rebuild the dirty services from `cs` (the caller holds the state lock) and return
        the whole snapshot; unchanged services are the same objects as before."""
        if self._all:
            names = set(cs.services) | set(self.routes)
            self.issues.forget_service("routing", [s for (a, s) in self.issues.current if a == "routing"
                                                   and s not in cs.services])
        else:
            names = self._dirty
        self._all, self._dirty = False, set()
        for name in sorted(names):
            svc = cs.services.get(name)
            if svc is None:
                self.routes.pop(name, None)
                self.issues.forget_service("routing", [name])
                continue
            try:
                route = build_service(cs, svc, self.listen_host, local_up, self.dial)
            except Exception as exc:  # isolate: one broken service must not stop the others
                self.issues.report("routing", name, f"cannot build routing: {type(exc).__name__}: {exc}")
                continue
            self.rebuilt += 1
            self.issues.clear("routing", name)
            if route is None:
                self.routes.pop(name, None)
            elif self.routes.get(name) != route:
                self.routes[name] = route
        self.version += 1
        return RoutingSnapshot(version=self.version,
                               services=tuple(self.routes[n] for n in sorted(self.routes)),
                               acme_challenges=acme_answers(cs))

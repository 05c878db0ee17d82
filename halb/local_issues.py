"""Node-local problems with one service (a routing build, health targets or the data plane
could not take it), kept where an operator sees them: `halb cluster status`, the node's
/v1/local-events list and the log at ERROR.
"""
from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

log = logging.getLogger("halb.local_issues")


@dataclass
class Issue:
    area: str  # "routing" | "health" | "dataplane"
    service: str
    message: str
    since: float
    count: int = 1


class LocalIssues:
    """Node-local problems with one service, surfaced in status, a local event list and
    the log at ERROR.

    Not replicated on purpose: recording an audit event would need a write, and the
    failure is local (this node's build), may differ between versions of halb, and must be
    reported also without quorum. Each distinct problem is logged once (and again when its
    message changes), so a broken service does not flood the log on every rebuild.
    """

    def __init__(self, keep: int = 200, clock: Callable[[], float] = time.time) -> None:
        self.current: dict[tuple[str, str], Issue] = {}
        self.events: collections.deque[dict[str, Any]] = collections.deque(maxlen=keep)
        self.seq = 0
        self.clock = clock

    def report(self, area: str, service: str, message: str) -> None:
        key = (area, service)
        old = self.current.get(key)
        if old is not None and old.message == message:
            old.count += 1
            return
        self.current[key] = Issue(area, service, message, self.clock())
        log.error("%s: service %s skipped on this node: %s", area, service, message)
        self._event(f"local.{area}_error", service, message)

    def clear(self, area: str, service: str) -> None:
        if self.current.pop((area, service), None) is not None:
            log.info("%s: service %s builds again", area, service)
            self._event(f"local.{area}_ok", service, f"service {service} builds again")

    def forget_service(self, area: str, services: Iterable[str]) -> None:
        for name in list(services):
            self.current.pop((area, name), None)

    def sync(self, area: str, errors: dict[str, str]) -> None:
        """Make the issues of `area` exactly `errors` (service -> message)."""
        for service, message in errors.items():
            self.report(area, service, message)
        for (a, service) in [k for k in self.current if k[0] == area and k[1] not in errors]:
            self.clear(a, service)

    def event(self, kind: str, message: str) -> None:
        """A node-wide local event (not about one service), e.g. the data-plane self-check."""
        self._event(kind, "", message)

    def for_service(self, service: str) -> list[Issue]:
        return [i for (_, s), i in sorted(self.current.items()) if s == service]

    def _event(self, kind: str, service: str, message: str) -> None:
        self.seq += 1
        self.events.append({"seq": self.seq, "at": self.clock(), "kind": kind, "service": service,
                            "message": message})

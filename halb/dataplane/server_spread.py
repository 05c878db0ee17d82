"""Server-first balancing (`server_balance = true`): pick a server, then an instance on it.

Several instances of a service on one server fail together, so spreading requests over
*servers* matters more than spreading them over instances. With this option the service's
algorithm runs twice: first over servers, each a group whose weight is the sum of its
eligible instances' effective weights (so a server takes exactly the share its instances'
weights say, and a server with an ejected instance takes correspondingly less) and whose
load is the sum of their in-flight counts; then over the chosen server's instances, with a
separate balancer state per server.

What changes compared to the flat algorithm:

* round robin: the shares are the same as flat (by design: a server takes what its
  instances' weights say); the instance order within a server is its own rotation;
* least_conn / p2c / peak EWMA: load is compared per server (sum of in-flight / sum of
  weight), so a server running many instances is seen as busy as it is;
* Maglev (consistent hashing) keeps its flat table: stickiness by key must not depend on
  the grouping. The option is ignored for it.

Only used when the option is on: the default path keeps the flat balancer and pays nothing.
Retries need nothing special: the runtime removes tried backends (and, with
`server_aware`, the failed servers) from the candidates before the balancer sees them.
"""
from __future__ import annotations

from typing import Any, Sequence

from halb.dataplane.balancers import make_balancer


class ServerGroup:
    """The instances of one server among the current candidates, as one candidate."""

    __slots__ = ("name", "weight", "in_flight", "ewma", "members")

    def __init__(self, name: str) -> None:
        self.name = name
        self.weight = 0.0
        self.in_flight = 0
        self.ewma = 0.0
        self.members: list[Any] = []

    def add(self, c: Any) -> None:
        self.members.append(c)
        self.weight += c.weight
        self.in_flight += c.in_flight
        if c.ewma > self.ewma:
            self.ewma = c.ewma


class ServerSpread:
    """Two-level balancer: `algorithm` over servers, then over the server's instances."""

    name = "server_spread"

    def __init__(self, algorithm: str) -> None:
        self.algorithm = algorithm
        self.outer = make_balancer(algorithm)
        self.inner: dict[str, Any] = {}

    def pick(self, cands: Sequence[Any], key: bytes | None = None) -> Any:
        if len(cands) <= 1:
            return cands[0] if cands else None
        groups: dict[str, ServerGroup] = {}
        for c in cands:
            server = c.server or c.name  # an unlabelled instance is its own failure domain
            g = groups.get(server)
            if g is None:
                g = groups[server] = ServerGroup(server)
            g.add(c)
        if len(groups) == 1:
            (g,) = groups.values()
        else:
            g = self.outer.pick(list(groups.values()), key)
        if len(g.members) == 1:
            return g.members[0]
        inner = self.inner.get(g.name)
        if inner is None:
            inner = self.inner[g.name] = make_balancer(self.algorithm)
        return inner.pick(g.members, key)


def wants_server_spread(enabled: bool, algorithm: str) -> bool:
    """Maglev keeps its flat table (see the module docstring)."""
    return enabled and algorithm.lower().replace("-", "_") not in ("maglev", "consistent_hash", "hash", "ring_hash")

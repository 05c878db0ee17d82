"""Per-backend capacity limits on one data-plane process: pure arithmetic, no I/O, no clock.

A backend's `max_conns` (requests in flight for HTTP, connections for TCP) and `max_rps`
(new requests/connections per second) are *cluster-wide* numbers in the replicated state.
One process enforces its share of them:

* node share: the fraction of the cluster's traffic for this service that this node
  carries (1.0 with one VIP holder; see docs/dataplane.md "Capacity limits" for the
  multi-node design);
* process share: a node with `workers = W` splits its share over W processes that do not
  talk to each other per request; `max_conns` is split as integers (floor, and the first
  `N mod W` processes get one more), so the sum over the processes is exactly the node's
  limit and never more; `max_rps` is split evenly.

A share of 0 connections means "this process may not use the backend" (e.g. max_conns 2
with 4 workers), which is different from "no limit" (UNLIMITED).

The rate limit is a token bucket per backend: `rate` tokens per second up to `burst`
(a tenth of a second's worth, at least one), one token per new request or connection.
"""
from __future__ import annotations

import math

UNLIMITED = 1 << 62  # conn_limit of a backend without max_conns: never reached
BURST_SECONDS = 0.1  # rate-limit burst: this many seconds' worth of tokens, at least 1


def conn_share(max_conns: int, index: int, count: int, fraction: float = 1.0) -> int:
    """This process's in-flight limit for a backend; UNLIMITED when max_conns is 0.

    `fraction` (0-1] is the node's share of the cluster limit; the node's limit is rounded
    down (a sum over nodes must not exceed max_conns) but kept >= 1 while the fraction is
    positive, so a node never loses a backend entirely to rounding."""
    if max_conns <= 0:
        return UNLIMITED
    node = max_conns if fraction >= 1.0 else max(1, math.floor(max_conns * max(fraction, 0.0)))
    count = max(1, count)
    base, extra = divmod(node, count)
    return base + (1 if index < extra else 0)


def rps_share(max_rps: float, count: int, fraction: float = 1.0) -> float:
    """This process's request rate for a backend; 0.0 when max_rps is 0 (no limit)."""
    if max_rps <= 0:
        return 0.0
    return max_rps * min(max(fraction, 0.0), 1.0) / max(1, count)


def burst_for(rate: float) -> float:
    return max(1.0, rate * BURST_SECONDS)


def refill(tokens: float, stamp: float, now: float, rate: float, burst: float) -> float:
    """Tokens after refilling from `stamp` to `now` (a clock going backwards adds none)."""
    if now <= stamp:
        return tokens
    return min(burst, tokens + (now - stamp) * rate)


def node_shares(me: str, recent: dict[str, dict[str, float]]) -> dict[str, float]:
    """This node's share of each service's cluster-wide limits, from the request rates
    every reachable node reported (`recent`: member -> service -> requests/s over the load
    meter's window).

    share = my rate / all nodes' rate: the nodes split a backend's capacity in proportion
    to the traffic each carries, so in steady state the shares sum to 1 and the nodes'
    limits (rounded down) sum to at most max_conns. A node that carries none of a
    service's traffic right now gets an even split (1 / nodes), not 0, so traffic that
    moves to it (a VIP handover, a DNS change) finds a usable limit before the next
    report; that is the bound's slack: the shares sum to at most 1 + idle nodes / nodes.
    Unreachable nodes are not in `recent`: their share goes to the others."""
    n = max(1, len(recent))
    mine = recent.get(me, {})
    services: set[str] = set()
    for per in recent.values():
        services.update(per)
    out: dict[str, float] = {}
    for svc in services:
        total = sum(max(0.0, per.get(svc, 0.0)) for per in recent.values())
        own = max(0.0, mine.get(svc, 0.0))
        out[svc] = own / total if own > 0 and total > 0 else 1.0 / n
    return out

"""Load-balancing algorithms: pure, deterministic given their inputs, no I/O.

Each balancer picks one of the *candidates* it is handed (the service runtime has already
removed ineligible, ejected and already-tried backends), so retries and ejections need no
special case inside an algorithm. A candidate is anything with the attributes of
``Candidate``; tests use plain objects.

Kept small and allocation-free on the hot path: one pick runs per request.
"""
from __future__ import annotations

import hashlib
import math
import random
from functools import lru_cache
from typing import Protocol, Sequence, TypeVar

MAGLEV_TABLE_SIZE = 65537  # prime, >100x any realistic backend count (Maglev paper: M >> N)


class Candidate(Protocol):
    name: str
    weight: float  # effective weight (slow start already applied), > 0
    in_flight: int
    ewma: float  # peak-EWMA latency in seconds, 0.0 = no sample yet


C = TypeVar("C", bound=Candidate)


def hash64(data: bytes, salt: bytes = b"") -> int:
    """Stable 64-bit hash (independent of PYTHONHASHSEED, identical in every worker/node)."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8, salt=salt).digest(), "little")


class SmoothWeightedRoundRobin:
    """nginx's smooth weighted round robin: weights 5,1,1 give a a b a c a a, not a a a a a b c.

    Every pick adds each candidate's weight to its current score, picks the highest, and
    subtracts the total from the winner. Over any window of sum(weights) picks each
    candidate is chosen exactly `weight` times (integer weights), interleaved.
    """

    name = "round_robin"

    def __init__(self) -> None:
        self.current: dict[str, float] = {}

    def pick(self, cands: Sequence[C], key: bytes | None = None) -> C | None:
        if len(cands) <= 1:
            return cands[0] if cands else None
        cur = self.current
        total = 0.0
        best = None
        best_cw = 0.0
        for c in cands:
            w = c.weight
            cw = cur.get(c.name, 0.0) + w
            cur[c.name] = cw
            total += w
            if best is None or cw > best_cw:
                best, best_cw = c, cw
        cur[best.name] = best_cw - total  # type: ignore[union-attr]
        return best


class LeastConnections:
    """Fewest in-flight requests per unit of weight; ties rotate so equal backends share."""

    name = "least_conn"

    def __init__(self) -> None:
        self._rot = 0

    def pick(self, cands: Sequence[C], key: bytes | None = None) -> C | None:
        n = len(cands)
        if n <= 1:
            return cands[0] if cands else None
        self._rot = (self._rot + 1) % n
        best = None
        best_score = 0.0
        for i in range(n):
            c = cands[(self._rot + i) % n]
            score = (c.in_flight + 1) / c.weight
            if best is None or score < best_score:
                best, best_score = c, score
        return best


class PowerOfTwoChoices:
    """Two random candidates, keep the less loaded (in-flight / weight).

    Nearly as good as least connections at balancing, without a global scan, and it does
    not herd onto one "least loaded" backend when many balancers share the same view.
    """

    name = "p2c"

    def __init__(self, rng: random.Random | None = None) -> None:
        self.rng = rng or random.Random()

    def _score(self, c: Candidate) -> float:
        return (c.in_flight + 1) / c.weight

    def pick(self, cands: Sequence[C], key: bytes | None = None) -> C | None:
        n = len(cands)
        if n <= 1:
            return cands[0] if cands else None
        i = self.rng.randrange(n)
        j = self.rng.randrange(n - 1)
        if j >= i:
            j += 1
        a, b = cands[i], cands[j]
        return a if self._score(a) <= self._score(b) else b


class PeakEwma(PowerOfTwoChoices):
    """Finagle's peak EWMA: P2C on cost = latency_ewma * (in_flight + 1) / weight.

    The average jumps up at once on a slow response (peak) and decays slowly, so a backend
    that turns slow loses traffic immediately and earns it back gradually. A backend
    without samples costs 0, so it is probed first.
    """

    name = "peak_ewma"

    def _score(self, c: Candidate) -> float:
        return c.ewma * (c.in_flight + 1) / c.weight


def ewma_update(ewma: float, stamp: float, rtt: float, now: float, decay_s: float) -> float:
    """Peak-sensitive EWMA step (pure, so the backend state and tests share it)."""
    if rtt >= ewma or ewma == 0.0:
        return rtt
    w = math.exp(-max(now - stamp, 0.0) / decay_s) if decay_s > 0 else 0.0
    return ewma * w + rtt * (1.0 - w)


@lru_cache(maxsize=64)
def maglev_table(members: tuple[tuple[str, int], ...], size: int = MAGLEV_TABLE_SIZE) -> tuple[int, ...]:
    """Maglev lookup table (Eisenbud et al., NSDI'16): entry -> index into `members`.

    Each member walks its own permutation of the slots (offset, skip from two hashes of
    its name) and claims the next free slot in turn; weights give heavier members more
    turns. Removing one of N members leaves ~(N-1)/N of the slots where they were.
    Cached by membership, because building costs ~0.1 s in pure Python.
    """
    n = len(members)
    if n == 0:
        return ()
    offsets = [hash64(m[0].encode(), b"maglev-off") % size for m in members]
    skips = [hash64(m[0].encode(), b"maglev-skip") % (size - 1) + 1 for m in members]
    weights = [max(int(m[1]), 1) for m in members]
    wmax = max(weights)
    credit = [0] * n
    nxt = [0] * n
    table = [-1] * size
    filled = 0
    while True:
        for i in range(n):
            credit[i] += weights[i]
            if credit[i] < wmax:
                continue
            credit[i] -= wmax
            off, skip, k = offsets[i], skips[i], nxt[i]
            c = (off + skip * k) % size
            while table[c] >= 0:
                k += 1
                c = (off + skip * k) % size
            table[c] = i
            nxt[i] = k + 1
            filled += 1
            if filled == size:
                return tuple(table)


class Maglev:
    """Consistent hashing by key (source address, header or cookie value).

    The table is built over the service's *stable* member set (every non-maint backend
    with weight > 0), not over the currently healthy ones: when a backend is ejected or
    unhealthy only its own keys move (they probe further along the table), and they come
    back when it recovers. Removing a backend from the service rebuilds the table, which
    moves about 1/N of the keys.
    """

    name = "maglev"

    def __init__(self, members: Sequence[tuple[str, int]], size: int = MAGLEV_TABLE_SIZE) -> None:
        self.members = tuple((str(n), int(w)) for n, w in members)
        self.size = size
        self.table = maglev_table(self.members, size)
        self.names = [m[0] for m in self.members]

    def lookup(self, key: bytes) -> str | None:
        """Name owning `key` in the table (ignoring health)."""
        if not self.table:
            return None
        return self.names[self.table[hash64(key) % self.size]]

    def pick(self, cands: Sequence[C], key: bytes | None = None) -> C | None:
        if not cands:
            return None
        if key is None or not self.table:
            return cands[0] if len(cands) == 1 else random.choice(cands)
        h = hash64(key)
        by_name = {c.name: c for c in cands}
        idx = h % self.size
        got = by_name.get(self.names[self.table[idx]])
        if got is not None:
            return got
        # owner unavailable: walk a key-specific probe sequence through the table so the
        # orphaned keys spread over the others in proportion to their table share
        step = (h >> 20) % (self.size - 1) + 1
        for _ in range(64):
            idx = (idx + step) % self.size
            got = by_name.get(self.names[self.table[idx]])
            if got is not None:
                return got
        return cands[h % len(cands)]  # members not in the table (new since the build)


def make_balancer(algorithm: str, members: Sequence[tuple[str, int]] = ()) -> object:
    """Factory by snapshot algorithm name; unknown names fall back to round robin."""
    a = algorithm.lower().replace("-", "_")
    if a in ("least_conn", "least_connections", "leastconn"):
        return LeastConnections()
    if a in ("p2c", "power_of_two", "power_of_two_choices", "random2"):
        return PowerOfTwoChoices()
    if a in ("maglev", "consistent_hash", "hash", "ring_hash"):
        return Maglev(members)
    if a in ("peak_ewma", "ewma", "least_latency"):
        return PeakEwma()
    return SmoothWeightedRoundRobin()


ALGORITHMS = ("round_robin", "least_conn", "p2c", "maglev", "peak_ewma")

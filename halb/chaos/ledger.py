"""The ledger check: every order a client saw acknowledged is stored exactly once.

"Zero errors" is not enough for a checkout: a balancer that retries a POST on another
server, or a client that retries with the same Idempotency-Key, could store an order twice,
and a backend that answers 201 before its commit could lose one. So after a drill the
orders the client saw acknowledged (2xx with an order id) are compared with the shared
database, by Idempotency-Key:

* lost: acknowledged, but no order with that key in the database;
* duplicated: more than one order stored under one key;
* mismatched: stored under the key, but with another order id than the client was given;
* unacknowledged_stored: stored, but the client never saw an acknowledgement (its request
  timed out or failed after the backend committed). That is allowed, and is exactly what
  the client's retry with the same key resolves; reported separately, not a failure.

Only keys this run generated (its prefix) are looked at, so a shared database with other
traffic does not confuse the check.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

from halb.chaos.load import Outcome
from halb.demo.shop_db import orders_by_idempotency_key


@dataclass
class LedgerResult:
    checked: bool
    acknowledged: int = 0
    stored: int = 0
    lost: list[str] = field(default_factory=list)
    duplicated: dict[str, list[str]] = field(default_factory=dict)
    mismatched: dict[str, dict[str, Any]] = field(default_factory=dict)
    unacknowledged_stored: list[str] = field(default_factory=list)
    reason: str = ""  # why not checked

    @property
    def intact(self) -> bool:
        return self.checked and not self.lost and not self.duplicated and not self.mismatched

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["intact"] = self.intact
        # keep the report small: counts plus a sample of keys
        for k in ("lost", "unacknowledged_stored"):
            d[f"{k}_count"] = len(d[k])
            d[k] = d[k][:50]
        d["duplicated_count"] = len(self.duplicated)
        d["mismatched_count"] = len(self.mismatched)
        return d

    def summary(self) -> str:
        if not self.checked:
            return f"not checked ({self.reason})"
        state = "intact" if self.intact else "BROKEN"
        return (f"{state}: {self.acknowledged} acknowledged, {len(self.lost)} lost, {len(self.duplicated)} duplicated, "
                f"{len(self.mismatched)} mismatched; {len(self.unacknowledged_stored)} stored without an ack")


def check_ledger(outcomes: Iterable[Outcome], db_path: str | None, key_prefix: str) -> LedgerResult:
    if not db_path:
        return LedgerResult(checked=False, reason="no database path (pass --db for an existing cluster)")
    try:
        stored = orders_by_idempotency_key(db_path)
    except FileNotFoundError as exc:
        return LedgerResult(checked=False, reason=str(exc))
    # only finished 2xx answers: a request still in flight has acknowledged nothing yet
    acked = {o.key: o.order_id for o in outcomes if o.kind == "checkout" and o.ok and o.key and o.order_id}
    return compare(acked, stored, key_prefix)


def compare(acked: dict[str, str], stored: dict[str, list[str]], key_prefix: str) -> LedgerResult:
    """acked: key -> order id the client was given; stored: key -> order ids in the DB."""
    mine = {k: v for k, v in stored.items() if k.startswith(key_prefix)}
    res = LedgerResult(checked=True, acknowledged=len(acked), stored=sum(len(v) for v in mine.values()))
    for key, order_id in sorted(acked.items()):
        ids = mine.get(key, [])
        if not ids:
            res.lost.append(key)
        elif order_id not in ids:
            res.mismatched[key] = {"client_saw": order_id, "stored": ids}
    for key, ids in sorted(mine.items()):
        if len(ids) > 1:
            res.duplicated[key] = list(ids)
        if key not in acked:
            res.unacknowledged_stored.append(key)
    return res

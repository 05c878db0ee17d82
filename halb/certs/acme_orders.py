"""When should the leader run an ACME order? Pure logic, time passed in (like
announce/lease.py): tested without a CA or a clock.

An order is due when its certificate is missing or was made for other names, when an
operator asked for a renewal after the certificate was stored, or at two thirds of the
certificate's lifetime (Let's Encrypt's advice; certbot renews 30 days before a 90-day
certificate ends, which is the same point). After a failure the next attempt waits,
doubling from a minute to an hour, so a broken DNS record does not hammer the CA's rate
limits; an operator's explicit renew skips the wait.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

RENEW_AT_FRACTION = 2.0 / 3.0
RETRY_MIN_S = 60.0
RETRY_MAX_S = 3600.0


@dataclass(frozen=True)
class Due:
    at: float  # unix time the order should run (<= now: run it now)
    reason: str


def retry_delay(failures: int) -> float:
    if failures <= 0:
        return 0.0
    return min(RETRY_MAX_S, RETRY_MIN_S * 2.0 ** min(failures - 1, 30))


def renewal_time(not_before: float, not_after: float) -> float:
    return not_before + RENEW_AT_FRACTION * max(0.0, not_after - not_before)


def next_run(order: dict[str, Any], cert: dict[str, Any] | None) -> Due:
    """When `order` (ClusterState.acme_orders entry) should next run, given its stored
    certificate (ClusterState.certs entry of the same name, or None)."""
    requested = float(order.get("renew_requested") or 0.0)
    failed_at = float(order.get("failed_at") or 0.0)
    failures = int(order.get("failures") or 0)
    if cert is None or cert.get("source") != "acme":
        due = Due(0.0, "no certificate yet")
    elif sorted(cert.get("sans") or []) != sorted(order.get("domains") or []):
        due = Due(0.0, "the order's domains changed")
    elif requested > float(cert.get("at") or 0.0):
        due = Due(requested, "renewal requested")
    else:
        due = Due(renewal_time(float(cert.get("not_before") or 0.0), float(cert.get("not_after") or 0.0)),
                  "renewal at two thirds of the certificate's lifetime")
    if failures and not (requested > failed_at):
        earliest = failed_at + retry_delay(failures)
        if earliest > due.at:
            return Due(earliest, f"{due.reason}; retrying after {failures} failure(s)")
    return due


__all__ = ["Due", "RENEW_AT_FRACTION", "next_run", "renewal_time", "retry_delay"]

"""File-descriptor limit of a data-plane process: raise it at start, size connections by it.

Every proxied connection holds two descriptors (client + backend). With the common default
of 1024 open files a proxy loaded with ~500 connections hit EMFILE on connect(), which was
then taken for dead backends. ``raise_nofile`` lifts the soft limit to the hard limit (an
unprivileged process may), and ``default_max_connections`` derives the per-service client
connection limit used when a service sets none, so the process refuses new clients
(HTTP 503, TCP close) before it runs out of descriptors for the ones it has.
"""
from __future__ import annotations

import logging

try:
    import resource
except ImportError:  # pragma: no cover - not POSIX
    resource = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

RESERVE_MIN = 64  # listeners, log files, control sockets, health probes, worker pipes
FALLBACK = 1024  # when the limit cannot be read


def nofile() -> int:
    """The current soft RLIMIT_NOFILE (FALLBACK when unknown or unlimited)."""
    if resource is None:
        return FALLBACK
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return FALLBACK if soft == resource.RLIM_INFINITY else int(soft)


def raise_nofile(who: str = "data plane") -> int:
    """Soft limit := hard limit; returns the resulting soft limit and logs it."""
    if resource is None:
        return FALLBACK
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as e:  # e.g. an infinite hard limit above fs.nr_open
            log.warning("%s: cannot raise RLIMIT_NOFILE from %s to %s: %s", who, soft, hard, e)
    n = nofile()
    log.info("%s: RLIMIT_NOFILE %d (hard %s); default max_connections per service %d",
             who, n, "unlimited" if hard == getattr(resource, "RLIM_INFINITY", -1) else hard,
             default_max_connections(n))
    return n


def reserve(limit: int) -> int:
    return max(RESERVE_MIN, limit // 10)


def default_max_connections(limit: int | None = None) -> int:
    """Client connections one process can serve: each needs a client and a backend fd."""
    n = nofile() if limit is None else limit
    return max(1, (n - reserve(n)) // 2)

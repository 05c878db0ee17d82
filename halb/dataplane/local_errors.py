"""Tell this proxy's own resource exhaustion apart from a backend failure.

``socket()`` or ``connect()`` failing with EMFILE/ENFILE (no file descriptor left), ENOBUFS or
ENOMEM says nothing about the backend: every backend would fail the same way. Counting it as
a connect failure ejected healthy backends (one connect failure ejects by default) and blamed
them in the logs while the real cause, the proxy's fd limit, was never logged. Both data-plane
paths (HTTP and TCP) ask ``is_local_resource_error`` before touching outlier accounting, answer
with ``local_reason`` and report through ``report_local_error`` (ERROR, rate-limited: under
such a load it would otherwise log once per connection).
"""
from __future__ import annotations

import errno
import logging
import time

log = logging.getLogger(__name__)

LOCAL_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
LOG_INTERVAL = 10.0  # seconds between two log lines of one kind


class RateLimitedLog:
    """At most one line per LOG_INTERVAL per instance, telling how many were held back."""

    def __init__(self, level: int) -> None:
        self.level = level
        self.last = -LOG_INTERVAL
        self.suppressed = 0

    def __call__(self, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self.last < LOG_INTERVAL:
            self.suppressed += 1
            return
        more = f" ({self.suppressed} more since the last report)" if self.suppressed else ""
        self.last, self.suppressed = now, 0
        log.log(self.level, msg + "%s", *args, more)

    def reset(self) -> None:
        """Forget the last line (tests, which may each expect one)."""
        self.last, self.suppressed = -LOG_INTERVAL, 0


local_log = RateLimitedLog(logging.ERROR)
rejected_log = RateLimitedLog(logging.WARNING)


def is_local_resource_error(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in LOCAL_RESOURCE_ERRNOS


def local_reason(exc: BaseException) -> str:
    """The client-facing reason: names the local limit, not a backend."""
    err = exc.errno if isinstance(exc, OSError) else None
    what = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    if err in (errno.EMFILE, errno.ENFILE):
        return f"proxy out of file descriptors ({what}); backends not tried"
    return f"proxy out of memory/buffers ({what}); backends not tried"


def report_local_error(service: str, backend: str, exc: BaseException) -> None:
    """ERROR, rate-limited: under the load that causes it, it would otherwise log per connection."""
    hint = (" raise the process's RLIMIT_NOFILE (ulimit -n) or lower max_connections;"
            if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE) else "")
    local_log("service %s: cannot open a connection to backend %s: %s; a local resource limit, "
               "not counted against the backend;%s", service, backend, exc, hint)


def report_rejected(service: str, limit: int) -> None:
    """WARNING, rate-limited: a client connection was refused at max_connections."""
    rejected_log("service %s: %d client connections open (max_connections); new ones are refused "
                  "until some close", service, limit)

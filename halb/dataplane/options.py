"""Per-service data-plane options, parsed once per snapshot from ``ServiceRoute.options``.

The dataclass, its defaults and its write-time schema live in the neutral module
halb/service_options.py, so the model can validate options strictly when a command is
written without importing the data plane. This module keeps the data plane's import path:
`ServiceOptions.from_route` stays tolerant (an unknown key is logged and ignored, a bad
value falls back to the default with a warning), a second line of defence behind the
strict validation at write time.

The data plane's `ServiceOptions` adds one thing the replicated state cannot know: limits
derived from this process's file-descriptor limit when a service leaves them unset.
"""
from __future__ import annotations

from typing import Any

from halb.dataplane.fdlimit import default_max_connections
from halb.service_options import FAIL_POLICIES, _coerce
from halb.service_options import ServiceOptions as _SchemaOptions

__all__ = ["FAIL_POLICIES", "ServiceOptions", "_coerce"]


class ServiceOptions(_SchemaOptions):
    """The schema's options plus limits derived from RLIMIT_NOFILE (see from_route)."""

    @classmethod
    def derive_unset(cls, values: dict[str, Any]) -> None:
        if "max_connections" not in values:  # never more clients than descriptors for them
            values["max_connections"] = default_max_connections()
        if "pool_max_idle" not in values:
            # A pool smaller than the number of busy clients closes a connection after one
            # request and opens another for the next (at 1,000 keep-alive clients a third of
            # all requests paid a connect and left a TIME_WAIT). Idle connections only exist
            # because that many were in use at once and are closed after upstream_keepalive.
            values["pool_max_idle"] = max(cls.pool_max_idle,
                                          (values["max_connections"] or default_max_connections()) // 2)

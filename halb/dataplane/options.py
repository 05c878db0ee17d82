"""Per-service data-plane options, parsed once per snapshot from ``ServiceRoute.options``.

The dataclass, its defaults and its write-time schema live in the neutral module
halb/service_options.py, so the model can validate options strictly when a command is
written without importing the data plane. This module keeps the data plane's import path:
`ServiceOptions.from_route` stays tolerant (an unknown key is logged and ignored, a bad
value falls back to the default with a warning), a second line of defence behind the
strict validation at write time.
"""
from __future__ import annotations

from halb.service_options import FAIL_POLICIES, ServiceOptions, _coerce

__all__ = ["FAIL_POLICIES", "ServiceOptions", "_coerce"]

"""What a frontend route's host and path prefix may be, and the one canonical spelling of a
request's Host that routes are matched against.

Neutral module (like service_options.py): the command schemas (control) check routes with
it before they are proposed, and the data plane (frontend_routes.py) canonicalises each
request's Host the same way, so a route stored as `shop.example` matches `Shop.Example:8443`
and `shop.example.` alike.
"""
from __future__ import annotations

import re
from typing import Any

from halb.model import ModelError

MAX_HOST = 253
MAX_PATH_PREFIX = 1024
# DNS labels (letters, digits, '-', and '_' which real names carry, e.g. _acme), or an IPv4
# literal, which matches the same pattern; no IPv6 literals in routes (use the default service)
_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
HOST_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
# visible ASCII without '?' and '#' (those end the path) and without '%' escapes' ambiguity
# being hidden: matching is on the raw bytes of the request path, case-sensitive
PATH_RE = re.compile(r"/[!-~]*")


def check_route_host(value: Any) -> str:
    """`shop.example` or `*.shop.example` (any name under shop.example, not itself),
    lowercased; no port, no scheme, no bare `*` (that is the frontend's default service)."""
    if not isinstance(value, str) or not value:
        raise ModelError("route host must be a non-empty string such as shop.example or *.shop.example")
    host = value.strip().lower().rstrip(".")
    wildcard = host.startswith("*.")
    name = host[2:] if wildcard else host
    if ":" in name or "/" in name:
        raise ModelError(f"route host {value!r} must be a host name without port or scheme "
                         "(the frontend's port is the port)"[:300])
    if len(name) > MAX_HOST or not HOST_RE.fullmatch(name):
        raise ModelError(f"route host {value!r} must be a DNS name (letters, digits, '-', '.'), optionally "
                         "starting with '*.' for every name under it"[:300])
    return host


def check_path_prefix(value: Any) -> str:
    """A path prefix matched on the raw request path (before '?'), byte for byte."""
    if value is None:
        return "/"
    if not isinstance(value, str) or not PATH_RE.fullmatch(value) or len(value) > MAX_PATH_PREFIX \
            or "?" in value or "#" in value:
        raise ModelError(f"path_prefix {value!r}"[:200] + " must start with '/' and hold visible ASCII "
                         f"without '?' or '#' (at most {MAX_PATH_PREFIX} characters)")
    return value


def request_host(raw: bytes | None) -> bytes | None:
    """The Host a request is routed by: lowercased, port and trailing dot removed; None
    when there is none. An IPv6 literal keeps its brackets ([::1])."""
    if not raw:
        return None
    h = raw.strip().lower()
    if h.startswith(b"["):
        end = h.find(b"]")
        return h[:end + 1] if end > 0 else None
    colon = h.find(b":")
    if colon >= 0:
        h = h[:colon]
    if h.endswith(b"."):
        h = h[:-1]
    return h or None


__all__ = ["check_path_prefix", "check_route_host", "request_host"]

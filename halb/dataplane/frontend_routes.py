"""A frontend's routes as the data plane holds them, and the pure function that picks a
request's service (no sockets: tests/unit/test_frontend_routes.py).

Order, as documented in docs/dataplane.md "Frontends and routes":
1. Host: an exact route host beats a wildcard; among wildcards (`*.shop.example` matches
   any name under shop.example, at any depth, not shop.example itself) the longest suffix
   wins. The Host is canonical first (frontend_rules.request_host: lowercase, no port, no
   trailing dot).
2. Within the first host that has a route whose path prefix matches, the longest prefix
   wins (raw bytes of the path before '?', case-sensitive: `/api/` does not match `/api`).
   A host whose prefixes all miss falls through to the next (wildcard) host.
3. Otherwise the frontend's default service, otherwise None (the caller answers 404).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from halb.frontend_rules import request_host


@dataclass(frozen=True)
class RouteEntry:
    host: str  # canonical: "shop.example" or "*.shop.example"
    path_prefix: str
    service: str


@dataclass(frozen=True)
class FrontendRoute:
    """One frontend on this node, immutable (compared by value to skip unchanged ones)."""
    name: str
    listen_host: str
    port: int
    tls: bool = False
    http_port: int = 0
    redirect_https: bool = False
    accept_proxy: bool = False  # every connection (both ports) starts with a PROXY header (proxy_protocol.py)
    default_service: str = ""
    default_cert: str = ""
    routes: tuple[RouteEntry, ...] = ()


Prefixes = tuple[tuple[bytes, str], ...]  # (prefix, service), longest prefix first
# (prefix or None for "/", service) in match order for one raw Host value: the exact host's
# prefixes, then each matching wildcard's, then (None, default) when there is a default
Candidates = tuple[tuple["bytes | None", str], ...]
# what the cache holds per raw Host value: (the service when the path cannot change it, i.e.
# the first candidate has no prefix, else None; the candidates, tested in order otherwise)
Memo = tuple["str | None", Candidates]
MAX_CACHED_HOSTS = 4096  # raw Host values remembered per table (beyond: computed each time)


@dataclass
class RouteTable:
    """Lookup structures built once per frontend change, read per request.

    `pick` is on every frontend request, so the Host part is memoised per raw Host header
    value (`cache`: at most MAX_CACHED_HOSTS entries, so random Host values cannot grow it)
    and what remains per request is one dict lookup, and a prefix test or two only when the
    path can change the answer (the memo holds the service otherwise)."""
    exact: dict[bytes, Prefixes] = field(default_factory=dict)
    wildcards: tuple[tuple[bytes, Prefixes], ...] = ()  # (".suffix", prefixes), longest suffix first
    default: str | None = None
    cache: dict[bytes | None, Memo] = field(default_factory=dict)

    @property
    def only(self) -> str | None:
        """The service of every request when there are no routes (the default, or None):
        then a request needs no Host or path test at all."""
        return None if self.exact or self.wildcards else self.default

    @classmethod
    def build(cls, routes: tuple[RouteEntry, ...], default_service: str = "") -> "RouteTable":
        groups: dict[str, list[tuple[bytes, str]]] = {}
        for r in routes:
            groups.setdefault(r.host, []).append((r.path_prefix.encode(), r.service))
        exact: dict[bytes, Prefixes] = {}
        wild: list[tuple[bytes, Prefixes]] = []
        for host, items in groups.items():
            prefixes = tuple(sorted(items, key=lambda p: (-len(p[0]), p[0])))
            if host.startswith("*."):
                wild.append((host[1:].encode(), prefixes))  # ".shop.example"
            else:
                exact[host.encode()] = prefixes
        wild.sort(key=lambda w: (-len(w[0]), w[0]))
        return cls(exact, tuple(wild), default_service or None)

    def candidates(self, host: bytes | None) -> Candidates:
        """Every (prefix, service) a request with this raw Host header may take, in order."""
        h = request_host(host)
        out: list[tuple[bytes | None, str]] = []
        if h is not None:
            out.extend(self.exact.get(h, ()))
            for suffix, prefixes in self.wildcards:
                if h.endswith(suffix) and len(h) > len(suffix):
                    out.extend(prefixes)
        if self.default is not None:
            out.append((None, self.default))
        # "/" matches every origin-form target: no prefix test (it also takes `OPTIONS *`)
        return tuple((None if p == b"/" else p, s) for p, s in out)

    def remember(self, host: bytes | None) -> Memo:
        cands = self.candidates(host)
        memo = (cands[0][1] if cands and cands[0][0] is None else None, cands)
        if len(self.cache) < MAX_CACHED_HOSTS:
            self.cache[host] = memo
        return memo

    def pick(self, host: bytes | None, url: bytes) -> str | None:
        """The service for a request's Host header (raw) and target (origin-form path).

        The prefix is tested against the whole target: a prefix holds no '?', so it matches
        the target exactly when it matches the path before the query."""
        memo = self.cache.get(host)
        if memo is None:
            memo = self.remember(host)
        fixed, cands = memo
        if fixed is not None:
            return fixed
        for prefix, service in cands:
            if prefix is None or url.startswith(prefix):
                return service
        return None


__all__ = ["FrontendRoute", "RouteEntry", "RouteTable"]

"""The frontend route matcher (pure): Host exact before wildcard, longest wildcard suffix,
longest path prefix, default service, and the canonical Host."""
from __future__ import annotations

import pytest

from halb.dataplane.frontend_routes import RouteEntry, RouteTable
from halb.frontend_rules import check_path_prefix, check_route_host, request_host
from halb.model import ModelError

ROUTES = (
    RouteEntry("shop.example", "/", "checkout"),
    RouteEntry("shop.example", "/api/", "catalog"),
    RouteEntry("shop.example", "/api/v2/", "catalog2"),
    RouteEntry("*.example", "/", "wild"),
    RouteEntry("*.eu.example", "/", "eu"),
    RouteEntry("only-api.example", "/api/", "catalog"),
)


@pytest.mark.parametrize("host,url,want", [
    (b"shop.example", b"/", "checkout"),
    (b"shop.example", b"/cart?x=/api/", "checkout"),  # the query is not part of the path
    (b"shop.example", b"/api/items", "catalog"),
    (b"shop.example", b"/api", "checkout"),  # /api/ is a byte prefix: /api does not match it
    (b"shop.example", b"/api/v2/x", "catalog2"),  # longest prefix
    (b"SHOP.Example:8443", b"/api/x", "catalog"),  # canonical Host: case, port
    (b"shop.example.", b"/", "checkout"),  # trailing dot
    (b"a.example", b"/", "wild"),
    (b"a.b.example", b"/", "wild"),  # any depth under the suffix
    (b"x.eu.example", b"/", "eu"),  # longest wildcard suffix first
    (b"example", b"/", "default"),  # *.example does not match example itself
    (b"other.test", b"/", "default"),
    (None, b"/", "default"),  # no Host (HTTP/1.0)
    (b"only-api.example", b"/api/x", "catalog"),
    (b"only-api.example", b"/", "wild"),  # exact host, no prefix matched: next host candidate
    (b"[::1]:8080", b"/", "default"),
])
def test_pick(host, url, want):
    assert RouteTable.build(ROUTES, "default").pick(host, url) == want


def test_no_default_gives_none():
    table = RouteTable.build((RouteEntry("shop.example", "/api/", "catalog"),))
    assert table.pick(b"shop.example", b"/") is None
    assert table.pick(b"nope.example", b"/api/") is None
    assert table.pick(b"shop.example", b"/api/x") == "catalog"


def test_request_host():
    assert request_host(b"Shop.Example:80") == b"shop.example"
    assert request_host(b"[::1]:443") == b"[::1]"
    assert request_host(b"") is None and request_host(None) is None


@pytest.mark.parametrize("raw,canonical", [("Shop.Example", "shop.example"), ("*.Shop.example.", "*.shop.example"),
                                           ("10.0.0.1", "10.0.0.1"), ("_acme.shop.example", "_acme.shop.example")])
def test_route_host_ok(raw, canonical):
    assert check_route_host(raw) == canonical


@pytest.mark.parametrize("raw", ["", "*", "shop.example:8443", "http://shop.example", "a..b", "*.*.x", "sh op",
                                 "a" * 64 + ".example", 5, None])
def test_route_host_refused(raw):
    with pytest.raises(ModelError):
        check_route_host(raw)


@pytest.mark.parametrize("raw", ["api/", "/a b", "/a?b", "/a#b", "/" + "a" * 1100, 3])
def test_path_prefix_refused(raw):
    with pytest.raises(ModelError):
        check_path_prefix(raw)
    assert check_path_prefix("/api/") == "/api/" and check_path_prefix(None) == "/"

"""frontend.* and route.* in the state machine: validated before anything changes, port
clashes both ways, routes only to existing HTTP services with a listener, a routed service
cannot be removed (the users are named), and the state survives a snapshot round trip."""
from __future__ import annotations

import pytest

from halb.control.commands import CommandError, validate_command
from halb.control.state import ClusterState


def apply(st: ClusterState, op: str, **args: object) -> dict:
    return st.apply({"op": op, "args": args, "at": 1.0, "by": "t", "node": "n1"}).result


@pytest.fixture
def st() -> ClusterState:
    s = ClusterState()
    assert apply(s, "service.add", name="shop", listen="127.0.0.1:8080",
                 backends=[{"name": "A", "address": "127.0.0.1:9001"}])["ok"]
    assert apply(s, "service.add", name="db", mode="tcp", listen="127.0.0.1:5432")["ok"]
    assert apply(s, "service.add", name="nolisten")["ok"]
    return s


def test_frontend_and_routes_round_trip(st):
    assert apply(st, "frontend.add", name="web", port=8443, tls=True, http_port=8081, redirect_https=True,
                 default_service="shop", accept_proxy=True)["ok"]
    assert st.frontends["web"]["accept_proxy"] is True and "PROXY header required" in st.events[-1].message
    r = apply(st, "route.add", frontend="web", host="Shop.Example.", path_prefix="/api/", service="shop")
    assert r["ok"] and r["route"] == {"host": "shop.example", "path_prefix": "/api/", "service": "shop"}
    again = ClusterState.from_dict(st.to_dict())
    assert again.frontends == st.frontends
    assert st.frontends["web"]["routes"] == [{"host": "shop.example", "path_prefix": "/api/", "service": "shop"}]
    assert [e.kind for e in st.events[-2:]] == ["frontend.added", "route.added"]


@pytest.mark.parametrize("args,code,words", [
    ({"name": "web", "port": 8080}, "conflict", "listen port of service 'shop'"),
    ({"name": "web", "port": 9000, "tls": True, "http_port": 5432}, "conflict", "service 'db'"),
    ({"name": "web", "port": 9000, "default_service": "nope"}, "not_found", "does not exist"),
    ({"name": "web", "port": 9000, "default_service": "db"}, "invalid", "tcp service"),
    ({"name": "web", "port": 9000, "default_service": "nolisten"}, "invalid", "no listen address"),
])
def test_frontend_add_refusals_change_nothing(st, args, code, words):
    before = st.to_dict()
    r = apply(st, "frontend.add", **args)
    assert not r["ok"] and r["error"] == code and words in r["message"], r
    after = st.to_dict()
    assert after["frontends"] == before["frontends"] == {} and after["events"] == before["events"]


def test_ports_clash_both_ways_and_routes_are_unique(st):
    assert apply(st, "frontend.add", name="web", port=9000)["ok"]
    assert apply(st, "frontend.add", name="other", port=9000)["error"] == "conflict"
    r = apply(st, "service.add", name="late", listen="127.0.0.1:9000")
    assert r["error"] == "conflict" and "frontend 'web'" in r["message"]
    assert apply(st, "service.update", name="shop", listen="127.0.0.1:9000")["error"] == "conflict"
    assert apply(st, "route.add", frontend="web", host="a.example", service="shop")["ok"]
    assert apply(st, "route.add", frontend="web", host="A.example", service="shop")["error"] == "conflict"
    assert apply(st, "route.add", frontend="nope", host="a.example", service="shop")["error"] == "not_found"
    assert apply(st, "route.add", frontend="web", host="b.example", service="db")["error"] == "invalid"
    assert apply(st, "route.remove", frontend="web", host="a.example", path_prefix="/x/")["error"] == "not_found"


def test_a_routed_service_cannot_be_removed(st):
    assert apply(st, "frontend.add", name="web", port=9000)["ok"]
    assert apply(st, "route.add", frontend="web", host="*.shop.example", service="shop")["ok"]
    r = apply(st, "service.remove", name="shop")
    assert r["error"] == "conflict" and "route web *.shop.example/" in r["message"]
    assert apply(st, "service.update", name="shop", listen="")["error"] == "conflict"
    assert apply(st, "route.remove", frontend="web", host="*.shop.example")["ok"]
    assert apply(st, "service.remove", name="shop")["ok"]


@pytest.mark.parametrize("op,args", [
    ("frontend.add", {"name": "web", "port": 0}),
    ("frontend.add", {"name": "web", "port": 70000}),
    ("frontend.add", {"name": "web", "port": 80, "tls": "yes"}),
    ("frontend.add", {"name": "web", "port": 80, "http_port": 81}),  # http_port without tls
    ("frontend.add", {"name": "web", "port": 443, "tls": True, "redirect_https": True}),  # no http_port
    ("frontend.add", {"name": "web", "port": 443, "tls": True, "http_port": 443}),
    ("frontend.add", {"name": "web", "port": 80, "default_cert": "x"}),
    ("frontend.add", {"name": "web", "port": 80, "accept_proxy": "yes"}),
    ("frontend.add", {"name": "web", "port": 80, "extra": 1}),
    ("route.add", {"frontend": "web", "host": "a.example:80", "service": "shop"}),
    ("route.add", {"frontend": "web", "host": "a.example", "path_prefix": "api", "service": "shop"}),
    ("route.add", {"frontend": "web", "host": "a.example"}),
])
def test_shapes_refused_before_raft(op, args):
    with pytest.raises(CommandError) as exc:
        validate_command(op, args)
    assert exc.value.code == "invalid"

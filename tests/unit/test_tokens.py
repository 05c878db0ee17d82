"""Named API tokens: the role table (halb/api/roles.py), token identification, and the
token.add / token.revoke commands (validated before propose; the state stores a hash only)."""
from __future__ import annotations

from typing import Any

import pytest

from halb.api.roles import Identity, OPERATOR_ROUTES, identify, required_role
from halb.control.commands import CommandError, validate_command
from halb.control.state import ClusterState
from halb.tokens import BOOTSTRAP_NAME, ROLES, hash_token, is_token_hash, new_token, role_allows

BE = "/v1/services/{svc}/backends/{name}"


def cmd(op: str, args: Any, by: str = "alice") -> dict[str, Any]:
    return {"op": op, "args": args, "id": None, "by": by, "node": "n1", "at": 100.0}


@pytest.mark.parametrize("method,route,role", [
    ("GET", "/v1/status", "read"),
    ("GET", "/v1/services/{svc}/backends", "read"),
    ("GET", "/metrics", "read"),
    ("GET", "/v1/tokens", "admin"),
    ("POST", BE + "/{action}", "operator"),
    ("PUT", BE + "/weight", "operator"),
    ("PUT", BE + "/limits", "operator"),
    ("POST", "/v1/services/{svc}/backends", "admin"),
    ("DELETE", BE, "admin"),
    ("POST", "/v1/services", "admin"),
    ("DELETE", "/v1/services/{svc}", "admin"),
    ("POST", "/v1/members", "admin"),
    ("DELETE", "/v1/members/{id}", "admin"),
    ("POST", "/v1/leader/transfer", "admin"),
    ("POST", "/v1/tokens", "admin"),
    ("DELETE", "/v1/tokens/{name}", "admin"),
    ("POST", "/v1/admin/shutdown", "admin"),
    ("POST", None, "admin"),  # nothing matched: a write is admin-only
    ("PATCH", BE + "/weight", "admin"),  # the operator grant is per method too
])
def test_route_needs_role(method: str, route: str | None, role: str) -> None:
    assert required_role(method, route) == role


def test_roles_are_ordered_and_unknown_roles_allow_nothing() -> None:
    assert [r for r in ROLES if role_allows("operator", r)] == ["read", "operator"]
    assert [r for r in ROLES if role_allows("read", r)] == ["read"]
    assert all(role_allows("admin", r) for r in ROLES)
    assert not role_allows("root", "read") and not role_allows("admin", "root")


def test_operator_routes_are_the_backend_state_weight_and_limits_endpoints() -> None:
    assert {r for _, r in OPERATOR_ROUTES} == {BE + "/{action}", BE + "/weight", BE + "/limits"}


def test_identify_bootstrap_named_tokens_and_unknown() -> None:
    boot, ro = new_token(), new_token()
    assert boot != ro and boot.startswith("halb_") and len(boot) > 40
    table = [{"name": "ro", "role": "read", "hash": hash_token(ro)}, {"name": "junk", "role": "read", "hash": 5}]
    assert identify(boot.encode(), hash_token(boot), table) == Identity(BOOTSTRAP_NAME, "admin")
    assert identify(ro.encode(), hash_token(boot), table) == Identity("ro", "read")
    assert identify(b"nope", hash_token(boot), table) is None
    assert identify(b"\xff\xfe", hash_token(boot), table) is None  # any bytes: no crash
    assert identify(hash_token(ro).encode(), hash_token(boot), table) is None  # the hash is not a token


def valid_add(**over: Any) -> dict[str, Any]:
    return {"name": "ci", "role": "read", "hash": hash_token("t"), **over}


@pytest.mark.parametrize("args,why", [
    (valid_add(name="bootstrap"), "reserved"),
    (valid_add(name="a b"), "may only contain"),
    (valid_add(role="root"), "must be one of"),
    (valid_add(role=None), "must be one of"),
    (valid_add(hash="abc"), "64 lowercase hex"),
    (valid_add(hash=hash_token("t").upper()), "64 lowercase hex"),
    (valid_add(token="halb_x"), "unknown field"),  # the token itself never goes into a command
    ({"name": "ci", "role": "read"}, "missing field"),
])
def test_token_add_is_validated_before_propose(args: dict[str, Any], why: str) -> None:
    with pytest.raises(CommandError) as exc:
        validate_command("token.add", args)
    assert why in exc.value.message


def test_token_revoke_validation() -> None:
    assert validate_command("token.revoke", {"name": "ci"}) == {"name": "ci"}
    for bad in ({"name": "bootstrap"}, {"name": ""}, {}, {"name": "ci", "x": 1}):
        with pytest.raises(CommandError):
            validate_command("token.revoke", bad)


def test_state_stores_hash_only_and_revoke_removes_it() -> None:
    s = ClusterState()
    secret = new_token()
    res = s.apply(cmd("token.add", valid_add(hash=hash_token(secret), role="operator"))).result
    assert res == {"ok": True, "token": {"name": "ci", "role": "operator"}}
    assert s.tokens["ci"]["hash"] == hash_token(secret) and s.tokens["ci"]["by"] == "alice"
    snap = ClusterState.from_dict(s.to_dict())  # survives a snapshot
    assert snap.tokens == s.tokens and secret not in repr(s.to_dict())
    assert s.events[-1].kind == "token.added" and s.events[-1].by == "alice"
    dup = s.apply(cmd("token.add", valid_add(hash=hash_token("other")))).result
    assert dup["ok"] is False and dup["error"] == "conflict"
    same_hash = s.apply(cmd("token.add", valid_add(name="ci2", hash=hash_token(secret)))).result
    assert same_hash["error"] == "conflict"
    assert s.apply(cmd("token.revoke", {"name": "ci"}, by="bob")).result["ok"]
    assert "ci" not in s.tokens and s.events[-1].kind == "token.revoked" and s.events[-1].by == "bob"
    assert s.apply(cmd("token.revoke", {"name": "ci"})).result["error"] == "not_found"


def test_bad_token_command_changes_nothing() -> None:
    s = ClusterState()
    before = s.to_dict()
    for bad in (valid_add(role="god"), valid_add(hash="zz"), "x", None, valid_add(name="bootstrap")):
        assert s.apply(cmd("token.add", bad)).result["ok"] is False
    after = s.to_dict()
    before.pop("index"), after.pop("index")
    assert after == before


def test_snapshot_without_tokens_restores_empty_table() -> None:
    d = ClusterState().to_dict()
    del d["tokens"]
    assert ClusterState.from_dict(d).tokens == {}
    assert is_token_hash(hash_token("x")) and not is_token_hash(None)


def test_token_table_is_bounded() -> None:
    from halb.tokens import MAX_TOKENS
    s = ClusterState()
    for i in range(MAX_TOKENS):
        assert s.apply(cmd("token.add", valid_add(name=f"t{i}", hash=hash_token(str(i))))).result["ok"]
    over = s.apply(cmd("token.add", valid_add(name="one-more", hash=hash_token("x")))).result
    assert over["error"] == "conflict" and "one-more" not in s.tokens

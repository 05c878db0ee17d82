"""Named tokens and roles on a real three-node cluster (issue 15, "Named operators and
roles"): a read token cannot add a backend, an operator token can drain but not add members
or services, a revoked token is refused by every node within 5 s, and the audit log names
the token behind each change, whatever X-Halb-Operator header the client sent."""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Cluster, admin_url, admin_urlopen, wait_until

pytestmark = pytest.mark.timeout(120)
NODES = ("n1", "n2", "n3")


def call(api: str, token: str, method: str, path: str, body: Any = None,
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(admin_url(api, path), data=data, method=method, headers={
        "Authorization": f"Bearer {token}", "Content-Type": "application/json", **(headers or {})})
    try:
        with admin_urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def add_token(c: Cluster, name: str, role: str) -> tuple[str, Path]:
    out = c.cli("token", "add", name, "--role", role)
    token = out.stdout.strip()
    assert token.startswith("halb_") and "only time" in out.stderr, out
    path = c.directory / f"{name}.token"
    path.write_text(token + "\n")
    path.chmod(0o600)
    return token, path


def events_by_kind(c: Cluster, kind: str) -> list[dict[str, Any]]:
    return [e for e in c.cli_json("events", "--limit", "1000") if e["kind"] == kind]


def test_roles_are_enforced_revocation_is_cluster_wide_and_audit_names_the_token(cluster_factory: Any) -> None:
    c = cluster_factory()
    reader, reader_file = add_token(c, "ro-dash", "read")
    oper, oper_file = add_token(c, "oncall", "operator")
    c.cli("backend", "add", "D", "127.0.0.24:8080")  # bootstrap (admin)

    # the list shows names and roles, never a token or a hash
    listed = c.cli("token", "list", "--json").stdout
    rows = {r["name"]: r for r in json.loads(listed)}
    assert {n: r["role"] for n, r in rows.items()} == {"bootstrap": "admin", "ro-dash": "read", "oncall": "operator"}
    assert reader not in listed and oper not in listed and "hash" not in listed
    # a bad request is refused before anything is proposed
    for body in ({"name": "x", "role": "root"}, {"name": "bootstrap", "role": "read"}, {"name": "a b", "role": "read"},
                 {"name": "x", "role": "read", "hash": "0" * 64}):
        code, err = call(c.api("n1"), c.token, "POST", "/v1/tokens", body)
        assert code == 400 and err["error"] == "invalid", (body, err)
    dup = c.cli("token", "add", "oncall", "--role", "admin", check=False)
    assert dup.returncode == 1 and "already exists" in dup.stderr
    # a retry of an add that already applied cannot show the token again: 409, not a second token
    key = {"Idempotency-Key": "add-retry-1"}
    first = call(c.api("n1"), c.token, "POST", "/v1/tokens", {"name": "retry", "role": "read"}, headers=key)
    again = call(c.api("n2"), c.token, "POST", "/v1/tokens", {"name": "retry", "role": "read"}, headers=key)
    assert first[0] == 201 and first[1]["secret"].startswith("halb_"), first
    assert again[0] == 409 and "earlier attempt" in again[1]["message"], again
    assert call(c.api("n3"), first[1]["secret"], "GET", "/v1/status")[0] == 200

    # read: can look everywhere, cannot add a backend (CLI exit 1, API 403 with a JSON reason)
    for node in NODES:
        assert call(c.api(node), reader, "GET", "/v1/backends")[0] == 200
    refused = c.cli("backend", "add", "E", "127.0.0.25:8080", token_file=reader_file, check=False)
    assert refused.returncode == 1 and "forbidden" in refused.stderr and "needs role admin" in refused.stderr
    code, err = call(c.api("n2"), reader, "POST", "/v1/services/checkout/backends",
                     {"name": "E", "address": "127.0.0.25:8080"})
    assert code == 403 and err["error"] == "forbidden" and err["role"] == "read" and err["required_role"] == "admin"
    assert call(c.api("n1"), reader, "POST", "/v1/services/checkout/backends/D/drain", {})[0] == 403
    assert call(c.api("n1"), reader, "GET", "/v1/tokens")[0] == 403  # the token list is admin-only
    assert call(c.api("n1"), reader, "GET", "/v1/nowhere")[0] == 404  # unmatched: a read may learn 404
    assert call(c.api("n1"), reader, "POST", "/v1/nowhere", {})[0] == 403  # a write needs admin

    # operator: drain and weight yes; members, services, backend add, tokens no
    c.cli("backend", "drain", "D", token_file=oper_file)
    c.cli("backend", "weight", "D", "7", token_file=oper_file)
    d = next(r for r in c.cli_json("backend", "list") if r["name"] == "D")
    assert (d["admin_state"], d["weight"]) == ("drain", 7)
    for method, path, body in (("POST", "/v1/members", {"id": "n9", "raft": "127.0.0.1:1", "api": "127.0.0.1:2"}),
                               ("POST", "/v1/services", {"name": "evil"}),
                               ("POST", "/v1/services/checkout/backends", {"name": "F", "address": "127.0.0.26:1"}),
                               ("POST", "/v1/tokens", {"name": "mine", "role": "admin"})):
        code, err = call(c.api("n3"), oper, method, path, body)
        assert code == 403 and err["required_role"] == "admin", (path, code, err)
    member = c.cli("member", "add", "n9", "--raft", "127.0.0.1:1", "--api", "127.0.0.1:2",
                   token_file=oper_file, check=False)
    assert member.returncode == 1 and "forbidden" in member.stderr
    assert "evil" not in {s["name"] for s in c.cli_json("service", "list")}

    # the audit log names the token, not the header the client sent
    code, _ = call(c.api("n1"), oper, "POST", "/v1/services/checkout/backends/D/enable", {},
                   headers={"X-Halb-Operator": "someone-else"})
    assert code == 200
    assert [e["by"] for e in events_by_kind(c, "backend.drain")] == ["oncall"]
    assert [e["by"] for e in events_by_kind(c, "backend.weight")] == ["oncall"]
    assert [e["by"] for e in events_by_kind(c, "backend.active")] == ["oncall"]
    assert {e["by"] for e in events_by_kind(c, "backend.added")} == {"bootstrap"}
    added = {e["data"]["token"]: e["by"] for e in events_by_kind(c, "token.added")}
    assert added == {"ro-dash": "bootstrap", "oncall": "bootstrap", "retry": "bootstrap"}

    # revoke: every node answers 401 within 5 s
    for node in NODES:
        assert call(c.api(node), oper, "GET", "/v1/status")[0] == 200
    c.cli("token", "revoke", "oncall")
    revoked_at = time.monotonic()
    for node in NODES:
        wait_until(lambda node=node: call(c.api(node), oper, "GET", "/v1/status")[0] == 401,
                   5 - (time.monotonic() - revoked_at), message=f"revoked token refused by {node}")
    assert time.monotonic() - revoked_at < 5
    gone = c.cli("backend", "drain", "D", token_file=oper_file, check=False)
    assert gone.returncode == 1 and "unauthorized" in gone.stderr
    assert [e["by"] for e in events_by_kind(c, "token.revoked")] == ["bootstrap"]
    # the reader still works; the bootstrap token (node-to-node calls) is untouched
    assert call(c.api("n3"), reader, "GET", "/v1/status")[0] == 200
    assert "oncall" not in {r["name"] for r in c.cli_json("token", "list")}

    # the tokens never reach a node's log
    logs = "".join(p.read_text() for p in (c.directory / "logs").glob("*.log"))
    assert reader not in logs and oper not in logs

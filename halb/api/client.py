"""A small synchronous client of the admin API, used by the CLI and the chaos tools.

It tries each node in turn until one answers: a node that refuses the connection or
times out is skipped; an HTTP error from a node that answered is final (it is the
cluster's answer, not the node's health). Writes carry one Idempotency-Key across those
attempts, so a retried write is applied at most once.
"""
from __future__ import annotations

import json
import os
import ssl
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from typing import Any

from halb.tls import AdminTls, TlsError


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, node: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.node = status, code, message, node


class Unreachable(ApiError):
    def __init__(self, message: str) -> None:
        super().__init__(0, "unreachable", message)


def read_token(token_file: str | None) -> str:
    token = os.environ.get("HALB_TOKEN")
    if token:
        return token.strip()
    if not token_file:
        raise ApiError(0, "no_token", "no admin token: set HALB_TOKEN, HALB_TOKEN_FILE or --token-file")
    try:
        with open(token_file) as f:
            return f.read().strip()
    except OSError as exc:
        raise ApiError(0, "no_token", f"cannot read token file {token_file}: {exc.strerror}") from None


@dataclass
class Client:
    nodes: list[str]  # HOST:PORT (https, verified by `tls`) or a full http(s)://HOST:PORT
    token: str
    timeout: float = 5.0
    tls: AdminTls = field(default_factory=AdminTls.from_env)  # like the CLI: HALB_CA_FILE, else the system store

    @classmethod
    def from_options(cls, cluster: str | None, token_file: str | None, timeout: float = 5.0,
                     ca_file: str | None = None) -> "Client":
        """`ca_file`: the cluster CA (`--ca-file`), else HALB_CA_FILE, else the system's trust store."""
        if not cluster:
            raise ApiError(0, "no_cluster", "no cluster given: use --cluster HOST:PORT,... or set HALB_CLUSTER "
                                            "(`. DIR/cluster.env` after `halb cluster init DIR`)")
        nodes = [n.strip() for n in cluster.split(",") if n.strip()]
        tls = AdminTls.from_env(ca_file).for_addresses(nodes)
        try:
            tls.context()  # a missing or broken CA file is a usage error, said once, not per node
        except TlsError as exc:
            raise ApiError(0, "bad_ca_file", str(exc)) from None
        return cls(nodes, read_token(token_file), timeout, tls)

    def request(self, method: str, path: str, body: Any = None, *, node: str | None = None,
                idempotency_key: str | None = None, timeout: float | None = None) -> dict[str, Any]:
        data = json.dumps(body).encode() if body is not None else None
        # no operator header: the audit log names the token (its name is what the cluster trusts)
        headers = {"Authorization": f"Bearer {self.token}"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        if method != "GET":
            headers["Idempotency-Key"] = idempotency_key or uuid.uuid4().hex
        errors: list[str] = []
        quorum_failures = 0
        for target in [node] if node else self.nodes:
            url = self.tls.url(target, path)
            req = urllib.request.Request(url, data=data, method=method, headers=headers)
            try:
                with urllib.request.urlopen(req, timeout=timeout or self.timeout,
                                            context=self.tls.context_for(url)) as resp:
                    return json.loads(resp.read() or b"{}")
            except urllib.error.HTTPError as exc:
                raw = exc.read()
                try:
                    err = json.loads(raw)
                except ValueError:
                    err = {"error": "http", "message": raw.decode(errors="replace")[:200] or exc.reason}
                if exc.code == 503 and err.get("error") in ("no_quorum", "missing_leader", "not_leader",
                                                             "no_leader", "leader_changed", "discarded"):
                    errors.append(f"{target}: {err.get('message')}")
                    quorum_failures += 1
                    continue  # another node may be on the majority side; same key, applied once
                raise ApiError(exc.code, err.get("error", "error"), err.get("message", str(exc)), target) from None
            except (urllib.error.URLError, OSError, TimeoutError) as exc:
                reason = getattr(exc, "reason", exc)
                if isinstance(reason, ssl.SSLCertVerificationError):  # say what to fix, not just "failed"
                    reason = (f"TLS certificate not trusted ({reason.verify_message}): "
                              + (f"not signed by the CA in {self.tls.ca_file}" if self.tls.ca_file else
                                 "set HALB_CA_FILE or --ca-file to the cluster's ca.crt"))
                errors.append(f"{target}: {reason}")
        if quorum_failures:
            raise ApiError(503, "no_quorum", "; ".join(errors))
        raise Unreachable("no node answered: " + "; ".join(errors))

    def get(self, path: str, **kw: Any) -> dict[str, Any]:
        return self.request("GET", path, **kw)

    def post(self, path: str, body: Any = None, **kw: Any) -> dict[str, Any]:
        return self.request("POST", path, body if body is not None else {}, **kw)

    def put(self, path: str, body: Any, **kw: Any) -> dict[str, Any]:
        return self.request("PUT", path, body, **kw)

    def delete(self, path: str, **kw: Any) -> dict[str, Any]:
        return self.request("DELETE", path, **kw)

    def cluster_status(self) -> dict[str, Any]:
        """Status from one node, plus each member's own view of its Raft state."""
        status = self.get("/v1/status")
        for member in status["members"]:
            if member.get("self") and "raft_state" in member:
                continue
            if not member.get("api"):
                member["raft_state"] = "unknown"
                continue
            try:
                own = self.request("GET", "/v1/status", node=member["api"], timeout=min(self.timeout, 1.5))
                member["raft_state"] = own.get("raft_state")
                member["term"] = own.get("term")
                member["sees_leader"] = own.get("leader")
            except ApiError as exc:
                member["raft_state"] = "unreachable"
                member["error"] = exc.message
        return status

"""Admin API routes for TLS certificates: /v1/certs.

`POST` carries the plaintext key once, over the admin API (TLS): this node checks the pair
(halb/certs/pem.py), seals the key with the cluster secret (halb/certs/sealing.py) and
proposes only the sealed form. Answers, events and lists carry public facts only.
"""
from __future__ import annotations

import time
from typing import Any, Awaitable, Callable

from aiohttp import web
from cryptography import x509

from halb.certs.pem import CertError, check_pair
from halb.certs.acme_orders import next_run
from halb.certs.records import PUBLIC_FIELDS, acme_order_summary, cert_add_args, cert_summary
from halb.control.writer import WriteError

ADD_FIELDS = frozenset({"name", "cert", "key", "replace"})
ACME_FIELDS = frozenset({"name", "domains", "directory", "ca_bundle", "email"})


class CertRoutes:
    """Handlers bound to the AdminApi (for read_json, write, envelope and the node)."""

    def __init__(self, api: Any, read_json: Callable[[web.Request], Awaitable[dict[str, Any]]]) -> None:
        self.api = api
        self.read_json = read_json  # server.read_json (passed in: that module imports this one)

    def register(self, router: web.UrlDispatcher) -> None:
        router.add_get("/v1/certs", self.list)
        router.add_post("/v1/certs", self.add)
        router.add_delete("/v1/certs/{name}", self.remove)
        router.add_post("/v1/certs/acme", self.acme)
        router.add_post("/v1/certs/{name}/renew", self.renew)

    def records(self) -> list[dict[str, Any]]:
        """Stored certificates, plus ACME orders that have none yet; ACME rows say when the
        leader runs the order next and how the last attempt ended."""
        with self.api.node.raft.read() as cs:
            certs = {n: cert_summary(r) for n, r in cs.certs.items()}
            orders = {n: (dict(o), dict(cs.certs[n]) if n in cs.certs else None) for n, o in cs.acme_orders.items()}
        for name, (order, cert) in orders.items():
            row = certs.setdefault(name, {**{k: None for k in PUBLIC_FIELDS}, "name": name, "sans": order["domains"],
                                          "source": "acme"})
            due = next_run(order, cert)
            row["acme"] = {**acme_order_summary(order), "next_run": due.at, "next_reason": due.reason,
                           "status": ("failing" if order.get("failures") else "issued" if cert else "pending")}
        return [certs[n] for n in sorted(certs)]

    async def list(self, request: web.Request) -> web.Response:
        with self.api.node.raft.read() as cs:
            pending = len(cs.acme_challenges)
        return web.json_response(self.api.envelope(certs=self.records(), acme_challenges_pending=pending))

    async def add(self, request: web.Request) -> web.Response:
        body = await self.read_json(request)
        unknown = sorted(set(body) - ADD_FIELDS)
        if unknown:
            raise WriteError(400, "invalid", f"unknown field(s): {', '.join(unknown)}")
        for field in ("cert", "key"):
            if not isinstance(body.get(field), str):
                raise WriteError(400, "invalid", f"{field} must be the PEM text of the {field} file")
        if not isinstance(body.get("name"), str):
            raise WriteError(400, "invalid", "name must be a string")
        sealer = getattr(self.api.node, "cert_sealer", None)
        if sealer is None:
            raise WriteError(409, "conflict", "this node has no cluster secret (--insecure-dev without "
                             "secret_file), so it cannot encrypt certificate keys; refused")
        try:
            pair = check_pair(body["cert"], body["key"], time.time())
        except CertError as exc:
            raise WriteError(400, "invalid", f"certificate {body['name']!r}: {exc}") from None
        args = cert_add_args(body["name"], pair, sealer.seal(pair.key_pem, body["name"]), source="file",
                             replace=body.get("replace", False))
        result = await self.api.write(request, "cert.add", args)
        return web.json_response(self.api.envelope(**result), status=201)

    async def acme(self, request: web.Request) -> web.Response:
        """Ask the leader to order NAME over ACME (HTTP-01); answers once the request is
        committed, not when the certificate is issued (`halb cert acme` waits for that)."""
        body = await self.read_json(request)
        unknown = sorted(set(body) - ACME_FIELDS)
        if unknown:
            raise WriteError(400, "invalid", f"unknown field(s): {', '.join(unknown)}")
        bundle = body.get("ca_bundle") or ""
        if bundle:
            if not isinstance(bundle, str):
                raise WriteError(400, "invalid", "ca_bundle must be the PEM text of the CA bundle")
            try:
                x509.load_pem_x509_certificates(bundle.encode())
            except ValueError as exc:
                raise WriteError(400, "invalid", f"ca_bundle is not PEM certificates: {exc}") from None
        if getattr(self.api.node, "cert_sealer", None) is None:
            raise WriteError(409, "conflict", "this node has no cluster secret (--insecure-dev without "
                             "secret_file), so it cannot keep ACME keys; refused")
        result = await self.api.write(request, "acme.request", {k: body.get(k) for k in ACME_FIELDS if k in body})
        return web.json_response(self.api.envelope(**result), status=202)

    async def renew(self, request: web.Request) -> web.Response:
        result = await self.api.write(request, "acme.renew", {"name": request.match_info["name"]})
        return web.json_response(self.api.envelope(**result), status=202)

    async def remove(self, request: web.Request) -> web.Response:
        result = await self.api.write(request, "cert.remove", {"name": request.match_info["name"]})
        return web.json_response(self.api.envelope(**result))


__all__ = ["CertRoutes"]

"""Admin API routes for TLS certificates: /v1/certs.

`POST` carries the plaintext key once, over the admin API (TLS): this node checks the pair
(halb/certs/pem.py), seals the key with the cluster secret (halb/certs/sealing.py) and
proposes only the sealed form. Answers, events and lists carry public facts only.
"""
from __future__ import annotations

import time
from typing import Any, Awaitable, Callable

from aiohttp import web

from halb.certs.pem import CertError, check_pair
from halb.certs.records import cert_summary
from halb.control.writer import WriteError

ADD_FIELDS = frozenset({"name", "cert", "key", "replace"})


class CertRoutes:
    """Handlers bound to the AdminApi (for read_json, write, envelope and the node)."""

    def __init__(self, api: Any, read_json: Callable[[web.Request], Awaitable[dict[str, Any]]]) -> None:
        self.api = api
        self.read_json = read_json  # server.read_json (passed in: that module imports this one)

    def register(self, router: web.UrlDispatcher) -> None:
        router.add_get("/v1/certs", self.list)
        router.add_post("/v1/certs", self.add)
        router.add_delete("/v1/certs/{name}", self.remove)

    def records(self) -> list[dict[str, Any]]:
        with self.api.node.raft.read() as cs:
            return [cert_summary(r) for r in sorted(cs.certs.values(), key=lambda r: str(r.get("name")))]

    async def list(self, request: web.Request) -> web.Response:
        return web.json_response(self.api.envelope(certs=self.records()))

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
        info = pair.info
        args = {"name": body["name"], "chain": pair.chain_pem, "key_sealed": sealer.seal(pair.key_pem, body["name"]),
                "sans": list(info.sans), "not_before": info.not_before, "not_after": info.not_after,
                "fingerprint": info.fingerprint, "issuer": info.issuer, "key_type": info.key_type,
                "source": "file", "replace": body.get("replace", False)}
        result = await self.api.write(request, "cert.add", args)
        return web.json_response(self.api.envelope(**result), status=201)

    async def remove(self, request: web.Request) -> web.Response:
        result = await self.api.write(request, "cert.remove", {"name": request.match_info["name"]})
        return web.json_response(self.api.envelope(**result))


__all__ = ["CertRoutes"]

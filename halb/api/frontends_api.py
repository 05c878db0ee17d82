"""Admin API routes for frontends and their routes: /v1/frontends.

Reads come from this node's copy of the state; `listen` names every node's address for the
frontend's port (each node binds its own listen host, like per-service listeners). Writes
are validated in full (commands.frontend_args) and proposed; apply checks what needs the
state (ports free, services exist and are HTTP with a listener).
"""
from __future__ import annotations

from typing import Any, Awaitable, Callable

from aiohttp import web

from halb.control.writer import WriteError

FRONTEND_FIELDS = frozenset({"name", "port", "tls", "http_port", "redirect_https", "default_service", "default_cert",
                             "accept_proxy"})
ROUTE_FIELDS = frozenset({"host", "path_prefix", "service"})


def frontends_view(frontends: dict[str, Any], hosts: list[str]) -> list[dict[str, Any]]:
    """`halb frontend list --json`: [{name, port, tls, listen: [HOST:PORT per node], routes, ...}]."""
    out = []
    for name in sorted(frontends):
        fe = dict(frontends[name])
        fe["routes"] = [dict(r) for r in fe.get("routes") or []]
        fe["listen"] = sorted(f"{h or '0.0.0.0'}:{fe['port']}" for h in hosts)
        fe["http_listen"] = sorted(f"{h or '0.0.0.0'}:{fe['http_port']}" for h in hosts) if fe.get("http_port") else []
        out.append(fe)
    return out


class FrontendRoutes:
    """Handlers bound to the AdminApi (for read_json, write and envelope)."""

    def __init__(self, api: Any, read_json: Callable[[web.Request], Awaitable[dict[str, Any]]]) -> None:
        self.api = api
        self.read_json = read_json

    def register(self, router: web.UrlDispatcher) -> None:
        router.add_get("/v1/frontends", self.list)
        router.add_post("/v1/frontends", self.add)
        router.add_delete("/v1/frontends/{name}", self.remove)
        router.add_post("/v1/frontends/{name}/routes", self.route_add)
        router.add_delete("/v1/frontends/{name}/routes", self.route_remove)

    def view(self) -> list[dict[str, Any]]:
        with self.api.node.raft.read() as cs:
            frontends = {k: dict(v) for k, v in cs.frontends.items() if isinstance(v, dict)}
            hosts = [m.listen_host for m in cs.members.values()]
        return frontends_view(frontends, hosts)

    async def list(self, request: web.Request) -> web.Response:
        return web.json_response(self.api.envelope(frontends=self.view()))

    async def add(self, request: web.Request) -> web.Response:
        body = await self.read_json(request)
        _only(body, FRONTEND_FIELDS)
        result = await self.api.write(request, "frontend.add", body)
        return web.json_response(self.api.envelope(**result), status=201)

    async def remove(self, request: web.Request) -> web.Response:
        result = await self.api.write(request, "frontend.remove", {"name": request.match_info["name"]})
        return web.json_response(self.api.envelope(**result))

    async def route_add(self, request: web.Request) -> web.Response:
        body = await self.read_json(request)
        _only(body, ROUTE_FIELDS)
        result = await self.api.write(request, "route.add", dict(body, frontend=request.match_info["name"]))
        return web.json_response(self.api.envelope(**result), status=201)

    async def route_remove(self, request: web.Request) -> web.Response:
        q = request.query
        _only(dict(q), frozenset({"host", "path_prefix"}))
        args = {"frontend": request.match_info["name"], "host": q.get("host", "")}
        if "path_prefix" in q:
            args["path_prefix"] = q["path_prefix"]
        result = await self.api.write(request, "route.remove", args)
        return web.json_response(self.api.envelope(**result))


def _only(body: dict[str, Any], allowed: frozenset[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise WriteError(400, "invalid", f"unknown field(s): {', '.join(unknown)}"[:300])


__all__ = ["FrontendRoutes", "frontends_view"]

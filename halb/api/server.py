"""Admin REST API served by every node (aiohttp).

Reads answer from this node's copy of the replicated state and say who answered, whom
it believes leads and its Raft state, so an operator can judge staleness. Writes go
through Raft and answer only after commit, or fail with 503 within the write deadline.
Every error is JSON `{"error": code, "message": text}` with a fitting status.
"""
from __future__ import annotations

import hmac
import json
import logging
from typing import Any, Awaitable, Callable

from aiohttp import web

from halb.control.writer import WriteError
from halb.model import ADMIN_STATES, Backend, ModelError, Service, check_name, parse_hostport, to_primitive

log = logging.getLogger(__name__)

UNAUTHENTICATED_PATHS = frozenset({"/healthz", "/readyz"})
MAX_BODY = 1 << 20

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_error(status: int, code: str, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": code, "message": message, **extra}, status=status)


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except WriteError as exc:
        return json_error(exc.status, exc.code, exc.message)
    except web.HTTPException as exc:
        if exc.content_type == "application/json":
            raise
        return json_error(exc.status, exc.reason.lower().replace(" ", "_"), exc.text or exc.reason)
    except Exception:
        log.exception("API handler failed: %s %s", request.method, request.path)
        return json_error(500, "internal", "internal error; see the node's log")


def auth_middleware(token: str) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in UNAUTHENTICATED_PATHS:
            return await handler(request)
        given = request.headers.get("Authorization", "").encode()
        if not given:
            return json_error(401, "unauthorized", "missing bearer token (Authorization: Bearer TOKEN)")
        if not hmac.compare_digest(given, expected):
            return json_error(401, "unauthorized", "invalid token")
        return await handler(request)

    return check


async def read_json(request: web.Request) -> dict[str, Any]:
    if request.content_length and request.content_length > MAX_BODY:
        raise WriteError(413, "too_large", f"request body over {MAX_BODY} bytes")
    raw = await request.read()
    if not raw:
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise WriteError(400, "malformed_json", f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise WriteError(400, "malformed_json", "request body must be a JSON object")
    return body


def who(request: web.Request) -> str:
    return request.headers.get("X-Halb-Operator") or f"api@{request.remote}"


class AdminApi:
    """Routes; `node` is the running halb.node.Node (duck-typed to avoid an import cycle)."""

    def __init__(self, node: Any) -> None:
        self.node = node

    def app(self) -> web.Application:
        app = web.Application(
            middlewares=[errors_middleware, auth_middleware(self.node.token)], client_max_size=MAX_BODY
        )
        r = app.router
        r.add_get("/healthz", self.healthz)
        r.add_get("/readyz", self.readyz)
        r.add_get("/v1/status", self.status)
        r.add_get("/v1/services", self.services)
        r.add_post("/v1/services", self.service_add)
        r.add_get("/v1/services/{svc}", self.service_get)
        r.add_get("/v1/services/{svc}/resilience", self.service_resilience)
        r.add_get("/v1/resilience", self.resilience_all)
        r.add_delete("/v1/services/{svc}", self.service_remove)
        r.add_get("/v1/backends", self.backends_all)
        r.add_get("/v1/services/{svc}/backends", self.backends)
        r.add_post("/v1/services/{svc}/backends", self.backend_add)
        r.add_get("/v1/services/{svc}/backends/{name}", self.backend_get)
        r.add_delete("/v1/services/{svc}/backends/{name}", self.backend_remove)
        r.add_post("/v1/services/{svc}/backends/{name}/{action}", self.backend_action)
        r.add_put("/v1/services/{svc}/backends/{name}/weight", self.backend_weight)
        r.add_get("/v1/members", self.members)
        r.add_post("/v1/members", self.member_add)
        r.add_delete("/v1/members/{id}", self.member_remove)
        r.add_post("/v1/leader/transfer", self.leader_transfer)
        r.add_get("/v1/events", self.events)
        r.add_post("/v1/admin/shutdown", self.shutdown)
        for path, handler in self.node.extra_routes():
            r.add_get(path, handler)
        return app

    # --- helpers ----------------------------------------------------------------------

    def envelope(self, **data: Any) -> dict[str, Any]:
        """Every read says who answered and what it believes about leadership."""
        st = self.node.raft.raft_status()
        return {"node": self.node.node_id, "leader": self.node.leader_id(), "raft_state": st.state, **data}

    async def write(self, request: web.Request, op: str, args: dict[str, Any]) -> dict[str, Any]:
        cid = request.headers.get("Idempotency-Key") or None
        return await self.node.writer.write(op, args, by=who(request), cid=cid)

    # --- probes -----------------------------------------------------------------------

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "node": self.node.node_id})

    async def readyz(self, request: web.Request) -> web.Response:
        st = self.node.raft.raft_status()
        ready = st.leader is not None and self.node.raft.isReady()
        body = {"ready": ready, "node": self.node.node_id, "raft_state": st.state, "leader": self.node.leader_id()}
        return web.json_response(body, status=200 if ready else 503)

    # --- status, services, backends ----------------------------------------------------

    async def status(self, request: web.Request) -> web.Response:
        return web.json_response(self.node.status_view())

    async def services(self, request: web.Request) -> web.Response:
        return web.json_response(self.envelope(services=self.node.services_view()))

    async def service_get(self, request: web.Request) -> web.Response:
        name = request.match_info["svc"]
        for svc in self.node.services_view():
            if svc["name"] == name:
                reports = self.node.resilience_view(name)
                return web.json_response(self.envelope(service=dict(svc, resilience=reports[0] if reports else None)))
        return json_error(404, "not_found", f"service {name!r} does not exist")

    async def service_resilience(self, request: web.Request) -> web.Response:
        name = request.match_info["svc"]
        reports = self.node.resilience_view(name)
        if not reports:
            return json_error(404, "not_found", f"service {name!r} does not exist")
        return web.json_response(self.envelope(resilience=reports[0]))

    async def resilience_all(self, request: web.Request) -> web.Response:
        return web.json_response(self.envelope(resilience=self.node.resilience_view(None)))

    async def service_add(self, request: web.Request) -> web.Response:
        body = await read_json(request)
        try:
            svc = Service(**{k: body[k] for k in ("name", "mode", "listen", "algorithm", "hash_key", "options")
                             if k in body})
        except (ModelError, TypeError) as exc:
            return json_error(400, "invalid", str(exc))
        unknown = set(body) - {"name", "mode", "listen", "algorithm", "hash_key", "options", "backends"}
        if unknown:
            return json_error(400, "invalid", f"unknown field(s): {', '.join(sorted(unknown))}")
        args = to_primitive(svc)
        try:
            for b in body.get("backends", []) or []:
                be = Backend(**b)
                if be.name in args["backends"]:
                    return json_error(400, "invalid", f"backend {be.name!r} listed twice")
                args["backends"][be.name] = to_primitive(be)
        except (ModelError, TypeError) as exc:
            return json_error(400, "invalid", str(exc))
        result = await self.write(request, "service.add", args)
        return web.json_response(self.envelope(**result), status=201)

    async def service_remove(self, request: web.Request) -> web.Response:
        result = await self.write(request, "service.remove", {"name": request.match_info["svc"]})
        return web.json_response(self.envelope(**result))

    async def backends_all(self, request: web.Request) -> web.Response:
        return web.json_response(self.envelope(backends=self.node.backends_view(None)))

    async def backends(self, request: web.Request) -> web.Response:
        svc = request.match_info["svc"]
        if svc not in {s["name"] for s in self.node.services_view()}:
            return json_error(404, "not_found", f"service {svc!r} does not exist")
        return web.json_response(self.envelope(backends=self.node.backends_view(svc)))

    async def backend_get(self, request: web.Request) -> web.Response:
        svc, name = request.match_info["svc"], request.match_info["name"]
        for be in self.node.backends_view(svc):
            if be["name"] == name:
                return web.json_response(self.envelope(backend=be))
        return json_error(404, "not_found", f"backend {name!r} does not exist in service {svc!r}")

    async def backend_add(self, request: web.Request) -> web.Response:
        body = await read_json(request)
        unknown = set(body) - {"name", "address", "weight", "server", "zone", "admin_state", "max_rps", "max_conns"}
        if unknown:
            return json_error(400, "invalid", f"unknown field(s): {', '.join(sorted(unknown))}")
        try:
            be = Backend(**body)
        except TypeError:
            return json_error(400, "invalid", "backend needs at least 'name' and 'address'")
        except ModelError as exc:
            return json_error(400, "invalid", str(exc))
        result = await self.write(request, "backend.add", {"service": request.match_info["svc"],
                                                           "backend": to_primitive(be)})
        return web.json_response(self.envelope(**result), status=201)

    async def backend_remove(self, request: web.Request) -> web.Response:
        result = await self.write(request, "backend.remove",
                                  {"service": request.match_info["svc"], "name": request.match_info["name"]})
        return web.json_response(self.envelope(**result))

    async def backend_action(self, request: web.Request) -> web.Response:
        action = request.match_info["action"]
        state = {"drain": "drain", "maint": "maint", "enable": "active"}.get(action)
        if state is None:
            return json_error(404, "not_found", f"unknown action {action!r}; use drain, maint or enable")
        result = await self.write(request, "backend.state", {"service": request.match_info["svc"],
                                                             "name": request.match_info["name"], "state": state})
        return web.json_response(self.envelope(**result))

    async def backend_weight(self, request: web.Request) -> web.Response:
        body = await read_json(request)
        weight = body.get("weight")
        if not isinstance(weight, int) or isinstance(weight, bool) or not 0 <= weight <= 10000:
            return json_error(400, "invalid", "body must be {\"weight\": INTEGER 0-10000}")
        result = await self.write(request, "backend.weight", {"service": request.match_info["svc"],
                                                              "name": request.match_info["name"], "weight": weight})
        return web.json_response(self.envelope(**result))

    # --- members and leadership -------------------------------------------------------

    async def members(self, request: web.Request) -> web.Response:
        return web.json_response(self.envelope(members=self.node.members_view()))

    async def member_add(self, request: web.Request) -> web.Response:
        body = await read_json(request)
        try:
            node_id = check_name(body.get("id"), "member id")
            raft = body.get("raft")
            api = body.get("api")
            parse_hostport(raft, "raft address")
            parse_hostport(api, "api address")
        except ModelError as exc:
            return json_error(400, "invalid", str(exc))
        result = await self.node.member_add(node_id, raft, api, by=who(request))
        return web.json_response(self.envelope(**result), status=201)

    async def member_remove(self, request: web.Request) -> web.Response:
        result = await self.node.member_remove(request.match_info["id"], by=who(request))
        return web.json_response(self.envelope(**result))

    async def leader_transfer(self, request: web.Request) -> web.Response:
        body = await read_json(request)
        target = body.get("to")
        if target is not None and not isinstance(target, str):
            return json_error(400, "invalid", "'to' must be a node id")
        result = await self.node.transfer_leadership(target, by=who(request))
        return web.json_response(self.envelope(**result))

    async def events(self, request: web.Request) -> web.Response:
        try:
            since = int(request.query.get("since", "0"))
            limit = int(request.query.get("limit", "100"))
            last = int(request.query.get("last", "0"))
        except ValueError:
            return json_error(400, "invalid", "since, limit and last must be integers")
        limit = max(1, min(limit, 1000))
        events = self.node.events_view(since, 100000)
        events = events[-min(last, 1000):] if last > 0 else events[:limit]
        return web.json_response(self.envelope(events=events))

    async def shutdown(self, request: web.Request) -> web.Response:
        log.warning("shutdown requested through the API by %s", who(request))
        self.node.request_stop(f"shutdown requested by {who(request)}")
        return web.json_response({"ok": True, "node": self.node.node_id, "stopping": True}, status=202)


__all__ = ["AdminApi", "ADMIN_STATES"]

"""Admin REST API served by every node (aiohttp).

Reads answer from this node's copy of the replicated state and say who answered, whom
it believes leads and its Raft state, so an operator can judge staleness. Writes go
through Raft and answer only after commit, or fail with 503 within the write deadline.
Every error is JSON `{"error": code, "message": text}` with a fitting status (except the
status page's sign-in form under /ui, which answers a browser: halb/api/ui.py).
"""
from __future__ import annotations

import json
import logging
import math
from typing import Any, Awaitable, Callable

from aiohttp import web

from halb.api import ui
from halb.api.certs_api import CertRoutes
from halb.api.frontends_api import FrontendRoutes
from halb.api.protocol import AdminRunner, install_log_redaction
from halb.api.roles import Identity, identify, required_role
from halb.api.validation import validate_full
from halb.control.commands import CommandError
from halb.tokens import BOOTSTRAP_NAME, hash_token, new_token, role_allows
from halb.control.writer import ERROR_STATUS, WriteError
from halb.model import ADMIN_STATES, ModelError, check_name, listen_conflict, parse_hostport

log = logging.getLogger(__name__)

UNAUTHENTICATED_PATHS = frozenset({"/healthz", "/readyz"})
MAX_BODY = 1 << 20
MAX_JSON_DEPTH = 64
MAX_HEADER_TEXT = 128  # Idempotency-Key

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


TokenSource = Callable[[], list[dict[str, Any]]]
BEARER = b"Bearer "


def auth_middleware(token: str, tokens: TokenSource = lambda: []
                    ) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    """401 for an absent or unknown token, 403 (with the role it needs) for a known token
    whose role does not cover the route. `tokens()` reads the replicated token table on each
    request, so a revoked token stops working on this node as soon as the revoke applies.
    The status page's cookie is the same token, taken only for reads under /ui (ui.cookie_credential)."""
    bootstrap_hash = hash_token(token)

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in UNAUTHENTICATED_PATHS:
            return await handler(request)
        # aiohttp decodes header bytes that are not UTF-8 as surrogates: encode them back the
        # same way, so such a header is simply a wrong token (401), not an encoding crash
        given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
        if not given:  # the status page's cookie (reads under /ui only), checked like a bearer token
            cookie = ui.cookie_credential(request)
            given = BEARER + cookie if cookie is not None else b""
        ident = identify(given[len(BEARER):], bootstrap_hash, tokens()) if given.startswith(BEARER) else None
        if ui.is_public(request):  # the login form, sign in/out, assets: the handler decides (halb/api/ui.py)
            if ident is not None:
                request["identity"] = ident
            return await handler(request)
        if not given:
            return json_error(401, "unauthorized", "missing bearer token (Authorization: Bearer TOKEN)")
        if ident is None:
            return json_error(401, "unauthorized", "invalid token")
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else None
        needed = required_role(request.method, route)
        if not role_allows(ident.role, needed):
            return json_error(403, "forbidden", f"token {ident.name!r} has role {ident.role}; "
                              f"{request.method} {route or request.path} needs role {needed}",
                              token=ident.name, role=ident.role, required_role=needed)
        request["identity"] = ident
        return await handler(request)

    return check


async def read_json(request: web.Request) -> dict[str, Any]:
    if request.content_length and request.content_length > MAX_BODY:
        raise WriteError(413, "too_large", f"request body over {MAX_BODY} bytes")
    raw = await request.read()
    if not raw:
        return {}
    try:
        body = json.loads(raw, parse_constant=_no_constant, parse_float=_finite_float)
    except RecursionError:
        raise WriteError(400, "malformed_json", "request body is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise WriteError(400, "malformed_json", f"request body is not valid JSON: {exc}"[:300]) from None
    if not isinstance(body, dict):
        raise WriteError(400, "malformed_json", "request body must be a JSON object")
    if _depth(body) > MAX_JSON_DEPTH:
        raise WriteError(400, "malformed_json", f"request body is nested deeper than {MAX_JSON_DEPTH} levels")
    return body


def _no_constant(name: str) -> Any:
    # Python's json accepts NaN/Infinity; they are not JSON and would come back out as invalid JSON
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 parses to inf
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def _depth(value: Any) -> int:
    """Nesting depth without recursion (a deep body must not exhaust the stack here either)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        deepest = max(deepest, d)
        if d > MAX_JSON_DEPTH:
            break
        if isinstance(v, dict):
            stack.extend((x, d + 1) for x in v.values())
        elif isinstance(v, list):
            stack.extend((x, d + 1) for x in v)
    return deepest


def _header_text(request: web.Request, name: str) -> str | None:
    """A free-text header that ends up in the replicated state: printable ASCII, bounded."""
    value = request.headers.get(name)
    if not value:  # absent or empty: not given (the client library sends an empty operator)
        return None
    if len(value) > MAX_HEADER_TEXT or not value.isascii() or not value.isprintable():
        raise WriteError(400, "invalid", f"{name} must be at most {MAX_HEADER_TEXT} printable ASCII characters")
    return value


def who(request: web.Request) -> str:
    """The audit label: the name of the token that authenticated the request (set by
    auth_middleware). Never a header: a client could write anything there."""
    ident = request.get("identity")
    return ident.name if isinstance(ident, Identity) else f"api@{request.remote}"


class AdminApi:
    """Routes; `node` is the running halb.node.Node (duck-typed to avoid an import cycle)."""

    def __init__(self, node: Any) -> None:
        self.node = node

    def runner(self, **kwargs: Any) -> web.AppRunner:
        """The runner to serve `app()` with: errors aiohttp raises before any handler runs
        (oversized or malformed heads) answer JSON too, and never echo header values."""
        return AdminRunner(self.app(), **kwargs)

    def app(self) -> web.Application:
        install_log_redaction()
        app = web.Application(
            middlewares=[errors_middleware, auth_middleware(self.node.token, self.token_records)],
            client_max_size=MAX_BODY,
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
        r.add_put("/v1/services/{svc}/backends/{name}/limits", self.backend_limits)
        r.add_get("/v1/members", self.members)
        r.add_post("/v1/members", self.member_add)
        r.add_delete("/v1/members/{id}", self.member_remove)
        r.add_post("/v1/leader/transfer", self.leader_transfer)
        r.add_get("/v1/events", self.events)
        r.add_post("/v1/admin/shutdown", self.shutdown)
        r.add_get("/v1/tokens", self.tokens)
        r.add_post("/v1/tokens", self.token_add)
        r.add_delete("/v1/tokens/{name}", self.token_revoke)
        CertRoutes(self, read_json).register(r)
        FrontendRoutes(self, read_json).register(r)
        for path, handler in self.node.extra_routes():
            r.add_get(path, handler)
        bootstrap_hash = hash_token(self.node.token)
        ui.StatusPage(self.node.views, lambda given: identify(given, bootstrap_hash, self.token_records())).add_routes(r)
        for path, handler in getattr(self.node, "extra_post_routes", list)():  # admin role (roles.py)
            r.add_post(path, handler)
        return app

    # --- helpers ----------------------------------------------------------------------

    def token_records(self) -> list[dict[str, Any]]:
        """This node's copy of the replicated token table (a short lock, no I/O)."""
        with self.node.raft.read() as cs:
            return list(cs.tokens.values())

    def envelope(self, **data: Any) -> dict[str, Any]:
        """Every read says who answered and what it believes about leadership."""
        st = self.node.raft.raft_status()
        return {"node": self.node.node_id, "leader": self.node.views.leader_id(), "raft_state": st.state, **data}

    async def write(self, request: web.Request, op: str, args: dict[str, Any]) -> dict[str, Any]:
        """Validate in full (400 with the reason, nothing proposed), pre-check what needs
        the state (listen clash: 409), then propose. Apply re-checks both: it is the authority."""
        cid = _header_text(request, "Idempotency-Key")
        by = who(request)
        try:
            args = validate_full(op, args)
        except CommandError as exc:
            raise WriteError(ERROR_STATUS.get(exc.code, 400), exc.code, exc.message) from None
        clash = self.listen_clash(op, args)
        if clash:
            raise WriteError(409, "conflict", clash)
        return await self.node.writer.write(op, args, by=by, cid=cid)

    def listen_clash(self, op: str, args: dict[str, Any]) -> str | None:
        if op not in ("service.add", "service.update") or not args.get("listen"):
            return None
        with self.node.raft.read() as cs:
            services = list(cs.services.values())
        if op == "service.add":
            return listen_conflict(services, args["listen"], args["mode"])
        mine = next((s for s in services if s.name == args["name"]), None)
        mode = mine.mode if mine is not None else "http"
        return listen_conflict(services, args["listen"], mode, exclude=args["name"])

    # --- probes -----------------------------------------------------------------------

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "node": self.node.node_id})

    async def readyz(self, request: web.Request) -> web.Response:
        st = self.node.raft.raft_status()
        ready = st.leader is not None and self.node.raft.isReady()
        body = {"ready": ready, "node": self.node.node_id, "raft_state": st.state, "leader": self.node.views.leader_id()}
        return web.json_response(body, status=200 if ready else 503)

    # --- status, services, backends ----------------------------------------------------

    async def status(self, request: web.Request) -> web.Response:
        return web.json_response(self.node.views.status_view())

    async def services(self, request: web.Request) -> web.Response:
        return web.json_response(self.envelope(services=self.node.views.services_view()))

    async def service_get(self, request: web.Request) -> web.Response:
        name = request.match_info["svc"]
        for svc in self.node.views.services_view():
            if svc["name"] == name:
                reports = self.node.views.resilience_view(name)
                return web.json_response(self.envelope(service=dict(svc, resilience=reports[0] if reports else None)))
        return json_error(404, "not_found", f"service {name!r} does not exist")

    async def service_resilience(self, request: web.Request) -> web.Response:
        name = request.match_info["svc"]
        reports = self.node.views.resilience_view(name)
        if not reports:
            return json_error(404, "not_found", f"service {name!r} does not exist")
        return web.json_response(self.envelope(resilience=reports[0]))

    async def resilience_all(self, request: web.Request) -> web.Response:
        return web.json_response(self.envelope(resilience=self.node.views.resilience_view(None)))

    async def service_add(self, request: web.Request) -> web.Response:
        body = await read_json(request)
        if "name" not in body:
            return json_error(400, "invalid", "service needs at least 'name' (and 'listen' to be served)")
        result = await self.write(request, "service.add", body)
        return web.json_response(self.envelope(**result), status=201)

    async def service_remove(self, request: web.Request) -> web.Response:
        result = await self.write(request, "service.remove", {"name": request.match_info["svc"]})
        return web.json_response(self.envelope(**result))

    async def backends_all(self, request: web.Request) -> web.Response:
        return web.json_response(self.envelope(backends=self.node.views.backends_view(None)))

    async def backends(self, request: web.Request) -> web.Response:
        svc = request.match_info["svc"]
        if svc not in {s["name"] for s in self.node.views.services_view()}:
            return json_error(404, "not_found", f"service {svc!r} does not exist")
        return web.json_response(self.envelope(backends=self.node.views.backends_view(svc)))

    async def backend_get(self, request: web.Request) -> web.Response:
        svc, name = request.match_info["svc"], request.match_info["name"]
        for be in self.node.views.backends_view(svc):
            if be["name"] == name:
                return web.json_response(self.envelope(backend=be))
        return json_error(404, "not_found", f"backend {name!r} does not exist in service {svc!r}")

    async def backend_add(self, request: web.Request) -> web.Response:
        body = await read_json(request)
        if "name" not in body or "address" not in body:
            return json_error(400, "invalid", "backend needs at least 'name' and 'address'")
        result = await self.write(request, "backend.add", {"service": request.match_info["svc"], "backend": body})
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

    async def backend_limits(self, request: web.Request) -> web.Response:
        """Body `{max_conns?, max_rps?}`: the command's schema checks it (400 with the reason)."""
        body = await read_json(request)
        result = await self.write(request, "backend.limits", {**body, "service": request.match_info["svc"],
                                                              "name": request.match_info["name"]})
        return web.json_response(self.envelope(**result))

    # --- members and leadership -------------------------------------------------------

    async def members(self, request: web.Request) -> web.Response:
        return web.json_response(self.envelope(members=self.node.views.members_view()))

    async def member_add(self, request: web.Request) -> web.Response:
        body = await read_json(request)
        unknown = sorted(set(body) - {"id", "raft", "api"})
        if unknown:
            return json_error(400, "invalid", f"unknown field(s): {', '.join(unknown)}")
        try:
            node_id = check_name(body.get("id"), "member id")
            raft = body.get("raft")
            api = body.get("api")
            parse_hostport(raft, "raft address")
            parse_hostport(api, "api address")
        except ModelError as exc:
            return json_error(400, "invalid", str(exc))
        try:
            validate_full("member.register", {"id": node_id, "raft": raft, "api": api})
        except CommandError as exc:
            return json_error(400, exc.code, exc.message)
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
        events = self.node.views.events_view(since, 100000)
        events = events[-min(last, 1000):] if last > 0 else events[:limit]
        return web.json_response(self.envelope(events=events))

    # --- tokens -------------------------------------------------------------------------

    async def tokens(self, request: web.Request) -> web.Response:
        """GET is a read, but the list names every caller: admin only (see roles.py)."""
        rows = [{"name": BOOTSTRAP_NAME, "role": "admin", "source": "token_file", "at": None, "by": None}]
        rows += [{"name": t.get("name"), "role": t.get("role"), "source": "cluster", "at": t.get("at"),
                  "by": t.get("by")} for t in sorted(self.token_records(), key=lambda t: str(t.get("name")))]
        return web.json_response(self.envelope(tokens=rows))

    async def token_add(self, request: web.Request) -> web.Response:
        """The node makes the token and proposes only its hash; the answer is the one time the
        token is shown. A retried request (same Idempotency-Key) that finds the first attempt
        already applied cannot show that token again: 409, revoke and add again."""
        body = await read_json(request)
        unknown = sorted(set(body) - {"name", "role"})
        if unknown:
            return json_error(400, "invalid", f"unknown field(s): {', '.join(unknown)}")
        token = new_token()
        result = await self.write(request, "token.add", {"name": body.get("name"), "role": body.get("role"),
                                                         "hash": hash_token(token)})
        if result.get("duplicate"):
            return json_error(409, "conflict", f"token {body.get('name')!r} was added by an earlier attempt of "
                              "this request whose answer was lost; revoke it and add it again")
        return web.json_response(self.envelope(**result, secret=token), status=201)

    async def token_revoke(self, request: web.Request) -> web.Response:
        result = await self.write(request, "token.revoke", {"name": request.match_info["name"]})
        return web.json_response(self.envelope(**result))

    async def shutdown(self, request: web.Request) -> web.Response:
        log.warning("shutdown requested through the API by %s", who(request))
        self.node.request_stop(f"shutdown requested by {who(request)}")
        return web.json_response({"ok": True, "node": self.node.node_id, "stopping": True}, status=202)


__all__ = ["AdminApi", "ADMIN_STATES"]

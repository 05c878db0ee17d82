"""The Toxiproxy HTTP API (aiohttp) over a registry of proxies.

Status codes, messages and body shapes follow the real server (see
/work/shared/TOXIPROXY_API.md and docs/toxiproxy.md), so toxiproxy-python and other
clients work unchanged. Deliberate deviations: inputs that would crash or confuse
the real server (negative attributes, broken slicer settings, unparseable
addresses) are refused with 400 instead of being accepted.
"""
from __future__ import annotations

import asyncio
import json
import logging
import secrets
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from aiohttp import web

from .jsonbody import BodyError, Field, Pairs, decode_first_value, decode_struct
from .proxy import AddressError, Proxy, ProxyError, check_listen, check_upstream, resolve_listen
from .toxics import (
    ATTRIBUTES, GO_STRUCT, ToxicConfig, ToxicInputError, float32, parse_stream, validate_attributes,
)

log = logging.getLogger("halb.chaos.toxiproxy")

VERSION = "2.12.0"
HANDLER_TIMEOUT_S = 25.0
REQUEST_ID_ALPHABET = "0123456789abcdefghijklmnopqrstuv"  # xid-style base32hex

PROXY_FIELDS = [Field("name", "string"), Field("listen", "string"), Field("upstream", "string"),
                Field("enabled", "bool")]
TOXIC_FIELDS = [Field("name", "string"), Field("type", "string"), Field("stream", "string"),
                Field("toxicity", "float32")]
TOXIC_UPDATE_FIELDS = [Field("toxicity", "float32")]


class ApiError(Exception):
    """An error answer: ``{"error": message, "status": status}``."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


def bad_body(detail: str) -> ApiError:
    return ApiError(f"bad request body: {detail}", 400)


PROXY_NOT_FOUND = ("proxy not found", 404)
TOXIC_NOT_FOUND = ("toxic not found", 404)


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def json_response(obj: Any, status: int = 200) -> web.Response:
    return web.Response(text=_dumps(obj), status=status, content_type="application/json")


def error_response(err: ApiError) -> web.Response:
    body = _dumps({"error": err.message, "status": err.status}) + "\n"
    resp = web.Response(text=body, status=err.status)
    resp.headers["Content-Type"] = "text/plain; charset=utf-8"
    resp.headers["X-Content-Type-Options"] = "nosniff"
    return resp


# ---------------------------------------------------------------- registry

@dataclass
class Registry:
    """All proxies by name. Every method runs on the event loop, one at a time."""

    proxies: dict[str, Proxy] = field(default_factory=dict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def get(self, name: str) -> Proxy:
        proxy = self.proxies.get(name)
        if proxy is None:
            raise ApiError(*PROXY_NOT_FOUND)
        return proxy

    async def create(self, name: str, listen: str, upstream: str, enabled: bool) -> Proxy:
        if name in self.proxies:
            raise ApiError("proxy already exists", 409)
        proxy = Proxy(name, listen, upstream)
        if enabled:
            await start_proxy(proxy)
        self.proxies[name] = proxy
        return proxy

    async def add_or_replace(self, name: str, listen: str, upstream: str, enabled: bool) -> Proxy:
        """``/populate`` semantics: keep an identical proxy untouched, else replace it."""
        existing = self.proxies.get(name)
        if existing is not None:
            if existing.upstream == upstream and await same_listen(existing, listen):
                return existing
            existing.stop()
            del self.proxies[name]
        return await self.create(name, listen, upstream, enabled)

    def delete(self, name: str) -> None:
        proxy = self.get(name)
        proxy.stop()
        del self.proxies[name]

    async def reset(self) -> None:
        for proxy in list(self.proxies.values()):
            await start_proxy(proxy)
            proxy.remove_all_toxics()

    def stop_all(self) -> None:
        for proxy in self.proxies.values():
            proxy.stop()


async def start_proxy(proxy: Proxy) -> None:
    try:
        await proxy.start()
    except (ProxyError, AddressError) as exc:
        raise ApiError(str(exc), 500) from exc
    except OSError as exc:
        raise ApiError(f"listen tcp {proxy.listen}: {exc}", 500) from exc


async def same_listen(proxy: Proxy, listen: str) -> bool:
    try:
        return (await resolve_listen(listen)).text() == proxy.listen
    except (ProxyError, AddressError):
        return False


def validate_addresses(listen: str | None, upstream: str | None) -> None:
    try:
        if listen is not None:
            check_listen(listen)
        if upstream is not None:
            check_upstream(upstream)
    except AddressError as exc:
        raise bad_body(str(exc)) from exc


# ---------------------------------------------------------------- body helpers

async def read_json(request: web.Request) -> Any:
    raw = await request.read()
    try:
        return decode_first_value(raw)
    except BodyError as exc:
        raise bad_body(str(exc)) from exc


def struct_fields(value: Any, struct: str, fields: list[Field]) -> dict[str, Any]:
    try:
        return decode_struct(value, struct, fields)
    except BodyError as exc:
        raise bad_body(str(exc)) from exc


def find_key(value: Pairs, key: str) -> tuple[bool, Any]:
    """Last case-insensitive match of ``key`` in an object (Go's last-wins rule)."""
    found, result = False, None
    for k, v in value:
        if k.lower() == key:
            found, result = True, v
    return found, result


def decode_attributes(body: Any, toxic_type: str, current: dict[str, int]) -> dict[str, int]:
    """Merge the body's ``attributes`` into ``current`` and validate the result."""
    attrs = dict(current)
    if isinstance(body, Pairs):
        present, raw = find_key(body, "attributes")
        if present and raw is not None:
            struct = f"ToxicWrapper.attributes.{GO_STRUCT[toxic_type]}"
            fields = [Field(name, "int64") for name in ATTRIBUTES[toxic_type]]
            if not isinstance(raw, Pairs):
                raise bad_body(f"json: cannot unmarshal {type(raw).__name__} into Go struct field "
                               f"ToxicWrapper.attributes of type toxics.{GO_STRUCT[toxic_type]}")
            attrs.update(struct_fields(raw, struct, fields))
    try:
        validate_attributes(toxic_type, attrs)
    except ToxicInputError as exc:
        raise bad_body(str(exc)) from exc
    return attrs


# ---------------------------------------------------------------- handlers

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Api:
    """Route handlers bound to one registry."""

    def __init__(self, registry: Registry) -> None:
        self.reg = registry

    async def version(self, request: web.Request) -> web.Response:
        return web.Response(body=f'{{"version": "{VERSION}"}}\n'.encode(),
                            headers={"Content-Type": "application/json;charset=utf-8"})

    async def reset(self, request: web.Request) -> web.Response:
        async with self.reg.lock:
            await self.reg.reset()
        return web.Response(status=204)

    async def proxy_index(self, request: web.Request) -> web.Response:
        return json_response({name: self.reg.proxies[name].to_json() for name in sorted(self.reg.proxies)})

    async def proxy_create(self, request: web.Request) -> web.Response:
        body = await read_json(request)
        values = struct_fields(body, "Proxy", PROXY_FIELDS)
        name = values.get("name", "")
        upstream = values.get("upstream", "")
        if not name:
            raise ApiError("missing required field: name", 400)
        if not upstream:
            raise ApiError("missing required field: upstream", 400)
        listen = values.get("listen", "")
        validate_addresses(listen, upstream)
        async with self.reg.lock:
            proxy = await self.reg.create(name, listen, upstream, values.get("enabled", True))
        return json_response(proxy.to_json(), status=201)

    async def populate(self, request: web.Request) -> web.Response:
        done: list[Proxy] = []
        try:
            body = await read_json(request)
            if body is not None and not isinstance(body, list):
                kind = "object" if isinstance(body, Pairs) else type(body).__name__
                raise bad_body(f"json: cannot unmarshal {kind} into Go value of type []struct")
            items = [struct_fields(item, "Proxy", PROXY_FIELDS) for item in body or []]
            for n, item in enumerate(items, start=1):
                if not item.get("name"):
                    raise ApiError(f"missing required field: name at proxy {n}", 400)
                if not item.get("upstream"):
                    raise ApiError(f"missing required field: upstream at proxy {n}", 400)
            for item in items:
                validate_addresses(item.get("listen", ""), item["upstream"])
            async with self.reg.lock:
                for item in items:
                    done.append(await self.reg.add_or_replace(
                        item["name"], item.get("listen", ""), item["upstream"], item.get("enabled", True)))
        except ApiError as err:
            payload: dict[str, Any] = {"error": err.message, "status": err.status,
                                       "proxies": [p.to_json() for p in done] or None}
            return json_response(payload, status=err.status)
        return json_response({"proxies": [p.to_json() for p in done] or None}, status=201)

    async def proxy_show(self, request: web.Request) -> web.Response:
        return json_response(self.reg.get(request.match_info["proxy"]).to_json())

    async def proxy_update(self, request: web.Request) -> web.Response:
        async with self.reg.lock:
            proxy = self.reg.get(request.match_info["proxy"])
            body = await read_json(request)
            values = struct_fields(body, "Proxy", PROXY_FIELDS)
            listen = values.get("listen")
            upstream = values.get("upstream", proxy.upstream)
            validate_addresses(listen, upstream)
            enabled = values.get("enabled", proxy.enabled)
            new_listen = proxy.listen
            if listen is not None:
                try:
                    new_listen = (await resolve_listen(listen)).text()
                except (ProxyError, AddressError) as exc:
                    raise ApiError(str(exc), 500) from exc
            if new_listen != proxy.listen or upstream != proxy.upstream:
                proxy.stop()
                proxy.listen = new_listen
                proxy.upstream = upstream
            if enabled and not proxy.enabled:
                await start_proxy(proxy)
            elif not enabled:
                proxy.stop()
            return json_response(proxy.to_json())

    async def proxy_delete(self, request: web.Request) -> web.Response:
        async with self.reg.lock:
            self.reg.delete(request.match_info["proxy"])
        return web.Response(status=204)

    async def toxic_index(self, request: web.Request) -> web.Response:
        proxy = self.reg.get(request.match_info["proxy"])
        return json_response([t.to_json() for t in proxy.toxic_list()])

    async def toxic_create(self, request: web.Request) -> web.Response:
        async with self.reg.lock:
            proxy = self.reg.get(request.match_info["proxy"])
            body = await read_json(request)
            values = struct_fields(body, "ToxicWrapper", TOXIC_FIELDS)
            if isinstance(body, Pairs):
                present, raw_attrs = find_key(body, "attributes")
                if present and raw_attrs is not None and not isinstance(raw_attrs, Pairs):
                    raise bad_body("json: cannot unmarshal attributes into Go struct field "
                                   "ToxicWrapper.attributes of type toxics.Toxic")
            stream = values.get("stream", "downstream")
            direction = parse_stream(stream)
            if direction is None:
                raise ApiError("stream was invalid, can be either upstream or downstream", 400)
            toxic_type = values.get("type", "")
            name = values.get("name") or f"{toxic_type}_{stream}"
            if toxic_type not in ATTRIBUTES:
                raise ApiError("invalid toxic type", 400)
            if proxy.find_toxic(name) is not None:
                raise ApiError("toxic already exists", 409)
            attrs = decode_attributes(body, toxic_type, {k: 0 for k in ATTRIBUTES[toxic_type]})
            toxicity = float32(values["toxicity"]) if "toxicity" in values else 1.0
            config = ToxicConfig(name=name, type=toxic_type, stream=stream, direction=direction,
                                 toxicity=toxicity, attributes=attrs)
            proxy.add_toxic(config)
            return json_response(config.to_json())

    def _toxic(self, request: web.Request) -> tuple[Proxy, ToxicConfig]:
        proxy = self.reg.get(request.match_info["proxy"])
        toxic = proxy.find_toxic(request.match_info["toxic"])
        if toxic is None:
            raise ApiError(*TOXIC_NOT_FOUND)
        return proxy, toxic

    async def toxic_show(self, request: web.Request) -> web.Response:
        return json_response(self._toxic(request)[1].to_json())

    async def toxic_update(self, request: web.Request) -> web.Response:
        async with self.reg.lock:
            proxy, toxic = self._toxic(request)
            body = await read_json(request)
            values = struct_fields(body, "ToxicWrapper", TOXIC_UPDATE_FIELDS)
            attrs = decode_attributes(body, toxic.type, toxic.attributes)
            toxic.attributes = attrs
            if "toxicity" in values:
                toxic.toxicity = float32(values["toxicity"])
            proxy.update_toxic(toxic)
            return json_response(toxic.to_json())

    async def toxic_delete(self, request: web.Request) -> web.Response:
        async with self.reg.lock:
            proxy, toxic = self._toxic(request)
            proxy.remove_toxic(toxic)
        return web.Response(status=204)


def _request_id() -> str:
    return "".join(secrets.choice(REQUEST_ID_ALPHABET) for _ in range(20))


@web.middleware
async def compat_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Browser refusal, Go-style 404/405 answers, request ids, JSON errors, timeouts."""
    if request.headers.get("User-Agent", "").startswith("Mozilla/"):
        return web.Response(text="User agent not allowed\n", status=403,
                            headers={"Content-Type": "text/plain; charset=utf-8",
                                     "X-Content-Type-Options": "nosniff"})
    try:
        response = await asyncio.wait_for(handler(request), HANDLER_TIMEOUT_S)
    except web.HTTPMethodNotAllowed:
        return web.Response(status=405)
    except web.HTTPNotFound:
        return web.Response(text="404 page not found\n", status=404,
                            headers={"Content-Type": "text/plain; charset=utf-8",
                                     "X-Content-Type-Options": "nosniff"})
    except ApiError as err:
        response = error_response(err)
    except asyncio.TimeoutError:
        return web.Response(status=503)
    except web.HTTPException:
        raise
    except Exception as exc:  # a bug must not take the API down
        log.exception("internal error on %s %s", request.method, request.path)
        response = error_response(ApiError(f"internal error: {exc}", 500))
    response.headers["X-Toxiproxy-Request-Id"] = _request_id()
    return response


def build_app(registry: Registry) -> web.Application:
    """The aiohttp application serving the Toxiproxy API for ``registry``."""
    api = Api(registry)
    app = web.Application(middlewares=[compat_middleware], client_max_size=16 * 1024 * 1024)
    r = app.router
    r.add_get("/version", api.version, allow_head=False)
    r.add_post("/reset", api.reset)
    r.add_get("/proxies", api.proxy_index, allow_head=False)
    r.add_post("/proxies", api.proxy_create)
    r.add_post("/populate", api.populate)
    r.add_get("/proxies/{proxy}", api.proxy_show, allow_head=False)
    r.add_post("/proxies/{proxy}", api.proxy_update)
    r.add_patch("/proxies/{proxy}", api.proxy_update)
    r.add_delete("/proxies/{proxy}", api.proxy_delete)
    r.add_get("/proxies/{proxy}/toxics", api.toxic_index, allow_head=False)
    r.add_post("/proxies/{proxy}/toxics", api.toxic_create)
    r.add_get("/proxies/{proxy}/toxics/{toxic}", api.toxic_show, allow_head=False)
    r.add_post("/proxies/{proxy}/toxics/{toxic}", api.toxic_update)
    r.add_patch("/proxies/{proxy}/toxics/{toxic}", api.toxic_update)
    r.add_delete("/proxies/{proxy}/toxics/{toxic}", api.toxic_delete)
    return app


# ---------------------------------------------------------------- running it

@dataclass
class ServerHandle:
    """A running API server; ``await stop()`` closes the API and every proxy."""

    host: str
    port: int
    registry: Registry
    runner: web.AppRunner

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def stop(self) -> None:
        self.registry.stop_all()
        await self.runner.cleanup()


async def populate_from_file(registry: Registry, path: str) -> None:
    """Create proxies from a JSON array like the ``/populate`` body (the -config flag)."""
    with open(path, "rb") as fh:
        try:
            items = decode_first_value(fh.read())
        except BodyError as exc:
            raise ValueError(f"{path}: {exc}") from exc
    if not isinstance(items, list):
        raise ValueError(f"{path}: expected a JSON array of proxies")
    for n, item in enumerate(items, start=1):
        try:
            values = decode_struct(item, "Proxy", PROXY_FIELDS)
        except BodyError as exc:
            raise ValueError(f"{path}: proxy {n}: {exc}") from exc
        if not values.get("name") or not values.get("upstream"):
            raise ValueError(f"{path}: proxy {n}: name and upstream are required")
        try:
            await registry.add_or_replace(values["name"], values.get("listen", ""), values["upstream"],
                                          values.get("enabled", True))
        except ApiError as exc:
            raise ValueError(f"{path}: proxy {n}: {exc.message}") from exc


async def start_server(host: str = "127.0.0.1", port: int = 8474, config: str | None = None) -> ServerHandle:
    """Start the API (and any proxies from ``config``) on the running loop.

    ``port=0`` picks a free port; read it back from ``handle.port``.
    """
    registry = Registry()
    if config:
        await populate_from_file(registry, config)
    runner = web.AppRunner(build_app(registry), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    try:
        await site.start()
    except BaseException:
        registry.stop_all()
        await runner.cleanup()
        raise
    server = site._server  # aiohttp exposes no public accessor for the bound port
    bound_port = port
    if server is not None and getattr(server, "sockets", None):
        bound_port = server.sockets[0].getsockname()[1]
    log.info("toxiproxy API listening on %s:%d (version %s)", host, bound_port, VERSION)
    return ServerHandle(host=host, port=bound_port, registry=registry, runner=runner)

"""The checkout backend: a small aiohttp app the demo runs as servers A, B and C.

It is the thing halb balances in the demo, the drills and the benchmarks, so it is
deliberately honest: every instance writes to the same SQLite file (the shop's real
database, see shop_db), ``POST /checkout`` honours ``Idempotency-Key`` across instances,
and every response says who served it (``X-Served-By`` header and ``"server"`` in JSON) so
tests and drills can see where the balancer sent a request.

Database work runs in a small thread pool: a write may wait for the SQLite lock
(busy_timeout) and for an fsync, and neither may stall the event loop that also answers
health checks.

Chaos knobs (``delay_ms``, ``fail_rate``) apply to every route except ``/health`` unless
``affect_health`` is set, so a "slow" or "flaky" backend still looks alive to the active
health checks, which is the interesting case for retries and outlier detection.

``capacity`` makes an instance behave like a server with a fixed number of workers: at most
``capacity`` requests are worked on at once (each holding a worker for ``work_ms`` plus any
``delay_ms``), the rest wait in arrival order, so latency grows with the backlog and
throughput stays at ``capacity / work time``, as on a real saturated server. ``GET /stats``
counts every request *inside* the instance (working or waiting) since start, which is what a
balancer's limit must keep below ``capacity``: a test reads ``max_in_flight`` to prove that
the limit held from the backend's side.
"""
from __future__ import annotations

import asyncio
import functools
import json
import logging
import random
import signal
import sqlite3
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, TypeVar

from aiohttp import web

from halb.demo.shop_db import IdempotencyKeyReused, ShopDB, ShopError, UnknownSku

log = logging.getLogger("halb.demo.backend")

T = TypeVar("T")

MAX_ITEMS = 100
MAX_QTY = 1000
MAX_KEY_LEN = 255
DEFAULT_LIST_LIMIT = 50
MAX_LIST_LIMIT = 1000
REPLAY_HEADER = "Idempotent-Replayed"


@dataclass
class BackendConfig:
    name: str
    host: str
    port: int
    db_path: str
    server: str = ""  # failure domain / physical server label; defaults to name
    delay_ms: float = 0.0
    fail_rate: float = 0.0
    affect_health: bool = False
    max_body: int = 64 * 1024
    synchronous: str = "FULL"
    db_threads: int = 4
    access_log: bool = False
    capacity: int = 0  # requests worked on at once; 0: unlimited (no worker pool)
    work_ms: float = 0.0  # time each request holds a worker (simulated service time)
    catalog_host: str = ""  # also serve the catalog app (build_catalog_app) here; "" = not
    catalog_port: int = 0

    def __post_init__(self) -> None:
        if not self.server:
            self.server = self.name
        if self.delay_ms < 0:
            raise ValueError("delay_ms must be >= 0")
        if not 0.0 <= self.fail_rate <= 1.0:
            raise ValueError("fail_rate must be between 0 and 1")
        if self.max_body < 1:
            raise ValueError("max_body must be positive")
        if self.db_threads < 1:
            raise ValueError("db_threads must be >= 1")
        if self.capacity < 0:
            raise ValueError("capacity must be >= 0 (0: unlimited)")
        if self.work_ms < 0:
            raise ValueError("work_ms must be >= 0")


UNCOUNTED_PATHS = frozenset({"/health", "/stats"})  # cheap probes: never queue behind the workers


class Capacity:
    """A bounded worker pool with counters: at most ``capacity`` requests work at once.

    ``in_flight`` counts every request inside the instance (working plus waiting), so
    ``max_in_flight`` is the most concurrent requests anyone ever sent it; ``working`` is
    at most ``capacity`` by construction. Waiters are served in arrival order (asyncio's
    Semaphore is FIFO for waiters).
    """

    def __init__(self, capacity: int, work_ms: float) -> None:
        self.capacity = capacity
        self.work_s = work_ms / 1000.0
        self.sem = asyncio.Semaphore(capacity) if capacity > 0 else None
        self.in_flight = 0
        self.max_in_flight = 0
        self.working = 0
        self.max_working = 0
        self.served = 0

    def stats(self) -> dict[str, Any]:
        return {"in_flight": self.in_flight, "max_in_flight": self.max_in_flight,
                "capacity": self.capacity or None, "served": self.served,
                "working": self.working, "max_working": self.max_working,
                "queued": self.in_flight - self.working, "work_ms": self.work_s * 1000.0}

    async def run(self, handler: Callable[[], Awaitable[T]]) -> T:
        self.in_flight += 1
        if self.in_flight > self.max_in_flight:
            self.max_in_flight = self.in_flight
        try:
            if self.sem is not None:
                await self.sem.acquire()
            try:
                self.working += 1
                if self.working > self.max_working:
                    self.max_working = self.working
                if self.work_s > 0:
                    await asyncio.sleep(self.work_s)
                return await handler()
            finally:
                self.working -= 1
                if self.sem is not None:
                    self.sem.release()
        finally:
            self.in_flight -= 1
            self.served += 1


class BadRequest(Exception):
    """A client error with an HTTP status, a stable machine code and a human message."""

    def __init__(self, status: int, code: str, message: str, **details: Any) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details


APP_KEY = web.AppKey("shop", "Shop")


class Shop:
    """Request handlers plus the resources they share (DB, thread pool, config)."""

    def __init__(self, cfg: BackendConfig, rng: random.Random | None = None) -> None:
        self.cfg = cfg
        self.db = ShopDB(cfg.db_path, synchronous=cfg.synchronous)
        self.pool = ThreadPoolExecutor(max_workers=cfg.db_threads, thread_name_prefix=f"db-{cfg.name}")
        self.rng = rng or random.Random()
        self.capacity = Capacity(cfg.capacity, cfg.work_ms)

    # -- plumbing ---------------------------------------------------------------------

    async def run_db(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, functools.partial(fn, *args))

    def json(self, body: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
        payload = {"server": self.cfg.name, **body}
        return web.json_response(payload, status=status, headers=headers)

    def error(self, status: int, code: str, message: str, **details: Any) -> web.Response:
        body: dict[str, Any] = {"error": code, "message": message}
        if details:
            body["details"] = details
        return self.json(body, status=status)

    async def close(self) -> None:
        # Wait for queued DB work in a thread: joining the pool on the loop would block it.
        await asyncio.to_thread(self.pool.shutdown, True)
        self.db.close()

    # -- middlewares and signals --------------------------------------------------------

    @web.middleware
    async def errors_middleware(self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        """Every error leaves as JSON with the server name, including aiohttp's own 404/405."""
        try:
            return await handler(request)
        except BadRequest as exc:
            return self.error(exc.status, exc.code, exc.message, **exc.details)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            code = exc.reason.lower().replace(" ", "_")
            allow = exc.headers.get("Allow")
            resp = self.error(exc.status, code, exc.reason, **({"allow": allow} if allow else {}))
            if allow:
                resp.headers["Allow"] = allow
            return resp
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("unhandled error in %s %s", request.method, request.path)
            return self.error(500, "internal_error", "internal server error")

    @web.middleware
    async def capacity_middleware(self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        """Every request but the probes holds one of the ``capacity`` workers (chaos delay included)."""
        if request.path in UNCOUNTED_PATHS:
            return await handler(request)
        return await self.capacity.run(lambda: handler(request))

    @web.middleware
    async def chaos_middleware(self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        if request.path == "/health" and not self.cfg.affect_health:
            return await handler(request)
        if self.cfg.delay_ms > 0:
            await asyncio.sleep(self.cfg.delay_ms / 1000)
        if self.cfg.fail_rate > 0 and self.rng.random() < self.cfg.fail_rate:
            return self.error(500, "injected_failure", "failure injected by --fail-rate")
        return await handler(request)

    async def on_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        response.headers["X-Served-By"] = self.cfg.name

    # -- handlers ---------------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        # No DB round trip: the probe must stay cheap and must not queue behind checkout
        # writes in the thread pool (that would turn load into false "down" verdicts).
        return self.json({"status": "ok", "failure_domain": self.cfg.server})

    async def websocket(self, request: web.Request) -> web.WebSocketResponse:
        """GET /ws: an echo WebSocket. The first message names the instance, so a client
        (and the tests) can see which backend the balancer chose; then every text or binary
        message comes back unchanged until the client closes."""
        ws = web.WebSocketResponse(heartbeat=None, max_msg_size=self.cfg.max_body)
        await ws.prepare(request)
        await ws.send_json({"instance": self.cfg.name, "server": self.cfg.server})
        async for msg in ws:
            if msg.type == web.WSMsgType.TEXT:
                await ws.send_str(msg.data)
            elif msg.type == web.WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
        return ws

    async def stats(self, request: web.Request) -> web.Response:
        """Load since start, from the instance's side: the proof a balancer's limit held."""
        return self.json(self.capacity.stats())

    async def products(self, request: web.Request) -> web.Response:
        prods = await self.run_db(self.db.products)
        return self.json({"products": [p.to_dict() for p in prods]})

    async def checkout(self, request: web.Request) -> web.Response:
        key = request.headers.get("Idempotency-Key")
        if key is not None:
            if not key or len(key) > MAX_KEY_LEN or not key.isprintable():
                raise BadRequest(400, "invalid_idempotency_key",
                                 f"Idempotency-Key must be 1-{MAX_KEY_LEN} printable characters")
        items = parse_checkout(await self.read_body(request))
        try:
            order, replayed = await self.run_db(self.db.create_order, items, key, self.cfg.name)
        except UnknownSku as exc:
            raise BadRequest(422, exc.code, str(exc), sku=exc.sku) from None
        except IdempotencyKeyReused as exc:
            raise BadRequest(422, exc.code, str(exc), order_id=exc.order_id) from None
        except ShopError as exc:  # pragma: no cover - future error kinds
            raise BadRequest(422, exc.code, str(exc)) from None
        if replayed:
            log.info("checkout replay key=%s order=%s", key, order["id"])
            return self.json({"replayed": True, "order": order}, status=200, headers={REPLAY_HEADER: "true"})
        log.info("checkout created order=%s key=%s total=%d", order["id"], key, order["total_cents"])
        return self.json({"replayed": False, "order": order}, status=201,
                         headers={REPLAY_HEADER: "false", "Location": f"/orders/{order['id']}"})

    async def read_body(self, request: web.Request) -> bytes:
        limit = self.cfg.max_body
        if request.content_length is not None and request.content_length > limit:
            raise BadRequest(413, "body_too_large", f"request body is larger than {limit} bytes", limit=limit)
        chunks: list[bytes] = []
        size = 0
        # Read ourselves instead of request.read(): the limit also holds for chunked bodies
        # and the error stays JSON.
        async for chunk in request.content.iter_any():
            size += len(chunk)
            if size > limit:
                raise BadRequest(413, "body_too_large", f"request body is larger than {limit} bytes", limit=limit)
            chunks.append(chunk)
        return b"".join(chunks)

    async def get_order(self, request: web.Request) -> web.Response:
        order_id = request.match_info["order_id"]
        order = await self.run_db(self.db.get_order, order_id)
        if order is None:
            raise BadRequest(404, "order_not_found", f"no order {order_id!r}", order_id=order_id)
        return self.json({"order": order})

    async def list_orders(self, request: web.Request) -> web.Response:
        raw = request.query.get("limit", str(DEFAULT_LIST_LIMIT))
        try:
            limit = int(raw)
        except ValueError:
            raise BadRequest(400, "invalid_limit", f"limit {raw!r} is not an integer") from None
        if not 1 <= limit <= MAX_LIST_LIMIT:
            raise BadRequest(400, "invalid_limit", f"limit must be between 1 and {MAX_LIST_LIMIT}")
        orders = await self.run_db(self.db.list_orders, limit)
        return self.json({"orders": orders, "count": len(orders)})


def parse_checkout(body: bytes) -> list[tuple[str, int]]:
    """Validate a checkout body and return [(sku, qty)]; raises BadRequest with the path.

    Malformed JSON is a 400 (the request is not understood); well-formed JSON of the
    wrong shape is a 422 (understood, but not processable), as RFC 9110 suggests.
    Unknown skus are found later, against the database catalog.
    """
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(400, "malformed_json", f"request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadRequest(422, "invalid_body", "request body must be a JSON object")
    items = data.get("items")
    if items is None:
        raise BadRequest(422, "missing_items", "'items' is required", field="items")
    if not isinstance(items, list):
        raise BadRequest(422, "invalid_items", "'items' must be a list", field="items")
    if not items:
        raise BadRequest(422, "empty_items", "'items' must not be empty", field="items")
    if len(items) > MAX_ITEMS:
        raise BadRequest(422, "too_many_items", f"at most {MAX_ITEMS} items per order", field="items")
    out: list[tuple[str, int]] = []
    for i, item in enumerate(items):
        where = f"items[{i}]"
        if not isinstance(item, dict):
            raise BadRequest(422, "invalid_item", f"{where} must be an object", field=where)
        sku = item.get("sku")
        if not isinstance(sku, str) or not sku:
            raise BadRequest(422, "invalid_sku", f"{where}.sku must be a non-empty string", field=f"{where}.sku")
        qty = item.get("qty")
        if not isinstance(qty, int) or isinstance(qty, bool) or qty < 1:
            raise BadRequest(422, "invalid_qty", f"{where}.qty must be a positive integer", field=f"{where}.qty")
        if qty > MAX_QTY:
            raise BadRequest(422, "invalid_qty", f"{where}.qty must be at most {MAX_QTY}", field=f"{where}.qty")
        out.append((sku, qty))
    return out


def build_app(shop: Shop) -> web.Application:
    # client_max_size is a backstop; read_body enforces max_body with a JSON 413 first.
    app = web.Application(middlewares=[shop.errors_middleware, shop.capacity_middleware,
                                       shop.chaos_middleware],
                          client_max_size=shop.cfg.max_body + 1)
    app[APP_KEY] = shop
    app.on_response_prepare.append(shop.on_prepare)
    app.router.add_get("/health", shop.health)
    app.router.add_get("/stats", shop.stats)
    app.router.add_get("/ws", shop.websocket)
    app.router.add_get("/products", shop.products)
    app.router.add_post("/checkout", shop.checkout)
    app.router.add_get("/orders", shop.list_orders)
    app.router.add_get("/orders/{order_id}", shop.get_order)
    return app


def build_catalog_app(shop: Shop) -> web.Application:
    """The demo's second service, `catalog`, on its own port of the same process: read-only
    product data from the same shop database. It exists so that Host (and path) routing is
    visible through a frontend: every answer names its instance like the checkout app's."""

    async def items(request: web.Request) -> web.Response:
        prods = await shop.run_db(shop.db.products)
        return shop.json({"service": "catalog", "items": [p.to_dict() for p in prods]})

    async def item(request: web.Request) -> web.Response:
        sku = request.match_info["sku"]
        for p in await shop.run_db(shop.db.products):
            if p.sku == sku:
                return shop.json({"service": "catalog", "item": p.to_dict()})
        raise BadRequest(404, "unknown_sku", f"no product {sku!r}", sku=sku)

    app = web.Application(middlewares=[shop.errors_middleware, shop.chaos_middleware])
    app.on_response_prepare.append(shop.on_prepare)
    app.router.add_get("/health", shop.health)
    app.router.add_get("/catalog/items", items)
    app.router.add_get("/catalog/items/{sku}", item)
    return app


def setup_logging(name: str, level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s backend[{name}] %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


async def serve(cfg: BackendConfig, stop: asyncio.Event | None = None) -> None:
    """Run until ``stop`` is set or SIGTERM/SIGINT arrives, then shut down cleanly.

    Shutdown order: stop accepting, let in-flight requests finish (bounded), then drain
    the DB thread pool and close connections, so no half-written transaction is left.
    """
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread / platform
            pass
    shop = Shop(cfg)
    await shop.run_db(shop.db.init)
    app = build_app(shop)
    runner = web.AppRunner(app, access_log=log if cfg.access_log else None, shutdown_timeout=5.0)
    await runner.setup()
    runners = [runner]
    try:
        site = web.TCPSite(runner, cfg.host, cfg.port, reuse_address=True)
        await site.start()
        if cfg.catalog_port:
            catalog = web.AppRunner(build_catalog_app(shop), access_log=log if cfg.access_log else None,
                                    shutdown_timeout=5.0)
            await catalog.setup()
            runners.append(catalog)
            await web.TCPSite(catalog, cfg.catalog_host, cfg.catalog_port, reuse_address=True).start()
            log.info("serving catalog on http://%s:%d", cfg.catalog_host, cfg.catalog_port)
        log.info("serving checkout on http://%s:%d db=%s synchronous=%s delay_ms=%s fail_rate=%s capacity=%s work_ms=%s",
                 cfg.host, cfg.port, cfg.db_path, cfg.synchronous, cfg.delay_ms, cfg.fail_rate,
                 cfg.capacity or "unlimited", cfg.work_ms)
        await stop.wait()
        log.info("shutting down")
    finally:
        for r in reversed(runners):
            await r.cleanup()
        await shop.close()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.remove_signal_handler(sig)
            except (NotImplementedError, RuntimeError):
                pass
    log.info("stopped")


def run(cfg: BackendConfig) -> None:
    """Blocking entry point used by the CLI."""
    setup_logging(cfg.name)
    try:
        asyncio.run(serve(cfg))
    except (OSError, sqlite3.Error) as exc:  # bind failure, unusable database file
        log.error("cannot run: %s", exc)
        raise SystemExit(1) from None

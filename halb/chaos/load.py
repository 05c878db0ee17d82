"""Open-loop checkout traffic for drills.

Why open loop: a closed-loop generator (N workers, each waiting for its answer before the
next request) slows down when the system stalls, so a frozen balancer shows up as *fewer
requests* instead of slow or failed ones (coordinated omission). Here request i is
scheduled at ``t0 + i / rate`` no matter what happened to earlier requests, and latency is
measured from the scheduled time, so a stall is visible as latency and errors.

Bounded: at most ``max_requests`` requests, no new request after ``max_duration`` seconds,
every request gives up after ``request_timeout``, and no more than ``max_in_flight`` run
at once (a request that would exceed it is recorded as a client error, not delayed).

The client's own behaviour (documented in docs/chaos.md), which is what a careful real
client does and what decides whether a failure is *client-visible*:

* It knows several balancer addresses (``ClientAddresses``): all balancers in "none"
  announcement mode (like several A records), a single VIP, or a DNS answer. Request i
  starts at address ``i mod n`` so load is spread.
* A failed connect (refused, unreachable, connect timeout) is retried at once on the next
  address: the request never left the client, so this is always safe. Browsers do this
  with multiple A records.
* With ``client_retry = "idempotent"`` (default) a request that is safe to replay (a GET,
  or a POST carrying an Idempotency-Key, which every checkout here does) is also retried on
  the next address when the connection dies before a response arrives or the attempt
  times out (``attempt_timeout``): that is what the Idempotency-Key is for, and the ledger
  check proves it creates no duplicate. ``"connect"`` retries only failed connects.
* Each address is tried at most once per request. An HTTP status is never retried: a
  non-2xx answer is a client-visible error.

Every request's outcome (times, latency, status, attempts, who served it) is kept for the
report and the ledger.
"""
from __future__ import annotations

import asyncio
import json
import math
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

import aiohttp

SKUS = ("sku-1", "sku-2", "sku-3")


@dataclass
class ClientAddresses:
    """Where clients send service traffic: mode 'balancers', 'vip' or 'dns' and the addresses.

    For 'dns' the addresses are the current answer (resolved by the caller); the generator
    treats every mode the same way: a list of HOST:PORT to try in turn.
    """

    mode: str
    addresses: list[str]

    def order_for(self, i: int) -> list[str]:
        n = len(self.addresses)
        start = i % n
        return self.addresses[start:] + self.addresses[:start]


@dataclass
class LoadConfig:
    rate: float = 50.0
    max_duration: float = 60.0
    max_requests: int = 0  # 0: rate * max_duration
    checkout_share: float = 0.5
    connect_timeout: float = 0.5
    attempt_timeout: float = 2.0
    request_timeout: float = 10.0
    client_retry: str = "idempotent"
    max_in_flight: int = 2000
    key_prefix: str = ""

    def limit(self) -> int:
        return self.max_requests or int(self.rate * self.max_duration) + 1


@dataclass
class Outcome:
    seq: int
    kind: str  # "products" | "checkout"
    scheduled: float  # seconds since the generator's t0 (monotonic)
    key: str = ""
    finished: float = 0.0
    latency_ms: float = 0.0  # finished - scheduled
    status: int = 0  # 0: no HTTP answer
    error: str = ""  # "" when 2xx; else "http 502", "connect", "timeout", "reset", ...
    attempts: int = 0
    retried: list[str] = field(default_factory=list)  # why each earlier attempt was abandoned
    balancer: str = ""
    served_by: str = ""
    order_id: str = ""
    replayed: bool = False
    wrong_answer: str = ""
    retry_after: str = ""  # the Retry-After header of a non-2xx answer (a shed request)

    @property
    def ok(self) -> bool:
        """Finished with a 2xx answer (a request still in flight is not ok yet)."""
        return bool(self.finished) and not self.error

    def to_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "kind": self.kind, "t": round(self.scheduled, 4), "latency_ms": round(self.latency_ms, 2),
                "status": self.status, "error": self.error, "attempts": self.attempts, "retried": self.retried,
                "balancer": self.balancer, "served_by": self.served_by, "key": self.key, "order_id": self.order_id,
                **({"wrong_answer": self.wrong_answer} if self.wrong_answer else {}),
                **({"retry_after": self.retry_after} if self.retry_after else {})}


class _Retry(Exception):
    def __init__(self, reason: str, safe_always: bool) -> None:
        super().__init__(reason)
        self.reason, self.safe_always = reason, safe_always


class LoadGenerator:
    """Run with ``await gen.run(stop)``; outcomes accumulate in ``gen.outcomes``."""

    def __init__(self, addresses: ClientAddresses, cfg: LoadConfig, seed: int | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 products_addresses: ClientAddresses | None = None) -> None:
        if not addresses.addresses or (products_addresses is not None and not products_addresses.addresses):
            raise ValueError("no client addresses")
        self.addresses, self.cfg = addresses, cfg
        # /products may be a service of its own (overload drills: "browse" at low priority)
        self.products_addresses = products_addresses or addresses
        self.outcomes: list[Outcome] = []
        self.t0 = 0.0
        self.wall_t0 = 0.0
        self.in_flight = 0
        self.sent = 0
        self._rng = random.Random(seed)
        self._clock = clock
        self.key_prefix = cfg.key_prefix or f"chaos-{uuid.uuid4().hex[:12]}"

    def now(self) -> float:
        return self._clock() - self.t0

    async def run(self, stop: asyncio.Event) -> None:
        cfg = self.cfg
        connector = aiohttp.TCPConnector(force_close=True, limit=0)  # fresh connection per attempt
        tasks: set[asyncio.Task[None]] = set()
        async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
            self.t0, self.wall_t0 = self._clock(), time.time()
            for i in range(cfg.limit()):
                due = i / cfg.rate
                if due > cfg.max_duration:
                    break
                delay = due - self.now()
                if delay > 0:
                    try:
                        await asyncio.wait_for(stop.wait(), delay)
                    except asyncio.TimeoutError:
                        pass
                if stop.is_set():
                    break
                kind = "checkout" if self._rng.random() < cfg.checkout_share else "products"
                out = Outcome(seq=i, kind=kind, scheduled=due)
                if kind == "checkout":
                    out.key = f"{self.key_prefix}-{i}"
                self.outcomes.append(out)
                self.sent += 1
                if self.in_flight >= cfg.max_in_flight:
                    self._finish(out, 0, "client overload (too many in flight)")
                    continue
                task = asyncio.create_task(self._one(session, out))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.wait(set(tasks), timeout=cfg.request_timeout + 2)
            for task in list(tasks):
                task.cancel()

    def _finish(self, out: Outcome, status: int, error: str) -> None:
        out.status, out.error = status, error
        out.finished = self.now()
        out.latency_ms = (out.finished - out.scheduled) * 1000

    async def _one(self, session: aiohttp.ClientSession, out: Outcome) -> None:
        cfg = self.cfg
        self.in_flight += 1
        deadline = out.scheduled + cfg.request_timeout
        body = None
        headers = {"User-Agent": "halb-chaos-load/1"}
        if out.kind == "checkout":
            items = [{"sku": self._rng.choice(SKUS), "qty": self._rng.randint(1, 3)}]
            body = json.dumps({"items": items}).encode()
            headers.update({"Idempotency-Key": out.key, "Content-Type": "application/json"})
        try:
            last_error = "no address"
            addresses = self.addresses if out.kind == "checkout" else self.products_addresses
            for addr in addresses.order_for(out.seq):
                left = deadline - self.now()
                if left <= 0:
                    last_error = "timeout (request deadline)"
                    break
                out.attempts += 1
                out.balancer = addr
                try:
                    await self._attempt(session, out, addr, body, headers, min(left, cfg.attempt_timeout))
                    return
                except _Retry as r:
                    last_error = r.reason
                    if r.safe_always or cfg.client_retry == "idempotent":
                        out.retried.append(f"{addr}: {r.reason}")
                        continue
                    break
            self._finish(out, 0, last_error)
        except asyncio.CancelledError:
            self._finish(out, 0, "cancelled at shutdown")
            raise
        except Exception as exc:  # never let one request kill the generator
            self._finish(out, 0, f"client bug: {type(exc).__name__}: {exc}")
        finally:
            self.in_flight -= 1

    async def _attempt(self, session: aiohttp.ClientSession, out: Outcome, addr: str, body: bytes | None,
                       headers: dict[str, str], budget: float) -> None:
        url = f"http://{addr}/checkout" if out.kind == "checkout" else f"http://{addr}/products"
        timeout = aiohttp.ClientTimeout(total=budget, sock_connect=min(self.cfg.connect_timeout, budget))
        method = "POST" if out.kind == "checkout" else "GET"
        try:
            async with session.request(method, url, data=body, headers=headers, timeout=timeout) as resp:
                raw = await resp.read()
                status = resp.status
                out.served_by = resp.headers.get("X-Served-By", "")
                out.retry_after = resp.headers.get("Retry-After", "") if status >= 300 else ""
        except aiohttp.ClientConnectorError as exc:  # refused / unreachable: nothing was sent
            raise _Retry(f"connect: {exc.os_error.strerror or exc.os_error}" if exc.os_error else "connect",
                         True) from None
        except aiohttp.ConnectionTimeoutError:
            raise _Retry("connect timeout", True) from None
        except (asyncio.TimeoutError, aiohttp.ServerTimeoutError):
            raise _Retry("timeout", False) from None
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, aiohttp.ClientPayloadError) as exc:
            raise _Retry(f"connection lost: {type(exc).__name__}", False) from None
        if 200 <= status < 300:
            if out.kind == "checkout":
                try:
                    data = json.loads(raw)
                    out.order_id = data["order"]["id"]
                    out.replayed = bool(data.get("replayed"))
                    got_key = data["order"].get("idempotency_key")
                except (ValueError, KeyError, TypeError, AttributeError):
                    self._finish(out, status, "bad checkout answer (no order id)")
                    return
                if got_key is not None and got_key != out.key:
                    # the customer was shown somebody else's order: a desynchronised response
                    out.wrong_answer = f"order {out.order_id} belongs to key {got_key}"
                    self._finish(out, status, "wrong answer (order of another request)")
                    return
            self._finish(out, status, "")
        else:
            self._finish(out, status, f"http {status}")


# --- summaries ----------------------------------------------------------------------

def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of an unsorted list; 0 for an empty list."""
    if not values:
        return 0.0
    s = sorted(values)
    k = max(0, min(len(s) - 1, math.ceil(p / 100 * len(s)) - 1))
    return s[k]


def summarize(outcomes: list[Outcome], start: float = 0.0, end: float = float("inf")) -> dict[str, Any]:
    """Counts and latency of the requests *scheduled* in [start, end) that have finished."""
    sel = [o for o in outcomes if start <= o.scheduled < end and o.finished]
    lat = [o.latency_ms for o in sel]
    errors = [o for o in sel if not o.ok]
    kinds: dict[str, int] = {}
    for o in errors:
        kinds[o.error] = kinds.get(o.error, 0) + 1
    statuses: dict[str, int] = {}
    for o in sel:
        statuses[str(o.status)] = statuses.get(str(o.status), 0) + 1
    return {
        "requests": len(sel), "ok": len(sel) - len(errors), "errors": len(errors),
        "error_rate": (len(errors) / len(sel)) if sel else 0.0,
        "client_retries": sum(1 for o in sel if o.retried),
        "p50_ms": round(percentile(lat, 50), 2), "p99_ms": round(percentile(lat, 99), 2),
        "max_ms": round(max(lat), 2) if lat else 0.0,
        "by_status": statuses, "error_kinds": kinds,
        "served_by": _count(o.served_by for o in sel if o.served_by),
    }


def _count(items: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for x in items:
        out[x] = out.get(x, 0) + 1
    return out


def buckets(outcomes: list[Outcome], width: float = 0.1) -> list[dict[str, Any]]:
    """Per `width` seconds (by scheduled time): sent, ok, errors, retried, p50/p99 latency."""
    if not outcomes:
        return []
    n = int(max(o.scheduled for o in outcomes) / width) + 1
    rows: list[list[Outcome]] = [[] for _ in range(n)]
    for o in outcomes:
        rows[int(o.scheduled / width)].append(o)
    out = []
    for i, sel in enumerate(rows):
        done = [o for o in sel if o.finished]
        lat = [o.latency_ms for o in done]
        out.append({"t": round(i * width, 3), "sent": len(sel), "ok": sum(1 for o in done if o.ok),
                    "errors": sum(1 for o in done if not o.ok), "retried": sum(1 for o in sel if o.retried),
                    "p50_ms": round(percentile(lat, 50), 2) if lat else None,
                    "p99_ms": round(percentile(lat, 99), 2) if lat else None})
    return out

"""The checkout backend as real subprocesses (`python -m halb demo backend`) on free ports
with a real SQLite file: API, validation, idempotent replay across two instances sharing
one database, chaos knobs, and clean shutdown on signals."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import aiohttp
import pytest
import requests

from halb.demo.shop_db import count_orders, orders_by_idempotency_key

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Backend:
    name: str
    port: int
    proc: subprocess.Popen
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        """Stop the process; escalates to SIGKILL so nothing outlives the test."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


def start_backend(name: str, db: Path, logdir: Path, *extra: str, ready_timeout: float = 20.0) -> Backend:
    port = free_port()
    log_path = logdir / f"backend-{name}-{port}.log"
    cmd = [sys.executable, "-m", "halb", "demo", "backend", "--name", name,
           "--listen", f"127.0.0.1:{port}", "--db", str(db), *extra]
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    be = Backend(name, port, proc, log_path)
    deadline = time.monotonic() + ready_timeout
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"backend {name} exited with {proc.returncode}:\n{be.log()}")
            try:
                if requests.get(be.url + "/health", timeout=1).status_code == 200:
                    return be
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"backend {name} not ready after {ready_timeout}s:\n{be.log()}")
            time.sleep(0.1)
    except BaseException:
        be.stop(signal.SIGKILL)
        raise


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Backend, Backend, Path]]:
    """Backends A and B sharing one database file."""
    tmp = tmp_path_factory.mktemp("shop")
    db = tmp / "shop.db"
    started: list[Backend] = []
    try:
        started.append(start_backend("A", db, tmp))
        started.append(start_backend("B", db, tmp))
        yield started[0], started[1], db
    finally:
        for be in started:
            be.stop()


def checkout(be: Backend, items: list[dict], key: str | None = None) -> requests.Response:
    headers = {"Idempotency-Key": key} if key else {}
    return requests.post(be.url + "/checkout", json={"items": items}, headers=headers, timeout=10)


@pytest.mark.timeout(60)
def test_health_products_and_served_by(pair: tuple[Backend, Backend, Path]) -> None:
    a, b, _ = pair
    for be in (a, b):
        r = requests.get(be.url + "/health", timeout=5)
        assert r.status_code == 200 and r.headers["X-Served-By"] == be.name
        assert r.json()["status"] == "ok" and r.json()["server"] == be.name
        r = requests.get(be.url + "/products", timeout=5)
        assert r.status_code == 200 and r.headers["X-Served-By"] == be.name and r.json()["server"] == be.name
        skus = [p["sku"] for p in r.json()["products"]]
        assert skus[0] == "sku-1" and len(skus) >= 3
        assert all(isinstance(p["price_cents"], int) for p in r.json()["products"])


@pytest.mark.timeout(60)
def test_validation_errors_are_json(pair: tuple[Backend, Backend, Path]) -> None:
    a, _, db = pair
    before = count_orders(str(db))

    def post_raw(data: bytes) -> requests.Response:
        return requests.post(a.url + "/checkout", data=data, headers={"Content-Type": "application/json"}, timeout=10)

    cases = [
        (post_raw(b'{"items": ['), 400, "malformed_json"),
        (checkout(a, [{"sku": "sku-nope", "qty": 1}]), 422, "unknown_sku"),
        (checkout(a, [{"sku": "sku-1", "qty": 0}]), 422, "invalid_qty"),
        (checkout(a, [{"sku": "sku-1", "qty": "2"}]), 422, "invalid_qty"),
        (checkout(a, []), 422, "empty_items"),
        (post_raw(b'{"items": "' + b"x" * (70 * 1024) + b'"}'), 413, "body_too_large"),
        (checkout(a, [{"sku": "sku-1", "qty": 1}], key="x" * 300), 400, "invalid_idempotency_key"),
        (requests.get(a.url + "/orders/ord_missing", timeout=5), 404, "order_not_found"),
        (requests.get(a.url + "/orders?limit=abc", timeout=5), 400, "invalid_limit"),
        (requests.get(a.url + "/no/such/path", timeout=5), 404, "not_found"),
        (requests.delete(a.url + "/checkout", timeout=5), 405, "method_not_allowed"),
    ]
    for resp, status, code in cases:
        assert resp.status_code == status, (code, resp.text)
        assert resp.headers["Content-Type"].startswith("application/json")
        assert resp.headers["X-Served-By"] == "A"
        body = resp.json()
        assert body["error"] == code and body["server"] == "A" and body["message"]
    assert count_orders(str(db)) == before


@pytest.mark.timeout(60)
def test_chunked_body_over_limit_is_413(pair: tuple[Backend, Backend, Path]) -> None:
    a, _, _ = pair

    def gen() -> Iterator[bytes]:
        yield b'{"items": "'
        for _ in range(20):
            yield b"y" * 4096
        yield b'"}'

    r = requests.post(a.url + "/checkout", data=gen(), timeout=10)
    assert r.status_code == 413 and r.json()["error"] == "body_too_large"


@pytest.mark.timeout(60)
def test_idempotent_replay_across_instances(pair: tuple[Backend, Backend, Path]) -> None:
    a, b, db = pair
    items = [{"sku": "sku-1", "qty": 2}, {"sku": "sku-2", "qty": 1}]
    first = checkout(a, items, key="replay-1")
    assert first.status_code == 201, first.text
    assert first.headers["Idempotent-Replayed"] == "false"
    order = first.json()["order"]
    assert first.json()["server"] == "A" and order["created_by"] == "A" and order["total_cents"] > 0
    assert first.headers["Location"] == f"/orders/{order['id']}"

    for be in (a, b):
        again = checkout(be, items, key="replay-1")
        assert again.status_code == 200 and again.headers["Idempotent-Replayed"] == "true"
        assert again.json()["order"]["id"] == order["id"] and again.json()["replayed"] is True
        assert again.json()["server"] == be.name

    reused = checkout(b, [{"sku": "sku-1", "qty": 5}], key="replay-1")
    assert reused.status_code == 422 and reused.json()["error"] == "idempotency_key_reused"

    got = requests.get(f"{b.url}/orders/{order['id']}", timeout=5)
    assert got.status_code == 200 and got.json()["order"] == order and got.json()["server"] == "B"
    listed = requests.get(f"{b.url}/orders?limit=5", timeout=5).json()
    assert order["id"] in [o["id"] for o in listed["orders"]] and listed["count"] <= 5
    assert orders_by_idempotency_key(str(db))["replay-1"] == [order["id"]]


@pytest.mark.timeout(90)
def test_concurrent_identical_keys_on_two_instances_store_one_order(pair: tuple[Backend, Backend, Path]) -> None:
    a, b, db = pair
    keys = [f"race-{i}" for i in range(25)]
    copies = 4  # each key: 2 requests to A and 2 to B, all in flight together

    async def main() -> list[tuple[str, int, str, bool, str]]:
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            async def one(be: Backend, key: str) -> tuple[str, int, str, bool, str]:
                async with session.post(be.url + "/checkout", json={"items": [{"sku": "sku-3", "qty": 1}]},
                                        headers={"Idempotency-Key": key}) as resp:
                    body = await resp.json()
                    return key, resp.status, body["order"]["id"], resp.headers["Idempotent-Replayed"] == "true", \
                        resp.headers["X-Served-By"]
            jobs = [one((a, b)[i % 2], key) for key in keys for i in range(copies)]
            return await asyncio.gather(*jobs)

    results = asyncio.run(main())
    assert {r[4] for r in results} == {"A", "B"}
    ledger = orders_by_idempotency_key(str(db))
    for key in keys:
        mine = [r for r in results if r[0] == key]
        assert len(mine) == copies
        assert len({r[2] for r in mine}) == 1, mine  # every answer names the same order
        assert sorted(r[1] for r in mine) == [200] * (copies - 1) + [201], mine
        assert [r[3] for r in mine].count(False) == 1
        assert ledger[key] == [mine[0][2]]  # stored exactly once


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_cleanly(tmp_path: Path, sig: int) -> None:
    be = start_backend("C", tmp_path / "shop.db", tmp_path)
    try:
        assert checkout(be, [{"sku": "sku-1", "qty": 1}], key="before-stop").status_code == 201
        be.proc.send_signal(sig)
        rc = be.proc.wait(15)
        assert rc == 0, be.log()
        log = be.log()
        assert "backend[C]" in log and "shutting down" in log and "stopped" in log
        assert "Traceback" not in log
        with pytest.raises(requests.ConnectionError):
            requests.get(be.url + "/health", timeout=2)
        assert list(orders_by_idempotency_key(str(tmp_path / "shop.db"))) == ["before-stop"]
    finally:
        be.stop(signal.SIGKILL)


@pytest.mark.timeout(60)
def test_chaos_knobs_fail_rate_and_delay(tmp_path: Path) -> None:
    be = start_backend("D", tmp_path / "shop.db", tmp_path, "--fail-rate", "1", "--delay-ms", "300")
    try:
        start = time.monotonic()
        r = requests.get(be.url + "/products", timeout=10)
        assert time.monotonic() - start >= 0.25
        assert r.status_code == 500 and r.json()["error"] == "injected_failure" and r.headers["X-Served-By"] == "D"
        assert checkout(be, [{"sku": "sku-1", "qty": 1}], key="k").status_code == 500
        assert count_orders(str(tmp_path / "shop.db")) == 0  # failed before doing anything
        assert requests.get(be.url + "/health", timeout=10).status_code == 200  # health unaffected by default
    finally:
        assert be.stop() == 0


@pytest.mark.timeout(60)
def test_cli_help_and_bad_listen(tmp_path: Path) -> None:
    halb = [sys.executable, "-m", "halb"]
    out = subprocess.run(halb + ["demo", "backend", "--help"], capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert out.returncode == 0 and "--fail-rate" in out.stdout and "--delay-ms" in out.stdout
    bad = subprocess.run(halb + ["demo", "backend", "--name", "A", "--listen", "nope", "--db", str(tmp_path / "x.db")],
                         capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert bad.returncode == 2 and "HOST:PORT" in bad.stderr
    assert not (tmp_path / "x.db").exists()


async def _concurrent_gets(url: str, n: int) -> list[tuple[int, str]]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        async def one() -> tuple[int, str]:
            async with s.get(url, timeout=aiohttp.ClientTimeout(total=30)) as r:
                await r.read()
                return r.status, r.headers["X-Served-By"]
        return await asyncio.gather(*(one() for _ in range(n)))


@pytest.mark.timeout(60)
def test_capacity_is_a_worker_pool_and_stats_count_from_the_backend_side(tmp_path: Path) -> None:
    """9 concurrent requests at capacity 3 with 200 ms of work each: all are answered, but
    at most 3 work at once, so they need at least three rounds; /stats sees all 9 inside."""
    be = start_backend("K", tmp_path / "shop.db", tmp_path, "--capacity", "3", "--work-ms", "200")
    try:
        fresh = requests.get(be.url + "/stats", timeout=5).json()
        assert fresh == {"server": "K", "in_flight": 0, "max_in_flight": 0, "capacity": 3, "served": 0,
                         "working": 0, "max_working": 0, "queued": 0, "work_ms": 200.0}
        start = time.monotonic()
        got = asyncio.run(_concurrent_gets(be.url + "/products", 9))
        elapsed = time.monotonic() - start
        assert got == [(200, "K")] * 9
        assert elapsed >= 0.55  # three rounds of 200 ms: a lower bound, not a speed claim
        st = requests.get(be.url + "/stats", timeout=5).json()
        assert st["served"] == 9 and st["in_flight"] == 0 and st["queued"] == 0
        assert st["max_working"] == 3  # the pool held
        assert st["max_in_flight"] == 9  # every request the client sent at once was inside
        # probes are not counted and never wait for a worker
        requests.get(be.url + "/health", timeout=5)
        assert requests.get(be.url + "/stats", timeout=5).json()["served"] == 9
    finally:
        assert be.stop() == 0


@pytest.mark.timeout(60)
def test_without_capacity_stats_still_count(tmp_path: Path) -> None:
    be = start_backend("U", tmp_path / "shop.db", tmp_path)
    try:
        asyncio.run(_concurrent_gets(be.url + "/products", 4))
        st = requests.get(be.url + "/stats", timeout=5).json()
        assert st["capacity"] is None and st["served"] == 4 and 1 <= st["max_in_flight"] <= 4
    finally:
        assert be.stop() == 0


@pytest.mark.timeout(60)
def test_capacity_flags_are_checked(tmp_path: Path) -> None:
    bad = subprocess.run([sys.executable, "-m", "halb", "demo", "backend", "--name", "A", "--listen",
                          "127.0.0.1:1", "--db", str(tmp_path / "x.db"), "--capacity", "-1"],
                         capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert bad.returncode == 2 and "--capacity" in bad.stderr
    assert not (tmp_path / "x.db").exists()


def test_catalog_listen_serves_the_second_service_from_the_same_process(tmp_path: Path) -> None:
    """--catalog-listen: the demo's catalog service on a second port of the same process,
    reading the shop database, naming its instance; the checkout port is unchanged."""
    cport = free_port()
    be = start_backend("B", tmp_path / "shop.db", tmp_path, "--catalog-listen", f"127.0.0.1:{cport}")
    try:
        r = requests.get(f"http://127.0.0.1:{cport}/catalog/items", timeout=5)
        assert r.status_code == 200 and r.headers["X-Served-By"] == "B"
        body = r.json()
        assert body["server"] == "B" and body["service"] == "catalog"
        assert [i["sku"] for i in body["items"]] == [p["sku"] for p in requests.get(be.url + "/products", timeout=5)
                                                      .json()["products"]]
        one = requests.get(f"http://127.0.0.1:{cport}/catalog/items/sku-2", timeout=5).json()
        assert one["item"]["sku"] == "sku-2"
        missing = requests.get(f"http://127.0.0.1:{cport}/catalog/items/nope", timeout=5)
        assert missing.status_code == 404 and missing.json()["error"] == "unknown_sku"
        assert requests.get(f"http://127.0.0.1:{cport}/health", timeout=5).status_code == 200
        assert requests.get(f"http://127.0.0.1:{cport}/checkout", timeout=5).status_code == 404  # catalog only
    finally:
        assert be.stop() == 0
    assert "serving catalog on" in be.log()

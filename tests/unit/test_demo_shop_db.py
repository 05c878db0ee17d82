"""The shop database: schema, pricing, idempotency under concurrency, ledger helpers."""
from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from halb.demo.shop_db import (CATALOG, IdempotencyKeyReused, ShopDB, UnknownSku, connect, count_orders,
                               orders_by_idempotency_key)


@pytest.fixture
def db(tmp_path: Path):
    shop = ShopDB(str(tmp_path / "shop.db"))
    shop.init()
    try:
        yield shop
    finally:
        shop.close()


def test_init_is_idempotent_and_seeds_catalog(db: ShopDB) -> None:
    db.init()
    assert [p.sku for p in db.products()] == [p.sku for p in CATALOG]
    assert db.products()[0].sku == "sku-1" and all(p.price_cents > 0 for p in db.products())


def test_pragmas(tmp_path: Path) -> None:
    path = str(tmp_path / "p.db")
    conn = connect(path, "FULL")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] >= 1000
    conn.close()
    conn = connect(path, "NORMAL")
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 1
    conn.close()
    with pytest.raises(ValueError, match="synchronous"):
        connect(path, "OFF")


def test_create_order_prices_and_merges_lines(db: ShopDB) -> None:
    order, replayed = db.create_order([("sku-2", 1), ("sku-1", 2), ("sku-2", 3)], None, "A")
    assert not replayed and order["id"].startswith("ord_") and order["created_by"] == "A"
    price = {p.sku: p.price_cents for p in CATALOG}
    assert order["total_cents"] == 2 * price["sku-1"] + 4 * price["sku-2"]
    assert [(i["sku"], i["qty"]) for i in order["items"]] == [("sku-1", 2), ("sku-2", 4)]
    assert db.get_order(order["id"]) == order
    assert db.get_order("ord_missing") is None


def test_idempotent_replay_and_key_reuse(db: ShopDB) -> None:
    first, replayed = db.create_order([("sku-1", 1)], "key-1", "A")
    assert not replayed
    again, replayed = db.create_order([("sku-1", 1)], "key-1", "B")
    assert replayed and again == first and again["created_by"] == "A"
    with pytest.raises(IdempotencyKeyReused) as info:
        db.create_order([("sku-1", 2)], "key-1", "B")
    assert info.value.order_id == first["id"]
    assert count_orders(db.db_path) == 1


def test_unknown_sku_writes_nothing(db: ShopDB) -> None:
    with pytest.raises(UnknownSku, match="sku-999"):
        db.create_order([("sku-1", 1), ("sku-999", 1)], "k", "A")
    assert count_orders(db.db_path) == 0
    # the key is still free afterwards
    _, replayed = db.create_order([("sku-1", 1)], "k", "A")
    assert not replayed


def test_orders_without_key_are_all_stored(db: ShopDB) -> None:
    for _ in range(3):
        db.create_order([("sku-3", 1)], None, "A")
    assert count_orders(db.db_path) == 3
    assert orders_by_idempotency_key(db.db_path) == {}
    assert len(db.list_orders(2)) == 2 and len(db.list_orders(50)) == 3


@pytest.mark.timeout(60)
def test_concurrent_same_keys_from_two_connections_make_one_order_each(tmp_path: Path) -> None:
    """Two ShopDB objects (as two processes would have) hammer the same keys from threads."""
    path = str(tmp_path / "shop.db")
    a, b = ShopDB(path), ShopDB(path)
    a.init()
    b.init()
    keys = [f"k-{i}" for i in range(15)]
    results: list[tuple[str, str, bool]] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(6)
    lock = threading.Lock()

    def worker(shop: ShopDB, name: str) -> None:
        try:
            barrier.wait(timeout=10)
            for key in keys:
                order, replayed = shop.create_order([("sku-1", 1)], key, name)
                with lock:
                    results.append((key, order["id"], replayed))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(shop, f"{shop is a and 'A' or 'B'}{i}"))
               for i, shop in enumerate([a, b, a, b, a, b])]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    a.close()
    b.close()
    assert not errors, errors
    assert len(results) == 6 * len(keys)
    ledger = orders_by_idempotency_key(path)
    assert set(ledger) == set(keys) and all(len(ids) == 1 for ids in ledger.values())
    for key in keys:
        ids = {oid for k, oid, _ in results if k == key}
        created = [r for r in results if r[0] == key and not r[2]]
        assert ids == set(ledger[key]) and len(created) == 1
    assert count_orders(path) == len(keys)


def test_unique_constraint_is_in_the_schema(db: ShopDB) -> None:
    """The exactly-once guarantee rests on the constraint, not on application checks."""
    db.create_order([("sku-1", 1)], "dup", "A")
    conn = sqlite3.connect(db.db_path)
    try:
        with pytest.raises(sqlite3.IntegrityError):
            conn.execute("INSERT INTO orders (id, idempotency_key, request_hash, created_by, created_at, total_cents,"
                         " items_json) VALUES ('x', 'dup', '', 'A', 0, 0, '[]')")
    finally:
        conn.close()


def test_ledger_helpers_refuse_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        orders_by_idempotency_key(str(tmp_path / "nope.db"))
    assert not (tmp_path / "nope.db").exists()

"""The ledger check on crafted databases: it must catch a lost and a duplicated order."""
from __future__ import annotations

import sqlite3
from pathlib import Path

from halb.chaos.ledger import check_ledger, compare
from halb.chaos.load import Outcome


def crafted_db(path: Path, rows: list[tuple[str, str]]) -> str:
    """An orders table *without* the UNIQUE constraint, so a duplicate can exist at all."""
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE orders (id TEXT, idempotency_key TEXT, created_at REAL)")
    conn.executemany("INSERT INTO orders VALUES (?, ?, ?)", [(i, k, n) for n, (i, k) in enumerate(rows)])
    conn.commit()
    conn.close()
    return str(path)


def acked(key: str, order_id: str) -> Outcome:
    return Outcome(seq=0, kind="checkout", scheduled=0.0, key=key, finished=0.1, status=201, order_id=order_id)


def test_intact_ledger(tmp_path: Path) -> None:
    db = crafted_db(tmp_path / "shop.db", [("o1", "run-1"), ("o2", "run-2"), ("x", "other-run-1")])
    res = check_ledger([acked("run-1", "o1"), acked("run-2", "o2")], db, "run-")
    assert res.intact and res.acknowledged == 2 and res.stored == 2
    assert not res.unacknowledged_stored


def test_detects_duplicate_and_lost_order(tmp_path: Path) -> None:
    db = crafted_db(tmp_path / "shop.db", [("o1", "run-1"), ("o1b", "run-1"), ("o3", "run-3")])
    failed = Outcome(seq=3, kind="checkout", scheduled=0.0, key="run-3", finished=1.0, error="timeout")
    res = check_ledger([acked("run-1", "o1"), acked("run-2", "o2"), failed], db, "run-")
    assert not res.intact
    assert res.lost == ["run-2"]
    assert res.duplicated == {"run-1": ["o1", "o1b"]}
    assert res.unacknowledged_stored == ["run-3"]  # stored after a client timeout: allowed, reported
    d = res.to_dict()
    assert d["lost_count"] == 1 and d["duplicated_count"] == 1 and d["intact"] is False
    assert "BROKEN" in res.summary()


def test_detects_order_id_mismatch() -> None:
    res = compare({"run-1": "o1"}, {"run-1": ["other"]}, "run-")
    assert res.mismatched == {"run-1": {"client_saw": "o1", "stored": ["other"]}} and not res.intact


def test_real_shop_schema(tmp_path: Path) -> None:
    from halb.demo.shop_db import ShopDB

    db = ShopDB(str(tmp_path / "shop.db"))
    db.init()
    order, replayed = db.create_order([("sku-1", 1)], "run-7", "A")
    again, replayed2 = db.create_order([("sku-1", 1)], "run-7", "B")
    db.close()
    assert not replayed and replayed2 and again["id"] == order["id"]
    res = check_ledger([acked("run-7", order["id"])], str(tmp_path / "shop.db"), "run-")
    assert res.intact and res.stored == 1


def test_no_database_is_reported_not_passed(tmp_path: Path) -> None:
    assert not check_ledger([], None, "run-").checked
    res = check_ledger([], str(tmp_path / "missing.db"), "run-")
    assert not res.checked and "does not exist" in res.reason and not res.intact


def test_in_flight_checkout_is_not_acknowledged(tmp_path: Path) -> None:
    """A check while the load runs must not count a request still in flight (no answer yet)."""
    db = crafted_db(tmp_path / "shop.db", [("o1", "run-1"), ("o2", "run-2")])
    in_flight = Outcome(seq=2, kind="checkout", scheduled=0.5, key="run-2")  # stored, answer not read yet
    pending = Outcome(seq=3, kind="checkout", scheduled=0.6, key="run-3")  # not stored yet
    res = check_ledger([acked("run-1", "o1"), in_flight, pending], db, "run-")
    assert res.intact and res.acknowledged == 1 and res.unacknowledged_stored == ["run-2"]

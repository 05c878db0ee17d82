"""The checkout shop's database: one SQLite file shared by every backend instance.

Why SQLite in WAL mode: the demo needs a *real* shared database so that chaos drills can
prove "every acknowledged order is stored exactly once" without running a database
server. WAL lets readers run while one writer commits, and several processes on the same
host can open the same file (not over NFS: WAL needs shared memory).

Durability choice: ``synchronous=FULL`` by default. In WAL mode ``NORMAL`` survives a
process crash (``kill -9``, the drills' usual fault) but may lose the last commits on a
power cut or kernel crash; ``FULL`` fsyncs the WAL on every commit, so an order whose 201
reached the client is on disk. The cost (one fsync per checkout) is acceptable for a
demo. ``synchronous="NORMAL"`` can be chosen for benchmarks.

Idempotency: ``orders.idempotency_key`` is ``UNIQUE``. An order is created with
``INSERT ... ON CONFLICT(idempotency_key) DO NOTHING``; if no row was inserted the
existing order is read back in the same transaction and returned as a replay. There is no
check-then-insert window, so two processes receiving the same key at the same moment
still produce exactly one order. Writes use ``BEGIN IMMEDIATE`` so that a transaction
takes the write lock up front and waits in ``busy_timeout`` instead of failing with
SQLITE_BUSY when it would have had to upgrade a read lock.

All methods here are blocking; the aiohttp backend calls them in a thread pool so the
event loop never waits on a lock or an fsync. Each thread gets its own connection.
"""
from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Iterable

SYNCHRONOUS_MODES = ("NORMAL", "FULL")
DEFAULT_BUSY_TIMEOUT_MS = 10_000
CURRENCY = "EUR"


@dataclass(frozen=True)
class Product:
    sku: str
    name: str
    price_cents: int

    def to_dict(self) -> dict[str, Any]:
        return {"sku": self.sku, "name": self.name, "price_cents": self.price_cents, "currency": CURRENCY}


# The fixed catalog seeded at first start. Prices are integers in cents: never floats for money.
CATALOG: tuple[Product, ...] = (
    Product("sku-1", "Espresso beans 1 kg", 2490),
    Product("sku-2", "Ceramic pour-over dripper", 1890),
    Product("sku-3", "Paper filters (100)", 450),
    Product("sku-4", "Hand grinder", 6900),
    Product("sku-5", "Gooseneck kettle", 4500),
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS products (
    sku          TEXT PRIMARY KEY,
    name         TEXT NOT NULL,
    price_cents  INTEGER NOT NULL CHECK (price_cents >= 0)
);
CREATE TABLE IF NOT EXISTS orders (
    id               TEXT PRIMARY KEY,
    idempotency_key  TEXT UNIQUE,          -- NULL allowed (many orders without a key)
    request_hash     TEXT NOT NULL,        -- detects a key reused with a different body
    created_by       TEXT NOT NULL,        -- backend instance name that stored it
    created_at       REAL NOT NULL,        -- unix time
    total_cents      INTEGER NOT NULL,
    items_json       TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS orders_created_at ON orders (created_at);
"""


class ShopError(Exception):
    """Base of the errors the HTTP layer maps to 4xx responses."""

    code = "shop_error"


class UnknownSku(ShopError):
    code = "unknown_sku"

    def __init__(self, sku: str) -> None:
        super().__init__(f"unknown sku {sku!r}")
        self.sku = sku


class IdempotencyKeyReused(ShopError):
    """Same Idempotency-Key, different request body: refusing beats silently replaying."""

    code = "idempotency_key_reused"

    def __init__(self, key: str, order_id: str) -> None:
        super().__init__(f"Idempotency-Key {key!r} was already used for order {order_id} with a different body")
        self.key = key
        self.order_id = order_id


def canonical_items(items: Iterable[tuple[str, int]]) -> list[tuple[str, int]]:
    """Merge duplicate skus and sort, so equal baskets have one representation."""
    merged: dict[str, int] = {}
    for sku, qty in items:
        merged[sku] = merged.get(sku, 0) + qty
    return sorted(merged.items())


def request_hash(items: list[tuple[str, int]]) -> str:
    return hashlib.sha256(json.dumps(items, separators=(",", ":")).encode()).hexdigest()


def connect(db_path: str, synchronous: str = "FULL", busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS) -> sqlite3.Connection:
    """Open a connection with the shop's pragmas. Autocommit mode: transactions are explicit."""
    if synchronous not in SYNCHRONOUS_MODES:
        raise ValueError(f"synchronous must be one of {', '.join(SYNCHRONOUS_MODES)}, not {synchronous!r}")
    conn = sqlite3.connect(db_path, timeout=busy_timeout_ms / 1000, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    # busy_timeout first: switching to WAL itself needs a lock another process may hold.
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        conn.close()
        raise RuntimeError(f"{db_path}: could not switch to WAL journal mode (got {mode!r})")
    conn.execute(f"PRAGMA synchronous = {synchronous}")
    conn.execute("PRAGMA foreign_keys = ON")
    return conn


def init_db(db_path: str, synchronous: str = "FULL") -> None:
    """Create the schema and seed the catalog. Safe to run from several processes at once."""
    conn = connect(db_path, synchronous)
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            for stmt in SCHEMA.split(";"):
                if stmt.strip():
                    conn.execute(stmt)
            conn.executemany(
                "INSERT OR IGNORE INTO products (sku, name, price_cents) VALUES (?, ?, ?)",
                [(p.sku, p.name, p.price_cents) for p in CATALOG],
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    finally:
        conn.close()


def _order_dict(row: sqlite3.Row) -> dict[str, Any]:
    return {
        "id": row["id"],
        "idempotency_key": row["idempotency_key"],
        "created_by": row["created_by"],
        "created_at": row["created_at"],
        "total_cents": row["total_cents"],
        "currency": CURRENCY,
        "items": json.loads(row["items_json"]),
    }


class ShopDB:
    """Blocking access to the shop database; one connection per calling thread."""

    def __init__(self, db_path: str, synchronous: str = "FULL", busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS) -> None:
        self.db_path = db_path
        self.synchronous = synchronous
        self.busy_timeout_ms = busy_timeout_ms
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._closed = False

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            if self._closed:
                raise RuntimeError("ShopDB is closed")
            conn = connect(self.db_path, self.synchronous, self.busy_timeout_ms)
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    def init(self) -> None:
        init_db(self.db_path, self.synchronous)

    def close(self) -> None:
        """Close every thread's connection; call after the thread pool has shut down."""
        self._closed = True
        with self._lock:
            conns, self._all = self._all, []
        for conn in conns:
            try:
                conn.close()
            except sqlite3.Error:
                pass

    def products(self) -> list[Product]:
        rows = self._conn().execute("SELECT sku, name, price_cents FROM products ORDER BY sku").fetchall()
        return [Product(r["sku"], r["name"], r["price_cents"]) for r in rows]

    def create_order(self, items: list[tuple[str, int]], idempotency_key: str | None, created_by: str) -> tuple[dict[str, Any], bool]:
        """Store an order; returns (order, replayed).

        ``replayed`` is True when an order with this key already existed: that order is
        returned unchanged and nothing is written. Raises UnknownSku or
        IdempotencyKeyReused.
        """
        basket = canonical_items(items)
        digest = request_hash(basket)
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            lines = []
            total = 0
            for sku, qty in basket:
                prod = conn.execute("SELECT name, price_cents FROM products WHERE sku = ?", (sku,)).fetchone()
                if prod is None:
                    raise UnknownSku(sku)
                line_total = prod["price_cents"] * qty
                total += line_total
                lines.append({"sku": sku, "name": prod["name"], "qty": qty,
                              "unit_price_cents": prod["price_cents"], "line_total_cents": line_total})
            order_id = "ord_" + uuid.uuid4().hex
            cur = conn.execute(
                "INSERT INTO orders (id, idempotency_key, request_hash, created_by, created_at, total_cents, items_json)"
                " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (idempotency_key) DO NOTHING",
                (order_id, idempotency_key, digest, created_by, time.time(), total, json.dumps(lines)),
            )
            # No "does the key exist?" read before this INSERT: the UNIQUE constraint alone
            # decides who wins, so correctness never depends on the locking mode.
            if cur.rowcount == 0:  # this key was stored before (by us or another instance)
                row = conn.execute("SELECT * FROM orders WHERE idempotency_key = ?", (idempotency_key,)).fetchone()
                conn.execute("COMMIT")
                return self._replay(row, idempotency_key or "", digest), True
            row = conn.execute("SELECT * FROM orders WHERE id = ?", (order_id,)).fetchone()
            conn.execute("COMMIT")
            return _order_dict(row), False
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    @staticmethod
    def _replay(row: sqlite3.Row, key: str, digest: str) -> dict[str, Any]:
        if row["request_hash"] != digest:
            raise IdempotencyKeyReused(key, row["id"])
        return _order_dict(row)

    def get_order(self, order_id: str) -> dict[str, Any] | None:
        row = self._conn().execute("SELECT * FROM orders WHERE id = ?", (order_id,)).fetchone()
        return None if row is None else _order_dict(row)

    def list_orders(self, limit: int = 50) -> list[dict[str, Any]]:
        rows = self._conn().execute(
            "SELECT * FROM orders ORDER BY created_at DESC, id LIMIT ?", (limit,)).fetchall()
        return [_order_dict(r) for r in rows]

    def ping(self) -> None:
        self._conn().execute("SELECT 1").fetchone()


# --- read-only helpers for drills and tests -------------------------------------------

def _ro_connect(db_path: str) -> sqlite3.Connection:
    """A plain connection for reading; refuses to create a missing database by accident."""
    if not os.path.exists(db_path):
        raise FileNotFoundError(f"shop database {db_path} does not exist")
    conn = sqlite3.connect(db_path, timeout=DEFAULT_BUSY_TIMEOUT_MS / 1000, isolation_level=None)
    conn.execute(f"PRAGMA busy_timeout = {DEFAULT_BUSY_TIMEOUT_MS}")
    return conn


def orders_by_idempotency_key(db_path: str) -> dict[str, list[str]]:
    """Ledger view: every Idempotency-Key -> the ids of the orders stored under it.

    With the UNIQUE constraint each list has exactly one id; drills still check the length
    so that a schema regression would be caught rather than assumed away. Orders without
    a key are not included (see count_orders).
    """
    conn = _ro_connect(db_path)
    try:
        out: dict[str, list[str]] = {}
        for key, order_id in conn.execute(
                "SELECT idempotency_key, id FROM orders WHERE idempotency_key IS NOT NULL ORDER BY created_at, id"):
            out.setdefault(key, []).append(order_id)
        return out
    finally:
        conn.close()


def count_orders(db_path: str) -> int:
    """Total number of stored orders, with or without a key."""
    conn = _ro_connect(db_path)
    try:
        return int(conn.execute("SELECT COUNT(*) FROM orders").fetchone()[0])
    finally:
        conn.close()

"""Checkout body validation: status codes and error codes, without a server."""
from __future__ import annotations

import json

import pytest

from halb.demo.backend import MAX_ITEMS, BackendConfig, BadRequest, parse_checkout


def body(obj: object) -> bytes:
    return json.dumps(obj).encode()


def test_valid_body() -> None:
    assert parse_checkout(body({"items": [{"sku": "sku-1", "qty": 2}, {"sku": "sku-3", "qty": 1}]})) == [
        ("sku-1", 2), ("sku-3", 1)]


@pytest.mark.parametrize("raw,status,code", [
    (b"{", 400, "malformed_json"),
    (b"\xff\xfe", 400, "malformed_json"),
    (b"", 400, "malformed_json"),
    (body([1]), 422, "invalid_body"),
    (body({}), 422, "missing_items"),
    (body({"items": {}}), 422, "invalid_items"),
    (body({"items": []}), 422, "empty_items"),
    (body({"items": [{"sku": "sku-1", "qty": 1}] * (MAX_ITEMS + 1)}), 422, "too_many_items"),
    (body({"items": ["sku-1"]}), 422, "invalid_item"),
    (body({"items": [{"qty": 1}]}), 422, "invalid_sku"),
    (body({"items": [{"sku": 5, "qty": 1}]}), 422, "invalid_sku"),
    (body({"items": [{"sku": "sku-1"}]}), 422, "invalid_qty"),
    (body({"items": [{"sku": "sku-1", "qty": 0}]}), 422, "invalid_qty"),
    (body({"items": [{"sku": "sku-1", "qty": -2}]}), 422, "invalid_qty"),
    (body({"items": [{"sku": "sku-1", "qty": 1.5}]}), 422, "invalid_qty"),
    (body({"items": [{"sku": "sku-1", "qty": "1"}]}), 422, "invalid_qty"),
    (body({"items": [{"sku": "sku-1", "qty": True}]}), 422, "invalid_qty"),
    (body({"items": [{"sku": "sku-1", "qty": 10**9}]}), 422, "invalid_qty"),
])
def test_invalid_bodies(raw: bytes, status: int, code: str) -> None:
    with pytest.raises(BadRequest) as info:
        parse_checkout(raw)
    assert (info.value.status, info.value.code) == (status, code)


def test_error_names_the_field() -> None:
    with pytest.raises(BadRequest) as info:
        parse_checkout(body({"items": [{"sku": "sku-1", "qty": 1}, {"sku": "sku-2", "qty": 0}]}))
    assert info.value.details == {"field": "items[1].qty"}


def test_config_validation() -> None:
    cfg = BackendConfig(name="A", host="127.0.0.1", port=1, db_path="x")
    assert cfg.server == "A"
    with pytest.raises(ValueError):
        BackendConfig(name="A", host="127.0.0.1", port=1, db_path="x", fail_rate=1.5)
    with pytest.raises(ValueError):
        BackendConfig(name="A", host="127.0.0.1", port=1, db_path="x", delay_ms=-1)

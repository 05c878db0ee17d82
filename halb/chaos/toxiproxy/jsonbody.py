"""Request-body decoding that follows Go's ``encoding/json`` rules.

The real Toxiproxy decodes bodies into Go structs, and clients depend on the quirks
that follow from that: only the first JSON value is read (trailing bytes are ignored),
keys match case-insensitively, ``null`` leaves a field unchanged, unknown keys are
ignored, and integer fields refuse ``1.0``, ``1e3`` and ``"1"``. Python's ``json``
module is stricter in some places and looser in others (it accepts ``NaN``), so this
module wraps it to give the same accept/reject decisions and similar messages.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
FLOAT32_MAX = 3.4028234663852886e38


class BodyError(ValueError):
    """The body could not be decoded; the message follows ``bad request body: ``."""


class Pairs(list):  # type: ignore[type-arg]
    """A JSON object as an ordered list of (key, value) pairs.

    Kept as pairs, not a dict, because Go applies duplicate keys in order (last wins)
    and matches them case-insensitively, which a dict would hide.
    """


def _reject_constant(name: str) -> Any:
    raise BodyError(f"invalid character '{name[0]}' looking for beginning of value")


_DECODER = json.JSONDecoder(object_pairs_hook=Pairs, parse_constant=_reject_constant)
_WS = " \t\r\n"


def decode_first_value(raw: bytes) -> Any:
    """Decode the first JSON value in ``raw`` and ignore whatever follows it."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BodyError("invalid character in string literal") from exc
    idx = 0
    while idx < len(text) and text[idx] in _WS:
        idx += 1
    if idx >= len(text):
        raise BodyError("EOF")
    try:
        value, _end = _DECODER.raw_decode(text, idx)
    except json.JSONDecodeError as exc:
        if exc.pos >= len(text):
            raise BodyError("unexpected EOF") from exc
        raise BodyError(f"invalid character {text[exc.pos]!r} looking for beginning of value") from exc
    except RecursionError as exc:
        raise BodyError("exceeded max depth") from exc
    return value


def json_type_name(value: Any) -> str:
    """Go's name for the JSON kind of ``value``, used in type-mismatch messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, Pairs):
        return "object"
    return "array"


@dataclass(frozen=True)
class Field:
    """One struct field: its JSON name, Go kind and the struct name for messages."""

    name: str
    kind: str  # "string", "bool", "int64", "float32", "object"


def _mismatch(struct: str, field: Field, value: Any) -> BodyError:
    shown = json_type_name(value)
    if shown == "number":
        shown = f"number {json.dumps(value)}"
    return BodyError(f"json: cannot unmarshal {shown} into Go struct field {struct}.{field.name} of type {field.kind}")


def check_value(struct: str, field: Field, value: Any) -> Any:
    """Return ``value`` if it fits the Go kind of ``field``, else raise BodyError."""
    kind = field.kind
    if kind == "string":
        ok = isinstance(value, str)
    elif kind == "bool":
        ok = isinstance(value, bool)
    elif kind == "int64":
        ok = isinstance(value, int) and not isinstance(value, bool) and INT64_MIN <= value <= INT64_MAX
    elif kind == "float32":
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
              and math.isfinite(float(value)) and abs(float(value)) <= FLOAT32_MAX)
    elif kind == "object":
        ok = isinstance(value, Pairs)
    else:  # pragma: no cover - programming error
        raise AssertionError(kind)
    if not ok:
        raise _mismatch(struct, field, value)
    return value


def decode_struct(value: Any, struct: str, fields: list[Field]) -> dict[str, Any]:
    """Pick ``fields`` out of a decoded JSON object the way Go fills a struct.

    Returns only the fields that were present and not null. A top-level ``null``
    decodes to nothing (Go leaves the struct untouched); any other non-object is a
    type error.
    """
    if value is None:
        return {}
    if not isinstance(value, Pairs):
        raise BodyError(f"json: cannot unmarshal {json_type_name(value)} into Go value of type {struct}")
    by_lower = {f.name.lower(): f for f in fields}
    out: dict[str, Any] = {}
    for key, item in value:
        field = by_lower.get(key.lower())
        if field is None or item is None:
            continue
        out[field.name] = check_value(struct, field, item)
    return out

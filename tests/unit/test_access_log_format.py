"""The access log's two formatters (C: halb/dataplane/_accesslog.c, Python: py_format_lines)
write the same bytes, and every line is valid JSON that gives back what a client sent,
whatever bytes it sent; the query string is never logged; long values are cut."""
from __future__ import annotations

import json
import random

import pytest

from halb.dataplane import access_log

C = access_log.format_lines


def record(**kw):
    base = dict(t1=1000.0015, t0=1000.0, rid=b"n1-abc-1", peer=b"127.0.0.1", fe=None, service="web",
                host=b"shop.example", method=b"GET", url=b"/a?token=secret", status=200, sent=123, backend="b0",
                attempts=1, tls=None)
    base.update(kw)
    return tuple(base.values())


OFFSET = 1764909000.1219  # wall clock = monotonic + this: t1 above is 2025-12-05T04:46:40.123Z


def both(records):
    py = access_log.py_format_lines(records, OFFSET)
    if C is not None:
        assert C(records, OFFSET) == py
    return py


def test_fields_and_values():
    line = json.loads(both([record(fe="web", tls="TLSv1.3")]))
    assert line == {"time": "2025-12-05T04:46:40.123Z", "request_id": "n1-abc-1", "client": "127.0.0.1",
                    "frontend": "web", "service": "web", "host": "shop.example", "method": "GET", "path": "/a",
                    "status": 200, "bytes": 123, "duration_ms": 1.5, "backend": "b0", "attempts": 1, "tls": "TLSv1.3"}


def test_nulls_and_a_frontends_own_runtime():
    line = json.loads(both([record(rid=None, host=None, backend=None, t0=0.0, service="frontend:web")]))
    assert line["request_id"] == "" and line["host"] is None and line["backend"] is None
    assert line["duration_ms"] is None and line["service"] is None


def test_hostile_bytes_stay_inside_their_json_string():
    rng = random.Random(7)
    records = []
    for _ in range(300):
        junk = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 40)))
        records.append(record(host=junk, url=b"/" + junk.replace(b"?", b""), rid=junk, method=junk[:8],
                              t0=1000.0, t1=1000.0 + rng.random() * rng.choice((0.001, 1, 100)),
                              status=rng.randrange(100, 600), sent=rng.randrange(1 << 40)))
    text = both(records)
    for rec, raw in zip(records, text.splitlines()):
        line = json.loads(raw)
        assert line["host"] == rec[6].decode("latin-1") and line["path"] == rec[8].decode("latin-1")
        assert line["request_id"] == rec[2].decode("latin-1") and len(line) == 14


def test_long_values_are_cut():
    line = json.loads(both([record(url=b"/" + b"p" * 5000, host=b"h" * 1000)]))
    assert len(line["path"]) == access_log.MAX_PATH and len(line["host"]) == access_log.MAX_HOST


@pytest.mark.skipif(C is None, reason="halb.dataplane._accesslog not built")
def test_c_refuses_malformed_records_with_an_error():
    with pytest.raises(TypeError):
        C([("not", "a", "record")], 0.0)
    with pytest.raises(TypeError):
        C([record(host="a str")], 0.0)
    with pytest.raises(TypeError):
        C([record()])

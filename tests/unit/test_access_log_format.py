"""The access log's two formatters (C: halb/dataplane/_accesslog.c's Lines, Python:
py_format_lines, in batches and a line at a time through PyLines) write the same bytes, and every line is valid JSON that gives back what a client sent,
whatever bytes it sent; the query string is never logged; long values are cut."""
from __future__ import annotations

import json
import random
import time
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import pytest

from halb.dataplane import access_log

C = access_log.CLines


def record(**kw):
    base = dict(t1=1000.0015, t0=1000.0, rid=b"n1-abc-1", peer=b"127.0.0.1", fe=None, service="web",
                host=b"shop.example", method=b"GET", url=b"/a?token=secret", status=200, sent=123, backend="b0",
                attempts=1, tls=None)
    base.update(kw)
    return tuple(base.values())


OFFSET = 1764909000.1219  # wall clock = monotonic + this: t1 above is 2025-12-05T04:46:40.123Z


def line_by_line(lines, records):
    lines.wall_offset = OFFSET
    for i, rec in enumerate(records):
        assert lines.add_at(*rec) == i + 1 == lines.count
    data, n = lines.take()
    assert n == len(records) and lines.count == 0 and lines.take() == (b"", 0)
    return data


def both(records):
    py = access_log.py_format_lines(records, OFFSET)
    assert line_by_line(access_log.PyLines(), records) == py
    if C is not None:
        assert line_by_line(C(), records) == py
    return py


def every_lines():
    return [access_log.PyLines()] + ([access_log.CLines()] if access_log.CLines is not None else [])


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
    lines = C()
    with pytest.raises(TypeError):
        lines.add_at("not", "a", "record")
    with pytest.raises(TypeError):
        lines.add_at(*record(host="a str"))
    with pytest.raises(TypeError):
        lines.add_at(*record()[:-1])
    assert lines.take() == (b"", 0)


def test_add_stamps_the_end_time_from_the_monotonic_clock():
    """Lines.add (the request path) reads the end time itself: the line's time is now and its
    duration runs from the start the caller took with time.monotonic()."""
    for lines in every_lines():
        lines.wall_offset = time.time() - time.monotonic()
        before = time.time()
        lines.add(time.monotonic() - 0.5, b"r", b"127.0.0.1", None, "web", b"h", b"GET", b"/", 200, 1, "b0", 1, None)
        after = time.time()
        line = json.loads(lines.take()[0])
        stamp = datetime.strptime(line["time"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=__import__("datetime").timezone.utc)
        assert before - 0.002 <= stamp.timestamp() <= after + 0.002, (type(lines), line["time"], before, after)
        assert 500 <= line["duration_ms"] < 600, line


def test_a_malformed_record_raises_and_leaves_the_pending_lines_as_they_were():
    for lines in every_lines():
        lines.add_at(*record())
        with pytest.raises(TypeError):
            lines.add_at(*record(host="a str"))
        with pytest.raises(TypeError):
            lines.add(1.0)
        data, n = lines.take()
        assert n == 1 and data.count(b"\n") == 1 and json.loads(data)["host"] == "shop.example"


def test_access_log_drops_and_counts_a_record_it_cannot_format(tmp_path: Path, caplog):
    """One bad record (a bug elsewhere) costs that line only: counted in `dropped`, reported,
    and the lines before and after it are written."""
    al = access_log.AccessLog(str(tmp_path / "access.log"))
    try:
        route = SimpleNamespace(route=SimpleNamespace(name="web"))
        conn = SimpleNamespace(listener=SimpleNamespace(frontend=None, rt=route, ssl=None), peer=b"127.0.0.1")

        def ex(host):
            return SimpleNamespace(rt=route, t0=0.0, rid=b"r", host=host, method=b"GET", url=b"/", status=200,
                                   head_out=b"HTTP/1.1 200 OK\r\n\r\n", sent=0, attempts=1)
        al.add(conn, ex(b"a.example"), None)
        al.add(conn, ex("not bytes"), None)
        al.add(conn, ex(b"b.example"), None)
    finally:
        al.close()
    hosts = [json.loads(raw)["host"] for raw in (tmp_path / "access.log").read_text().splitlines()]
    assert hosts == ["a.example", "b.example"]
    assert al.dropped == 1 and al.written == 2
    reported = [r.getMessage() for r in caplog.records if "record dropped" in r.getMessage()]
    assert len(reported) == 1 and reported[0].startswith("access log record dropped (TypeError: "), reported

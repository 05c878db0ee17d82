"""The C head fast path (halb/dataplane/_fasthttp.c) against the llhttp path it shortcuts.

Safety property: whenever the fast path accepts a head, the llhttp path (httptools plus
HttpClientConn's callbacks, or scan_response_head for responses) accepts it too and gives
the same result, field for field. Heads are generated from a grammar that mixes valid and
invalid pieces, and mutated byte by byte; seeds are fixed, so a failure reproduces.
"""
from __future__ import annotations

import random
import shutil
from types import SimpleNamespace
from typing import Any

import httptools
import pytest

from halb.dataplane import http_proxy
from halb.dataplane.http_proxy import Exchange, HttpClientConn, scan_response_head
from halb.dataplane.options import ServiceOptions

try:
    from halb.dataplane._fasthttp import parse_request, parse_response
except ImportError:  # pragma: no cover - only where the package was built without a compiler
    if shutil.which("cc") or shutil.which("gcc"):
        raise  # a compiler exists, so the extension must have been built
    pytest.skip("halb.dataplane._fasthttp not built (no C compiler)", allow_module_level=True)

HASH = b"x-hash"
MAX = 65536

# ------------------------------------------------------------------ llhttp reference (requests)


class CapturingConn(HttpClientConn):
    """HttpClientConn's real parsing callbacks; routing replaced by recording the exchange."""

    def __init__(self) -> None:
        rt = SimpleNamespace(opts=ServiceOptions(), hash_header=HASH, connections=0, rejected=0)
        engine = SimpleNamespace(loop=None, conns=set(), new_request_id=lambda: b"rid", access_log=None)
        super().__init__(SimpleNamespace(engine=engine, rt=rt))  # type: ignore[arg-type]
        self.transport = SimpleNamespace(write=lambda d: None, close=lambda: None,
                                         pause_reading=lambda: None, resume_reading=lambda: None)  # type: ignore[assignment]
        self.started: list[Exchange] = []
        self.rejected: list[tuple[int, str]] = []

    def start(self, ex: Exchange) -> None:
        self.started.append(ex)
        self.cur = ex

    def reject(self, status: int, message: str) -> None:
        self.rejected.append((status, message))
        self.closed = True


def llhttp_request(data: bytes, monkeypatch: pytest.MonkeyPatch) -> tuple[Exchange | None, Any]:
    """Run the pure llhttp path over one read; returns the exchange it started (if any)."""
    monkeypatch.setattr(http_proxy, "fast_request", None)
    conn = CapturingConn()
    try:
        conn.data_received(data)
    finally:
        monkeypatch.undo()
    ok = len(conn.started) == 1 and not conn.rejected and conn.started[0].body_done
    return (conn.started[0] if ok else None), conn


FIELDS = ("method", "url", "version", "keep_alive", "hdrs", "host", "xff", "rid", "idem", "cookie", "hash_value")


def fast_fields(r: tuple[Any, ...]) -> dict[str, Any]:
    d = dict(zip(FIELDS, r))
    d["version"] = "1.0" if d["version"] else "1.1"
    return d


def check_request(data: bytes, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Asserts the safety property for one head; returns whether the fast path took it."""
    fast = parse_request(data, MAX, HASH, ServiceOptions().max_headers)
    if fast is None:
        return False
    ex, conn = llhttp_request(data, monkeypatch)
    assert ex is not None, f"fast path accepted what llhttp path did not: {data!r} {conn.rejected}"
    want = {f: getattr(ex, f) for f in FIELDS}
    assert fast_fields(fast) == want, data
    assert ex.content_length is None and not ex.chunked_in, data
    drop = set(ex.conn_tokens or ()) - {b"close", b"keep-alive", b""}
    assert not drop, data  # the llhttp path would have removed more headers
    return True


# ------------------------------------------------------------------ generators

METHODS = [b"GET"] * 14 + [b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"TRACE", b"CONNECT",
                          b"get", b"FOO", b"PROPFIND", b"G ET"]
URLS = [b"/"] * 14 + [b"/a/b?c=d&e=f", b"/p#frag", b"/%20x", b"*", b"http://h/x", b"/sp ace",
                     b"/\"<>\\^`{|}", b"/\x7f", b"/\x80", b"", b"/\t", b"//", b"/?", b"/;x"]
VERSIONS = [b"HTTP/1.1"] * 14 + [b"HTTP/1.0", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.2", b"http/1.1", b"HTTP/1.1 ", b"HTTP/1"]
NAMES = [b"Host", b"host", b"HOST", b"Connection", b"connection", b"X-Forwarded-For", b"X-Request-Id",
         b"Idempotency-Key", b"Cookie", b"X-Hash", b"x-HASH", b"Accept", b"User-Agent", b"Keep-Alive", b"TE",
         b"Trailer", b"Proxy-Authorization", b"X-Forwarded-Proto", b"X-Forwarded-Host", b"Content-Length",
         b"Transfer-Encoding", b"Upgrade", b"Proxy-Connection", b"Bad Name", b"X:Y", b"", b"X-\x80",
         b"X_Under", b"!#$%&'*+-.^_`|~", b"Expect"]
VALUES = [b"x", b"close", b"keep-alive", b"Keep-Alive, close", b"CLOSE", b"upgrade", b"close, foo",
          b" spaced", b"trailing ", b"a\tb", b"", b"v\x01", b"v\x80", b"0", b"5", b"chunked", b"abc-123",
          b"r" * 129, b"a b", b"127.0.0.1:8080", b"1.2.3.4, 5.6.7.8", b"a=b; c=d", b"*/*", b",", b"keep-alive,,",
          b"\tx", b"100-continue", b"v\x7f", b"identity"]
CLEAN_NAMES = [b"Accept", b"User-Agent", b"X-Hash", b"Accept-Encoding", b"Cookie", b"X-Request-Id", b"Connection",
               b"Idempotency-Key", b"X-Forwarded-For", b"Keep-Alive"]
CLEAN_VALUES = [b"x", b"*/*", b"close", b"keep-alive", b"gzip, deflate", b"a=b", b"id-1", b"1.2.3.4"]
SEPS = [b": "] * 6 + [b":", b":  ", b" : ", b":\t", b" :"]


def gen_request(rng: random.Random) -> bytes:
    line = rng.choice(METHODS) + b" " + rng.choice(URLS) + b" " + rng.choice(VERSIONS)
    eol = b"\r\n" if rng.random() < 0.95 else b"\n"
    lines = [line]
    for _ in range(rng.randint(0, 6)):
        if rng.random() < 0.7:  # mostly ordinary lines, so that whole heads often stay valid
            lines.append(rng.choice(CLEAN_NAMES) + b": " + rng.choice(CLEAN_VALUES))
            continue
        name = rng.choice(NAMES)
        if rng.random() < 0.3:
            name = bytes(c ^ 0x20 if chr(c).isalpha() and rng.random() < 0.5 else c for c in name)
        lines.append(name + rng.choice(SEPS) + rng.choice(VALUES))
        if rng.random() < 0.03:
            lines.append(b" folded")
    if rng.random() < 0.85:  # HTTP/1.1 without Host is refused (RFC 9112 3.2); mostly present
        lines.insert(rng.randint(1, len(lines)), b"Host: shop")
    head = eol.join(lines) + eol + eol
    if rng.random() < 0.1:
        head += rng.choice([b"x", b"GET / HTTP/1.1\r\n\r\n", b"hello"])
    return head


def mutate(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        i = rng.randrange(len(b) + 1)
        op = rng.random()
        c = rng.choice(b" \t\r\n:,;\x00\x7f\x80\xff/aZ0")
        if op < 0.4 and i < len(b):
            b[i] = c
        elif op < 0.7:
            b.insert(i, c)
        elif i < len(b):
            del b[i]
    return bytes(b)


COMMON = [
    b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n",  # wrk
    b"GET /products HTTP/1.1\r\nHost: shop\r\nUser-Agent: curl/7.88.1\r\nAccept: */*\r\n\r\n",  # curl
    b"GET /orders/7 HTTP/1.1\r\nHost: shop\r\nConnection: keep-alive\r\nAccept-Encoding: gzip, deflate\r\n"
    b"Accept: */*\r\nUser-Agent: python-requests/2.31\r\nCookie: sid=1\r\nX-Hash: k1\r\n\r\n",
    b"GET / HTTP/1.0\r\nHost: a\r\nConnection: Keep-Alive\r\n\r\n",
    b"DELETE /x HTTP/1.1\r\nHost: a\r\nIdempotency-Key: k-1\r\nX-Request-Id: my-id\r\n"
    b"X-Forwarded-For: 203.0.113.7\r\nConnection: close\r\n\r\n",
]


def test_common_client_requests_take_the_fast_path_with_llhttp_results(monkeypatch: pytest.MonkeyPatch) -> None:
    for data in COMMON:
        assert check_request(data, monkeypatch), data


def test_generated_requests_fast_path_agrees_with_llhttp(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(20261127)
    taken = fell_back = 0
    for _ in range(6000):
        if check_request(gen_request(rng), monkeypatch):
            taken += 1
        else:
            fell_back += 1
    # both branches must be exercised for the comparison to mean something
    assert taken > 1000 and fell_back > 1000, (taken, fell_back)


def test_mutated_requests_fast_path_agrees_with_llhttp(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(7)
    taken = 0
    for i in range(6000):
        taken += check_request(mutate(COMMON[i % len(COMMON)], rng), monkeypatch)
    assert taken > 300, taken


def test_fast_path_declines_what_it_does_not_model() -> None:
    declined = [
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi",  # a body
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n",  # framing headers
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close, X-Secret\r\nX-Secret: s\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",  # pipelined
        b"GET / HTTP/1.1\r\nHost: a\r\n",  # incomplete
        b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nX-Long: " + b"v" * 70000 + b"\r\n\r\n",  # over max_head
        b"GET / HTTP/1.1\r\nUser-Agent: x\r\n\r\n",  # HTTP/1.1 without Host: the llhttp path answers 400
        b"GET http://a/x HTTP/1.1\r\nHost: b\r\n\r\n",  # absolute-form: the URI's authority wins
        b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n",
    ]
    for data in declined:
        assert parse_request(data, MAX, HASH) is None, data[:80]
        assert parse_request(data, MAX, HASH, 100) is None, data[:80]
    # HTTP/1.0 needs no Host; the header-count limit counts every line, dropped ones too
    assert parse_request(b"GET / HTTP/1.0\r\n\r\n", MAX, HASH) is not None
    three = b"GET / HTTP/1.1\r\nHost: a\r\nTE: x\r\nAccept: */*\r\n\r\n"
    assert parse_request(three, MAX, HASH, 3) is not None
    assert parse_request(three, MAX, HASH, 2) is None


def test_header_count_limit_same_on_both_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    """At the limit both paths accept; one line over, C declines and llhttp answers 431."""
    limit = ServiceOptions().max_headers
    for n, ok in ((limit, True), (limit + 1, False)):
        data = b"GET / HTTP/1.1\r\nHost: a\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(n - 1)) + b"\r\n"
        assert (parse_request(data, MAX, HASH, limit) is not None) is ok
        ex, conn = llhttp_request(data, monkeypatch)
        assert (ex is not None) is ok
        if not ok:
            assert conn.rejected and conn.rejected[0][0] == 431


# ------------------------------------------------------------------ responses


def llhttp_response(data: bytes) -> dict[str, Any] | None:
    """What the llhttp path makes of one response (None when llhttp rejects it)."""
    got: dict[str, Any] = {"complete": 0}

    class Cb:
        def on_headers_complete(self) -> None:
            got["status"] = p.get_status_code()
            got["keep_alive"] = p.should_keep_alive()

        def on_message_complete(self) -> None:
            got["complete"] += 1

    p = httptools.HttpResponseParser(Cb())
    try:
        p.feed_data(data)
    except httptools.HttpParserError:
        return None
    end = data.find(b"\r\n\r\n")
    if "status" not in got or end < 0:
        return None
    out, cl, chunked, _ = scan_response_head(data[:end + 4])
    got.update(head=out, cl=cl, chunked=chunked, head_len=end + 4)
    return got


def check_response(data: bytes) -> bool:
    fast = parse_response(data, MAX)
    if fast is None:
        return False
    status, head, cl, ka, head_len = fast
    # bytes beyond the announced body are the proxy's business (it relays cl bytes and does
    # not reuse the connection), so llhttp is shown the head and at most cl body bytes
    ref = llhttp_response(data[:head_len + cl])
    assert ref is not None, f"fast path accepted what llhttp rejects: {data!r}"
    assert (status, head, cl, ka, head_len) == (ref["status"], ref["head"], ref["cl"], ref["keep_alive"],
                                                ref["head_len"]), data
    assert not ref["chunked"]
    if len(data) - head_len >= cl:
        assert ref["complete"] == 1, data  # llhttp frames the body exactly as announced
    return True


STATUS = [b"HTTP/1.1 200 OK"] * 5 + [b"HTTP/1.0 200 OK", b"HTTP/1.1 404 Not Found", b"HTTP/1.1 200",
                                     b"HTTP/1.1 200 ", b"HTTP/1.1 099 X", b"HTTP/1.1 20 X", b"HTTP/2 200 OK",
                                     b"HTTP/1.1 200 O\x01K", b"HTTP/1.1 301 Moved \tPermanently",
                                     b"HTTP/1.1 100 Continue", b"HTTP/1.1 500 Err", b"HTTP/1.1 2000 X",
                                     b"http/1.1 200 OK", b"HTTP/1.1 200 \x80"]
RESP_HEADERS = [
    (b"Content-Length", [b"12", b"012", b"+12", b"1 2", b"12 ", b"99999999999999999", b"x", b"-1", b""]),
    (b"content-length", [b"12"]), (b"CONTENT-LENGTH", [b"12"]),
    (b"Connection", [b"keep-alive", b"close", b"Keep-Alive, close", b"upgrade", b"x-foo", b""]),
    (b"Keep-Alive", [b"timeout=5"]), (b"Transfer-Encoding", [b"chunked", b"identity"]),
    (b"Upgrade", [b"h2c"]), (b"Proxy-Authenticate", [b"Basic"]), (b"Trailer", [b"X"]),
    (b"Proxy-Connection", [b"close"]), (b"Server", [b"nginx/1.22.1"]), (b"Date", [b"Fri, 27 Nov 2026 08:00:00 GMT"]),
    (b"X-Odd", [b"a\tb", b"\tlead", b"trail\t", b"\x7f"]), (b"Set-Cookie", [b"a=b; Path=/"]), (b"Bad Name", [b"x"]),
]


def gen_response(rng: random.Random) -> bytes:
    lines = [rng.choice(STATUS)]
    have_cl = False
    for _ in range(rng.randint(0, 6)):
        name, vals = rng.choice(RESP_HEADERS)
        have_cl |= name.lower() == b"content-length"
        lines.append(name + rng.choice(SEPS) + rng.choice(vals))
    if not have_cl and rng.random() < 0.8:
        lines.insert(rng.randint(1, len(lines)), b"Content-Length: 12")
    return b"\r\n".join(lines) + b"\r\n\r\n" + rng.choice([b"hello world!", b"hello", b"", b"hello world!!"])


def test_common_responses_take_the_fast_path() -> None:
    for data in [b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Fri, 27 Nov 2026 08:00:00 GMT\r\n"
                 b"Content-Type: text/plain\r\nContent-Length: 12\r\nConnection: keep-alive\r\n\r\nhello world!",
                 b"HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\n\r\n",
                 b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"]:
        assert check_response(data), data


def test_generated_responses_fast_path_agrees_with_llhttp() -> None:
    rng = random.Random(11)
    taken = sum(check_response(gen_response(rng)) for _ in range(6000))
    assert 300 < taken < 5700, taken


def test_mutated_responses_fast_path_agrees_with_llhttp() -> None:
    rng = random.Random(13)
    base = b"HTTP/1.1 200 OK\r\nServer: x\r\nContent-Length: 12\r\nConnection: keep-alive\r\n\r\nhello world!"
    taken = sum(check_response(mutate(base, rng)) for _ in range(6000))
    assert taken > 300, taken

"""HTTP/1.1 reverse proxy on asyncio Protocols and httptools (llhttp).

Why not aiohttp: a server+client aiohttp proxy measured ~0.13x HAProxy; callbacks on raw
Protocols with the C parser reach ~0.9x. So there is no task or coroutine per request:
`HttpClientConn` (one per client connection) parses requests and drives an `Exchange`
(one per request, across retry attempts) through callbacks; `UpstreamConn` (pooled,
keep-alive, one per backend connection) parses responses. Only opening a new upstream
connection runs a coroutine.

Bodies stream both ways with flow control: a full write buffer on one side pauses reading
on the other (pause_writing -> pause_reading), so memory per connection stays bounded by
the transports' buffers whatever the body size. Small request bodies of replayable
requests are also kept (up to retry_buffer_bytes) so a failed attempt can be replayed on
another backend.

Framing is re-done by the proxy: llhttp rejects ambiguous requests (Content-Length with
Transfer-Encoding, duplicate or invalid Content-Length, bad chunk sizes) before any byte
reaches a backend, bodies are forwarded de-chunked and re-chunked, hop-by-hop headers
(and headers named in Connection) are dropped.

Timeouts are checked by the engine's sweeper a few times per second (`check`) instead of
one timer per request: cheaper on the hot path, at the cost of ~0.25 s granularity.
"""
from __future__ import annotations

import asyncio
import os
import re
from collections import deque
from typing import TYPE_CHECKING, Any

import httptools

from halb.dataplane import acme_answer, body_deadline, body_relay, proxy_protocol, request_target, tunnel
from halb.dataplane.access_log import BATCH, CLIENT_CLOSED, monotonic, tls_version
from halb.dataplane.admission import QUEUE_MESSAGES, Admission
from halb.dataplane.http_errors import error_response
from halb.dataplane.local_errors import is_local_resource_error, local_reason, report_local_error, report_rejected
from halb.dataplane.options import ServiceOptions
from halb.dataplane.proxy_protocol import Addresses
from halb.dataplane.request_head import HeadState
from halb.dataplane.routing import BackendState, ServiceRuntime

if TYPE_CHECKING:  # pragma: no cover
    from halb.dataplane.listeners import Listener

# Optional C fast path (halb/dataplane/_fasthttp.c) for complete, simple heads; llhttp stays
# the authority for everything else. HALB_HTTP_ACCEL=0 turns it off (tests compare both).
fast_request: Any = None
fast_response: Any = None
if os.environ.get("HALB_HTTP_ACCEL", "1") != "0":
    try:
        from halb.dataplane._fasthttp import parse_request as fast_request, parse_response as fast_response
    except ImportError:  # built without a C compiler: the pure-Python path serves everything
        pass


# DataPlanes of this process with the access log on (engine.set_access_log keeps the count):
# while 0 the request path skips the log's bookkeeping after one global read (callgrind: an
# `self.engine.access_log` check cost ~150 instructions, this one a few dozen)
LOGGING = 0


def accelerated() -> bool:
    """Whether the C head fast path is in use (reported by `halb` at start-up and in bench)."""
    return fast_request is not None

IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})
# request headers the proxy drops or rewrites itself
REQ_SPECIAL = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"proxy-authorization", b"te", b"trailer",
    b"transfer-encoding", b"upgrade", b"content-length", b"x-forwarded-for", b"x-forwarded-proto",
    b"x-forwarded-host", b"x-request-id", b"host", b"idempotency-key", b"cookie",
})
RESP_SPECIAL = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate", b"trailer",
    b"transfer-encoding", b"upgrade", b"content-length",
})
VALID_RID = re.compile(rb"[\x21-\x7e]{1,128}")
INF = float("inf")
PENDING_HIGH = 256 * 1024  # body bytes buffered while no upstream is writable yet
BIG_CHUNK = 16 * 1024  # above this, a body chunk is handed to the transport without a copy

# read-pause reasons of a client connection (bit mask)
R_UPSTREAM = 1  # upstream write buffer full
R_PENDING = 2  # body buffered while connecting
R_PIPELINE = 4  # a pipelined request waits for the current one
R_UPGRADE = 8  # a WebSocket handshake waits for the backend's answer

OUT_RAW, OUT_CHUNKED = 0, 1

XFF = b"X-Forwarded-For: "
XFF_TAIL = b"\r\nX-Forwarded-Proto: http\r\nX-Request-Id: "

# response header lines the proxy removes (hop-by-hop, or re-framed) and Content-Length.
# Matched on a lowercased copy of the head: case-sensitive literals let the regex engine
# reject a branch on its first byte (an IGNORECASE alternation cost ~4x more per head), and
# findall avoids finditer's per-call method lookup. llhttp rejects whitespace before ':'.
RESP_SCAN = re.compile(rb"\r\n(c(?:onnection|ontent-length)|keep-alive|proxy-(?:connection|authenticate)|"
                       rb"t(?:railer|ransfer-encoding)|upgrade):[ \t]*([^\r\n]*)")
RESP_CUT = re.compile(rb"\r\n(?:connection|keep-alive|proxy-(?:connection|authenticate)|"
                      rb"t(?:railer|ransfer-encoding)|upgrade):[^\r\n]*")


def scan_response_head(block: bytes) -> tuple[bytes, int, bool, bytes | None]:
    """Raw response head (status line + header lines, CRLF each, blank line) -> what the client gets.

    Returns (block with the status line's version set to "HTTP/1.1" and without hop-by-hop
    lines, Content-Length or -1, is chunked, Connection header value, lowercased). One regex
    scan instead of a Python callback per header; llhttp has already validated the syntax.
    """
    cl = -1
    chunked = False
    tokens = None
    cuts = 0
    low = block.lower()
    for name, value in RESP_SCAN.findall(low):
        if name == b"content-length":
            cl = int(value)  # llhttp validated it
            continue
        cuts += 1
        if name == b"connection":
            tokens = value if tokens is None else tokens + b"," + value
        elif name == b"transfer-encoding":
            chunked = True
    if not block.startswith(b"HTTP/1.1"):  # the client gets HTTP/1.1 whatever the backend speaks
        block = b"HTTP/1.1" + block[8:]
        low = block.lower()
    if not cuts:
        return block, cl, chunked, None
    if cuts == 1 and tokens is not None:  # the usual case: only a Connection line to drop
        i = low.find(b"\r\nconnection:")
        out = block[:i] + block[low.find(b"\r\n", i + 13):]
    else:
        pieces = []
        pos = 0
        for m in RESP_CUT.finditer(low):
            pieces.append(block[pos:m.start()])
            pos = m.end()
        pieces.append(block[pos:])
        out = b"".join(pieces)
    if tokens is not None and tokens != b"keep-alive" and tokens != b"close":
        drop = {t.strip() for t in tokens.split(b",")} - {b"close", b"keep-alive", b""}
        if drop:  # headers named in Connection are hop-by-hop too
            lines = out.split(b"\r\n")
            out = b"\r\n".join([lines[0]] + [ln for ln in lines[1:] if ln.split(b":", 1)[0].strip().lower() not in drop])
    return out, cl, chunked, tokens



def _record_sent(ex: "Exchange", data: bytes) -> None:
    """Count body bytes sent upstream and keep a replay copy while it fits the retry buffer
    (a body larger than retry_buffer_bytes cannot be replayed, so its copy is dropped)."""
    n = len(data)
    ex.body_sent += n
    if ex.copy is not None:
        if ex.copy_size + n <= ex.opts.retry_buffer_bytes:  # type: ignore[union-attr]
            ex.copy.append(data)
            ex.copy_size += n
        else:
            ex.copy = None

class Reject(Exception):
    """Raised from parser callbacks to answer with an error and close."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Exchange:
    """One client request across its attempts.

    Slots, all set in __init__: a read of a class-level default cost a generic attribute
    lookup (~20 of them per request); slot reads are specialised by the interpreter.
    """

    __slots__ = (
        "url", "method", "version", "keep_alive", "conn_tokens", "host", "xff", "rid", "idem",
        "hash_value", "cookie", "content_length", "chunked_in", "body_done", "body_received",
        "head", "pending", "pending_size", "copy", "copy_size", "body_sent", "rt", "opts",
        "backend", "upstream", "attempts", "tried", "failed_servers", "deadline", "t_attempt",
        "response_started", "out_mode", "close_after", "finished", "retryable", "key", "hdrs", "upgrade",
        "t0", "status", "head_out", "sent",
    )

    url: bytes
    method: bytes
    version: str
    keep_alive: bool
    conn_tokens: list[bytes] | None
    host: bytes | None
    xff: bytes | None
    rid: bytes | None
    idem: bool
    hash_value: bytes | None
    cookie: bytes | None
    content_length: int | None
    chunked_in: bool
    body_done: bool
    body_received: int
    head: bytes
    pending: list[bytes] | None
    pending_size: int
    copy: list[bytes] | None
    copy_size: int
    body_sent: int
    rt: ServiceRuntime | None
    opts: ServiceOptions | None
    backend: BackendState | None
    upstream: "UpstreamConn | None"
    attempts: int
    tried: set[BackendState] | None
    failed_servers: set[str] | None
    deadline: float
    t_attempt: float
    response_started: bool
    out_mode: int
    close_after: bool
    finished: bool
    retryable: bool
    key: bytes | None
    hdrs: bytes  # forwarded request header lines ("Name: value\r\n" each), concatenated
    upgrade: bytes | None  # the Upgrade header of a WebSocket handshake being forwarded (tunnel.py)
    t0: float  # time.monotonic() when the request began, only while the access log is on (access_log.py)
    status: int  # the final status sent to the client (0: none yet)
    # what the client got, for the access log: the final head (or a whole local answer) as
    # written, and body bytes after it. A reference and a small int on the hot path: a byte
    # count like len(head) + body is mostly > 256, a new int object per request (callgrind:
    # ~400 instructions per request); it is added up only when a line is logged
    head_out: bytes
    sent: int

    def __init__(self) -> None:
        # one tuple unpack: two opcodes per field instead of three
        (
            self.url, self.method, self.version, self.keep_alive, self.conn_tokens, self.host,
            self.xff, self.rid, self.idem, self.hash_value, self.cookie, self.content_length,
            self.chunked_in, self.body_done, self.body_received, self.head, self.pending,
            self.pending_size, self.copy, self.copy_size, self.body_sent, self.rt, self.opts,
            self.backend, self.upstream, self.attempts, self.tried, self.failed_servers,
            self.deadline, self.t_attempt, self.response_started, self.out_mode, self.close_after,
            self.finished, self.retryable, self.key, self.hdrs, self.upgrade, self.t0, self.status, self.head_out, self.sent,
        ) = EX_DEFAULTS


EX_DEFAULTS = (  # in __slots__ order
    b"", b"", "1.1", True, None, None, None, None, False, None, None, None, False, False, 0, b"",
    None, 0, None, 0, 0, None, None, None, None, 0, None, None, INF, 0.0, False, 0, False, False,
    False, None, b"", None, 0.0, 0, b"", 0,
)


class UpstreamConn(asyncio.Protocol):
    """One keep-alive connection to a backend; parses responses for the bound exchange."""

    __slots__ = ("backend", "loop", "transport", "parser", "ex", "client", "final", "closed", "idle_since",
                 "read_paused", "write_paused", "max_hdr", "_close_delimited", "want_head", "hacc", "hpos",
                 "remaining", "bypass", "ka", "interims")

    def __init__(self, backend: BackendState, loop: asyncio.AbstractEventLoop) -> None:
        self.backend = backend
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.ex: Exchange | None = None
        self.client: HttpClientConn | None = None
        self.want_head = True  # collecting the raw response head
        self.hacc = b""
        self.hpos = 0
        self.remaining = -1  # Content-Length body bytes still to come (-1: not counted)
        self.bypass = False  # relaying the rest of a known-length body without the parser
        self.ka = True
        self.final = False
        self.closed = False
        self.idle_since = 0.0
        self.read_paused = False
        self.write_paused = False
        self.max_hdr = 65536
        self._close_delimited = False
        self.interims = 0  # 1xx responses seen for the bound exchange (capped: max_interim_responses)

    # --- lifecycle ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        try:
            self.backend.pool.remove(self)
        except ValueError:
            pass
        ex, client = self.ex, self.client
        if ex is None or client is None:
            return
        self.ex = None
        if not ex.response_started:
            client.attempt_failed(ex, False, "upstream closed before response" if exc is None else f"upstream error: {exc}")
        elif self._close_delimited and exc is None:
            client.response_done(self, ex, reusable=False)
        else:
            client.upstream_broke(ex, "upstream closed mid-response")

    def close(self) -> None:
        self.ex = None
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()

    def bind(self, ex: Exchange, client: "HttpClientConn") -> None:
        # hacc/hpos/remaining/bypass are back at rest whenever a connection is reusable
        self.ex = ex
        self.client = client
        self.final = False
        self.want_head = True
        self.max_hdr = ex.opts.max_header_bytes  # type: ignore[union-attr]
        if client.write_paused:
            self.pause_reading()
        elif self.read_paused:
            self.resume_reading()

    def pause_reading(self) -> None:
        if not self.read_paused and not self.closed:
            self.read_paused = True
            self.transport.pause_reading()  # type: ignore[union-attr]

    def resume_reading(self) -> None:
        if self.read_paused and not self.closed:
            self.read_paused = False
            self.transport.resume_reading()  # type: ignore[union-attr]

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.client is not None and self.ex is not None:
            self.client.pause(R_UPSTREAM)

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.client is not None:
            self.client.unpause(R_UPSTREAM)

    def data_received(self, data: bytes) -> None:
        ex = self.ex
        if ex is None:  # bytes on an idle pooled connection: protocol violation, drop it
            self.close()
            return
        client = self.client
        client.active = True  # type: ignore[union-attr]
        if self.bypass:
            self._relay(ex, client, data)  # type: ignore[arg-type]
            return
        if self.want_head and not self.hacc and fast_response is not None:
            r = fast_response(data, self.max_hdr)
            # 5xx (may be retried) and answers to HEAD take the llhttp path (C declines 1xx/204/304)
            if r is not None and r[0] < 500 and ex.method != b"HEAD":
                self._fast_response(ex, client, data, r)  # type: ignore[arg-type]
                return
        client.wbuf = []  # type: ignore[union-attr]
        switched: bytes | None = None
        try:
            if self.want_head:
                acc = self.hacc = self.hacc + data if self.hacc else data
                if len(acc) - self.hpos > self.max_hdr and acc.find(b"\r\n\r\n", self.hpos) < 0:
                    raise Reject(502, "upstream response head too large")
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:  # after a 101 we forwarded: the rest is the new protocol
            if self.ex is ex and ex.upgrade is not None and ex.response_started:
                switched = data[e.args[0]:]
            else:
                self.ex = None
                self.close()
                client.upstream_broke(ex, "unexpected protocol switch from upstream")  # type: ignore[union-attr]
        except Exception as e:  # HttpParserError or a limit: the response is unusable
            ex = self.ex
            if ex is not None:
                self.ex = None
                self.close()
                cause = e if isinstance(e, Reject) else e.__context__
                why = f"bad response: {cause.message if isinstance(cause, Reject) else e}"
                if ex.response_started:
                    client.upstream_broke(ex, why)  # type: ignore[union-attr]
                else:
                    client.attempt_failed(ex, False, why)  # type: ignore[union-attr]
        finally:
            buf = client.wbuf  # client.flush(), inlined
            client.wbuf = None
            if buf and not client.closed:
                client.transport.write(buf[0] if len(buf) == 1 else b"".join(buf))
        if switched is not None:
            tunnel.begin(client, self, ex, switched)
            return
        if self.remaining > 0 and self.ex is ex:
            # the rest of a Content-Length body bypasses llhttp: no per-chunk callback and
            # no copy of the slice (bulk transfers); a fresh parser serves the next response
            self.bypass = True
            self.ka = self.parser.should_keep_alive()
            if self.remaining >= body_relay.MIN_BODY:  # read into halb's buffer, no copy per read
                body_relay.begin(self)

    def _fast_response(self, ex: Exchange, client: "HttpClientConn", data: bytes,
                       r: tuple[int, bytes, int, bool, int]) -> None:
        """A response head the C parser took whole (Content-Length framed, 2xx-4xx): send
        head and body to the client in one write; the rest of the body, if any, takes the
        bypass relay. The llhttp parser is never fed, so it stays fresh for the next one."""
        status, out, cl, ka, hl = r
        out = client.final_head(ex, status, out)
        body = len(data) - hl
        n = body if body < cl else cl  # body bytes of this response in this read
        if LOGGING:
            ex.sent = n
        if not client.closed:
            if n > BIG_CHUNK:  # one writev, no copy of the body chunk
                client.transport.writelines((out, memoryview(data)[hl:hl + n]))  # type: ignore[union-attr]
            else:
                client.transport.write(out + data[hl:hl + n] if n else out)  # type: ignore[union-attr]
        if body < cl:
            self.want_head = False
            self.final = True
            self.remaining = cl - body
            self.bypass = True
            self.ka = ka
            if self.remaining >= body_relay.MIN_BODY:  # read into halb's buffer, no copy per read
                body_relay.begin(self)
            return
        # bytes beyond the announced length: the backend broke framing, do not reuse
        client.response_done(self, ex, reusable=ka and body == cl)

    def _relay(self, ex: Exchange, client: "HttpClientConn", data: bytes) -> None:
        n = len(data)
        rem = self.remaining
        if n < rem:
            self.remaining = rem - n
            ex.sent += n
            if not client.closed:
                client.transport.write(data)  # type: ignore[union-attr]
            return
        ex.sent += rem
        if not client.closed:
            client.transport.write(data if n == rem else data[:rem])  # type: ignore[union-attr]
        self.body_ended(ex, client, exact=n == rem)

    def body_ended(self, ex: Exchange, client: "HttpClientConn", exact: bool) -> None:
        """The known-length body is through (here or in body_relay): a fresh parser reads the
        next response head. Bytes beyond the announced length (``exact`` false) mean the
        backend broke framing: the connection is not reused."""
        self.bypass = False
        self.remaining = -1
        self.parser = httptools.HttpResponseParser(self)
        client.response_done(self, ex, reusable=self.ka and exact)

    # --- httptools callbacks -----------------------------------------------------
    # No on_header/on_status: a per-header callback cost ~0.8 us; the response head is
    # taken from the raw bytes instead (llhttp still validates it and does the framing).
    def on_headers_complete(self) -> None:
        ex = self.ex
        if ex is None:
            return
        acc = self.hacc
        end = acc.find(b"\r\n\r\n", self.hpos)
        if end < 0:  # llhttp accepted something that is not CRLF-delimited
            raise Reject(502, "malformed upstream response head")
        if end + 4 - self.hpos > self.max_hdr:  # also when the whole head came in one read
            raise Reject(502, "upstream response head too large")
        block = acc[self.hpos:end + 4]  # with the blank line
        self.hpos = end + 4
        status = self.parser.get_status_code()
        if status < 200:
            if status == 101:
                if ex.upgrade is None or ex.response_started:
                    raise Reject(502, "unexpected protocol switch from upstream")
                self.want_head = False
                self.hacc = b""
                self.hpos = 0
                self.final = False  # on_message_complete must not finish or pool this connection
                tunnel.send_switch(self.client, ex, block)
                return
            self.interims += 1
            if self.interims > ex.opts.max_interim_responses:  # type: ignore[union-attr]
                raise Reject(502, "too many interim (1xx) responses from upstream")
            self.client.interim(ex, self, block)  # type: ignore[union-attr]
            return
        self.want_head = False
        self.hacc = b""
        self.hpos = 0
        self.interims = 0
        self.final = True
        # the final response head (HttpClientConn.response_head's work, inlined: hot path)
        client: HttpClientConn = self.client  # type: ignore[assignment]
        if status >= 500:
            client.response_head_5xx(self, ex, status, ex.backend)  # type: ignore[arg-type]
            if self.ex is not ex:
                return  # retried elsewhere
        out, cl, chunked, _ = scan_response_head(block)
        method = ex.method
        if method == b"HEAD" or status == 204 or status == 304:
            pass  # a HEAD response keeps its Content-Length line
        elif cl >= 0 and not chunked:
            self.remaining = cl  # the Content-Length line is passed through
        else:
            out = client.reframe(self, ex, out, chunked)
        out = client.final_head(ex, status, out)
        buf = client.wbuf
        if buf is not None:
            buf.append(out)
        else:
            client._w(out)
        if method == b"HEAD":
            # llhttp cannot be told the request was HEAD: finish now, fresh parser next time
            self.parser = httptools.HttpResponseParser(self)
            client.response_done(self, ex, reusable=cl >= 0 or chunked)

    def on_body(self, body: bytes) -> None:
        ex = self.ex
        if ex is None:
            return
        if self.remaining >= 0:
            self.remaining -= len(body)
        if ex.out_mode == OUT_CHUNKED:
            body = b"%x\r\n%b\r\n" % (len(body), body)
        ex.sent += len(body)
        buf = self.client.wbuf  # type: ignore[union-attr]
        if buf is not None:
            buf.append(body)
        else:
            self.client._w(body)  # type: ignore[union-attr]

    def on_message_complete(self) -> None:
        ex = self.ex
        if ex is not None and self.final:
            self.remaining = -1
            self.client.response_done(self, ex, reusable=self.parser.should_keep_alive())  # type: ignore[union-attr]


class HttpClientConn(asyncio.Protocol):
    """One client connection: parse requests, route, retry, relay responses."""

    def __init__(self, listener: "Listener") -> None:
        self.listener = listener
        self.engine = listener.engine
        self.loop: asyncio.AbstractEventLoop = listener.engine.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.rt_conn: ServiceRuntime | None = None
        self.parsing: Exchange | None = None
        self.cur: Exchange | None = None
        self.queue: deque[Exchange] | None = None
        self.in_headers = False
        self.hfed = 0
        self.read_pause = 0
        self.write_paused = False
        self.active = True
        self.last_active = 0.0
        self.header_start = 0.0
        self.closed = False
        self.upgraded = False
        self.early = b""  # bytes after a WebSocket handshake head, held until the backend's 101
        self.proxied: Addresses | None = None  # the client's addresses from a PROXY header (accept_proxy)
        self.deferred: Reject | None = None
        self.peer = b""
        self.xff_head = XFF + XFF_TAIL  # added to every upstream request head, per connection
        self.wbuf: list[bytes] | None = None
        self.ubuf: list[bytes] | None = None  # upstream writes coalesced per client chunk
        self.ubuf_up: UpstreamConn | None = None
        self.first: bytes | None = None  # the chunk that began the request being parsed
        # llhttp path: the request being parsed (limits, header lines, body clock). Keep this
        # class below 30 attributes: at 30 every attribute read got slower (request_head.py)
        self.head: HeadState | None = None

    # --- connection lifecycle ----------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        rt = self.listener.rt
        self.rt_conn = rt
        peer = self.proxied[0] if self.proxied is not None else transport.get_extra_info("peername")
        self.peer = peer[0].encode() if peer else b"unknown"
        self.xff_head = XFF + self.peer + XFF_TAIL
        self.last_active = self.loop.time()
        mc = rt.opts.max_connections
        if mc and rt.connections >= mc:
            rt.rejected += 1
            self.rt_conn = None
            transport.write(error_response(503, "too many connections", b"", retry_after=rt.opts.retry_after_s, close=True))  # type: ignore[attr-defined]
            transport.close()
            self.closed = True
            report_rejected(rt.route.name, mc)
            return
        rt.connections += 1
        self.engine.conns.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.engine.conns.discard(self)
        if self.rt_conn is not None:
            self.rt_conn.connections -= 1
            self.rt_conn = None
        ex = self.cur
        if ex is not None and not ex.finished:
            up = ex.upstream
            ex.upstream = None
            if up is not None:
                up.close()
            ex.finished = True
            al = self.engine.access_log
            if al is not None:
                if not ex.response_started:
                    ex.status = CLIENT_CLOSED
                al.add(self, ex, ex.backend)
            self._detach_backend(ex)
            if ex.rt is not None and ex.rt.queued:
                ex.rt.admission.wake()  # it may have been waiting: drop it from the queue
        self.cur = None
        self.queue = None

    def set_proxied(self, addrs: Addresses | None) -> None:
        """Before connection_made: the client's addresses a PROXY header gave (proxy_protocol.py)."""
        self.proxied = addrs

    def _w(self, data: bytes) -> None:
        """Write to the client; coalesced into one send while an upstream chunk is parsed."""
        buf = self.wbuf
        if buf is not None:
            buf.append(data)
        elif not self.closed:
            self.transport.write(data)  # type: ignore[union-attr]

    def uwrite(self, up: UpstreamConn, data: bytes) -> None:
        buf = self.ubuf
        if buf is not None and (self.ubuf_up is None or self.ubuf_up is up):
            self.ubuf_up = up
            buf.append(data)
        else:
            up.transport.write(data)  # type: ignore[union-attr]

    def uflush(self) -> None:
        buf, up = self.ubuf, self.ubuf_up
        self.ubuf = None
        self.ubuf_up = None
        if buf and up is not None and not up.closed:
            up.transport.write(buf[0] if len(buf) == 1 else b"".join(buf))  # type: ignore[union-attr]

    def flush(self) -> None:
        buf = self.wbuf
        self.wbuf = None
        if buf and not self.closed:
            self.transport.write(buf[0] if len(buf) == 1 else b"".join(buf))  # type: ignore[union-attr]

    def close(self) -> None:
        if self.wbuf:
            self.flush()
        if not self.closed:
            self.closed = True
            self.transport.close()  # type: ignore[union-attr]

    def pause(self, bit: int) -> None:
        if not self.read_pause and not self.closed:
            self.transport.pause_reading()  # type: ignore[union-attr]
        self.read_pause |= bit

    def unpause(self, bit: int) -> None:
        if self.read_pause & bit:
            self.read_pause &= ~bit
            if not self.read_pause and not self.closed:
                self.transport.resume_reading()  # type: ignore[union-attr]

    def pause_writing(self) -> None:
        self.write_paused = True
        ex = self.cur
        if ex is not None and ex.upstream is not None:
            ex.upstream.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        ex = self.cur
        if ex is not None and ex.upstream is not None:
            ex.upstream.resume_reading()

    def data_received(self, data: bytes) -> None:
        self.active = True
        if self.upgraded:
            return
        if self.parsing is None and self.cur is None and fast_request is not None:
            # a whole bodyless request head in one read, in the C parser's strict subset
            rt = self.listener.rt
            opts = rt.opts
            r = fast_request(data, opts.max_header_bytes, rt.hash_header, opts.max_headers)
            if r is not None:
                ex = Exchange()
                if LOGGING:
                    ex.t0 = monotonic()
                (ex.method, ex.url, http10, ex.keep_alive, ex.hdrs, ex.host, ex.xff, ex.rid, ex.idem,
                 ex.cookie, ex.hash_value) = r
                if http10:
                    ex.version = "1.0"
                ex.body_done = True
                self.start(ex)
                return
        self.ubuf = []
        # a chunk read between requests starts with the next request line: its version is
        # read from the raw bytes (llhttp's get_http_version formats a str, ~2 % of a request)
        self.first = data if self.parsing is None else None
        try:
            self.parser.feed_data(data)
        except Reject as r:
            self.uflush()
            self.reject(r.status, r.message)
            return
        except httptools.HttpParserUpgrade as e:
            self.uflush()
            self.upgraded = True
            ex = self.cur
            if ex is not None and ex.upgrade is not None and not ex.finished:
                # a WebSocket handshake went to a backend: read nothing more until its answer
                # (a 101 makes this connection a tunnel, tunnel.py; anything else closes it)
                self.early = data[e.args[0]:]
                self.pause(R_UPGRADE)
                if ex.keep_alive:
                    ex.keep_alive = False
                return
            # any other Upgrade is not proxied: the request was forwarded without Upgrade,
            # so it is answered as a plain request; the connection closes after it.
            if self.parsing is not None:
                self.parsing.keep_alive = False
            if self.cur is not None:
                self.cur.keep_alive = False
            return
        except httptools.HttpParserError as e:
            self.uflush()
            cause = e.__cause__ or e.__context__
            if isinstance(cause, Reject):  # raised by our own callback (a limit)
                self.reject(cause.status, cause.message)
            else:
                self.reject(400, f"malformed request: {e}")
            return
        buf, up = self.ubuf, self.ubuf_up  # uflush, inlined
        self.ubuf = None
        if buf:
            self.ubuf_up = None
            if not up.closed:  # type: ignore[union-attr]
                up.transport.write(buf[0] if len(buf) == 1 else b"".join(buf))  # type: ignore[union-attr]
        if self.in_headers:
            self.hfed += len(data)
            if self.hfed > self.head.max_hdr + 1024:  # type: ignore[union-attr]
                self.reject(431, "request headers too large")

    def reject(self, status: int, message: str) -> None:
        """Answer a request that cannot be parsed or accepted, then close."""
        ex = self.cur
        if self.rt_conn is not None:
            self.rt_conn.rejected += 1
        if ex is not None and not ex.finished:
            if not ex.response_started and self.parsing is ex:
                # error in the current request's own body (size, chunking): stop its upstream
                up = ex.upstream
                ex.upstream = None
                if up is not None:
                    up.close()
                self._detach_backend(ex)
                self.send_error(ex, status, message, close=True)
                return
            if self.parsing is not ex:
                # a pipelined request is bad: answer after the current one
                self.deferred = Reject(status, message)
                self.pause(R_PIPELINE)
                return
            up = ex.upstream
            if up is not None:
                up.close()
            ex.finished = True
            self._detach_backend(ex)
            self.close()
            return
        rid = self.parsing.rid if self.parsing is not None and self.parsing.rid else self.engine.new_request_id()
        resp = error_response(status, message, rid, close=True)
        al = self.engine.access_log
        if al is not None:  # a request that never became one (bad head): logged with what was parsed
            ex = self.parsing if self.parsing is not None else Exchange()
            ex.rid, ex.status, ex.head_out = rid, status, resp
            al.add(self, ex, None)
        self._w(resp)
        self.close()

    # --- request parsing callbacks -------------------------------------------------
    def on_message_begin(self) -> None:
        ex = Exchange()
        if LOGGING:
            ex.t0 = monotonic()
        self.parsing = ex
        self.in_headers = True
        self.hfed = 0
        self.header_start = 0.0  # stamped by the sweeper (0.25 s granularity, no clock call here)
        # one HeadState per connection, reset per request (a constructor call per request
        # cost more than these stores); its limits are re-read only when the options change
        h = self.head
        rt = self.listener.rt
        opts = rt.opts
        if h is None or h.opts is not opts:
            h = self.head = HeadState(opts)
        h.lines = []
        h.size = 0
        h.hash_header = rt.hash_header

    def on_url(self, url: bytes) -> None:
        ex = self.parsing
        ex.url += url  # type: ignore[union-attr]
        h = self.head
        h.size += len(url)  # type: ignore[union-attr]
        if h.size > h.max_hdr:  # type: ignore[union-attr]
            raise Reject(431, "request line too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        # Every header line takes one entry of h.lines (b"" for lines the proxy drops), joined
        # once when the head is complete (`hdrs += line` copied the whole head per line:
        # quadratic) and counted there for max_headers; the special headers below, whose
        # values accumulate, are counted here already.
        h = self.head
        h.size += len(name) + len(value) + 4  # type: ignore[union-attr]
        if h.size > h.max_hdr:  # type: ignore[union-attr]
            raise Reject(431, "request headers too large")
        ex = self.parsing
        ln = name.lower()
        lines = h.lines  # type: ignore[union-attr]
        if ln in REQ_SPECIAL:
            if ln == b"host":
                if ex.host is not None:  # type: ignore[union-attr]
                    raise Reject(400, "more than one Host header")  # RFC 9112 3.2
                ex.host = value  # type: ignore[union-attr]
                lines.append(b"Host: " + value + b"\r\n")
                return
            if len(lines) >= h.max_headers:  # type: ignore[union-attr]
                raise Reject(431, "too many request headers")
            if ln == b"idempotency-key":
                ex.idem = True  # type: ignore[union-attr]
                lines.append(name + b": " + value + b"\r\n")
                return
            if ln == b"cookie":
                ex.cookie = value if ex.cookie is None else ex.cookie + b"; " + value  # type: ignore[union-attr]
                lines.append(name + b": " + value + b"\r\n")
                return
            if ln == b"content-length":
                ex.content_length = int(value)  # type: ignore[union-attr]  # llhttp validated it
            elif ln == b"transfer-encoding":
                ex.chunked_in = True  # type: ignore[union-attr]  # llhttp requires chunked last
            elif ln == b"x-forwarded-for":
                ex.xff = value if ex.xff is None else ex.xff + b", " + value  # type: ignore[union-attr]
            elif ln == b"x-request-id":
                ex.rid = value if VALID_RID.fullmatch(value) else None  # type: ignore[union-attr]
            elif ln == b"upgrade":
                ex.upgrade = value if ex.upgrade is None else ex.upgrade + b", " + value  # type: ignore[union-attr]
            elif ln == b"connection":
                toks = [t.strip().lower() for t in value.split(b",")]
                if ex.conn_tokens is None:  # type: ignore[union-attr]
                    ex.conn_tokens = toks  # type: ignore[union-attr]
                else:
                    ex.conn_tokens.extend(toks)  # type: ignore[union-attr]
            # everything else in REQ_SPECIAL is hop-by-hop or re-set by the proxy
            lines.append(b"")
            return
        if ln == h.hash_header:  # type: ignore[union-attr]
            ex.hash_value = value  # type: ignore[union-attr]
        lines.append(name + b": " + value + b"\r\n")

    def on_headers_complete(self) -> None:
        ex = self.parsing
        p = self.parser
        self.in_headers = False
        method = ex.method = p.get_method()  # type: ignore[union-attr]
        d = self.first
        if d is not None:
            self.first = None
            i = d.find(b"\r\n")
            v = d[i - 9:i] if i >= 9 else b""
            if v == b" HTTP/1.1":
                pass  # the class default
            elif v == b" HTTP/1.0":
                ex.version = "1.0"  # type: ignore[union-attr]
            else:
                ex.version = p.get_http_version()  # type: ignore[union-attr]
        else:
            ex.version = p.get_http_version()  # type: ignore[union-attr]
        if not p.should_keep_alive():
            ex.keep_alive = False  # type: ignore[union-attr]
        if method == b"CONNECT":
            raise Reject(405, "CONNECT is not supported")
        h = self.head
        lines = h.lines  # type: ignore[union-attr]
        if len(lines) > h.max_headers:  # type: ignore[union-attr]
            raise Reject(431, "too many request headers")
        if ex.host is None or ex.url[0] != 47:  # type: ignore[union-attr]  # 47: "/"
            self._resolve_target(ex, lines)  # type: ignore[arg-type]
        ex.hdrs = b"".join(lines)  # type: ignore[union-attr]
        if self.cur is None:
            self.start(ex)  # type: ignore[arg-type]
        else:
            if self.queue is None:
                self.queue = deque()
            ex.upgrade = None  # type: ignore[union-attr]  # a pipelined handshake is answered as a plain request
            self.queue.append(ex)  # type: ignore[arg-type]
            self.pause(R_PIPELINE)

    @staticmethod
    def _resolve_target(ex: Exchange, lines: list[bytes]) -> None:
        """No Host, or not origin-form: RFC 9112 3.2 (request_target.py); raises Reject(400)."""
        try:
            url, host = request_target.resolve(ex.url, ex.host, ex.version)
        except request_target.BadTarget as e:
            raise Reject(400, str(e)) from None
        if host is not ex.host:  # absolute-form: its authority replaces the Host line
            request_target.replace_host_line(lines, host)  # type: ignore[arg-type]
        ex.url = url
        ex.host = host

    def on_body(self, body: bytes) -> None:
        ex = self.parsing
        ex.body_received += len(body)  # type: ignore[union-attr]
        max_body = self.head.max_body  # type: ignore[union-attr]
        if max_body and ex.body_received > max_body:  # type: ignore[union-attr]
            raise Reject(413, "request body too large")
        if ex.finished:  # type: ignore[union-attr]
            return
        if ex.chunked_in:  # type: ignore[union-attr]
            body = b"%x\r\n%b\r\n" % (len(body), body)
        self.send_body(ex, body)  # type: ignore[arg-type]

    def on_message_complete(self) -> None:
        ex = self.parsing
        self.parsing = None
        self.in_headers = False
        if ex is None:
            return
        ex.body_done = True
        if ex.opts is not None:
            # like Envoy, the response deadline runs from the end of the request body;
            # a slow upload is bounded by body_deadline.py and the idle timeout instead
            ex.deadline = self.loop.time() + ex.opts.request_timeout
        if ex.chunked_in and not ex.finished:
            self.send_body(ex, b"0\r\n\r\n")

    # --- request side ------------------------------------------------------------
    def send_body(self, ex: Exchange, data: bytes) -> None:
        up = ex.upstream
        if up is not None:
            self.uwrite(up, data)
            _record_sent(ex, data)
        else:
            if ex.pending is None:
                ex.pending = []
            ex.pending.append(data)
            ex.pending_size += len(data)
            if ex.pending_size > PENDING_HIGH:
                self.pause(R_PENDING)

    def start(self, ex: Exchange) -> None:
        """Route a request whose head is complete and send it (hot path: one call, no helpers)."""
        if self.engine.acme_answers and acme_answer.answer(self, ex, self.engine.acme_answers):
            return
        rt = self.listener.rt
        opts = rt.opts
        ex.rt = rt
        ex.opts = opts
        self.cur = ex
        rt.requests += 1  # also the retry budget's count of live requests
        if ex.body_done:
            ex.deadline = self.loop.time() + opts.request_timeout
        cl = ex.content_length
        method = ex.method
        if cl is None and not ex.chunked_in:  # no body: the usual case
            framing = b"\r\n"
            if method in IDEMPOTENT or ex.idem:
                ex.retryable = True
        else:
            if cl is not None and opts.max_body_bytes and cl > opts.max_body_bytes:
                rt.rejected += 1
                self.send_error(ex, 413, "request body too large", close=True)
                return
            if method in IDEMPOTENT or ex.idem:
                ex.retryable = True
                ex.copy = []  # replay buffer for the body
            if ex.chunked_in:
                framing = b"Transfer-Encoding: chunked\r\n\r\n"
            else:
                framing = b"Content-Length: %d\r\n\r\n" % cl
        # upstream request head, built once for every attempt
        hdrs = ex.hdrs
        if ex.conn_tokens:
            drop = set(ex.conn_tokens) - {b"close", b"keep-alive", b""}
            if ex.upgrade is not None:
                hdrs = tunnel.handshake_headers(ex, opts, hdrs)
                drop.discard(b"upgrade")
            if drop:
                hdrs = b"".join([ln + b"\r\n" for ln in hdrs.split(b"\r\n")[:-1]
                                 if ln.split(b":", 1)[0].strip().lower() not in drop])
        rid = ex.rid
        if rid is None:
            eng = self.engine  # engine.new_request_id, inlined: a counter, no uuid
            n = eng._rid_counter = eng._rid_counter + 1
            rid = ex.rid = b"%s%x" % (eng._rid_prefix, n)
        xff = self.xff_head if ex.xff is None else XFF + ex.xff + b", " + self.xff_head[len(XFF):]
        host = ex.host
        if host is not None:
            ex.head = b"".join((method, b" ", ex.url, b" HTTP/1.1\r\n", hdrs, xff, rid,
                                b"\r\nX-Forwarded-Host: ", host, b"\r\n", framing))
        else:
            ex.head = b"".join((method, b" ", ex.url, b" HTTP/1.1\r\n", hdrs, xff, rid, b"\r\n", framing))
        # pick, inlined for the common case (no hash key, candidates up to date)
        if rt.limited:  # capacity limits: a full backend is no candidate; wait in the queue
            if rt.uses_key:
                ex.key = self._hash_key(ex, rt)
            if rt.queued:  # others wait already: behind them, in priority order
                self._enqueue(ex, rt)
                return
            b = rt.pick(ex.key)
            if b is None and rt.at_capacity():
                self._enqueue(ex, rt)
                return
        elif rt.uses_key:
            ex.key = self._hash_key(ex, rt)
            b = rt.pick(ex.key)
        elif rt.dirty or rt.rotate:
            b = rt.pick(None)
        else:
            cands = rt.candidates
            b = cands[0] if len(cands) == 1 else rt.balancer.pick(cands, None)
        if b is None:
            rt.rejected += 1
            self.send_error(ex, 503, f"no backend available for service {rt.route.name}", retry_after=rt.retry_after())
            return
        # attach + bind + _send_head, inlined for a pooled connection and no buffered body
        ex.attempts = 1
        ex.backend = b
        b.in_flight += 1
        b.requests += 1
        if rt.track_latency:
            ex.t_attempt = self.loop.time()
        pool = b.pool
        while pool:
            up = pool.pop()
            if up.closed:
                continue
            up.ex = ex
            up.client = self
            up.final = False
            up.want_head = True
            up.max_hdr = opts.max_header_bytes
            if self.write_paused:
                up.pause_reading()
            elif up.read_paused:
                up.resume_reading()
            if ex.pending:
                self._send_head(ex, up)
                return
            ex.upstream = up
            buf = self.ubuf
            if buf is not None and (self.ubuf_up is None or self.ubuf_up is up):
                self.ubuf_up = up
                buf.append(ex.head)
            else:
                up.transport.write(ex.head)  # type: ignore[union-attr]
            if up.write_paused:
                self.pause(R_UPSTREAM)
            return
        self.loop.create_task(self._connect(ex, b))

    # --- the admission queue (admission.py): every backend at its limit ---------------
    def _enqueue(self, ex: Exchange, rt: ServiceRuntime) -> None:
        adm = rt.admission
        if adm is None:
            adm = rt.admission = Admission(rt, self.loop)
        adm.enqueue(self, ex, rt.rank)

    def queue_alive(self, ex: Exchange) -> bool:
        return not ex.finished and not self.closed and self.cur is ex

    def dispatch(self, ex: Exchange, b: BackendState) -> None:
        """A slot freed up for a queued request: send it like a first attempt."""
        self.attach(ex, b)

    def queue_refused(self, ex: Exchange, reason: str, retry_after: int) -> None:
        if ex.finished:
            return
        rt = ex.rt
        name = rt.route.name  # type: ignore[union-attr]
        message = QUEUE_MESSAGES.get(reason, reason).format(service=name, opts=rt.opts)  # type: ignore[union-attr]
        self.send_error(ex, 503, message, retry_after=retry_after, reason=reason)

    def _hash_key(self, ex: Exchange, rt: ServiceRuntime) -> bytes:
        if rt.hash_header is not None and ex.hash_value is not None:
            return ex.hash_value
        if rt.hash_cookie is not None and ex.cookie is not None:
            for part in ex.cookie.split(b";"):
                k, _, v = part.strip().partition(b"=")
                if k == rt.hash_cookie:
                    return v
        return self.peer

    def attach(self, ex: Exchange, b: BackendState) -> None:
        ex.attempts += 1
        ex.backend = b
        b.in_flight += 1
        b.requests += 1
        if ex.rt.track_latency:  # type: ignore[union-attr]
            ex.t_attempt = self.loop.time()
        pool = b.pool
        while pool:
            up = pool.pop()
            if not up.closed:
                up.bind(ex, self)
                self._send_head(ex, up)
                return
        self.loop.create_task(self._connect(ex, b))

    async def _connect(self, ex: Exchange, b: BackendState) -> None:
        loop = self.loop
        try:
            _, up = await asyncio.wait_for(
                loop.create_connection(lambda: UpstreamConn(b, loop), b.host, b.port),
                ex.opts.connect_timeout)  # type: ignore[union-attr]
        except (OSError, asyncio.TimeoutError) as e:
            if ex.backend is b and not ex.finished and ex.upstream is None:
                if is_local_resource_error(e):  # out of fds/memory here: no backend is to blame
                    report_local_error(ex.rt.route.name, b.name, e)  # type: ignore[union-attr]
                    self.attempt_failed(ex, True, local_reason(e), local=True)
                    return
                what = "connect timeout" if isinstance(e, asyncio.TimeoutError) else f"connect failed: {e.strerror or e}"
                self.attempt_failed(ex, True, what)
            return
        except Exception as e:  # pragma: no cover - defensive: never leave a request hanging
            if ex.backend is b and not ex.finished and ex.upstream is None:
                self.attempt_failed(ex, True, f"connect error: {e!r}")
            return
        if ex.backend is not b or ex.finished or self.closed:
            self._release(up, True)  # the request went away meanwhile: keep the connection
            return
        if up.closed:
            # Accepted and closed before we could send (e.g. a proxy in front of a dead
            # backend): nothing was sent, so this is a connect failure. Writing to the closed
            # transport would raise under uvloop and leave the request hanging.
            self.attempt_failed(ex, True, "upstream closed right after connect")
            return
        up.bind(ex, self)
        if ex.opts.send_proxy != "off":  # type: ignore[union-attr]  # before anything else on this connection
            addrs = self.proxied or proxy_protocol.connection_addrs(self.transport)  # type: ignore[arg-type]
            if addrs is not None:
                up.transport.write(proxy_protocol.header(ex.opts.send_proxy, addrs))  # type: ignore[union-attr]
        self._send_head(ex, up)

    def _send_head(self, ex: Exchange, up: UpstreamConn) -> None:
        ex.upstream = up
        if ex.pending:
            data = ex.pending
            ex.pending = None
            ex.pending_size = 0
            self.uwrite(up, b"".join([ex.head, *data]))
            for d in data:
                _record_sent(ex, d)
            self.unpause(R_PENDING)
        else:
            self.uwrite(up, ex.head)
        if up.write_paused:
            self.pause(R_UPSTREAM)

    def _detach_backend(self, ex: Exchange) -> None:
        b = ex.backend
        if b is not None:
            ex.backend = None
            b.in_flight -= 1
            if ex.rt.queued:  # type: ignore[union-attr]
                ex.rt.admission.wake()  # type: ignore[union-attr]

    def _retry_allowed(self, ex: Exchange, connect: bool, failed: BackendState | None) -> bool:
        """May this request have another attempt (and note the failed backend as tried)?"""
        opts = ex.opts
        if ex.attempts > opts.retries:  # type: ignore[union-attr]
            return False
        if not (connect or ex.retryable):
            return False  # non-idempotent and it may have reached the backend
        if ex.body_sent and ex.copy is None:
            return False  # streamed body larger than the replay buffer
        if self.loop.time() >= ex.deadline:
            return False
        if ex.tried is None:
            ex.tried = set()
            ex.failed_servers = set()
        if failed is not None:
            ex.tried.add(failed)
            if failed.server:
                ex.failed_servers.add(failed.server)  # type: ignore[union-attr]
        return True

    def _retry_target(self, ex: Exchange, connect: bool, failed: BackendState | None) -> BackendState | None:
        """A different backend for another attempt, or None when a retry is not allowed."""
        if not self._retry_allowed(ex, connect, failed):
            return None
        nb = ex.rt.pick(ex.key, exclude=ex.tried, avoid_servers=ex.failed_servers)  # type: ignore[union-attr]
        if nb is None:
            return None
        budget = ex.rt.budget  # type: ignore[union-attr]
        budget.count_to(ex.rt.requests)  # type: ignore[union-attr]
        if not budget.try_withdraw():
            return None
        return nb

    def _retry_or_wait(self, ex: Exchange, connect: bool, failed: BackendState | None) -> bool:
        """Retry on another backend; when every other one is at its capacity limit, wait in
        the queue for the retry instead of failing. False: neither, answer the client."""
        if not self._retry_allowed(ex, connect, failed):
            return False
        rt: ServiceRuntime = ex.rt  # type: ignore[assignment]
        nb = rt.pick(ex.key, exclude=ex.tried, avoid_servers=ex.failed_servers)
        if nb is None and not (rt.limited and rt.at_capacity(ex.tried)):
            return False
        rt.budget.count_to(rt.requests)
        if not rt.budget.try_withdraw():
            return False
        if nb is not None:
            self._retry(ex, nb)
            return True
        rt.retries += 1
        self._rewind_body(ex)
        self._enqueue(ex, rt)  # a backend freeing up takes it (the failed one only if it recovered)
        return True

    def _retry(self, ex: Exchange, nb: BackendState) -> None:
        ex.rt.retries += 1  # type: ignore[union-attr]
        nb.retries += 1
        self._rewind_body(ex)
        self.attach(ex, nb)

    @staticmethod
    def _rewind_body(ex: Exchange) -> None:
        """The body sent to the failed attempt is sent again from the replay copy."""
        if ex.body_sent:
            ex.pending = ex.copy + (ex.pending or [])  # type: ignore[operator]
            ex.pending_size = sum(len(d) for d in ex.pending)
            ex.copy = []
            ex.copy_size = 0
            ex.body_sent = 0

    def attempt_failed(self, ex: Exchange, connect: bool, reason: str, *, timeout: bool = False,
                       target: BackendState | None = None, local: bool = False) -> None:
        """An attempt failed before a response reached the client: retry or answer.

        ``local``: this process ran out of a resource (local_errors): not the backend's
        fault, so no outlier accounting and no retry (another backend would fail alike)."""
        if ex.finished:
            return
        up = ex.upstream
        ex.upstream = None
        if up is not None:
            up.close()
        self.unpause(R_UPSTREAM)
        b = ex.backend
        self._detach_backend(ex)
        rt = ex.rt
        if b is not None and not local:
            rt.record_failure(b, connect, reason)  # type: ignore[union-attr]
        if ex.response_started:
            self.close()
            return
        if local:
            self.send_error(ex, 503, reason, retry_after=rt.retry_after())  # type: ignore[union-attr]
            return
        if target is not None:
            self._retry(ex, target)
            return
        if not timeout and self._retry_or_wait(ex, connect, b):
            return
        if timeout:
            self.send_error(ex, 504, f"upstream timeout: {reason}")
        elif connect:
            self.send_error(ex, 503, f"no backend could be reached: {reason}", retry_after=rt.retry_after())  # type: ignore[union-attr]
        else:
            self.send_error(ex, 502, reason)

    def send_error(self, ex: Exchange, status: int, message: str, *, retry_after: int | None = None,
                   close: bool = False, reason: str | None = None) -> None:
        if ex.rt is not None:
            ex.rt.errors += 1
        close = close or ex.close_after or not ex.keep_alive or not ex.body_done
        ex.response_started = True
        ex.close_after = close
        ex.status = status
        if not self.closed:
            resp = error_response(status, message, ex.rid or self.engine.new_request_id(),
                                  retry_after=retry_after, close=close, reason=reason)
            ex.head_out = resp
            self._w(resp)
        self.finish(ex)

    # --- response side -----------------------------------------------------------
    def interim(self, ex: Exchange, up: UpstreamConn, block: bytes) -> None:
        """Forward a 1xx (100 Continue, 103 Early Hints) to an HTTP/1.1 client."""
        if ex.version != "1.1" or self.closed:
            return
        # bytes reach the client now: from here on a failure of this attempt is answered,
        # never retried (the client would otherwise see the interim responses of two backends)
        ex.retryable = False
        out, _, _, _ = scan_response_head(block)
        self._w(out)

    def response_head_5xx(self, up: UpstreamConn, ex: Exchange, status: int, b: BackendState) -> None:
        """A 5xx final response: retry it on another backend if allowed (up.ex is then
        cleared), else count the failure; the caller relays it."""
        if status in ex.opts.retry_on_status:  # type: ignore[union-attr]
            nb = self._retry_target(ex, False, b)
            if nb is not None:
                up.ex = None
                self.attempt_failed(ex, False, f"upstream answered {status}", target=nb)
                return
        ex.rt.record_failure(b, False, f"status {status}")  # type: ignore[union-attr]

    def final_head(self, ex: Exchange, status: int, out: bytes) -> bytes:
        """A final response is going to this client (both head paths end here): a non-5xx
        answer counts as a success for outlier detection and latency (a 5xx was counted by
        response_head_5xx); returns the head with Connection set from the request's
        persistence and marks the response as started (no retry after this)."""
        if status < 500:
            b = ex.backend
            if b.consecutive_failures or b.ejection_streak or ex.rt.track_latency:  # type: ignore[union-attr]
                ex.rt.record_success(b, self.loop.time() - ex.t_attempt)  # type: ignore[union-attr]
        if not ex.keep_alive or ex.close_after or self.upgraded or self.engine.draining:
            out = out[:-2] + b"Connection: close\r\n\r\n"
            ex.close_after = True
        elif ex.version == "1.0":
            out = out[:-2] + b"Connection: keep-alive\r\n\r\n"
        ex.response_started = True
        if LOGGING:
            ex.status = status
            ex.head_out = out
        return out

    def reframe(self, up: UpstreamConn, ex: Exchange, out: bytes, chunked: bool) -> bytes:
        """A response without Content-Length (chunked or close-delimited): chunked for an
        HTTP/1.1 client, close-delimited for HTTP/1.0."""
        up._close_delimited = not chunked
        if ex.version == "1.1":
            ex.out_mode = OUT_CHUNKED
            return out[:-2] + b"Transfer-Encoding: chunked\r\n\r\n"
        ex.close_after = True
        return out

    def response_done(self, up: UpstreamConn, ex: Exchange, reusable: bool) -> None:
        if ex.out_mode == OUT_CHUNKED and not self.closed:
            self._w(b"0\r\n\r\n")
            ex.sent += 5
        up.ex = None
        up.client = None
        ex.upstream = None
        ex.finished = True
        if not ex.body_done:
            reusable = False  # the backend answered before the whole body was sent
            ex.close_after = True
        # hot path: _release and finish inlined
        b = ex.backend
        if b is not None:
            ex.backend = None
            b.in_flight -= 1
            if ex.rt.queued:  # type: ignore[union-attr]
                ex.rt.admission.wake()  # type: ignore[union-attr]
        b = up.backend
        pool = b.pool
        if (reusable and not up.closed and not b.removed and not b.ejected and len(pool) < ex.opts.pool_max_idle  # type: ignore[union-attr]
                and b.route.admin_state == "active"):
            if up.read_paused:
                up.resume_reading()
            up.idle_since = self.engine.now
            pool.append(up)
        else:
            up.close()
        if self.read_pause:
            self.unpause(R_UPSTREAM)
        if self.cur is ex:
            self.cur = None
        if self.closed:
            al = self.engine.access_log
            if al is not None:
                al.add(self, ex, b)
            return
        if ex.close_after or not ex.keep_alive or self.deferred is not None:
            self.finish(ex, b)  # logs it
            return
        # the access log (access_log.py): one global read when off; AccessLog.add, inlined (its
        # RECORD layout), when on: keep-alive responses end here
        al = self.engine.access_log if LOGGING else None
        if al is not None:
            lst = self.listener
            try:  # free in 3.11 unless it raises
                n = al.pending.add(ex.t0, ex.rid, self.peer, lst.frontend, ex.rt.route.name, ex.host,  # type: ignore[union-attr]
                                   ex.method, ex.url, ex.status, len(ex.head_out) + ex.sent, b.name, ex.attempts,
                                   tls_version(self) if lst.ssl is not None else None)
            except Exception as exc:
                al.bad_record(exc)
                n = 0
            if n >= BATCH:
                al.flush()
        self.active = True
        if self.queue:
            self._start_next()

    def _start_next(self) -> None:
        """Start the oldest pipelined request (its head was parsed while another ran)."""
        q = self.queue
        nxt = q.popleft()  # type: ignore[union-attr]
        if not q:
            self.unpause(R_PIPELINE)
        self.start(nxt)

    def upstream_broke(self, ex: Exchange, reason: str) -> None:
        """Upstream failed after the response head was sent: only closing is honest."""
        if ex.finished:
            return
        b = ex.backend
        if b is not None:
            ex.rt.record_failure(b, False, reason)  # type: ignore[union-attr]
        ex.rt.errors += 1  # type: ignore[union-attr]
        ex.upstream = None
        ex.finished = True
        al = self.engine.access_log
        if al is not None:  # the client got a cut response: logged with the bytes it got
            al.add(self, ex, b)
        self._detach_backend(ex)
        self.cur = None
        self.close()

    def _release(self, up: UpstreamConn, reusable: bool) -> None:
        b = up.backend
        up.ex = None
        up.client = None
        opts = self.listener.rt.opts
        if (reusable and not up.closed and not b.removed and b.route.admin_state == "active"
                and not b.ejected and len(b.pool) < opts.pool_max_idle and opts.send_proxy == "off"):
            if up.read_paused:
                up.resume_reading()
            up.idle_since = self.loop.time()
            b.pool.append(up)
        else:
            up.close()

    def finish(self, ex: Exchange, answered_by: BackendState | None = None) -> None:
        """A request ends (a local answer, or a response after which the connection closes);
        `answered_by`: the backend whose response the client got (None: a local answer)."""
        ex.finished = True
        b = ex.backend
        if b is not None:
            ex.backend = None
            b.in_flight -= 1
            if ex.rt.queued:  # type: ignore[union-attr]
                ex.rt.admission.wake()  # type: ignore[union-attr]
        al = self.engine.access_log
        if al is not None:
            al.add(self, ex, answered_by)
        if self.cur is ex:
            self.cur = None
        if self.closed:
            return
        if ex.close_after or not ex.keep_alive:
            self.close()
            return
        self.active = True
        if self.deferred is not None:
            d, self.deferred = self.deferred, None
            self._w(error_response(d.status, d.message, self.engine.new_request_id(), close=True))
            self.close()
            return
        if self.queue:
            self._start_next()

    # --- timeouts (called by the engine's sweeper) -----------------------------------
    def check(self, now: float) -> None:
        if self.active:
            self.active = False
            self.last_active = now
        ex = self.cur
        if ex is not None:
            opts: Any = ex.opts
            if not ex.response_started:
                if not ex.body_done:
                    why = None
                    if self.parsing is ex and self.head is not None:
                        why = body_deadline.check(self.head, ex, now, self.read_pause != 0)
                    if why is None and now - self.last_active > opts.idle_timeout:
                        why = "request body not received in time"
                    if why is not None:
                        up = ex.upstream
                        ex.upstream = None
                        if up is not None:
                            up.close()
                        self._detach_backend(ex)
                        self.send_error(ex, 408, why, close=True)
                elif now >= ex.deadline:
                    self.attempt_failed(ex, False, f"no response within {opts.request_timeout}s", timeout=True)
            elif now - self.last_active > opts.idle_timeout:
                self.upstream_broke(ex, "idle timeout during response")
            return
        h = self.head
        if h is not None and h.body_ex is not None:
            h.body_ex = None  # do not keep a finished request (and its replay copy) alive
        opts = self.listener.rt.opts
        if self.in_headers:
            if not self.header_start:
                self.header_start = now
            elif now - self.header_start > opts.header_timeout:
                self.reject(408, "request headers not received in time")
        elif now - self.last_active > opts.idle_timeout:
            self.close()

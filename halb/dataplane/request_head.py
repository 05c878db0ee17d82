"""Per-request state of the llhttp request path: the head being parsed, then its body's clock.

Why an object of its own instead of attributes of HttpClientConn: CPython 3.11 reads
instance attributes fast while a class's instances share one small key table; at 30
attributes HttpClientConn's reads got slower across the board (+1,500 instructions per
request on the C fast path, measured with bench/instr.py). The per-request limits and
counters of the llhttp path live here instead, behind one reference, so the connection
stays at 26 attributes. One per connection (new when the service options change), created
by the first request that takes the llhttp path and reset by each later one
(on_message_begin): requests the C fast path takes whole never touch it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from halb.dataplane.options import ServiceOptions


class HeadState:
    """lines: one entry per header line, the forwarded line ("Name: value\\r\\n") or b""
    for a line the proxy drops, joined once when the head is complete (`hdrs += line`
    copied the whole head per line: quadratic) and counted for max_headers; size: bytes of
    request line and headers so far (max_hdr); opts, max_hdr, max_headers, max_body: the
    service options they were read from;
    hash_header: the service's, as of the request's start. body_ex, body_t0, body_b0: the
    request whose body the sweeper is timing, when it first saw that body arriving and how
    many body bytes had arrived then (body_deadline.py)."""

    __slots__ = ("lines", "size", "hash_header", "opts", "max_hdr", "max_headers", "max_body",
                 "body_ex", "body_t0", "body_b0")

    def __init__(self, opts: "ServiceOptions") -> None:
        self.lines: list[bytes] = []
        self.size = 0
        self.hash_header: bytes | None = None
        self.opts = opts
        self.max_hdr = opts.max_header_bytes
        self.max_headers = opts.max_headers
        self.max_body = opts.max_body_bytes
        self.body_ex: Any = None
        self.body_t0 = 0.0
        self.body_b0 = 0

"""Request-body deadline and minimum rate: the slow-body counterpart of header_timeout.

Why: the idle timeout restarts on every byte, so a client sending its body at 1 byte/s
kept a client connection, an upstream connection and a backend worker busy for as long as
it liked. Two bounds close that (HAProxy's `timeout http-request` with
http-buffer-request and Envoy's request_timeout bound the whole request; Kestrel's
MinRequestBodyDataRate is the rate rule):

- body_timeout_s: the whole body must arrive within this after its head (0 = off);
- body_min_rate_bps after body_rate_grace_s: once the grace is over the client must have
  sent at least min_rate x (elapsed - grace) body bytes, i.e. the grace is free time and
  after it the average must keep up (0 = off). Bytes are counted after de-chunking, so
  chunk framing, chunk extensions or trailers dribbled slowly do not count as progress.

The clock runs only while the proxy is reading the body: while reading from the client is
paused (the backend is slow to take the body, or a connection is being opened) the slow
party is not the client, so the measurement restarts when reading resumes. Checked by the
engine's sweeper (HttpClientConn.check, a few times per second): no per-request work on
the hot path, and nothing at all for bodyless requests.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from halb.dataplane.options import ServiceOptions
    from halb.dataplane.request_head import HeadState


def overdue(opts: "ServiceOptions", elapsed: float, received: int) -> str | None:
    """Why a body that has been arriving for `elapsed` seconds with `received` bytes so far
    must be refused (408), or None while it is within the bounds."""
    limit = opts.body_timeout_s
    if limit and elapsed > limit:
        return f"request body not received within {limit:g}s"
    rate = opts.body_min_rate_bps
    grace = opts.body_rate_grace_s
    if rate and elapsed > grace and received < rate * (elapsed - grace):
        return f"request body slower than {rate} bytes/s"
    return None


def check(state: "HeadState", ex: Any, now: float, paused: bool) -> str | None:
    """Called by the sweeper while `ex` (an Exchange, `state` its connection's HeadState)
    is still receiving its body: why to refuse it now, or None."""
    if state.body_ex is not ex or paused:
        # the first look at this body, or the client is not being read: (re)start measuring
        state.body_b0 = ex.body_received if state.body_ex is ex else 0
        state.body_ex = ex
        state.body_t0 = now
        return None
    return overdue(ex.opts, now - state.body_t0, ex.body_received - state.body_b0)

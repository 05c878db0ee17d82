"""Relay the rest of a large Content-Length response body without uvloop's copy per read.

uvloop hands every read to `Protocol.data_received` as a new bytes object: a memcpy of
every body byte, 94 % of halb's user-space instructions for a 1 MiB response
(bench/NOTES.md, "1 MiB bodies"). A protocol that has `get_buffer`/`buffer_updated` and
is *not* an `asyncio.Protocol` is read into a buffer it supplies instead (uvloop's
`UVStream._set_protocol`; it picks the read callbacks when reading starts, and
`transport.set_protocol` stops and restarts reading, so the switch takes effect at the
next read). So while a large body remains, the upstream transport's protocol is a
`BodyRelay`: the kernel copies into a halb-owned bytearray and a memoryview of it goes
to the client transport. At the body's end `UpstreamConn` is the protocol again (its
parser reads the next response head from bytes, as before).

Ownership: a transport keeps a reference to what it could not send at once (uvloop keeps
a memoryview of it, no copy; asyncio's and uvloop's TLS transports keep it in their
backlog), and every one of them counts that in `get_write_buffer_size()`. A buffer is
reused only when the client transport's write buffer is empty after the write; otherwise
it is left to the transport (freed once sent) and the next read takes another one.
Reusing it earlier would overwrite bytes the client has not got yet.
"""
from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from halb.dataplane.http_proxy import UpstreamConn

# bytes per read. Larger than uvloop's 256,000: one read takes what the socket holds, so
# fewer reads and fewer window updates wake the backend (1 MiB bodies, perf cpu-clock: the
# kernel's wake-up time per request halved against 256 or 512 KiB; bench/NOTES.md)
SIZE = 1024 * 1024
# body bytes still to come for the switch to pay: two set_protocol calls (a read stop and
# start each, epoll changes) against a copy of every byte; a judgment, not measured
MIN_BODY = 128 * 1024
# idle buffers kept per process for the next large body (a fresh bytearray is zero-filled):
# at most SPARE_MAX * SIZE = 8 MiB held between large bodies
SPARE_MAX = 8
_spare: list[bytearray] = []


class BodyRelay(asyncio.BufferedProtocol):
    """The upstream transport's protocol while the rest of a large known-length body is
    relayed; everything but the reads is `UpstreamConn`'s."""

    __slots__ = ("up", "buf")

    def __init__(self, up: "UpstreamConn") -> None:
        self.up = up
        self.buf: bytearray | None = None

    def get_buffer(self, sizehint: int) -> bytearray:
        buf = self.buf
        if buf is None:
            buf = self.buf = _spare.pop() if _spare else bytearray(SIZE)
        return buf

    def buffer_updated(self, nbytes: int) -> None:
        up = self.up
        ex, client = up.ex, up.client
        if ex is None or client is None:  # unbound while relaying: the exchange went away
            self._release()
            up.close()
            return
        client.active = True
        rem = up.remaining
        n = nbytes if nbytes < rem else rem
        ex.sent += n
        if not client.closed:
            t = client.transport
            t.write(memoryview(self.buf)[:n])  # type: ignore[arg-type, union-attr]
            if t.get_write_buffer_size():  # type: ignore[union-attr]
                self.buf = None  # the transport still holds part of it: no longer ours
        if nbytes < rem:
            up.remaining = rem - nbytes
            return
        self._release()
        if not up.closed:
            up.transport.set_protocol(up)  # type: ignore[union-attr]
        up.body_ended(ex, client, exact=nbytes == rem)

    def _release(self) -> None:
        buf = self.buf
        self.buf = None
        if buf is not None and len(_spare) < SPARE_MAX:
            _spare.append(buf)

    # everything else is the upstream connection's
    def connection_lost(self, exc: Exception | None) -> None:
        self.buf = None  # uvloop may still hold it for an aborted read: not returned to the spares
        self.up.connection_lost(exc)

    def eof_received(self) -> bool | None:
        return self.up.eof_received()

    def pause_writing(self) -> None:
        self.up.pause_writing()

    def resume_writing(self) -> None:
        self.up.resume_writing()


def begin(up: "UpstreamConn") -> None:
    """Relay the rest of `up`'s body (up.remaining bytes, up.bypass set) through a BodyRelay."""
    if not up.closed:
        up.transport.set_protocol(BodyRelay(up))  # type: ignore[union-attr]

"""TLS termination for frontend connections, in place of uvloop's SSLProtocol.

Why: over HTTPS keep-alive, uvloop's SSL protocol (Cython) cost ~6,200 instructions per
request beyond OpenSSL's own work: a MemoryBIO write and memoryview per socket read, the
write backlog list, the outgoing-BIO read, context copies and its app flow-control
bookkeeping per write (docs/benchmarks.md, "HTTPS keep-alive, second round"). That was
the rest of the gap to HAProxy's req/s. A frontend connection needs far less of that
machine: one OpenSSL connection on two memory BIOs, records decrypted as socket data
arrives and encrypted as the application writes, and the rules below. `TlsStream` is the
raw TCP connection's protocol and the application's transport at once; its per-request
work is a few C calls (`_tlsdirect.c` for the records when built).

Behaviour, as uvloop's SSL transport has it (tests/integration/test_tls_stream.py):

- The handshake runs first; the application's `connection_made` comes only after it (a
  connection is counted against max_connections only then). A handshake that fails (a
  client that speaks no TLS, an unknown SNI with no default certificate, a version or
  cipher mismatch) sends OpenSSL's alert and closes the connection; one that does not
  finish within `handshake_timeout` is aborted. Both are logged at DEBUG only: on a TLS
  port they are what scanners and impatient clients do.
- Reading is paused and resumed for the application: records already received stay
  encrypted in the incoming BIO until it resumes (no data_received while paused).
- `close()` sends close_notify and closes the socket once the written data has left; it
  does not wait for the client's close_notify (nginx's and HAProxy's way; uvloop waits
  up to its shutdown timeout). `abort()` drops the connection at once.
- A client's close_notify, or its TCP FIN, is `eof_received` for the application (no
  half-close over TLS: `can_write_eof()` is False); a TLS error while reading (a tampered
  record, an alert) aborts the connection and the application sees connection_lost.
- Write flow control is the socket's: the raw transport's pause_writing/resume_writing go
  to the application, and everything written is encrypted at once (nothing waits above
  the socket's buffer, so get_write_buffer_size() is the socket transport's).

The per-request half is C when `_tlsdirect` is in use (halb/certs/tls.py: built, and
libssl found): `StreamCore.data_received` and `.write` run the records with SSL_read_ex /
SSL_write_ex on the two memory BIOs and call the application's data_received and the raw
transport's write, with no Python frame of their own. Every other state and result
(before the handshake's end, closing, paused, a partial record, close_notify, an error)
goes to `_data_slow` / `_write_slow` here, which redo it through CPython's ssl methods.
`_PyCore` is the same interface in Python, used without the extension.

`HALB_TLS_STREAM=0` keeps uvloop's SSL protocol (the A/B switch of bench/ab.py).
"""
from __future__ import annotations

import asyncio
import logging
import os
import ssl
from typing import Any

log = logging.getLogger(__name__)

RECORD = 16384  # plaintext of one TLS record at most: what one read returns
_WANT_READ = ssl.SSLWantReadError
_SSL_ERROR = ssl.SSLError


def enabled() -> bool:
    return os.environ.get("HALB_TLS_STREAM", "1") != "0"


class _PyCore:
    """_tlsdirect.StreamCore's interface in Python: every call takes the slow path."""

    __slots__ = ("app", "ready", "closing", "read_paused")

    def data_received(self, data: bytes) -> None:
        self._data_slow(data)  # type: ignore[attr-defined]

    def write(self, data: Any) -> None:
        self._write_slow(data)  # type: ignore[attr-defined]

    def _bind_core(self, sock: Any, app: Any, raw_write: Any) -> bool:
        return False

    def _set_app(self, app: Any) -> None:
        self.app = app

    def _unbind_core(self) -> None:
        pass


def _core() -> type:
    """StreamCore when TLS records go through _tlsdirect (its checks and version gate)."""
    from halb.certs.tls import tls_direct
    if not tls_direct():
        return _PyCore
    try:
        from halb.certs._tlsdirect import StreamCore
    except ImportError:
        return _PyCore
    return StreamCore  # type: ignore[no-any-return]


_Core: Any = _core()


def core_in_use() -> str:
    return "C (halb.certs._tlsdirect.StreamCore)" if _Core is not _PyCore else "Python"


class _Stream(asyncio.Protocol):
    """Everything of a TLS stream but its core's two hot methods (TlsStream, PyTlsStream)."""

    __slots__ = ()
    # set in __init__; declared by the concrete classes' __slots__
    loop: asyncio.AbstractEventLoop
    ctx: ssl.SSLContext
    raw: Any
    incoming: ssl.MemoryBIO
    outgoing: ssl.MemoryBIO
    sslobj: Any
    timer: asyncio.TimerHandle | None
    timeout: float
    app_lost: bool
    app: Any
    ready: bool
    closing: bool
    read_paused: bool

    def __init__(self, loop: asyncio.AbstractEventLoop, ctx: ssl.SSLContext, app: Any,
                 handshake_timeout: float) -> None:
        self.loop = loop
        self.ctx = ctx
        self._set_app(app)
        self.raw: Any = None
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.sslobj: Any = None
        self.ready = False  # handshake done, app.connection_made called
        self.closing = False
        self.read_paused = False  # by the application
        self.timer: asyncio.TimerHandle | None = None
        self.timeout = handshake_timeout
        self.app_lost = False

    # ------------------------------------------------------------------ raw connection side
    def connection_made(self, transport: Any) -> None:
        self.raw = transport
        try:
            self.sslobj = self.ctx.wrap_bio(self.incoming, self.outgoing, server_side=True)
        except Exception as exc:  # a context that cannot make connections (out of memory)
            log.warning("TLS connection could not be set up: %r", exc)
            self.closing = True
            transport.abort()
            return
        self.timer = self.loop.call_later(self.timeout, self._handshake_timed_out)

    def _data_slow(self, data: bytes) -> None:
        """data_received in Python: before the handshake's end, while paused or closing, and
        after the C path met anything but a whole record (it has then fed the data already)."""
        if data:
            self.incoming.write(data)
        if self.ready:
            self._read()
        elif not self.closing:
            self._handshake()

    def eof_received(self) -> bool:
        if not self.ready:  # gone during its handshake
            self._give_up("closed during the TLS handshake")
            return True
        self._eof()
        return True  # closing is ours: close() sends close_notify first

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self._unbind_core()
        self._stop_timer()
        if self.ready and not self.app_lost:
            self.app_lost = True
            self.app.connection_lost(exc)

    def pause_writing(self) -> None:
        if self.ready:
            self.app.pause_writing()

    def resume_writing(self) -> None:
        if self.ready:
            self.app.resume_writing()

    # ------------------------------------------------------------------ TLS
    def _handshake(self) -> None:
        try:
            self.sslobj.do_handshake()
        except _WANT_READ:
            self._flush()
            return
        except Exception as exc:  # SSLError, or an error raised by the SNI callback
            self._flush()  # OpenSSL's alert, when it made one
            self._give_up(f"TLS handshake failed: {exc!r}", graceful=True)
            return
        self._flush()
        self._stop_timer()
        self.ready = True
        self._bind_core(self.sslobj._sslobj, self.app, self.raw.write)
        self.app.connection_made(self)
        if not self.closing and (self.incoming.pending or self.sslobj.pending()):
            self._read()  # a request sent right behind the client's Finished

    def _read(self) -> None:
        """Decrypt what has arrived, record by record, into the application."""
        sslobj = self.sslobj
        incoming = self.incoming
        while not self.read_paused and not self.closing:
            try:
                chunk = sslobj.read(RECORD)
            except _WANT_READ:  # a record not complete yet
                break
            except _SSL_ERROR as exc:  # a tampered record, an alert, a protocol error
                log.debug("TLS error while reading, connection aborted: %r", exc)
                self._flush()
                self.abort()
                return
            if not chunk:  # the client's close_notify
                self._eof()
                return
            self.app.data_received(chunk)
            if not incoming.pending and not sslobj.pending():
                break
        if self.outgoing.pending:  # a key update's answer, session tickets
            self._flush()

    def _eof(self) -> None:
        if self.closing:
            return
        try:
            keep_open = self.app.eof_received()
        except Exception:
            self.abort()
            raise
        if not keep_open:
            self.close()

    def _flush(self) -> None:
        if self.outgoing.pending and self.raw is not None and not self.raw.is_closing():
            self.raw.write(self.outgoing.read())

    def _stop_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _handshake_timed_out(self) -> None:
        self.timer = None
        if not self.ready:
            self._give_up(f"TLS handshake not done within {self.timeout:g} s")

    def _give_up(self, why: str, graceful: bool = False) -> None:
        log.debug("TLS connection %s: %s", self.raw.get_extra_info("peername") if self.raw else "?", why)
        self.closing = True
        self._stop_timer()
        if self.raw is not None:
            if graceful:
                self.raw.close()  # after the alert
            else:
                self.raw.abort()

    # ------------------------------------------------------------------ application's transport
    def _write_slow(self, data: Any) -> None:
        """write in Python (the C path's every other case)."""
        if self.closing or not data or not self.ready:
            return
        self.sslobj.write(data)
        self._flush()

    def writelines(self, chunks: Any) -> None:
        self.write(b"".join(chunks))

    def close(self) -> None:
        if self.closing:
            return
        self.closing = True
        if self.ready:
            try:
                self.sslobj.unwrap()  # close_notify into the outgoing BIO
            except (_SSL_ERROR, ValueError):  # want-read for the client's answer: not waited for
                pass
            self._flush()
        if self.raw is not None:
            self.raw.close()

    def abort(self) -> None:
        self.closing = True
        if self.raw is not None:
            self.raw.abort()

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "ssl_object":
            return self.sslobj
        if name == "sslcontext":
            return self.ctx
        if name == "peercert":
            return self.sslobj.getpeercert() if self.sslobj is not None else default
        if name == "cipher":
            return self.sslobj.cipher() if self.sslobj is not None else default
        if name == "compression":
            return self.sslobj.compression() if self.sslobj is not None else default
        return self.raw.get_extra_info(name, default) if self.raw is not None else default

    def pause_reading(self) -> None:
        if not self.read_paused:
            self.read_paused = True
            if self.raw is not None:
                self.raw.pause_reading()

    def resume_reading(self) -> None:
        if self.read_paused:
            self.read_paused = False
            if self.raw is not None and not self.closing:
                self.raw.resume_reading()
                if self.incoming.pending or (self.sslobj is not None and self.sslobj.pending()):
                    self.loop.call_soon(self._read_if_ready)

    def _read_if_ready(self) -> None:
        if self.ready and not self.read_paused and not self.closing:
            self._read()

    def is_reading(self) -> bool:
        return not self.read_paused and not self.closing

    def set_proxied(self, addrs: Any) -> None:
        """The client's addresses from a PROXY header read before TLS (proxy_protocol.py)."""
        self.app.set_proxied(addrs)

    def set_protocol(self, protocol: Any) -> None:
        self._set_app(protocol)

    def get_protocol(self) -> Any:
        return self.app

    def can_write_eof(self) -> bool:
        return False

    def write_eof(self) -> None:
        raise NotImplementedError("TLS has no half-close")

    def get_write_buffer_size(self) -> int:
        return self.raw.get_write_buffer_size() if self.raw is not None else 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if self.raw is not None:
            self.raw.set_write_buffer_limits(high, low)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self.raw.get_write_buffer_limits() if self.raw is not None else (0, 0)


_FIELDS = ("loop", "ctx", "raw", "incoming", "outgoing", "sslobj", "timer", "timeout", "app_lost")


class TlsStream(_Core, _Stream):
    """The raw connection's protocol and the application's transport (module docstring)."""

    __slots__ = _FIELDS


class PyTlsStream(_PyCore, _Stream):
    """TlsStream with the Python core (tests run both; the same as TlsStream without C)."""

    __slots__ = _FIELDS

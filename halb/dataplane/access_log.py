"""The access log: one JSON line per HTTP request, written without blocking the event loop.

Why this shape:

- The request path makes one C call per request (`Lines.add` of _accesslog.c, through
  `AccessLog.add`, inlined in HttpClientConn.response_done for keep-alive responses): it
  reads the end time from the monotonic clock and formats the JSON line at once into a
  buffer the Lines object keeps. Formatting at once, rather than keeping a tuple per request
  and formatting a batch later, was measured cheaper: no tuple per request, no Python clock
  call, and the request's objects are freed at once instead of 256 requests' worth staying
  alive until the batch (bench/ab.py --access-log; docs/benchmarks.md). `flush` (every 256
  lines, and from the engine's sweeper every 0.25 s) takes the formatted bytes and hands them
  to a writer thread. Formatting stays in the loop's thread on purpose: a writer thread
  running Python would hold the GIL and stall the loop up to the switch interval (5 ms); the
  thread only calls `os.write`, which releases the GIL while the disk works. Builds without
  the extension use `PyLines`: the same interface, records kept and formatted in Python by
  `py_format_lines` (the same bytes; tests compare).
- The hand-over is bounded (`buffer_bytes` of formatted lines waiting for the writer): when
  the disk (or a FIFO nobody reads) cannot keep up, whole batches are dropped and counted in
  `dropped`; requests never wait and memory never grows past the bound.
- Every process of a node (the node process and each data-plane worker) has its own
  AccessLog on the same file, opened O_APPEND: each batch is one `write(2)` of whole lines,
  and Linux serialises appends to a regular file, so lines of different processes never
  interleave (a line is never split across two writes).
- `reopen()` (SIGHUP, for logrotate: rename, then signal) makes the writer close and open the
  path again before its next write; lines already queued go to the new file.

Fields (docs/dataplane.md#access-log): time (RFC 3339 UTC, ms, when the response ended),
request_id, client (the PROXY-protocol address when the connection had one), frontend,
service, host, method, path (without the query: it often carries tokens; at most 1024
bytes), status, bytes (sent to the client: head and body), duration_ms, backend (null for an
answer the balancer made itself), attempts, tls (protocol version, null for plain HTTP).
Values a client sent are JSON-escaped: every byte outside printable ASCII as ``\\u00XX``
(the Latin-1 character), so a line is valid JSON whatever a client sent.
"""
from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections import deque
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_BUFFER = 4 * 1024 * 1024  # formatted bytes waiting for the writer thread
BATCH = 256  # records formatted at once (and the sweeper hands over the rest every 0.25 s)
WAKE_BYTES = 256 * 1024  # formatted bytes that wake the writer before the sweeper's next tick
# A record (RECORD): (end: time.monotonic(), start: time.monotonic() or 0.0, request_id,
# client, frontend, service, host, method, url, status, bytes, backend, attempts, tls)
MAX_PATH = 1024  # bytes of the path logged
MAX_HOST = 256
CLIENT_CLOSED = 499  # status logged when the client went away before a response (nginx's convention)

monotonic = time.monotonic
wall = time.time

# bytes that may go into a JSON string as they are: printable ASCII except '"' and '\'
_UNSAFE = re.compile(rb'[^\x20\x21\x23-\x5b\x5d-\x7e]')
_ESC = [chr(c) if 0x20 <= c < 0x7f and c not in (0x22, 0x5c) else ("\\" + chr(c) if c in (0x22, 0x5c) else
        "\\u%04x" % c) for c in range(256)]

# the C formatter (halb/dataplane/_accesslog.c); HALB_ACCESS_LOG_ACCEL=0 uses the Python one
CLines: Any = None
if os.environ.get("HALB_ACCESS_LOG_ACCEL", "1") != "0":
    try:
        from halb.dataplane._accesslog import Lines as CLines
    except ImportError:  # built without a C compiler
        pass


def _jbytes(v: bytes | None, limit: int = 256, query: bool = False) -> bytes:
    """Bytes a client sent as a JSON string: each byte outside printable ASCII as \\u00XX
    (the Latin-1 character), '"' and '\\' escaped; exactly what _accesslog.c writes."""
    if v is None:
        return b"null"
    if query:
        i = v.find(b"?")
        if i >= 0:
            v = v[:i]
    v = v[:limit]
    if _UNSAFE.search(v) is None:
        return b'"%s"' % v
    return ('"' + "".join([_ESC[c] for c in v]) + '"').encode()


def _jname(v: str | None, frontend_is_null: bool = False) -> bytes:
    if v is None or (frontend_is_null and v.startswith("frontend:")):
        return b"null"
    return _jbytes(v.encode()[:256])


def _ms(dur: float) -> bytes:
    """Seconds -> milliseconds with 3 decimals, from whole microseconds (as the C code does)."""
    us = int(dur * 1e6 + 0.5)
    return b"%d.%03d" % (us // 1000, us % 1000)


def py_format_lines(records: list[tuple[Any, ...]], wall_offset: float) -> bytes:
    """The pure-Python formatter: the same bytes as _accesslog.Lines (tests compare)."""
    out = []
    for (t1, t0, rid, peer, fe, service, host, method, url, status, sent, backend, attempts, tls) in records:
        t = t1 + wall_offset
        dur = t1 - t0 if t0 else -1.0
        sec = int(t)
        ms = min(max(int((t - sec) * 1000), 0), 999)
        out.append(b'{"time":"%s.%03dZ","request_id":%s,"client":%s,"frontend":%s,"service":%s,"host":%s,'
                   b'"method":%s,"path":%s,"status":%d,"bytes":%d,"duration_ms":%s,"backend":%s,"attempts":%d,'
                   b'"tls":%s}\n' % (
                       time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)).encode(), ms,
                       _jbytes(rid) if rid is not None else b'""', _jbytes(peer), _jname(fe),
                       _jname(service, True), _jbytes(host, MAX_HOST), _jbytes(method), _jbytes(url, MAX_PATH, True),
                       status, sent, b"null" if dur < 0 else _ms(dur), _jname(backend), attempts,
                       _jname(tls)))
    return b"".join(out)


class PyLines:
    """_accesslog.Lines for builds without the extension: the same interface and bytes, each
    record formatted by py_format_lines when added (so a malformed one raises there, as in C)."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.wall_offset = 0.0

    @property
    def count(self) -> int:
        return len(self.chunks)

    def add(self, *values: Any) -> int:
        """The 13 values of a record after its end time, which is now."""
        return self.add_at(monotonic(), *values)

    def add_at(self, *record: Any) -> int:
        if len(record) != 14:
            raise TypeError("PyLines.add_at takes a whole record (14 values)")
        self.chunks.append(py_format_lines([record], self.wall_offset))
        return len(self.chunks)

    def take(self) -> tuple[bytes, int]:
        chunks, self.chunks = self.chunks, []
        return b"".join(chunks), len(chunks)


def new_lines() -> Any:
    """A pending-lines buffer: the C one when built (and not turned off), else PyLines."""
    return CLines() if CLines is not None else PyLines()


def tls_version(conn: Any) -> str | None:
    """The TLS protocol version of a client connection, or None for plain HTTP."""
    if getattr(conn.listener, "ssl", None) is None or conn.transport is None:
        return None
    try:
        obj = conn.transport.get_extra_info("ssl_object")
        return obj.version() if obj is not None else None
    except Exception:  # a transport already torn down
        return None


class AccessLog:
    """One process's access log: records in the loop, writes in a thread (module docstring)."""

    def __init__(self, path: str, buffer_bytes: int = DEFAULT_BUFFER) -> None:
        self.path = path
        self.buffer_bytes = buffer_bytes
        self.pending = new_lines()  # lines of finished requests not yet handed to the writer
        self.pending.wall_offset = wall() - monotonic()  # time.time() = time.monotonic() + this (refreshed per flush)
        self.lines = 0  # lines handed to the writer
        self.dropped = 0  # lines dropped: the writer's queue was full, or writing failed
        self.written = 0  # lines written
        self.error = ""  # the last open/write error ("" once writing works again)
        self._bad_records: set[str] = set()  # errors of records that could not be formatted (logged once each)
        self._queue: deque[tuple[bytes, int]] = deque()  # (lines, how many)
        self._queued = 0  # bytes in _queue (under _cond)
        self._cond = threading.Condition()
        self._reopen = False
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="halb-access-log", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ event loop side
    def add(self, conn: Any, ex: Any, backend: Any) -> None:
        """One finished request, formatted at once (one C call).
        `backend`: the BackendState whose response the client got, None for a local answer."""
        lst = conn.listener
        rt = ex.rt
        # the layout (RECORD) is also written inline in HttpClientConn.response_done (hot path)
        try:
            n = self.pending.add(
                ex.t0, ex.rid, conn.peer, lst.frontend,
                (rt if rt is not None else lst.rt).route.name, ex.host, ex.method, ex.url, ex.status,
                len(ex.head_out) + ex.sent,
                backend.name if backend is not None else None, ex.attempts,
                tls_version(conn) if lst.ssl is not None else None)
        except Exception as exc:
            self.bad_record(exc)
            return
        if n >= BATCH:
            self.flush()

    def bad_record(self, exc: Exception) -> None:
        """A record that could not be formatted (a value of the wrong type: a bug): dropped and
        counted, logged once per distinct error; the request it describes is not affected."""
        self.dropped += 1
        why = f"{type(exc).__name__}: {exc}"
        if why not in self._bad_records:
            self._bad_records.add(why)
            log.error("access log record dropped (%s); dropped records are counted", why)

    def flush(self, wake: bool = False) -> None:
        """Hand the pending lines to the writer (or drop them, counted).
        The writer is woken when a quarter of the buffer (at most WAKE_BYTES) waits, or with
        `wake` (the sweeper, every 0.25 s): fewer, larger writes and thread switches."""
        pending = self.pending
        n = pending.count
        if n:
            data, n = pending.take()
        pending.wall_offset = wall() - monotonic()  # lines hold monotonic times; follows clock steps
        with self._cond:
            if n:
                if self._queued + len(data) > self.buffer_bytes:
                    self.dropped += n
                    return
                self._queue.append((data, n))
                self._queued += len(data)
                self.lines += n
            if self._queue and (wake or self._queued >= min(WAKE_BYTES, self.buffer_bytes // 4)):
                self._cond.notify()

    def reopen(self) -> None:
        """Close and open the file again before the next write (logrotate renamed it)."""
        with self._cond:
            self._reopen = True
            self._cond.notify()

    def set_path(self, path: str, buffer_bytes: int) -> None:
        with self._cond:
            self.path = path
            self.buffer_bytes = buffer_bytes
            self._reopen = True
            self._cond.notify()

    def stats(self) -> dict[str, Any]:
        with self._cond:
            queued = self._queued
        return {"path": self.path, "lines": self.lines, "written": self.written, "dropped": self.dropped,
                "queued_bytes": queued, "error": self.error}

    def close(self, timeout: float = 2.0) -> None:
        """Hand over what is pending, let the writer finish (up to `timeout`), stop it.
        Blocking: the engine calls it from a thread (asyncio.to_thread)."""
        self.flush(wake=True)
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)

    # ------------------------------------------------------------------ writer thread
    def _run(self) -> None:
        fd = -1
        while True:
            with self._cond:
                while not self._queue and not self._stopping and not self._reopen:
                    self._cond.wait()
                batch = list(self._queue)
                self._queue.clear()
                reopen, self._reopen = self._reopen, False
                stopping = self._stopping
                path = self.path
            if reopen and fd >= 0:
                os.close(fd)
                fd = -1
            if batch:
                data = batch[0][0] if len(batch) == 1 else b"".join([d for d, _ in batch])
                n = sum(k for _, k in batch)
                if fd < 0:
                    fd = self._open(path)
                ok = fd >= 0 and self._write(fd, data)
                with self._cond:
                    self._queued -= len(data)
                    if ok:
                        self.written += n
                    else:
                        self.dropped += n
                if not ok and fd >= 0:
                    os.close(fd)  # open again for the next batch (the file may be back)
                    fd = -1
            if stopping:
                with self._cond:
                    if self._queue:
                        continue
                if fd >= 0:
                    os.close(fd)
                return

    def _open(self, path: str) -> int:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        except OSError as exc:
            self._failed(f"cannot open access log {path}: {exc.strerror or exc}")
            return -1
        return fd

    def _write(self, fd: int, data: bytes) -> bool:
        view = memoryview(data)
        try:
            while view:
                n = os.write(fd, view)
                view = view[n:]
        except OSError as exc:
            self._failed(f"cannot write access log {self.path}: {exc.strerror or exc}")
            return False
        if self.error:
            log.warning("access log %s: writing again", self.path)
            self.error = ""
        return True

    def _failed(self, why: str) -> None:
        if why != self.error:  # once per distinct problem, not per batch
            log.error("%s; access log lines are dropped (counted) until it works", why)
        self.error = why

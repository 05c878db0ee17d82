"""The access log: one JSON line per HTTP request, written without blocking the event loop.

Why this shape:

- The request path only appends a tuple of values it already has (`AccessLog.add`, ~1 us);
  nothing is formatted per request on the hot path. `flush` (every 256 records, and from the
  engine's sweeper every 0.25 s) turns the pending tuples into JSON lines in one go and hands
  the bytes to a writer thread. Formatting stays in the loop's thread on purpose: a writer
  thread running Python would hold the GIL and stall the loop up to the switch interval
  (5 ms); the thread only calls `os.write`, which releases the GIL while the disk works.
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
Values a client sent are JSON-escaped; bytes that are not UTF-8 appear as ``\\xNN``.
"""
from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections import deque
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_BUFFER = 4 * 1024 * 1024  # formatted bytes waiting for the writer thread
BATCH = 256  # records per hand-over (and the sweeper hands over the rest every 0.25 s)
MAX_PATH = 1024  # bytes of the path logged
MAX_HOST = 256
CLIENT_CLOSED = 499  # status logged when the client went away before a response (nginx's convention)

monotonic = time.monotonic
wall = time.time

# bytes that may go into a JSON string as they are: printable ASCII except '"' and '\'
_UNSAFE = re.compile(rb'[^\x20\x21\x23-\x5b\x5d-\x7e]')
_LINE = (b'{"time":"%s.%03dZ","request_id":"%s","client":"%s","frontend":%s,"service":%s,"host":%s,'
         b'"method":"%s","path":"%s","status":%d,"bytes":%d,"duration_ms":%s,"backend":%s,"attempts":%d,'
         b'"tls":%s}\n')


def _esc(v: bytes) -> bytes:
    """Bytes a client sent, as the inside of a JSON string."""
    if _UNSAFE.search(v) is None:
        return v
    return json.dumps(v.decode("utf-8", "backslashreplace"))[1:-1].encode()


_names: dict[str, bytes] = {}


def _name(v: str | None) -> bytes:
    """A service / backend / frontend name (validated when configured) as a JSON value; cached."""
    if v is None:
        return b"null"
    out = _names.get(v)
    if out is None:
        if len(_names) > 10000:
            _names.clear()
        out = _names[v] = json.dumps(v).encode()
    return out


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
        self.records: list[tuple[Any, ...]] = []
        self.lines = 0  # lines handed to the writer
        self.dropped = 0  # lines dropped: the writer's queue was full, or writing failed
        self.written = 0  # lines written
        self.error = ""  # the last open/write error ("" once writing works again)
        self._queue: deque[bytes] = deque()
        self._queued = 0  # bytes in _queue (under _cond)
        self._cond = threading.Condition()
        self._reopen = False
        self._stopping = False
        self._sec = -1
        self._sec_txt = b""
        self._thread = threading.Thread(target=self._run, name="halb-access-log", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ event loop side
    def add(self, conn: Any, ex: Any, backend: Any) -> None:
        """One finished request (hot path: a tuple, no formatting). `backend`: the
        BackendState whose response the client got, None for a local answer."""
        lst = conn.listener
        self.records.append((
            wall(), ex.t0, monotonic(), ex.rid, conn.peer, lst, ex.rt, ex.host, ex.method, ex.url,
            ex.status, ex.sent, backend.name if backend is not None else None, ex.attempts,
            tls_version(conn) if lst.ssl is not None else None,
        ))
        if len(self.records) >= BATCH:
            self.flush()

    def flush(self) -> None:
        """Format the pending records and hand them to the writer (or drop them, counted)."""
        recs = self.records
        if not recs:
            return
        self.records = []
        data = b"".join([self._format(r) for r in recs])
        n = len(recs)
        with self._cond:
            if self._queued + len(data) > self.buffer_bytes:
                self.dropped += n
                return
            self._queue.append(data)
            self._queued += len(data)
            self.lines += n
            self._cond.notify()

    def _format(self, r: tuple[Any, ...]) -> bytes:
        (t, t0, t1, rid, peer, lst, rt, host, method, url, status, sent, backend, attempts, tls) = r
        sec = int(t)
        if sec != self._sec:
            self._sec = sec
            self._sec_txt = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)).encode()
        fe = getattr(lst, "fe", None)
        if rt is None:  # a request refused before routing (bad head): the listener's service
            rt = getattr(lst, "rt", None)
        service = rt.route.name if rt is not None else None
        if service is not None and service.startswith("frontend:"):
            service = None  # the frontend answered itself (no route): no service
        i = url.find(b"?")
        path = url[:i] if i >= 0 else url
        return _LINE % (
            self._sec_txt, int((t - sec) * 1000), _esc(rid or b""), _esc(peer),
            _name(fe.name) if fe is not None else b"null", _name(service),
            b'"%s"' % _esc(host[:MAX_HOST]) if host is not None else b"null",
            _esc(method), _esc(path[:MAX_PATH]), status, sent,
            b"%.3f" % ((t1 - t0) * 1000) if t0 else b"null", _name(backend), attempts,
            _name(tls),
        )

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
        self.flush()
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
                data = b"".join(batch)
                if fd < 0:
                    fd = self._open(path)
                ok = fd >= 0 and self._write(fd, data)
                n = data.count(b"\n")
                with self._cond:
                    self._queued -= sum(len(b) for b in batch)
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

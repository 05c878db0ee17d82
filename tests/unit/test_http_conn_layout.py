"""Guards a performance cliff of HttpClientConn (regression guard, not a timing test).

CPython 3.11 reads instance attributes fast while all instances of a class share one small
key table; HttpClientConn at 30 attributes made every `self.x` read slower (bench/instr.py:
+1,500 user-space instructions per request, +4 %, on the C fast path). Per-request state
of the llhttp path lives in request_head.HeadState instead. Add attributes there, not on
the connection.
"""
from __future__ import annotations

from types import SimpleNamespace

from halb.dataplane.http_proxy import HttpClientConn
from halb.dataplane.options import ServiceOptions


def test_client_connection_stays_below_the_shared_keys_cliff() -> None:
    rt = SimpleNamespace(opts=ServiceOptions(), hash_header=None, connections=0, rejected=0)
    engine = SimpleNamespace(loop=None, conns=set(), new_request_id=lambda: b"rid", access_log=None)
    conn = HttpClientConn(SimpleNamespace(engine=engine, rt=rt))  # type: ignore[arg-type]
    conn.transport = SimpleNamespace(write=lambda d: None, close=lambda: None,  # type: ignore[assignment]
                                     pause_reading=lambda: None, resume_reading=lambda: None)
    conn.start = lambda ex: None  # type: ignore[method-assign]  # parsing only: no routing here
    conn.data_received(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi")
    n = len(vars(conn)) - 1  # the test's own `start` override is not a real attribute
    assert n < 30, f"HttpClientConn has {n} attributes; keep it below 30 (see module docstring)"


def test_data_plane_stays_below_the_shared_keys_cliff() -> None:
    """`self.engine.x` is read several times per request (draining, now, request ids, the
    access log): DataPlane at 30 attributes made those reads slower too."""
    from halb.dataplane.engine import DataPlane

    n = len(vars(DataPlane("n1")))
    assert n < 30, f"DataPlane has {n} attributes; keep it below 30 (see module docstring)"

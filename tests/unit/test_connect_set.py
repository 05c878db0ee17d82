"""The prober's ConnectSet, C (halb.health._probe) and Python, against real loopback sockets.

Both implementations must give the same answers: the prober uses whichever is available.
"""
from __future__ import annotations

import errno
import os
import select
import socket
import time
from typing import Any, Callable, Iterator

import pytest

from halb.health import connect_set
from halb.health.connect_set import PyConnectSet

IMPLS: list[Any] = [pytest.param(PyConnectSet, id="python")]
IMPLS.append(pytest.param(connect_set.CConnectSet, id="c", marks=pytest.mark.skipif(
    connect_set.CConnectSet is None, reason="halb.health._probe not built")))


@pytest.fixture(params=IMPLS)
def cset(request: pytest.FixtureRequest) -> Iterator[Any]:
    s = request.param()
    yield s
    s.close()


def finish(cs: Any, fd: int, err: int, timeout: float = 5.0) -> int:
    """The connect's final errno: from start() if it finished at once, else from collect()."""
    if fd < 0:
        return err
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        select.select([cs.fileno()], [], [], 0.05)
        for done_fd, done_err in cs.collect():
            assert done_fd == fd
            return done_err
    raise AssertionError("connect did not finish")


def listener(backlog: int = 16) -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(backlog)
    return s


def test_connect_to_a_listener_succeeds_and_the_socket_is_closed_with_rst(cset: Any) -> None:
    srv = listener()
    try:
        fd, err = cset.start(socket.AF_INET, "127.0.0.1", srv.getsockname()[1])
        assert finish(cset, fd, err) == 0
        conn, _ = srv.accept()
        with conn:
            with pytest.raises(ConnectionResetError):  # RST, not FIN: no TIME_WAIT on our side
                conn.recv(1)
        assert cset.collect() == []
    finally:
        srv.close()


def test_connect_to_a_closed_port_reports_econnrefused(cset: Any) -> None:
    srv = listener()
    port = srv.getsockname()[1]
    srv.close()
    fd, err = cset.start(socket.AF_INET, "127.0.0.1", port)
    assert finish(cset, fd, err) == errno.ECONNREFUSED


def test_ipv6_loopback(cset: Any) -> None:
    try:
        srv = socket.socket(socket.AF_INET6)
        srv.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    srv.listen(4)
    try:
        fd, err = cset.start(socket.AF_INET6, "::1", srv.getsockname()[1])
        assert finish(cset, fd, err) == 0
    finally:
        srv.close()


def test_a_hanging_connect_stays_in_flight_until_aborted(cset: Any) -> None:
    srv = listener(0)  # never accepts: once its queue is full, SYNs are dropped
    port = srv.getsockname()[1]
    fillers = []
    try:
        for _ in range(4):
            c = socket.socket()
            c.setblocking(False)
            c.connect_ex(("127.0.0.1", port))
            fillers.append(c)
        fd, err = cset.start(socket.AF_INET, "127.0.0.1", port)
        assert fd >= 0 and err == 0
        select.select([cset.fileno()], [], [], 0.3)
        assert cset.collect() == []
        os.fstat(fd)  # still open
        cset.abort(fd)
        with pytest.raises(OSError) as exc:
            os.fstat(fd)
        assert exc.value.errno == errno.EBADF
    finally:
        for c in fillers:
            c.close()
        srv.close()


def test_abort_leaves_a_file_that_is_not_in_the_set_alone(cset: Any) -> None:
    r, w = os.pipe()
    try:
        cset.abort(r)
        os.fstat(r)  # still open: a stale fd number must never close someone else's file
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.parametrize("call", [
    lambda cs: cs.start(socket.AF_INET, "localhost", 80),  # host names take the prober's stream path
    lambda cs: cs.start(socket.AF_INET, "::1", 80),
    lambda cs: cs.start(socket.AF_INET6, "127.0.0.1", 80),
    lambda cs: cs.start(socket.AF_INET, "127.0.0.1", 0),
    lambda cs: cs.start(socket.AF_INET, "127.0.0.1", 70000),
    lambda cs: cs.start(socket.AF_UNIX, "127.0.0.1", 80),
], ids=["name", "v6-as-v4", "v4-as-v6", "port-0", "port-70000", "af-unix"])
def test_bad_input_is_a_value_error(cset: Any, call: Callable[[Any], Any]) -> None:
    with pytest.raises(ValueError):
        call(cset)


def test_many_connects_at_once_are_all_collected(cset: Any) -> None:
    srv = listener(1024)
    port = srv.getsockname()[1]
    try:
        in_flight: set[int] = set()
        results: list[int] = []
        for i in range(600):  # more than one collect() batch in C (512)
            fd, err = cset.start(socket.AF_INET, "127.0.0.1", port)
            if fd < 0:
                results.append(err)
            else:
                assert fd not in in_flight
                in_flight.add(fd)
            if i % 100 == 99:
                srv.setblocking(False)
                while True:
                    try:
                        srv.accept()[0].close()
                    except BlockingIOError:
                        break
        deadline = time.monotonic() + 10
        while in_flight and time.monotonic() < deadline:
            select.select([cset.fileno()], [], [], 0.05)
            for fd, err in cset.collect():
                in_flight.remove(fd)
                results.append(err)
        assert len(results) == 600 and set(results) == {0}
    finally:
        srv.close()


def test_new_connect_set_follows_halb_probe_accel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HALB_PROBE_ACCEL", "0")
    s = connect_set.new_connect_set()
    try:
        assert isinstance(s, PyConnectSet)
    finally:
        s.close()
    monkeypatch.setenv("HALB_PROBE_ACCEL", "1")
    s = connect_set.new_connect_set()
    try:
        assert isinstance(s, connect_set.CConnectSet or PyConnectSet)
    finally:
        s.close()

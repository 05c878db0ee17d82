"""The C relay's own contract (halb.dataplane._tcprelay), on real sockets without an engine:
records for connect success / failure / timeout / close, half-close, bad calls refused with
a clear error, accept, and collection by the cyclic GC."""
from __future__ import annotations

import errno
import gc
import os
import select
import socket
import time
from typing import Any

import pytest

relay_mod = pytest.importorskip("halb.dataplane._tcprelay")
Relay = relay_mod.Relay


def nfds() -> int:
    return len(os.listdir("/proc/self/fd"))


def records(r: Any, want: int = 1, timeout: float = 5.0) -> list[tuple[Any, int, int]]:
    """run() until `want` records came (select on the relay's fd, as the event loop does)."""
    out: list[tuple[Any, int, int]] = []
    deadline = time.monotonic() + timeout
    while len(out) < want and time.monotonic() < deadline:
        select.select([r.fileno()], [], [], 0.05)
        out += r.run()
    return out


def recv_all(s: socket.socket, timeout: float = 5.0) -> bytes:
    s.settimeout(timeout)
    out = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            return out
        out += chunk


def _add(r: Any, tok: object, idle: float = 10.0) -> tuple[socket.socket, int]:
    """A socketpair stands in for an accepted client: the relay takes one end (by fd).
    Returns the client's end and the fd the relay knows the connection by."""
    client, inner = socket.socketpair()
    fd = inner.detach()
    r.add(fd, tok, idle)
    return client, fd


@pytest.fixture
def backend() -> Any:
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(8)
    yield ls
    ls.close()


def test_relays_both_ways_and_keeps_half_close(backend: socket.socket) -> None:
    r = Relay()
    tok = object()
    client, fd = _add(r, tok)
    assert r.count == 1
    client.sendall(b"early")  # before the backend exists: kept
    assert r.connect(fd, tok, "127.0.0.1", backend.getsockname()[1], 5.0) is True
    (kind_tok, kind, us), = records(r)
    assert kind_tok is tok and kind == relay_mod.CONNECTED and us >= 0
    b, _ = backend.accept()
    b.settimeout(5)
    assert b.recv(100) == b"early"
    client.shutdown(socket.SHUT_WR)  # client done: the backend sees EOF ...
    assert records(r, want=1, timeout=0.3) == []  # forwarded, nothing to report
    assert b.recv(100) == b""
    b.sendall(b"answer")  # ... and can still answer
    b.close()
    assert records(r) == [(tok, relay_mod.CLOSED, 0)]
    assert recv_all(client) == b"answer"
    assert r.count == 0
    client.close()
    r.shutdown()


def test_connect_refused_is_a_failed_record_and_the_client_stays(backend: socket.socket) -> None:
    r = Relay()
    tok = object()
    client, fd = _add(r, tok)
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    port = dead.getsockname()[1]
    dead.close()  # nothing listens there
    try:
        r.connect(fd, tok, "127.0.0.1", port, 5.0)
        (t, kind, err), = records(r)
        assert t is tok and kind == relay_mod.FAILED and err == errno.ECONNREFUSED
    except ConnectionRefusedError:  # refused at once: the other way the relay may report it
        pass
    assert r.count == 1  # the client is kept for the next attempt
    r.connect(fd, tok, "127.0.0.1", backend.getsockname()[1], 5.0)
    assert records(r)[0][1] == relay_mod.CONNECTED
    assert r.close(fd, tok) is True
    assert r.count == 0 and recv_all(client) == b""
    client.close()
    r.shutdown()


def test_connect_timeout_comes_from_expire() -> None:
    stuck = socket.socket()
    stuck.bind(("127.0.0.1", 0))
    stuck.listen(0)
    fillers = []
    for _ in range(4):  # fill the accept queue: further SYNs are dropped
        f = socket.socket()
        f.setblocking(False)
        f.connect_ex(stuck.getsockname())
        fillers.append(f)
    r = Relay()
    tok = object()
    client, fd = _add(r, tok)
    try:
        r.connect(fd, tok, "127.0.0.1", stuck.getsockname()[1], 0.2)
        assert r.expire() == []
        time.sleep(0.3)
        assert r.expire() == [(tok, relay_mod.TIMEOUT, errno.ETIMEDOUT)]
        assert r.count == 1
    finally:
        r.shutdown()
        client.close()
        for f in fillers:
            f.close()
        stuck.close()


def test_idle_timeout_closes_with_a_record(backend: socket.socket) -> None:
    r = Relay()
    tok = object()
    client, fd = _add(r, tok, idle=0.1)
    r.connect(fd, tok, "127.0.0.1", backend.getsockname()[1], 5.0)
    records(r)
    r.expire()
    time.sleep(0.25)
    assert r.expire() == [(tok, relay_mod.CLOSED, 0)]
    assert recv_all(client) == b"" and r.count == 0
    client.close()
    r.shutdown()


def test_bad_calls_get_clear_errors(backend: socket.socket) -> None:
    r = Relay()
    tok = object()
    client, fd = _add(r, tok)
    with pytest.raises(ValueError, match="numeric"):
        r.connect(fd, tok, "localhost", 80, 1.0)
    with pytest.raises(ValueError, match="port"):
        r.connect(fd, tok, "127.0.0.1", 70000, 1.0)
    with pytest.raises(KeyError):
        r.connect(fd, object(), "127.0.0.1", 80, 1.0)  # not this connection's token
    with pytest.raises(ValueError, match="already"):
        r.add(fd, tok, 1.0)
    with pytest.raises(ValueError):
        Relay(bufsize=0)
    r.connect(fd, tok, "127.0.0.1", backend.getsockname()[1], 5.0)
    with pytest.raises(ValueError, match="already has a backend"):
        r.connect(fd, tok, "127.0.0.1", backend.getsockname()[1], 5.0)
    assert r.close(fd, object()) is False  # a stale token closes nothing
    assert r.count == 1
    r.shutdown()
    client.close()


def test_accept_batches_and_reports_peers() -> None:
    r = Relay()
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(16)
    ls.setblocking(False)
    assert r.accept(ls.fileno(), 8, True) == []
    cs = [socket.create_connection(ls.getsockname()) for _ in range(5)]
    got = r.accept(ls.fileno(), 3, True)
    assert len(got) == 3 and all(peer == b"127.0.0.1" for _, peer in got)
    rest = r.accept(ls.fileno(), 8, False)
    assert len(rest) == 2 and all(peer is None for _, peer in rest)
    for fd, _ in got + rest:
        assert os.get_blocking(fd) is False and os.get_inheritable(fd) is False
        os.close(fd)
    for c in cs:
        c.close()
    ls.close()
    r.shutdown()


def test_unreachable_relay_is_collected_and_closes_its_sockets() -> None:
    gc.collect()  # earlier tests' garbage must not close fds in the middle of this count
    before = nfds()

    class Token:
        relay: Any = None

    r = Relay()
    client, _ = _add(r, tok := Token())
    tok.relay = r  # a cycle through a reference only the relay's C side holds
    assert nfds() == before + 3  # the epoll fd, the relayed socket and the client's end
    del r, tok
    gc.collect()
    assert nfds() == before + 1  # the relay's two closed by the GC clearing it
    assert recv_all(client) == b""
    client.close()

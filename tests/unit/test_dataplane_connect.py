"""halb.dataplane.connect: a backend connect driven by callbacks, on uvloop and asyncio."""
from __future__ import annotations

import asyncio
import gc
import os
import socket
from typing import Any, Iterator

import pytest
import uvloop

from halb.dataplane.connect import open_connection
from halb.dataplane.testing import free_port

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(params=["uvloop", "asyncio"])
def loop(request: pytest.FixtureRequest) -> Iterator[asyncio.AbstractEventLoop]:
    lp = uvloop.new_event_loop() if request.param == "uvloop" else asyncio.new_event_loop()
    yield lp
    lp.close()


def open_fds(loop: asyncio.AbstractEventLoop) -> int:
    """After one attempt on this loop: libuv opens a reserve fd (for EMFILE) with its first stream."""
    loop.run_until_complete(attempt(loop, free_port(), 5))
    return fd_count()


def fd_count() -> int:
    """Open descriptors, after collecting garbage: sockets dropped by earlier tests closing
    during a test (seen in the full suite: 32 before, 30 after) must not read as a change."""
    gc.collect()
    return len(os.listdir("/proc/self/fd"))


async def attempt(loop: asyncio.AbstractEventLoop, port: int, timeout: float, cancel_after: float | None = None
                  ) -> list[tuple[Any, BaseException | None]]:
    got: list[tuple[Any, BaseException | None]] = []
    done = asyncio.Event()

    def cb(proto: Any, exc: BaseException | None) -> None:
        got.append((proto, exc))
        done.set()

    pc = open_connection(loop, asyncio.Protocol, "127.0.0.1", port, timeout, cb)
    if cancel_after is not None:
        loop.call_later(cancel_after, pc.cancel)
    await asyncio.wait_for(done.wait(), 10)
    await asyncio.sleep(0.05)  # a second call would land here
    return got


def test_success_gives_the_protocol_with_a_live_transport(loop: asyncio.AbstractEventLoop) -> None:
    async def main() -> None:
        srv = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        got = await attempt(loop, port, 5)
        assert len(got) == 1 and got[0][1] is None
        proto = got[0][0]
        assert isinstance(proto, asyncio.Protocol)
        srv.close()

    loop.run_until_complete(main())


def test_refused_reports_the_oserror(loop: asyncio.AbstractEventLoop) -> None:
    got = loop.run_until_complete(attempt(loop, free_port(), 5))
    assert len(got) == 1 and got[0][0] is None and isinstance(got[0][1], ConnectionRefusedError)


@pytest.fixture
def stuck_port() -> Iterator[int]:
    """A listener that never accepts, with its queue full: SYNs are dropped, connects hang."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(0)
    fillers = []
    for _ in range(4):
        f = socket.socket()
        f.setblocking(False)
        f.connect_ex(s.getsockname())
        fillers.append(f)
    yield s.getsockname()[1]
    for f in fillers:
        f.close()
    s.close()


def test_timeout_reports_once_and_closes_the_socket(loop: asyncio.AbstractEventLoop, stuck_port: int) -> None:
    before = open_fds(loop)
    got = loop.run_until_complete(attempt(loop, stuck_port, 0.2))
    assert len(got) == 1 and got[0][0] is None and isinstance(got[0][1], asyncio.TimeoutError)
    assert fd_count() == before


def test_cancel_reports_once_and_closes_the_socket(loop: asyncio.AbstractEventLoop, stuck_port: int) -> None:
    before = open_fds(loop)
    got = loop.run_until_complete(attempt(loop, stuck_port, 5, cancel_after=0.1))
    assert len(got) == 1 and got[0][0] is None and isinstance(got[0][1], ConnectionAbortedError)
    assert fd_count() == before

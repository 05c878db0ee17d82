"""TCP mode over real sockets: half-close, connect failover, connection limit, bulk.

Every test runs on both TCP paths (the C relay and the asyncio Protocols), see tcp_paths.py."""
from __future__ import annotations

import asyncio
import contextlib
import os
import resource
from typing import AsyncIterator, Iterator

import pytest

from halb.dataplane.engine import DataPlane
from halb.dataplane.origin import Origin
from halb.dataplane.snapshot import BackendRoute, RoutingSnapshot
from halb.dataplane.testing import free_port, run, service, snapshot
from tests.integration.tcp_paths import tcp_path  # noqa: F401  (autouse: both TCP paths)

pytestmark = pytest.mark.timeout(60)


@contextlib.asynccontextmanager
async def setup(snap_of_port) -> AsyncIterator[tuple[DataPlane, int]]:
    echo = Origin("echo")
    dp = DataPlane("t")
    try:
        port = await echo.start(tcp=True)
        await dp.start(snap_of_port(port))
        yield dp, dp.bound_port("tcp")
    finally:
        await dp.stop()
        echo.close()


def tcp_snap(*ports: int, **opts: object) -> RoutingSnapshot:
    bs = [BackendRoute(name=f"b{i}", host="127.0.0.1", port=p, weight=1, server=f"s{i}") for i, p in enumerate(ports)]
    return snapshot(service("tcp", bs, mode="tcp", **opts))


async def read_all(reader: asyncio.StreamReader, timeout: float = 10) -> bytes:
    out = b""
    while True:
        chunk = await asyncio.wait_for(reader.read(65536), timeout)
        if not chunk:
            return out
        out += chunk


@contextlib.contextmanager
def fds_exhausted(limit: int = 4096) -> Iterator[list[int]]:
    """Lower RLIMIT_NOFILE to at most `limit` and open /dev/null until no descriptor is
    left; yields the fillers (close some to free exactly that many). Everything is closed
    and the limit restored on the way out, also when the test fails."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    fillers: list[int] = []
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, limit), hard))
        while True:
            try:
                fillers.append(os.open(os.devnull, os.O_RDONLY))
            except OSError:
                break
        yield fillers
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_half_close_keeps_the_other_direction_open() -> None:
    async def main() -> None:
        async with setup(lambda p: tcp_snap(p)) as (dp, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"hello")
            await writer.drain()
            assert await asyncio.wait_for(reader.readexactly(5), 10) == b"hello"
            writer.write_eof()  # client done sending; must still receive the answer
            rest = await read_all(reader)
            assert rest == b"EOF after 5 bytes\n"
            writer.close()
            s = dp.stats()["services"]["tcp"]
            assert s["requests"] == 1 and s["errors"] == 0

    run(main())


def test_connect_failure_tries_next_backend() -> None:
    async def main() -> None:
        dead = free_port()
        async with setup(lambda p: tcp_snap(dead, p)) as (dp, port):
            for i in range(6):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"x" * i)
                writer.write_eof()
                assert await read_all(reader) == b"x" * i + b"EOF after %d bytes\n" % i
                writer.close()
            s = dp.stats()["services"]["tcp"]
            assert s["backends"]["b0"]["ejected"] and s["backends"]["b0"]["errors"] >= 1
            assert s["backends"]["b1"]["requests"] == 6 and s["errors"] == 0

    run(main())


def test_connection_limit_per_service() -> None:
    async def main() -> None:
        async with setup(lambda p: tcp_snap(p, max_connections=2)) as (dp, port):
            held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
            for r, w in held:
                w.write(b"a")
                assert await asyncio.wait_for(r.readexactly(1), 10) == b"a"
            r3, w3 = await asyncio.open_connection("127.0.0.1", port)
            with contextlib.suppress(ConnectionError):
                assert await read_all(r3) == b""  # closed at once
            w3.close()
            assert dp.stats()["services"]["tcp"]["rejected"] == 1
            for _, w in held:
                w.close()
            deadline = asyncio.get_running_loop().time() + 10
            while dp.stats()["services"]["tcp"]["connections"] > 0:  # the proxy saw them close
                assert asyncio.get_running_loop().time() < deadline, dp.stats()["services"]["tcp"]
                await asyncio.sleep(0.01)
            r4, w4 = await asyncio.open_connection("127.0.0.1", port)
            w4.write(b"b")
            assert await asyncio.wait_for(r4.readexactly(1), 10) == b"b"
            w4.close()

    run(main())


def test_bulk_echo_8mib_with_flow_control() -> None:
    async def main() -> None:
        async with setup(lambda p: tcp_snap(p)) as (dp, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            total = 8 * 1024 * 1024
            block = bytes(range(256)) * 256

            async def send() -> None:
                for _ in range(total // len(block)):
                    writer.write(block)
                    await writer.drain()
                writer.write_eof()

            sender = asyncio.create_task(send())
            data = await read_all(reader, timeout=30)
            await sender
            assert len(data) == total + len(b"EOF after %d bytes\n" % total)
            assert data[:len(block)] == block
            writer.close()

    run(main())


def test_all_backends_down_closes_client() -> None:
    async def main() -> None:
        dp = DataPlane("t")
        await dp.start(tcp_snap(free_port(), free_port()))
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", dp.bound_port("tcp"))
            with contextlib.suppress(ConnectionError):
                assert await read_all(reader) == b""
            writer.close()
            assert dp.stats()["services"]["tcp"]["errors"] == 1
        finally:
            await dp.stop()

    run(main())


def test_connect_timeout_tries_next_backend() -> None:
    """A backend whose accept queue is full drops SYNs: connect_timeout fires, the next one serves."""
    import socket

    stuck = socket.socket()
    stuck.bind(("127.0.0.1", 0))
    stuck.listen(0)  # never accepted: the queue fills, further SYNs are dropped
    fillers = []
    try:
        for _ in range(4):
            f = socket.socket()
            f.setblocking(False)
            f.connect_ex(stuck.getsockname())
            fillers.append(f)

        async def main() -> None:
            async with setup(lambda p: tcp_snap(stuck.getsockname()[1], p, connect_timeout=0.3)) as (dp, port):
                loop = asyncio.get_running_loop()
                t0 = loop.time()
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"abc")
                writer.write_eof()
                assert await read_all(reader) == b"abcEOF after 3 bytes\n"
                assert loop.time() - t0 >= 0.25  # the first attempt waited for its timeout
                writer.close()
                s = dp.stats()["services"]["tcp"]
                assert s["backends"]["b0"]["errors"] == 1 and s["backends"]["b0"]["ejected"]
                assert s["backends"]["b1"]["requests"] == 1 and s["errors"] == 0 and s["retries"] == 1

        run(main())
    finally:
        for f in fillers:
            f.close()
        stuck.close()


def test_out_of_fds_on_backend_connect_is_not_the_backends_fault(caplog: pytest.LogCaptureFixture) -> None:
    """EMFILE on the backend socket(): the client is closed, the backend keeps a clean record
    (not ejected, no error), an ERROR names the local limit, and it serves once fds are back."""
    import logging
    import socket

    from halb.dataplane import local_errors

    local_errors.local_log.reset()

    async def main() -> None:
        async with setup(lambda p: tcp_snap(p)) as (dp, port):
            with fds_exhausted() as fillers:
                os.close(fillers.pop())
                client = socket.socket()  # the one free fd
                client.setblocking(False)
                os.close(fillers.pop())  # one left for the proxy's accept, none for its connect
                client.connect_ex(("127.0.0.1", port))
                loop = asyncio.get_running_loop()
                data = await asyncio.wait_for(loop.sock_recv(client, 100), 10)
                assert data == b""  # closed by the proxy without a backend
                client.close()
            s = dp.stats()["services"]["tcp"]
            b = s["backends"]["b0"]
            assert not b["ejected"] and b["errors"] == 0 and b["ejections"] == 0, b
            assert s["errors"] == 1
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"ok")
            writer.write_eof()
            assert await read_all(reader) == b"okEOF after 2 bytes\n"
            writer.close()

    with caplog.at_level(logging.ERROR, logger="halb.dataplane.local_errors"):
        run(main())
    assert any("Too many open files" in r.getMessage() and "not counted against the backend" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]


def test_client_leaving_during_connect_leaves_no_backend_in_flight() -> None:
    """The client closes while the backend connect hangs: the attempt still ends by its
    timeout (and is charged to that backend), in_flight returns to 0, nothing is forwarded."""
    import socket

    stuck = socket.socket()
    stuck.bind(("127.0.0.1", 0))
    stuck.listen(0)
    fillers = []
    try:
        for _ in range(4):
            f = socket.socket()
            f.setblocking(False)
            f.connect_ex(stuck.getsockname())
            fillers.append(f)

        async def main() -> None:
            dp = DataPlane("t")
            await dp.start(tcp_snap(stuck.getsockname()[1], connect_timeout=0.5))
            try:
                port = dp.bound_port("tcp")
                loop = asyncio.get_running_loop()

                async def until(cond: object) -> None:
                    deadline = loop.time() + 5
                    while loop.time() < deadline and not cond():  # type: ignore[operator]
                        await asyncio.sleep(0.02)

                def b0() -> dict:  # type: ignore[type-arg]
                    return dp.stats()["services"]["tcp"]["backends"]["b0"]

                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"abc")
                await until(lambda: b0()["in_flight"] == 1)
                assert b0()["in_flight"] == 1 and b0()["errors"] == 0  # connecting
                writer.close()
                await until(lambda: b0()["errors"] == 1)
                b = b0()
                assert b["errors"] == 1 and b["in_flight"] == 0, b
                assert len(dp.conns) == 0
            finally:
                await dp.stop()

        run(main())
    finally:
        for f in fillers:
            f.close()
        stuck.close()


def test_idle_timeout_closes_a_silent_connection() -> None:
    async def main() -> None:
        async with setup(lambda p: tcp_snap(p, idle_timeout=0.5)) as (dp, port):
            loop = asyncio.get_running_loop()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"a")
            assert await asyncio.wait_for(reader.readexactly(1), 10) == b"a"
            t0 = loop.time()
            with contextlib.suppress(ConnectionError):
                assert await read_all(reader) == b""  # closed by the proxy, nothing more
            assert 0.4 <= loop.time() - t0 < 5
            writer.close()
            deadline = loop.time() + 5
            while dp.stats()["services"]["tcp"]["connections"] and loop.time() < deadline:
                await asyncio.sleep(0.01)
            s = dp.stats()["services"]["tcp"]
            assert s["connections"] == 0 and s["backends"]["b0"]["in_flight"] == 0, s

    run(main())


def test_backend_given_by_host_name() -> None:
    async def main() -> None:
        def snap(p: int) -> RoutingSnapshot:
            return snapshot(service("tcp", [BackendRoute(name="b0", host="localhost", port=p, weight=1)], mode="tcp"))

        echo = Origin("echo")
        dp = DataPlane("t")
        try:
            p = await echo.start(host="127.0.0.1", tcp=True)
            await dp.start(snap(p))
            reader, writer = await asyncio.open_connection("127.0.0.1", dp.bound_port("tcp"))
            writer.write(b"name")
            writer.write_eof()
            assert await read_all(reader) == b"nameEOF after 4 bytes\n"
            writer.close()
        finally:
            await dp.stop()
            echo.close()

    run(main())


def test_source_hash_keeps_a_client_address_on_one_backend() -> None:
    async def main() -> None:
        echoes = [Origin(f"e{i}") for i in range(3)]
        dp = DataPlane("t")
        try:
            ports = [await e.start(tcp=True) for e in echoes]
            bs = [BackendRoute(name=f"b{i}", host="127.0.0.1", port=p, weight=1) for i, p in enumerate(ports)]
            await dp.start(snapshot(service("tcp", bs, mode="tcp", algorithm="maglev", hash_key="source")))
            chosen: dict[str, set[str]] = {}
            for i in range(24):  # 12 source addresses, two connections each
                src = f"127.0.0.{2 + i % 12}"

                def counts() -> dict[str, int]:
                    return {n: b["requests"] for n, b in dp.stats()["services"]["tcp"]["backends"].items()}

                before = counts()
                reader, writer = await asyncio.open_connection("127.0.0.1", dp.bound_port("tcp"),
                                                               local_addr=(src, 0))
                writer.write_eof()
                assert await read_all(reader) == b"EOF after 0 bytes\n"
                writer.close()
                chosen.setdefault(src, set()).update(n for n, c in counts().items() if c != before[n])
            assert all(len(v) == 1 for v in chosen.values()), chosen  # an address sticks to its backend
            assert len(set().union(*chosen.values())) >= 2, chosen  # and the key is the address
        finally:
            await dp.stop()
            for e in echoes:
                e.close()

    run(main())


def test_stop_closes_connections_still_open() -> None:
    """A connection still open when the engine stops (after stop_grace) is closed: the client
    sees EOF, the backend sees EOF, nothing stays counted."""
    async def main() -> None:
        echo = Origin("echo")
        dp = DataPlane("t")
        port = await echo.start(tcp=True)
        await dp.start(tcp_snap(port, stop_grace=0.2))
        reader, writer = await asyncio.open_connection("127.0.0.1", dp.bound_port("tcp"))
        try:
            writer.write(b"held")
            assert await asyncio.wait_for(reader.readexactly(4), 10) == b"held"
            await asyncio.wait_for(dp.stop(), 10)
            with contextlib.suppress(ConnectionError):
                rest = await read_all(reader, timeout=5)
                assert rest in (b"", b"EOF after 4 bytes\n"), rest  # the backend's answer may still arrive
            assert len(dp.conns) == 0
        finally:
            writer.close()
            echo.close()

    run(main())


def test_out_of_fds_on_accept_pauses_accepting_then_serves(tcp_path: str, caplog: pytest.LogCaptureFixture) -> None:
    """EMFILE on accept (C relay; libuv has its own answer on the asyncio path): accepting
    pauses instead of spinning on a ready listener, an ERROR says so, and the waiting client
    is served once descriptors are free again."""
    if tcp_path != "c-relay":
        pytest.skip("accept is libuv's on the asyncio path")
    import logging
    import socket

    from halb.dataplane import tcp_relay

    tcp_relay.accept_log.reset()

    async def main() -> None:
        async with setup(lambda p: tcp_snap(p)) as (dp, port):
            client = socket.socket()  # made before the fds run out
            client.setblocking(False)
            loop = asyncio.get_running_loop()
            with fds_exhausted():
                client.connect_ex(("127.0.0.1", port))  # queued; the proxy cannot accept it
                await asyncio.sleep(0.3)
                assert dp.stats()["services"]["tcp"]["requests"] == 0
            await asyncio.wait_for(loop.sock_sendall(client, b"late"), 10)
            client.shutdown(socket.SHUT_WR)
            got = b""
            while True:
                chunk = await asyncio.wait_for(loop.sock_recv(client, 100), 10)
                if not chunk:
                    break
                got += chunk
            assert got == b"lateEOF after 4 bytes\n"
            client.close()

    with caplog.at_level(logging.ERROR, logger="halb.dataplane.tcp_relay"):
        run(main())
    assert any("cannot accept" in r.getMessage() and "pauses" in r.getMessage() for r in caplog.records), \
        [r.getMessage() for r in caplog.records]

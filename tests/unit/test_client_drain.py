"""Graceful client drain (halb/dataplane/client_drain.py) and bgp mode's drain sequence
(halb/announce/bgp_manager.py): real sockets, a real DataPlane and origin on 127.0.0.1.
BIRD is replaced by a recorder of set_sessions calls (the netns tests drive the real one)."""
from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from pathlib import Path
from typing import Any, AsyncIterator

import pytest

from halb.dataplane.client_drain import ClientDrain, accept_syns, refuse_syns
from halb.dataplane.engine import DataPlane
from halb.dataplane.origin import Origin
from halb.dataplane.testing import run, service, snapshot


@contextlib.asynccontextmanager
async def _serving(workers: int = 1) -> AsyncIterator[DataPlane]:
    """A DataPlane with service ``web`` in front of a real origin; both stopped on exit."""
    origin = Origin("o")
    oport = await origin.start()
    dp = DataPlane("t", workers=workers) if workers != 1 else DataPlane("t")
    try:
        await dp.start(snapshot(service("web", [("127.0.0.1", oport)])))
        yield dp
    finally:
        await dp.stop()
        origin.close()


def _listener() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    return s


def test_refused_syn_gets_no_answer_and_established_flows_keep_working() -> None:
    lst = _listener()
    port = lst.getsockname()[1]
    old = socket.create_connection(("127.0.0.1", port), timeout=2)
    srv, _ = lst.accept()
    try:
        refuse_syns(lst)
        with pytest.raises(socket.timeout):  # no RST: ConnectionRefusedError would be a reset
            socket.create_connection(("127.0.0.1", port), timeout=0.3)
        old.sendall(b"still here")
        assert srv.recv(64) == b"still here"
        accept_syns(lst)
        accept_syns(lst)  # nothing attached: fine
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    finally:
        for s in (old, srv, lst):
            s.close()


def test_counts_follow_the_connections_open_when_the_drain_began() -> None:
    a, b, c = object(), object(), object()
    d = ClientDrain()
    d.set_phase("closing", {a, b}, [])
    assert (d.counts({a, b, c}).connections, d.counts({a, b, c}).from_before) == (3, 2)
    assert d.counts({b, c}).from_before == 1
    assert d.counts({a, c}).from_before == 0  # a was pruned when it closed: it never counts again
    d.set_phase("refusing", {c}, [])  # a later phase keeps the set from the start
    assert d.counts({c}).from_before == 0
    with pytest.raises(ValueError, match="phase"):
        d.set_phase("later", set(), [])


async def _request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = int([ln for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length:")][0].split(b":")[1])
    await asyncio.wait_for(reader.readexactly(length), 5)
    return head.lower()


async def _connect_times_out(port: int) -> bool:
    try:
        await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 0.3)
    except asyncio.TimeoutError:
        return True
    return False


def test_dataplane_phases_close_keepalive_refuse_syns_and_undo() -> None:
    async def main() -> None:
        async with _serving() as dp:
            port = dp.listeners["web"].port
            idle = await asyncio.open_connection("127.0.0.1", port)
            assert b"connection: close" not in await _request(*idle)
            dp.set_client_drain("closing")
            counts = dp.client_drain_poll()  # closes the idle keep-alive connection
            assert await asyncio.wait_for(idle[0].read(), 5) == b""
            new = await asyncio.open_connection("127.0.0.1", port)  # still accepted while closing
            assert b"connection: close" in await _request(*new)
            await asyncio.sleep(0.05)
            counts = dp.client_drain_poll()
            assert (counts.phase, counts.connections, counts.from_before) == ("closing", 0, 0)
            dp.set_client_drain("refusing")
            assert await _connect_times_out(port)
            dp.set_client_drain("off")
            again = await asyncio.open_connection("127.0.0.1", port)
            assert b"connection: close" not in await _request(*again)
            again[1].close()

    run(main(), timeout=30)


class SessionsRecorder:
    """Stands in for BirdProcess: records when the BGP sessions were switched."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, bool]] = []

    def alive(self) -> bool:
        return True

    async def set_sessions(self, enabled: bool) -> None:
        self.calls.append((time.monotonic(), enabled))


def _announcement(dp: Any, grace: float, **extra: Any) -> Any:
    from halb.announce.bgp_manager import BgpAnnouncement
    from halb.announce.settings import parse_announce

    cfg = parse_announce({"mode": "bgp", "local_as": 65001, "local_address": "10.0.0.2",
                          "routers": [{"address": "10.0.0.1", "as": 65000}], "addresses": ["10.99.2.10"],
                          "drain_grace_s": grace, **extra}, Path("."))
    return BgpAnnouncement("n1", None, cfg, routes=dict, conf_dir=Path("/nonexistent"),
                           bird=SessionsRecorder(), addresses={}, dataplane=dp)


def test_drain_withdraws_only_after_the_nodes_own_flow_ended_and_undo_reverses() -> None:
    async def main() -> None:
        async with _serving() as dp:
            port = dp.listeners["web"].port
            ann = _announcement(dp, grace=5.0)
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET / HTTP/1.1\r\n")  # mid-head: not idle, so not closed
            await asyncio.sleep(0.05)
            drain = asyncio.ensure_future(ann.drain(True))
            await asyncio.sleep(0.3)
            assert ann.drain_phase == "closing" and ann.bird.calls == []  # still announced
            writer.write(b"Host: x\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert b"connection: close" in head.lower()
            answered = time.monotonic()
            body = await asyncio.wait_for(drain, 5)
            assert body["drain"]["phase"] == "withdrawn" and body["drain"]["connections_left"] == 0
            assert [on for _, on in ann.bird.calls] == [False] and ann.bird.calls[0][0] >= answered
            assert await _connect_times_out(port)  # SYNs still refused while drained
            events = [e.get("phase", e["event"]) for e in ann.transitions]
            assert events == ["drain", "closing", "refusing", "withdrawn"]
            body = await ann.drain(False)
            assert body["draining"] is False and [on for _, on in ann.bird.calls] == [False, True]
            again = await asyncio.open_connection("127.0.0.1", port)
            assert b"connection: close" not in await _request(*again)
            again[1].close()

    run(main(), timeout=30)


def test_drain_grace_bounds_the_wait() -> None:
    async def main() -> None:
        async with _serving() as dp:
            ann = _announcement(dp, grace=0.3)
            _, writer = await asyncio.open_connection("127.0.0.1", dp.listeners["web"].port)
            writer.write(b"GET / HTTP/1.1\r\n")  # never finishes its head
            await asyncio.sleep(0.05)
            t0 = time.monotonic()
            body = await asyncio.wait_for(ann.drain(True), 5)
            assert 0.3 <= time.monotonic() - t0 < 2.0
            assert (body["drain"]["connections_left"], body["drain"]["own_flows_left"]) == (1, 1)
            assert [on for _, on in ann.bird.calls] == [False]
            writer.close()

    run(main(), timeout=30)


def test_grace_zero_withdraws_at_once_and_leaves_the_clients_alone() -> None:
    async def main() -> None:
        async with _serving() as dp:
            port = dp.listeners["web"].port
            ann = _announcement(dp, grace=0.0)
            idle = await asyncio.open_connection("127.0.0.1", port)
            await _request(*idle)
            await asyncio.wait_for(ann.drain(True), 5)
            assert [on for _, on in ann.bird.calls] == [False] and dp.client_drain.phase == "off"
            assert b"connection: close" not in await _request(*idle)  # still a keep-alive connection
            idle[1].close()

    run(main(), timeout=30)


def test_drain_grace_is_validated_with_its_key() -> None:
    from halb.announce.settings import AnnounceConfigError, parse_announce

    base = {"mode": "bgp", "local_as": 65001, "local_address": "10.0.0.2",
            "routers": [{"address": "10.0.0.1", "as": 65000}], "addresses": ["10.99.2.10"]}
    assert parse_announce(base, Path(".")).bgp.drain_grace_s == 5.0
    with pytest.raises(AnnounceConfigError, match="drain_grace_s: must be 0-3600"):
        parse_announce({**base, "drain_grace_s": -1}, Path("."))


class _Conn:
    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


def test_idle_connections_from_before_close_at_once_new_ones_after_a_while() -> None:
    from halb.dataplane.client_drain import FRESH_IDLE_S

    old, new = _Conn(), _Conn()
    d = ClientDrain()
    d.set_phase("closing", {old}, [])
    d.close_idle([old, new], 100.0, lambda c: not c.closed)
    assert old.closed and not new.closed  # new: its request is probably on its way
    d.close_idle([new], 100.0 + FRESH_IDLE_S / 2, lambda c: not c.closed)
    assert not new.closed
    d.close_idle([new], 100.0 + FRESH_IDLE_S, lambda c: not c.closed)
    assert new.closed


def test_undo_during_a_drain_answers_both_calls_and_reverses_it() -> None:
    async def main() -> None:
        async with _serving() as dp:
            port = dp.listeners["web"].port
            ann = _announcement(dp, grace=5.0)
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET / HTTP/1.1\r\n")  # keeps the drain waiting
            await asyncio.sleep(0.05)
            drain = asyncio.ensure_future(ann.drain(True))
            await asyncio.sleep(0.2)
            undo = await asyncio.wait_for(ann.drain(False), 5)
            body = await asyncio.wait_for(drain, 5)
            assert undo["draining"] is False and body["draining"] is False
            assert ann.bird.calls == [] and dp.client_drain.phase == "off" and not dp.draining
            writer.close()

    run(main(), timeout=30)


def test_worker_processes_refuse_too_and_report_in_the_current_phase() -> None:
    """workers = 2: the node process and one worker share the port (SO_REUSEPORT); the
    worker gets the phase over its pipe and reports its counts; until it has reported in
    the current phase it counts as busy (a drain does not withdraw on a stale zero)."""
    async def main() -> None:
        async with _serving(workers=2) as dp:
            port = dp.listeners["web"].port
            dp.set_client_drain("refusing")
            assert dp.client_drain_poll().connections >= 1  # the worker has not answered yet
            deadline = time.monotonic() + 10
            while dp.client_drain_poll().connections and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert dp.client_drain_poll().connections == 0
            for _ in range(4):  # whichever socket of the group the kernel picks refuses
                assert await _connect_times_out(port)
            dp.set_client_drain("off")
            while dp.client_drain_poll().connections and time.monotonic() < deadline + 10:
                await asyncio.sleep(0.02)  # the worker has detached its filter
            for _ in range(4):
                c = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 0.9)
                assert b"200" in await _request(*c)
                c[1].close()

    run(main(), timeout=40)


def test_without_dropping_syns_the_drain_withdraws_once_the_old_flows_ended() -> None:
    async def main() -> None:
        async with _serving() as dp:
            port = dp.listeners["web"].port
            ann = _announcement(dp, grace=5.0, drain_drop_syns=False)
            idle = await asyncio.open_connection("127.0.0.1", port)
            await _request(*idle)
            body = await asyncio.wait_for(ann.drain(True), 5)
            assert body["drain"]["phase"] == "withdrawn" and [on for _, on in ann.bird.calls] == [False]
            assert await asyncio.wait_for(idle[0].read(), 5) == b""  # the old flow was ended first
            late = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 2)  # accepted
            assert b"connection: close" in await _request(*late)
            assert "refusing" not in [e.get("phase") for e in ann.transitions]

    run(main(), timeout=30)


def test_shutdown_lets_the_flows_end_while_the_address_is_still_refreshed() -> None:
    """stop(): the announce loop keeps running while the clients' flows end (it refreshes the
    address on lo, valid_lft 1 s); the sessions go down only after the flow ended."""
    async def main() -> None:
        async with _serving() as dp:
            ann = _announcement(dp, grace=5.0)
            ann.accepted["10.99.2.10"] = True  # as if announcing (no kernel address in a unit test)
            ann.bird.stop = lambda: None
            ann._addresses = {"10.99.2.10": _Released()}
            loop_ran = asyncio.Event()
            ann._task = asyncio.ensure_future(loop_ran.wait())  # stands for the running announce loop
            reader, writer = await asyncio.open_connection("127.0.0.1", dp.listeners["web"].port)
            writer.write(b"GET / HTTP/1.1\r\n")
            await asyncio.sleep(0.05)
            stop = asyncio.ensure_future(ann.stop())
            await asyncio.sleep(0.3)
            assert not ann._task.done() and ann.bird.calls == []  # loop alive, still announced
            writer.write(b"Host: x\r\n\r\n")
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            answered = time.monotonic()
            await asyncio.wait_for(stop, 5)
            assert [on for _, on in ann.bird.calls] == [False] and ann.bird.calls[0][0] >= answered
            assert ann._addresses["10.99.2.10"].released

    run(main(), timeout=30)


class _Released:
    def __init__(self) -> None:
        self.released = False

    async def arelease(self) -> None:
        self.released = True

    def close(self, release: bool = False) -> None:
        self.released = self.released or release

"""The pure and socket-level parts of the hot restart (halb/takeover.py,
halb/takeover_server.py, halb/live_settings.py); the whole flow under load is
tests/integration/test_takeover.py."""
from __future__ import annotations

import asyncio
import os
import socket
import stat
from dataclasses import replace
from pathlib import Path

import pytest

from halb.config import parse_config
from halb.dataplane.listeners import make_listen_socket
from halb.live_settings import plan_reload
from halb.takeover import (NodeLock, SocketKey, TakeoverClient, TakeoverError, decode, encode, key_of, listen_unix,
                           recv_msg, send_msg, socket_path, sockets_from_fds)
from halb.takeover_server import HandoverHooks, TakeoverServer


def test_socket_key_round_trip_and_malformed() -> None:
    k = SocketKey("tcp", "127.0.0.1", 8080)
    assert SocketKey.from_wire(k.wire()) == k
    for bad in (["tcp", "h"], ["tcp", "h", "80"], ["tcp", "h", True], "tcp h 80", [1, "h", 80]):
        with pytest.raises(TakeoverError):
            SocketKey.from_wire(bad)


def test_frames_refuse_garbage() -> None:
    assert decode(encode({"op": "hello"})[4:]) == {"op": "hello"}
    with pytest.raises(TakeoverError):
        decode(b"[1, 2]")
    with pytest.raises(TakeoverError):
        decode(b"\xff")


def test_a_passed_listener_keeps_its_queued_connection() -> None:
    """The reason for SCM_RIGHTS: closing the sender's copy does not reset a connection
    waiting in the accept queue, the receiver accepts it."""
    lst = make_listen_socket("127.0.0.1", 0)
    client = socket.create_connection(lst.getsockname()[:2], timeout=2)  # queued, never accepted here
    a, b = socket.socketpair()
    try:
        send_msg(a, {"sockets": [key_of("tcp", lst).wire()]}, [lst.fileno()])
        lst.close()  # the old process lets go
        msg, fds = recv_msg(b)
        got = sockets_from_fds([SocketKey.from_wire(k) for k in msg["sockets"]], fds)
        port = client.getpeername()[1]
        sock = got.take("tcp", "127.0.0.1", port)
        assert sock is not None
        sock.setblocking(True)
        sock.settimeout(2)
        conn, _ = sock.accept()
        client.sendall(b"ping")
        assert conn.recv(4) == b"ping"
        conn.close()
        sock.close()
    finally:
        client.close()
        a.close()
        b.close()


def test_inherited_sockets_match_kind_host_port_and_report_leftovers() -> None:
    s1, s2 = make_listen_socket("127.0.0.1", 0), make_listen_socket("127.0.0.1", 0)
    k1, k2 = key_of("tcp", s1), key_of("api", s2)
    got = sockets_from_fds([k1, k2], [os.dup(s1.fileno()), os.dup(s2.fileno())])
    s1.close()
    s2.close()
    assert got.take("api", "127.0.0.1", k1.port) is None  # kind matters
    assert got.take("tcp", "127.0.0.1", 0) is None  # "any port" is never a match
    taken = got.take("tcp", "127.0.0.1", k1.port)
    assert taken is not None and taken.getblocking() is False
    taken.close()
    assert got.close_rest() == [k2]
    with pytest.raises(TakeoverError, match="described 1 sockets but sent 0"):
        sockets_from_fds([k1], [])


def test_recv_at_eof_is_a_clear_error() -> None:
    a, b = socket.socketpair()
    a.close()
    with pytest.raises(TakeoverError, match="closed the connection"):
        recv_msg(b)
    b.close()


def test_node_lock_is_exclusive(tmp_path: Path) -> None:
    first, second = NodeLock(tmp_path), NodeLock(tmp_path)
    assert first.try_acquire()
    assert not second.try_acquire()
    assert second.holder() == str(os.getpid())
    assert stat.S_IMODE(os.stat(first.path).st_mode) == 0o600
    first.release()
    assert second.try_acquire()
    second.release()


def test_unix_socket_is_owner_only(tmp_path: Path) -> None:
    s = listen_unix(socket_path(tmp_path))
    try:
        assert stat.S_IMODE(os.stat(socket_path(tmp_path)).st_mode) == 0o600
    finally:
        s.close()


class Hooks:
    """The node's side, recorded: the server is tested against real unix sockets."""

    def __init__(self) -> None:
        self.owned = make_listen_socket("127.0.0.1", 0)
        self.released = 0
        self.handed: list[int] = []
        self.failed: list[str] = []

    def hooks(self, node_id: str = "n1") -> HandoverHooks:
        async def release() -> None:
            self.released += 1

        async def sockets() -> list:
            return [(key_of("tcp", self.owned), self.owned)]

        return HandoverHooks(node_id=node_id, sockets=sockets,
                             release=release, handed_over=self.handed.append,
                             failed_after_release=self.failed.append, can_hand_over=lambda: None)


def _run_server(tmp_path: Path, h: Hooks, scenario) -> None:
    async def main() -> None:
        server = TakeoverServer(tmp_path, h.hooks())
        server.start()
        try:
            await scenario(server)
        finally:
            await server.stop()

    try:
        asyncio.run(main())
    finally:
        h.owned.close()


def test_server_full_hand_over(tmp_path: Path) -> None:
    h = Hooks()

    async def scenario(server: TakeoverServer) -> None:
        client = TakeoverClient(server.path, "n1", timeout=5)
        socks = await asyncio.to_thread(client.hello)
        assert list(socks.socks) == [key_of("tcp", h.owned)]
        await asyncio.to_thread(client.release)
        await asyncio.to_thread(client.ready)
        client.close()
        socks.close_rest()

    _run_server(tmp_path, h, scenario)
    assert h.released == 1 and h.handed == [os.getpid()] and h.failed == []


def test_server_refuses_a_second_takeover_and_the_wrong_node(tmp_path: Path) -> None:
    h = Hooks()

    async def scenario(server: TakeoverServer) -> None:
        first = TakeoverClient(server.path, "n1", timeout=5)
        socks = await asyncio.to_thread(first.hello)
        second = TakeoverClient(server.path, "n1", timeout=5)
        with pytest.raises(TakeoverError, match=f"by pid {os.getpid()} is already in progress"):
            await asyncio.to_thread(second.hello)
        second.close()
        wrong = TakeoverClient(server.path, "n2", timeout=5)
        with pytest.raises(TakeoverError, match="this is node 'n1'"):
            await asyncio.to_thread(wrong.hello)
        wrong.close()
        first.close()  # abandoned before release: nothing given up
        socks.close_rest()
        for _ in range(100):
            if server.busy_pid is None:
                break
            await asyncio.sleep(0.01)
        assert server.busy_pid is None  # the next takeover may come

    _run_server(tmp_path, h, scenario)
    assert h.released == 0 and h.handed == [] and h.failed == []


def test_server_reports_a_successor_that_died_after_release(tmp_path: Path) -> None:
    h = Hooks()

    async def scenario(server: TakeoverServer) -> None:
        client = TakeoverClient(server.path, "n1", timeout=5)
        socks = await asyncio.to_thread(client.hello)
        await asyncio.to_thread(client.release)
        client.close()  # dies before ready
        socks.close_rest()
        for _ in range(200):
            if h.failed:
                break
            await asyncio.sleep(0.01)

    _run_server(tmp_path, h, scenario)
    assert h.released == 1 and h.handed == [] and len(h.failed) == 1 and "failed after taking Raft" in h.failed[0]


def test_no_running_node_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TakeoverError, match="no running node to take over"):
        TakeoverClient(socket_path(tmp_path), "n1", timeout=1).hello()


BASE = {"node_id": "n1", "token_file": "token", "raft": {"bind": "127.0.0.1:7001", "peers": ["127.0.0.1:7002"]},
        "api": {"bind": "127.0.0.1:7000"},
        "services": [{"name": "web", "listen": "127.0.0.1:8080", "backends": [{"name": "a", "address": "127.0.0.1:9001"}]}]}


def _cfg(**changes: object) -> object:
    import copy

    raw = copy.deepcopy(BASE)
    for key, value in changes.items():
        table, _, sub = key.partition("__")
        if sub:
            raw.setdefault(table, {})[sub] = value
        else:
            raw[key] = value
    return parse_config(Path("/etc/halb/n1.toml"), raw)


def test_reload_plan_sorts_changes() -> None:
    cur = _cfg()
    assert not plan_reload(cur, _cfg()).changed
    plan = plan_reload(cur, _cfg(log_level="DEBUG", api__write_timeout=5.0, raft__election_timeout_max=0.9,
                                 dataplane__workers=2, node_id="n9",
                                 services=[{"name": "web", "listen": "127.0.0.1:8081", "backends": []}]))
    assert plan.live == {"log_level": ("INFO", "DEBUG"), "api.write_timeout": (3.0, 5.0)}
    assert plan.needs_takeover == ["dataplane.workers", "raft.election_timeout_max"]
    assert plan.seed_only == ["services"]
    assert "node_id" in plan.identity
    text = plan.summary()
    assert "applied: api.write_timeout 3.0 -> 5.0, log_level 'INFO' -> 'DEBUG'" in text
    assert "need `halb node reload` (takeover): dataplane.workers, raft.election_timeout_max" in text
    assert "ignored (seed only; use the API): services" in text and "cannot change in place" in text
    assert "cannot change" not in replace(plan, identity=[]).summary()
    on = plan_reload(cur, _cfg(dataplane__access_log="/var/log/halb/access.log", dataplane__access_log_buffer=65536))
    assert on.live == {"dataplane.access_log": ("", "/var/log/halb/access.log"),
                       "dataplane.access_log_buffer": (4 * 1024 * 1024, 65536)} and not on.needs_takeover

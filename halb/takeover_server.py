"""The running node's side of a takeover (protocol in halb/takeover.py): listens on
``DATA_DIR/takeover.sock``, hands its listening sockets to one new process at a time and
gives up Raft only when that process asks for it.

The node plugs in what it owns through `HandoverHooks`, so this module knows nothing of
Raft, aiohttp or the data plane.
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable

from halb.takeover import (PROTOCOL, SocketKey, TakeoverError, listen_unix, peer_allowed, recv_msg, send_msg,
                           socket_path)

log = logging.getLogger(__name__)

HELLO_TIMEOUT = 5.0  # the new process says hello this fast after connecting
RELEASE_TIMEOUT = 30.0  # ... and asks for Raft within this long after receiving the sockets
READY_TIMEOUT = 60.0  # ... and is serving within this long after Raft was released


@dataclass
class HandoverHooks:
    node_id: str
    # every listener the node owns; slot > 0: copies received from its data-plane workers,
    # closed here once sent
    sockets: Callable[[], Awaitable[list[tuple[SocketKey, socket.socket]]]]
    release: Callable[[], Awaitable[None]]  # leadership away, Raft stopped, lock released
    handed_over: Callable[[int], None]  # the new process serves: stop accepting, drain, exit 0
    failed_after_release: Callable[[str], None]  # no Raft here and no successor: exit 1
    can_hand_over: Callable[[], str | None]  # None, or why not now (e.g. stopping)
    systemd: Callable[[], dict[str, object]] = dict  # NOTIFY_SOCKET, watchdog interval (sd_notify)


class TakeoverServer:
    def __init__(self, data_dir: Path, hooks: HandoverHooks) -> None:
        self.path = socket_path(data_dir)
        self.hooks = hooks
        self.sock: socket.socket | None = None
        self.busy_pid: int | None = None  # the takeover in progress
        self.released = False
        self._task: asyncio.Task[None] | None = None
        self._conns: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        self.sock = listen_unix(self.path)
        self._task = asyncio.get_running_loop().create_task(self._accept(), name="takeover-accept")
        log.info("takeover socket %s", self.path)

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        assert self.sock is not None
        while True:
            conn, _ = await loop.sock_accept(self.sock)
            t = loop.create_task(self._serve(conn))
            self._conns.add(t)
            t.add_done_callback(self._conns.discard)

    async def _serve(self, conn: socket.socket) -> None:
        conn.setblocking(True)
        conn.settimeout(HELLO_TIMEOUT)
        try:
            await self._handshake(conn)
        except (TakeoverError, OSError) as exc:
            log.info("takeover connection ended: %s", exc)
        finally:
            conn.close()

    def _refusal(self, hello: dict[str, object]) -> str | None:
        if hello.get("op") != "hello" or hello.get("protocol") != PROTOCOL:
            return f"expected hello with protocol {PROTOCOL}, got {hello.get('op')!r} {hello.get('protocol')!r}"
        if hello.get("node_id") != self.hooks.node_id:
            return (f"this is node {self.hooks.node_id!r}, the new process is configured as "
                    f"{hello.get('node_id')!r}")
        if self.busy_pid is not None:
            return f"a takeover by pid {self.busy_pid} is already in progress"
        return self.hooks.can_hand_over()

    async def _handshake(self, conn: socket.socket) -> None:
        if not peer_allowed(conn):
            send_msg(conn, {"ok": False, "error": "peer runs as another user"})
            return
        hello, fds = await asyncio.to_thread(recv_msg, conn)
        for fd in fds:
            os.close(fd)
        refusal = self._refusal(hello)
        pid = int(hello.get("pid", 0) or 0)
        if refusal is not None:
            log.warning("takeover by pid %s refused: %s", pid, refusal)
            send_msg(conn, {"ok": False, "error": refusal})
            return
        self.busy_pid = pid
        try:
            await self._hand_over(conn, pid)
        finally:
            self.busy_pid = None if not self.released else self.busy_pid

    async def _hand_over(self, conn: socket.socket, pid: int) -> None:
        owned = await self.hooks.sockets()
        log.info("takeover by pid %s: handing over %d listening sockets (%s)", pid, len(owned),
                 ", ".join(str(k) for k, _ in owned))
        try:
            send_msg(conn, {"ok": True, "pid": os.getpid(), "sockets": [k.wire() for k, _ in owned],
                            "systemd": self.hooks.systemd()},
                     [s.fileno() for _, s in owned])
        finally:
            for k, s in owned:
                if k.slot:
                    s.close()
        conn.settimeout(RELEASE_TIMEOUT)
        try:
            msg, fds = await asyncio.to_thread(recv_msg, conn)
        except (TakeoverError, OSError) as exc:
            log.warning("takeover by pid %s abandoned before the Raft hand-over (%s); this process keeps serving",
                        pid, exc)
            return
        for fd in fds:
            os.close(fd)
        if msg.get("op") != "release":
            send_msg(conn, {"ok": False, "error": f"expected release, got {msg.get('op')!r}"})
            return
        why = self.hooks.can_hand_over()
        if why is not None:
            send_msg(conn, {"ok": False, "error": why})
            return
        self.released = True
        await self.hooks.release()
        send_msg(conn, {"ok": True, "op": "released"})
        conn.settimeout(READY_TIMEOUT)
        try:
            msg, fds = await asyncio.to_thread(recv_msg, conn)
            for fd in fds:
                os.close(fd)
            if msg.get("op") != "ready":
                raise TakeoverError(f"expected ready, got {msg.get('op')!r}")
        except (TakeoverError, OSError) as exc:
            self.hooks.failed_after_release(f"the new process (pid {pid}) failed after taking Raft over: {exc}")
            return
        send_msg(conn, {"ok": True})
        log.info("taken over by pid %s", pid)
        self.hooks.handed_over(pid)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for t in list(self._conns):
            t.cancel()
        if self.sock is not None:
            self.sock.close()
            self.sock = None
            if not self.released:  # after a hand-over the path names the new process's socket
                try:
                    self.path.unlink()
                except OSError:
                    pass

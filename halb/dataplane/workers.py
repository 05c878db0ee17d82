"""Extra worker processes for multi-core proxying (DataPlane(workers=N>1)).

Workers are *spawned* (a fresh interpreter, `python -m halb.dataplane.workers`), not
forked: the node process runs threads (Raft, health) and a live event loop, and forking
those is unsafe. Each worker binds the same ports with SO_REUSEPORT (the kernel spreads
new connections), runs its own DataPlane on uvloop, and talks to the parent over a
socketpair with length-prefixed msgpack frames: snapshots down; stats (every 0.5 s) and
ejection events up. A worker exits when the pipe closes or the parent dies
(PR_SET_PDEATHSIG), so it never outlives the node.

Hot restart (halb/takeover.py): each worker's listening sockets have their own accept
queues, so they are handed over too. A second socketpair per worker carries them (SCM_RIGHTS
needs sendmsg/recvmsg, which the asyncio stream of the first cannot do): the parent asks with
a "fds" frame, the worker answers there. A new node's worker N is spawned with the old worker
N's sockets (``HALB_INHERITED_SOCKETS``) and binds only what it did not get.
"""
from __future__ import annotations

import collections
import asyncio
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import msgpack

from halb.aio import run
from halb.dataplane.client_drain import DrainCounts
from halb.dataplane.snapshot import RoutingSnapshot

log = logging.getLogger(__name__)
STATS_INTERVAL = 0.5
DRAIN_REPORT_INTERVAL = 0.05  # while a client drain waits for the workers' connections to end
_LEN = struct.Struct("!I")


def frame(msg: dict[str, Any]) -> bytes:
    data = msgpack.packb(msg, use_bin_type=True)
    return _LEN.pack(len(data)) + data


async def read_frame(reader: asyncio.StreamReader) -> dict[str, Any] | None:
    try:
        head = await reader.readexactly(4)
        data = await reader.readexactly(_LEN.unpack(head)[0])
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    return msgpack.unpackb(data, raw=False)


@dataclass(eq=False)
class Worker:
    proc: subprocess.Popen[bytes]
    writer: asyncio.StreamWriter
    reader: asyncio.StreamReader
    index: int = 1  # slot on the node (the node process is 0): its share of the limits
    stats: dict[str, Any] | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    fdchan: socket.socket | None = None  # listening sockets come up here (hot restart)
    client_drain: DrainCounts = field(default_factory=DrainCounts)  # its last report (client_drain.py)


class WorkerPool:
    """Parent side: spawn, feed snapshots, collect stats, stop."""

    def __init__(self, engine: Any, count: int) -> None:
        self.engine = engine
        self.count = count
        self.workers: list[Worker] = []
        self.stopping = False
        self.respawns = 0
        self.deaths: collections.deque[float] = collections.deque(maxlen=64)  # monotonic times (selfcheck.py)

    async def _spawn(self, snapshot: RoutingSnapshot) -> Worker:
        used = {w.index for w in self.workers}
        index = next(i for i in range(1, self.count + 2) if i not in used)  # a respawn takes the dead one's slot
        from halb import takeover

        parent, child = socket.socketpair()
        fd_parent, fd_child = socket.socketpair()
        inherited = takeover.inherited.take_slot(index)  # the replaced node's worker `index`
        env = dict(os.environ)
        if inherited:
            env["HALB_INHERITED_SOCKETS"] = takeover.InheritedSockets.env_value(inherited)
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "halb.dataplane.workers", str(child.fileno()), self.engine.node_id,
                 "1" if self.engine.loop_uvloop else "0", ",".join(self.engine.shared.hosts),
                 f"{index}/{self.engine.workers}", str(fd_child.fileno())],
                pass_fds=[child.fileno(), fd_child.fileno(), *(s.fileno() for s in inherited.values())],
                stdin=subprocess.DEVNULL, env=env)
        finally:
            child.close()
            fd_child.close()
            for s in inherited.values():
                s.close()
        fd_parent.settimeout(5.0)
        reader, writer = await asyncio.open_connection(sock=parent)
        w = Worker(proc=proc, writer=writer, reader=reader, index=index, fdchan=fd_parent)
        w.task = asyncio.get_running_loop().create_task(self._read(w))
        self.workers.append(w)
        writer.write(frame({"t": "snap", "d": snapshot.to_wire()}))
        if self.engine.capacity_share or self.engine.capacity_share_default != 1.0:  # a respawn: today's shares
            writer.write(frame({"t": "share", "d": self.engine.capacity_share, "x": self.engine.capacity_share_default}))
        al = self.engine.access_log
        if al is not None:
            writer.write(frame({"t": "alog", "p": al.path, "b": al.buffer_bytes}))
        if self.engine.client_drain.phase != "off":  # a respawn during a drain drains too
            writer.write(frame({"t": "cdrain", "p": self.engine.client_drain.phase}))
        return w

    async def start(self, snapshot: RoutingSnapshot) -> None:
        for _ in range(self.count):
            await self._spawn(snapshot)
        for w in self.workers:
            try:
                await asyncio.wait_for(w.ready.wait(), 15)
            except asyncio.TimeoutError:
                log.error("data plane worker %s did not start", w.proc.pid)

    async def _respawn(self, dead: Worker) -> None:
        """A worker died (crash, OOM kill): its socket left the SO_REUSEPORT group, so the
        others already take its new connections; restore the capacity after a short pause."""
        await asyncio.sleep(min(0.5 * (2 ** min(self.respawns, 5)), 10.0))
        for _ in range(100):  # reap without blocking the loop
            if dead.proc.poll() is not None:
                break
            await asyncio.sleep(0.05)
        else:
            dead.proc.kill()
            dead.proc.wait()
        if self.stopping:
            return
        self.respawns += 1
        if dead in self.workers:
            self.workers.remove(dead)
        if dead.fdchan is not None:
            dead.fdchan.close()
        w = await self._spawn(self.engine._worker_snapshot())
        log.warning("data plane worker %s died (exit %s); started %s", dead.proc.pid, dead.proc.returncode, w.proc.pid)

    async def _read(self, w: Worker) -> None:
        while True:
            msg = await read_frame(w.reader)
            if msg is None:
                w.ready.set()
                if not self.stopping:
                    self.deaths.append(time.monotonic())
                    asyncio.get_running_loop().create_task(self._respawn(w))
                return
            t = msg.get("t")
            if t == "stats":
                w.stats = msg["d"]
                w.client_drain = DrainCounts.from_wire(msg.get("cd"))
                w.ready.set()
            elif t == "ej":
                self.engine._hook(msg["s"], msg["b"], msg["e"], msg["r"])

    def send_snapshot(self, snapshot: RoutingSnapshot) -> None:
        data = frame({"t": "snap", "d": snapshot.to_wire()})
        for w in self.workers:
            if not w.writer.is_closing():
                w.writer.write(data)

    def send_shares(self, shares: dict[str, float], default: float) -> None:
        data = frame({"t": "share", "d": shares, "x": default})
        for w in self.workers:
            if not w.writer.is_closing():
                w.writer.write(data)

    def send_access_log(self, path: str, buffer_bytes: int) -> None:
        """Access log on/off/moved, or reopen (SIGHUP): each worker writes its own lines."""
        data = frame({"t": "alog", "p": path, "b": buffer_bytes})
        for w in self.workers:
            if not w.writer.is_closing():
                w.writer.write(data)

    def send_client_drain(self, phase: str) -> None:
        """Client drain phase (client_drain.py) for every worker; each reports its counts."""
        data = frame({"t": "cdrain", "p": phase})
        for w in self.workers:
            if not w.writer.is_closing():
                w.writer.write(data)

    def client_drain_counts(self) -> list[DrainCounts]:
        return [w.client_drain for w in self.workers if w.proc.poll() is None]

    async def listening_sockets(self) -> list[tuple[int, Any, socket.socket]]:
        """(worker slot, SocketKey, a copy of the socket) of every live worker, for a hot
        restart; the caller closes the copies once they are sent."""
        from halb.takeover import SocketKey, TakeoverError, recv_msg, sockets_from_fds

        out: list[tuple[int, Any, socket.socket]] = []
        for w in list(self.workers):
            if w.proc.poll() is not None or w.fdchan is None or w.writer.is_closing():
                continue
            w.writer.write(frame({"t": "fds"}))
            try:
                msg, fds = await asyncio.to_thread(recv_msg, w.fdchan)
                got = sockets_from_fds([SocketKey.from_wire(k) for k in msg.get("sockets", [])], fds)
            except (TakeoverError, OSError) as exc:
                log.warning("data plane worker %s did not hand its sockets over: %s", w.proc.pid, exc)
                continue
            out += [(w.index, k, s) for k, s in got.socks.items()]
        return out

    def worker_stats(self) -> list[dict[str, Any]]:
        return [w.stats for w in self.workers if w.stats is not None and w.proc.poll() is None]

    async def stop(self, timeout: float = 8.0) -> None:
        self.stopping = True
        for w in self.workers:
            try:
                if not w.writer.is_closing():
                    w.writer.write(frame({"t": "stop"}))
            except Exception:
                pass
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        for w in self.workers:
            while w.proc.poll() is None and loop.time() < deadline:
                await asyncio.sleep(0.05)
            if w.proc.poll() is None:
                w.proc.kill()
                w.proc.wait()
            w.writer.close()
            if w.fdchan is not None:
                w.fdchan.close()
            if w.task is not None:
                w.task.cancel()
        self.workers.clear()


# ---------------------------------------------------------------------- child side
def _die_with_parent() -> None:
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


async def _child(fd: int, node_id: str, shared_hosts: list[str], slot: tuple[int, int] = (0, 1),
                 fdchan_fd: int = -1) -> None:
    from halb import takeover
    from halb.dataplane.access_log import DEFAULT_BUFFER
    from halb.dataplane.engine import DataPlane

    fdchan = socket.socket(fileno=fdchan_fd) if fdchan_fd >= 0 else None
    sock = socket.socket(fileno=fd)
    reader, writer = await asyncio.open_connection(sock=sock)
    dp = DataPlane(node_id, workers=1, shared_hosts=shared_hosts, slot=slot)
    dp.on_ejection.append(lambda s, b, e, r: writer.write(frame({"t": "ej", "s": s, "b": b, "e": e, "r": r})))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, lambda: None)  # the parent decides

    async def report() -> None:
        while True:
            cd = dp.client_drain_poll()  # while draining: closes idle keep-alive connections
            writer.write(frame({"t": "stats", "d": dp.local_stats(), "cd": cd.wire()}))
            await asyncio.sleep(STATS_INTERVAL if cd.phase == "off" else DRAIN_REPORT_INTERVAL)

    async def commands() -> None:
        started = False
        while True:
            msg = await read_frame(reader)
            if msg is None or msg.get("t") == "stop":
                stop.set()
                return
            if msg.get("t") == "snap":
                snap = RoutingSnapshot.from_wire(msg["d"])
                if not started:
                    await dp.start(snap)
                    started = True
                    left = takeover.inherited.close_rest()  # a service gone since the hand-over
                    if left:
                        log.warning("closed inherited sockets no service listens on: %s", ", ".join(map(str, left)))
                    from halb.dataplane.run import tune_process

                    tune_process()
                    loop.create_task(report())
                else:
                    dp.update(snap)
            elif msg.get("t") == "fds" and fdchan is not None:  # hot restart: hand the listeners over
                socks = dp.listening_sockets()
                keys = [takeover.key_of("tcp", s).wire() for s in socks]
                try:
                    await asyncio.to_thread(takeover.send_msg, fdchan, {"sockets": keys}, [s.fileno() for s in socks])
                except OSError as exc:
                    log.warning("could not hand the listening sockets over: %s", exc)
            elif msg.get("t") == "cdrain" and started:
                dp.set_client_drain(str(msg.get("p") or "off"))
                writer.write(frame({"t": "stats", "d": dp.local_stats(), "cd": dp.client_drain_poll().wire()}))
            elif msg.get("t") == "alog":
                dp.set_access_log(str(msg.get("p") or ""), int(msg.get("b") or 0) or DEFAULT_BUFFER)
            elif msg.get("t") == "share" and started:
                dp.set_capacity_shares(msg.get("d") or {}, float(msg.get("x", 1.0)))

    cmd = loop.create_task(commands())
    await stop.wait()
    cmd.cancel()
    await dp.stop()
    writer.close()


def main(argv: list[str]) -> None:
    fd, node_id, use_uvloop = int(argv[0]), argv[1], argv[2] == "1"
    shared_hosts = [h for h in (argv[3] if len(argv) > 3 else "").split(",") if h]
    index, _, count = (argv[4] if len(argv) > 4 else "0/1").partition("/")
    slot = (int(index), int(count))
    fdchan_fd = int(argv[5]) if len(argv) > 5 else -1
    inherited = os.environ.pop("HALB_INHERITED_SOCKETS", "")
    if inherited:
        from halb import takeover

        takeover.inherited.load_env(inherited)
    _die_with_parent()
    logging.basicConfig(level=os.environ.get("HALB_LOG", "WARNING"))
    from halb.dataplane.fdlimit import raise_nofile

    raise_nofile(f"data plane worker {os.getpid()}")
    run(_child(fd, node_id, shared_hosts, slot, fdchan_fd), use_uvloop=use_uvloop)


if __name__ == "__main__":
    main(sys.argv[1:])

"""Extra worker processes for multi-core proxying (DataPlane(workers=N>1)).

Workers are *spawned* (a fresh interpreter, `python -m halb.dataplane.workers`), not
forked: the node process runs threads (Raft, health) and a live event loop, and forking
those is unsafe. Each worker binds the same ports with SO_REUSEPORT (the kernel spreads
new connections), runs its own DataPlane on uvloop, and talks to the parent over a
socketpair with length-prefixed msgpack frames: snapshots down; stats (every 0.5 s) and
ejection events up. A worker exits when the pipe closes or the parent dies
(PR_SET_PDEATHSIG), so it never outlives the node.
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
from halb.dataplane.snapshot import RoutingSnapshot

log = logging.getLogger(__name__)
STATS_INTERVAL = 0.5
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
        parent, child = socket.socketpair()
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "halb.dataplane.workers", str(child.fileno()), self.engine.node_id,
                 "1" if self.engine.loop_uvloop else "0", ",".join(self.engine.shared.hosts),
                 f"{index}/{self.engine.workers}"],
                pass_fds=[child.fileno()], stdin=subprocess.DEVNULL)
        finally:
            child.close()
        reader, writer = await asyncio.open_connection(sock=parent)
        w = Worker(proc=proc, writer=writer, reader=reader, index=index)
        w.task = asyncio.get_running_loop().create_task(self._read(w))
        self.workers.append(w)
        writer.write(frame({"t": "snap", "d": snapshot.to_wire()}))
        if self.engine.capacity_share or self.engine.capacity_share_default != 1.0:  # a respawn: today's shares
            writer.write(frame({"t": "share", "d": self.engine.capacity_share, "x": self.engine.capacity_share_default}))
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


async def _child(fd: int, node_id: str, shared_hosts: list[str], slot: tuple[int, int] = (0, 1)) -> None:
    from halb.dataplane.engine import DataPlane

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
            writer.write(frame({"t": "stats", "d": dp.local_stats()}))
            await asyncio.sleep(STATS_INTERVAL)

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
                    from halb.dataplane.run import tune_process

                    tune_process()
                    loop.create_task(report())
                else:
                    dp.update(snap)
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
    _die_with_parent()
    logging.basicConfig(level=os.environ.get("HALB_LOG", "WARNING"))
    from halb.dataplane.fdlimit import raise_nofile

    raise_nofile(f"data plane worker {os.getpid()}")
    run(_child(fd, node_id, shared_hosts, slot), use_uvloop=use_uvloop)


if __name__ == "__main__":
    main(sys.argv[1:])

"""Random TCP traffic through a DataPlane in TCP mode, with every byte checked end to end.

Shared by tests/integration/test_tcprelay_stress.py (both TCP paths, small relay buffers)
and tests/fuzz_tcprelay.py (the C relay built with ASan + UBSan). Each client picks one
behaviour at random:

  normal       random payload in random chunks, reading while it writes (so both
               directions are busy and flow control engages), then a half-close; it must
               get back exactly its bytes plus the backend's "END n" trailer, then EOF.
  early        the whole payload and the half-close are sent at once (most of it reaches
               the proxy before the backend connection exists: the early-bytes path).
  client-rst   sends part of its payload and resets (SO_LINGER 0): the proxy must close the
               backend side too.
  backend-rst  the backend resets after K bytes: the client gets a prefix of its echo and
               then an error or EOF, never a hang.

At the end every connection must be gone from the proxy (stats `connections` 0, every
backend's in_flight 0).
"""
from __future__ import annotations

import asyncio
import random
import socket
import struct
from dataclasses import dataclass, field

from halb.dataplane.engine import DataPlane
from halb.dataplane.snapshot import BackendRoute
from halb.dataplane.testing import service, snapshot

BEHAVIOURS = ("normal", "early", "client-rst", "backend-rst")


class EchoBackend(asyncio.Protocol):
    """Echoes everything; on EOF writes b"END <n>\\n" and closes. A first line
    b"rst K\\n" makes it reset after K bytes (the line included)."""

    def __init__(self) -> None:
        self.n = 0
        self.head = b""
        self.reset_at: int | None = None
        self.paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.reset_at is None and len(self.head) < 32:
            self.head += data[:32]
            if self.head.startswith(b"rst ") and b"\n" in self.head:
                self.reset_at = int(self.head[4:self.head.index(b"\n")])
        self.n += len(data)
        self.t.write(data)
        if self.reset_at is not None and self.n >= self.reset_at:
            sock = self.t.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.t.abort()

    def pause_writing(self) -> None:  # echo no faster than the proxy takes it back
        self.t.pause_reading()

    def resume_writing(self) -> None:
        self.t.resume_reading()

    def eof_received(self) -> bool:
        self.t.write(b"END %d\n" % self.n)
        self.t.close()
        return True


@dataclass
class Outcome:
    counts: dict[str, int] = field(default_factory=dict)
    bytes_checked: int = 0
    failures: list[str] = field(default_factory=list)


async def _read_until_eof(reader: asyncio.StreamReader, timeout: float, slow: bool = False) -> bytes:
    out = bytearray()
    while True:
        chunk = await asyncio.wait_for(reader.read(4096 if slow else 65536), timeout)
        if not chunk:
            return bytes(out)
        out += chunk
        if slow:
            await asyncio.sleep(0.0005)


async def _client(port: int, rng: random.Random, behaviour: str, max_payload: int, slow_share: float,
                  out: Outcome, timeout: float) -> None:
    # Some clients read slowly through a small receive buffer: the proxy's sends to them fall
    # short and block, so its buffers fill and it must stop reading the backend.
    slow = rng.random() < slow_share
    size = rng.randint(0, max_payload)
    payload = rng.randbytes(size)
    sock = socket.socket()
    if slow:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    reader, writer = await asyncio.open_connection(sock=sock, limit=4096 if slow else 65536)
    reader_task: asyncio.Future[bytes] | None = None
    try:
        if behaviour == "early":
            writer.write(payload)
            writer.write_eof()
            got = await _read_until_eof(reader, timeout, slow)
            if got != payload + b"END %d\n" % size:
                out.failures.append(f"early: {len(got)} bytes back for {size} sent")
            out.bytes_checked += size
            return
        if behaviour == "backend-rst":
            k = rng.randint(1, 200_000)
            payload = b"rst %d\n" % k + payload
        reader_task = asyncio.ensure_future(_read_until_eof(reader, timeout, slow))
        cut = rng.randint(0, len(payload)) if behaviour == "client-rst" else len(payload)
        i = 0
        try:
            while i < cut:
                n = min(rng.choice((1, 100, 1460, 16384, 65536, 300_000)), cut - i)
                writer.write(payload[i:i + n])
                i += n
                await asyncio.wait_for(writer.drain(), timeout)
                if rng.random() < 0.05:
                    await asyncio.sleep(0.001)
        except (OSError, RuntimeError, asyncio.TimeoutError):  # reset: ECONNRESET, ENOTCONN, closed transport
            if behaviour != "backend-rst":
                raise
        if behaviour == "client-rst":
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            reader_task.cancel()
            return
        if behaviour == "normal":
            writer.write_eof()
            got = await reader_task
            if got != payload + b"END %d\n" % len(payload):
                out.failures.append(f"normal: {len(got)} bytes back for {len(payload)} sent")
            out.bytes_checked += len(payload)
            return
        # backend-rst: a prefix of the echo, then EOF or a reset; never a hang
        if not writer.is_closing():
            try:
                writer.write_eof()
            except (OSError, RuntimeError):
                pass
        try:
            got = await reader_task
        except OSError:  # reset: fine, as long as it came
            got = None
        if got is not None and not (payload + b"END %d\n" % len(payload)).startswith(got):
            out.failures.append(f"backend-rst: {len(got)} bytes back are not a prefix of the echo")
    finally:
        writer.close()
        if reader_task is not None:
            if reader_task.done() and not reader_task.cancelled():
                reader_task.exception()  # retrieved: an error here was already judged above
            else:
                reader_task.cancel()


async def stress(*, clients: int, concurrency: int, seed: int, max_payload: int = 300_000,
                 slow_share: float = 0.3, timeout: float = 20.0) -> Outcome:
    """`clients` connections, `concurrency` at a time, through a fresh DataPlane."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(EchoBackend, "127.0.0.1", 0)
    bport = server.sockets[0].getsockname()[1]
    dp = DataPlane("stress")
    rng = random.Random(seed)
    out = Outcome()
    try:
        await dp.start(snapshot(service("tcp", [BackendRoute(name="b0", host="127.0.0.1", port=bport, weight=1)],
                                        mode="tcp")))
        port = dp.bound_port("tcp")
        # Accepted sockets inherit the listener's (locked) send buffer size: a small one makes
        # the proxy's sends to slow clients fall short (loopback otherwise starts at ~2.6 MB).
        dp.listeners["tcp"].sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
        sem = asyncio.Semaphore(concurrency)

        async def one(i: int) -> None:
            behaviour = BEHAVIOURS[i % len(BEHAVIOURS)] if i < len(BEHAVIOURS) else rng.choice(BEHAVIOURS)
            crng = random.Random(rng.random())
            async with sem:
                out.counts[behaviour] = out.counts.get(behaviour, 0) + 1
                try:
                    await _client(port, crng, behaviour, max_payload, slow_share, out, timeout)
                except Exception as e:  # noqa: BLE001 - every failure is reported by the caller
                    out.failures.append(f"{behaviour}: {type(e).__name__}: {e}")

        await asyncio.gather(*(one(i) for i in range(clients)))
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            s = dp.stats()["services"]["tcp"]
            if s["connections"] == 0 and all(b["in_flight"] == 0 for b in s["backends"].values()):
                break
            await asyncio.sleep(0.02)
        s = dp.stats()["services"]["tcp"]
        if s["connections"] or any(b["in_flight"] for b in s["backends"].values()) or dp.conns:
            out.failures.append(f"connections left open: {s['connections']}, conns {len(dp.conns)}")
        if dp._relay is not None and dp._relay.relay.count:
            out.failures.append(f"relay still holds {dp._relay.relay.count} connections")
    finally:
        await dp.stop()
        server.close()
    return out

"""Toxic definitions (what the API stores) and toxic behaviour (what a link runs).

Every proxied connection has two links (upstream: client->server, downstream:
server->client). A link pushes each chunk it reads through the *stages* of its
direction, one stage per configured toxic. A stage remembers the per-link facts the
real Toxiproxy keeps per "stub": whether the toxicity draw made it active, its
interrupt signal (fired on update/removal so held data is released at once) and,
for ``limit_data``, the byte counter that survives updates.

Behaviours are small classes with one coroutine, ``pipe``: it receives one chunk
(``None`` means end of stream), and hands what it lets through to ``forward``, which
runs the rest of the chain. ``pipe`` returns True once the link has ended (end of
stream reached the destination), so callers stop feeding it.
"""
from __future__ import annotations

import asyncio
import random
import struct
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, ClassVar, Protocol

# Forward the (possibly changed) chunk to the rest of the chain; True = link ended.
Forward = Callable[[bytes | None, float], Awaitable[bool]]

UPSTREAM = "upstream"
DOWNSTREAM = "downstream"

# Longest single wait we hand to the event loop; bigger values (an attribute can be
# any int64) would overflow some loop implementations and mean "forever" anyway.
MAX_WAIT_S = 10**8


class ToxicInputError(ValueError):
    """An attribute value we refuse (400), usually because it crashes real Toxiproxy."""


# type -> attribute names, in the order the real server emits them
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "noop": (),
    "latency": ("latency", "jitter"),
    "bandwidth": ("rate",),
    "slow_close": ("delay",),
    "timeout": ("timeout",),
    "reset_peer": ("timeout",),
    "slicer": ("average_size", "size_variation", "delay"),
    "limit_data": ("bytes",),
}

# Go struct names, only used to word type-mismatch messages like the real server.
GO_STRUCT = {
    "noop": "NoopToxic", "latency": "LatencyToxic", "bandwidth": "BandwidthToxic",
    "slow_close": "SlowCloseToxic", "timeout": "TimeoutToxic", "reset_peer": "ResetToxic",
    "slicer": "SlicerToxic", "limit_data": "LimitDataToxic",
}


def parse_stream(stream: str) -> str | None:
    """Canonical direction for a stream string (case-insensitive), None if invalid."""
    lowered = stream.lower()
    return lowered if lowered in (UPSTREAM, DOWNSTREAM) else None


def validate_attributes(toxic_type: str, attrs: dict[str, int]) -> None:
    """Refuse values that are meaningless or crash the real server.

    Real Toxiproxy dies on slicer average_size 0, slicer size_variation above
    average_size and bandwidth with a negative rate; negative times and sizes are
    nonsense. Refusing them with 400 keeps drills portable to a real server.
    """
    for key, value in attrs.items():
        if value < 0:
            raise ToxicInputError(f"{toxic_type}: attribute {key} must not be negative (got {value})")
    if toxic_type == "slicer":
        if attrs["average_size"] <= 0:
            raise ToxicInputError("slicer: attribute average_size must be greater than 0")
        if attrs["size_variation"] > attrs["average_size"]:
            raise ToxicInputError("slicer: attribute size_variation must not exceed average_size")


def float32(value: float) -> float:
    """Round to the nearest 32-bit float: toxicity is a Go float32."""
    return struct.unpack("<f", struct.pack("<f", float(value)))[0]


def float32_json(value: float) -> int | float:
    """The shortest number that reads back as the same float32, as Go prints it."""
    if float(value).is_integer() and abs(value) < 1e21:
        return int(value)
    for digits in range(1, 10):
        candidate = float(f"{value:.{digits}g}")
        if float32(candidate) == value:
            return candidate
    return value


@dataclass
class ToxicConfig:
    """One toxic as the API sees it; shared by every stage that runs it."""

    name: str
    type: str
    stream: str  # as sent by the client, echoed verbatim
    direction: str  # canonical "upstream" / "downstream"
    toxicity: float
    attributes: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "attributes": {k: self.attributes.get(k, 0) for k in ATTRIBUTES[self.type]},
            "name": self.name,
            "type": self.type,
            "stream": self.stream,
            "toxicity": float32_json(self.toxicity),
        }


class StageOwner(Protocol):
    """What a stage needs from its link (kept abstract to avoid an import cycle)."""

    def inject_eof(self, start_index: int) -> None: ...

    def stage_index(self, stage: "Stage") -> int: ...


class Stage:
    """A toxic running on one link."""

    def __init__(self, config: ToxicConfig, owner: StageOwner) -> None:
        self.config = config
        self.owner = owner
        self.behaviour = BEHAVIOURS[config.type]
        self.active = False
        self.removed = False
        self.interrupt = asyncio.Event()
        self.state: dict[str, Any] = {}  # per-link state that survives restarts
        self.run_state: dict[str, Any] = {}  # per-run state, reset by restart
        self._timer: asyncio.TimerHandle | None = None
        self.start()

    def start(self) -> None:
        """(Re)start: draw toxicity again and let the behaviour arm its timers."""
        self.active = random.random() < self.config.toxicity
        self.run_state = {}
        self.behaviour.on_start(self)

    def restart(self) -> None:
        """Interrupt what the stage is holding (it is released at once), then start."""
        self.cancel_timer()
        old, self.interrupt = self.interrupt, asyncio.Event()
        old.set()
        self.start()

    def remove(self) -> None:
        self.removed = True
        self.cancel_timer()
        self.interrupt.set()

    async def wait(self, seconds: float | None) -> bool:
        """Sleep ``seconds`` (None = forever) unless interrupted; True if interrupted."""
        event = self.interrupt
        if event.is_set():
            return True
        if seconds is not None and seconds <= 0:
            return False
        timeout = None if seconds is None else min(seconds, MAX_WAIT_S)
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    def set_timer(self, seconds: float, callback: Callable[[], None]) -> None:
        self.cancel_timer()
        self._timer = asyncio.get_running_loop().call_later(min(seconds, MAX_WAIT_S), callback)

    def cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def attr(self, key: str) -> int:
        return self.config.attributes.get(key, 0)


class Behaviour:
    """Base behaviour: pass everything through (this is also ``noop``)."""

    type_name: ClassVar[str] = "noop"

    def on_start(self, stage: Stage) -> None:
        """Called when the stage starts or restarts on a link."""

    def on_remove(self, stage: Stage) -> None:
        """Called when the toxic is deleted while the link is alive."""

    async def pipe(self, stage: Stage, data: bytes | None, ts: float, forward: Forward) -> bool:
        return await forward(data, ts)


class Latency(Behaviour):
    """Deliver each chunk at read time + latency ± jitter; a pipeline delay.

    The chunk's timestamp is advanced by the time slept, so a second latency toxic
    adds its own delay on top (two 100 ms toxics give 200 ms).
    """

    type_name = "latency"

    async def pipe(self, stage: Stage, data: bytes | None, ts: float, forward: Forward) -> bool:
        if data is None:
            return await forward(None, ts)
        delay_ms = stage.attr("latency")
        jitter = stage.attr("jitter")
        if jitter > 0:
            delay_ms += random.randrange(2 * jitter) - jitter
        loop = asyncio.get_running_loop()
        sleep = delay_ms / 1000.0 - (loop.time() - ts)
        if sleep > 0:
            if not await stage.wait(sleep):
                ts += sleep
        return await forward(data, ts)


class Bandwidth(Behaviour):
    """Cap throughput at ``rate`` KB/s (1 KB = 1000 bytes); rate 0 holds data."""

    type_name = "bandwidth"
    SLICE_INTERVAL = 0.1

    async def pipe(self, stage: Stage, data: bytes | None, ts: float, forward: Forward) -> bool:
        if data is None:
            return await forward(None, ts)
        rate = stage.attr("rate")
        loop = asyncio.get_running_loop()
        if rate <= 0:
            # held until the toxic is updated or removed, then delivered
            await stage.wait(None)
            return await forward(data, ts)
        debt = stage.run_state.get("debt", 0.0) + len(data) / (rate * 1000.0)
        slice_size = rate * 100
        while len(data) > slice_size:
            if await stage.wait(self.SLICE_INTERVAL):
                return await forward(data, ts)
            head, data = data[:slice_size], data[slice_size:]
            debt -= self.SLICE_INTERVAL
            stage.run_state["debt"] = debt
            if await forward(head, ts):
                return True
        start = loop.time()
        interrupted = await stage.wait(debt)
        if not interrupted:
            debt -= loop.time() - start
            stage.run_state["debt"] = debt
        return await forward(data, ts)


class SlowClose(Behaviour):
    """Pass data; postpone the close by ``delay`` ms when the source ends."""

    type_name = "slow_close"

    async def pipe(self, stage: Stage, data: bytes | None, ts: float, forward: Forward) -> bool:
        if data is None:
            await stage.wait(stage.attr("delay") / 1000.0)
        return await forward(data, ts)


class Timeout(Behaviour):
    """Swallow all data; close after ``timeout`` ms without data (0 = never).

    The idle timer runs even when no chunk arrives, so it lives outside ``pipe``:
    it is armed on start, re-armed by each chunk, and on expiry ends the stream from
    this stage on. Removing the toxic also ends the stream, as the real one does.
    """

    type_name = "timeout"

    def on_start(self, stage: Stage) -> None:
        self._arm(stage)

    def _arm(self, stage: Stage) -> None:
        timeout = stage.attr("timeout")
        if stage.active and timeout > 0 and not stage.removed:
            stage.set_timer(timeout / 1000.0, lambda: self._expire(stage))

    @staticmethod
    def _expire(stage: Stage) -> None:
        stage.cancel_timer()
        if not stage.removed:
            stage.owner.inject_eof(stage.owner.stage_index(stage) + 1)

    def on_remove(self, stage: Stage) -> None:
        # called just before the stage leaves the list: the stage now at ``index``
        # will be the one after it when the injected end of stream is processed
        index = stage.owner.stage_index(stage)
        if index >= 0:
            stage.owner.inject_eof(index)

    async def pipe(self, stage: Stage, data: bytes | None, ts: float, forward: Forward) -> bool:
        if data is None:
            stage.cancel_timer()
            return await forward(None, ts)
        self._arm(stage)  # restart the idle timer; the chunk is dropped
        return False


class ResetPeer(Behaviour):
    """Drop the first chunk (or EOF), wait ``timeout`` ms, then close.

    The close is an RST only because the connection's sockets got SO_LINGER 0 at
    accept time (decided by the proxy, as in the real server).
    """

    type_name = "reset_peer"

    async def pipe(self, stage: Stage, data: bytes | None, ts: float, forward: Forward) -> bool:
        # the wait cannot be interrupted, as in the real server
        await asyncio.sleep(min(stage.attr("timeout") / 1000.0, MAX_WAIT_S))
        return await forward(None, ts)


class Slicer(Behaviour):
    """Cut each chunk into pieces of about ``average_size`` with ``delay`` µs between."""

    type_name = "slicer"

    @staticmethod
    def cut_points(length: int, average: int, variation: int) -> list[tuple[int, int]]:
        """Split [0, length) by recursive halving with jitter, iteratively."""
        pieces: list[tuple[int, int]] = []
        stack = [(0, length)]
        while stack:
            start, end = stack.pop()
            if (end - start) - average <= variation:
                pieces.append((start, end))
                continue
            mid = start + (end - start) // 2
            if variation > 0:
                mid += random.randrange(2 * variation) - variation
            mid = max(start + 1, min(end - 1, mid))
            stack.append((mid, end))
            stack.append((start, mid))
        return pieces

    async def pipe(self, stage: Stage, data: bytes | None, ts: float, forward: Forward) -> bool:
        if data is None:
            return await forward(None, ts)
        average = max(1, stage.attr("average_size"))
        variation = min(stage.attr("size_variation"), average)
        delay = stage.attr("delay") / 1_000_000.0
        view = memoryview(data)
        for n, (start, end) in enumerate(self.cut_points(len(data), average, variation)):
            if await forward(bytes(view[start:end]), ts):
                return True
            if end >= len(data):
                break
            interrupted = await stage.wait(delay) if delay > 0 else stage.interrupt.is_set()
            if delay <= 0 and n % 64 == 63:
                await asyncio.sleep(0)  # let the loop breathe on huge zero-delay slicing
            if interrupted:
                return await forward(bytes(view[end:]), ts)
        return False


class LimitData(Behaviour):
    """Forward up to ``bytes`` bytes on this link (counter survives updates), then close."""

    type_name = "limit_data"

    async def pipe(self, stage: Stage, data: bytes | None, ts: float, forward: Forward) -> bool:
        if data is None:
            return await forward(None, ts)
        sent = stage.state.get("sent", 0)
        remaining = max(0, stage.attr("bytes") - sent)
        if remaining < len(data):
            data = data[:remaining]
        if data:
            stage.state["sent"] = sent + len(data)
            if await forward(data, ts):
                return True
        if stage.attr("bytes") - stage.state.get("sent", 0) <= 0:
            return await forward(None, ts)
        return False


BEHAVIOURS: dict[str, Behaviour] = {
    cls.type_name: cls()
    for cls in (Behaviour, Latency, Bandwidth, SlowClose, Timeout, ResetPeer, Slicer, LimitData)
}
assert set(BEHAVIOURS) == set(ATTRIBUTES)

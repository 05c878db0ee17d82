"""The Prober against real servers on 127.0.0.1 (aiohttp and raw asyncio listeners).

Timing assertions only bound from above with generous slack: the CI box has two cores
shared with other test runs.
"""
from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import pytest
from aiohttp import web

from halb.health import connect_set
from halb.health.checks import CheckConfig
from halb.health.prober import Prober

SLACK = 2.0  # seconds of scheduling slack on a loaded machine


@dataclass
class Hit:
    path: str
    at: float
    peer_port: int


@dataclass
class FakeBackend:
    """An aiohttp server whose answers per path the test changes on the fly."""

    status: dict[str, int] = field(default_factory=dict)
    body: dict[str, str] = field(default_factory=dict)
    delay: dict[str, float] = field(default_factory=dict)
    hits: list[Hit] = field(default_factory=list)
    port: int = 0
    runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        self.hits.append(Hit(request.path, time.monotonic(), peer[1] if peer else 0))
        await asyncio.sleep(self.delay.get(request.path, 0.0))
        return web.Response(status=self.status.get(request.path, 200), text=self.body.get(request.path, "ok"))

    async def start(self) -> int:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", self.port, reuse_address=True)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self.port

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    def paths_hit(self, path: str) -> list[Hit]:
        return [h for h in self.hits if h.path == path]


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, bool, str]] = []
        self.changed = asyncio.Event()

    def __call__(self, service: str, backend: str, up: bool, detail: str) -> None:
        self.events.append((service, backend, up, detail))
        self.changed.set()

    async def wait_for(self, pred: Callable[[], bool], timeout: float) -> float:
        """Wait until pred() holds; returns the seconds it took."""
        start = time.monotonic()
        async with asyncio.timeout(timeout):
            while not pred():
                self.changed.clear()
                try:
                    await asyncio.wait_for(self.changed.wait(), 0.05)
                except TimeoutError:
                    pass
        return time.monotonic() - start


async def wait_until(pred: Callable[[], bool], timeout: float) -> None:
    async with asyncio.timeout(timeout):
        while not pred():
            await asyncio.sleep(0.02)


def run(coro_fn: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(coro_fn())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


FAST = dict(interval=0.2, timeout=0.5, rise=2, fall=2, jitter=0.1)


@pytest.fixture(params=["c", "python"])
def probe_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a TCP check test on both ConnectSets (halb/health/connect_set.py)."""
    if request.param == "c" and connect_set.CConnectSet is None:
        pytest.skip("halb.health._probe not built")
    monkeypatch.setenv("HALB_PROBE_ACCEL", "1" if request.param == "c" else "0")
    return str(request.param)


@pytest.mark.timeout(30)
def test_http_backend_goes_down_after_fall_and_comes_back_after_rise() -> None:
    async def main() -> None:
        be = FakeBackend()
        port = await be.start()
        rec = Recorder()
        latencies: list[float] = []
        prober = Prober(rec, on_result=lambda s, b, r: latencies.append(r.latency))
        cfg = CheckConfig(**FAST)  # type: ignore[arg-type]
        try:
            prober.set_targets({("shop", "A"): ("127.0.0.1", port, cfg)})
            await wait_until(lambda: prober.state("shop", "A").consecutive_successes >= 3, 10)
            st = prober.state("shop", "A")
            assert st.up and rec.events == [] and st.last_latency is not None and st.last_latency > 0
            # every check on its own connection: no keep-alive reuse
            ports = [h.peer_port for h in be.hits]
            assert len(set(ports)) == len(ports)

            await be.stop()  # listener gone: connection refused
            took = await rec.wait_for(lambda: len(rec.events) >= 1, 10)
            assert took <= cfg.interval * (1 + cfg.jitter) * cfg.fall + SLACK
            svc, name, up, detail = rec.events[0]
            assert (svc, name, up) == ("shop", "A", False) and "connect failed" in detail
            st = prober.state("shop", "A")
            assert not st.up and st.consecutive_failures >= 2 and "connect failed" in st.last_error

            await be.start()  # same port again
            took = await rec.wait_for(lambda: len(rec.events) >= 2, 10)
            assert took <= cfg.interval * (1 + cfg.jitter) * cfg.rise + SLACK
            assert rec.events[1][2] is True and prober.state("shop", "A").up
            checks = prober.state("shop", "A").checks_total
            await wait_until(lambda: prober.state("shop", "A").checks_total >= checks + 3, 10)  # 3 more good checks
            assert [e[2] for e in rec.events] == [False, True]  # transitions only, once each
            assert len(latencies) == prober.state("shop", "A").checks_total
        finally:
            await prober.stop()
            await be.stop()

    run(main)


@pytest.mark.timeout(30)
def test_status_range_body_substring_host_header_and_timeout() -> None:
    async def main() -> None:
        be = FakeBackend(status={"/fail": 503, "/teapot": 418}, body={"/body": "hello world"}, delay={"/slow": 2.0})
        port = await be.start()
        rec = Recorder()
        prober = Prober(rec)
        mk = lambda **kw: CheckConfig(**{**FAST, **kw})  # noqa: E731
        targets = {
            ("shop", "ok"): ("127.0.0.1", port, mk(path="/ok")),
            ("shop", "fail"): ("127.0.0.1", port, mk(path="/fail")),
            ("shop", "teapot-ok"): ("127.0.0.1", port, mk(path="/teapot", expect_status=(418, 418))),
            ("shop", "teapot-bad"): ("127.0.0.1", port, mk(path="/teapot")),
            ("shop", "body-ok"): ("127.0.0.1", port, mk(path="/body", expect_body="world")),
            ("shop", "body-bad"): ("127.0.0.1", port, mk(path="/body", expect_body="missing")),
            ("shop", "slow"): ("127.0.0.1", port, mk(path="/slow", timeout=0.15)),
        }
        try:
            prober.set_targets(targets)
            bad = {"fail", "teapot-bad", "body-bad", "slow"}
            await rec.wait_for(lambda: {e[1] for e in rec.events} >= bad, 15)
            # the good ones must also have been checked enough to have had the chance to fail
            await wait_until(lambda: all(prober.state("shop", n).checks_total >= 3 for _, n in targets), 10)
            states = prober.states()
            assert {k[1] for k, st in states.items() if not st.up} == bad
            assert {e[1] for e in rec.events} == bad and all(e[2] is False for e in rec.events)
            assert "status 503 not in 200-399" in states[("shop", "fail")].last_error
            assert "status 418 not in 200-399" in states[("shop", "teapot-bad")].last_error
            assert "lacks 'missing'" in states[("shop", "body-bad")].last_error
            assert "timeout after 0.15s" in states[("shop", "slow")].last_error
            assert states[("shop", "slow")].last_latency is not None and states[("shop", "slow")].last_latency < 1.5
        finally:
            await prober.stop()
            await be.stop()

    run(main)


@pytest.mark.timeout(30)
def test_host_header_and_method_are_sent() -> None:
    seen: list[tuple[str, str]] = []

    async def main() -> None:
        async def handler(request: web.Request) -> web.Response:
            seen.append((request.method, request.headers.get("Host", "")))
            return web.Response(text="ok")

        app = web.Application()
        app.router.add_route("*", "/health", handler)
        runner = web.AppRunner(app, shutdown_timeout=0.1)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        prober = Prober(lambda *a: None)
        try:
            cfg = CheckConfig(**{**FAST, "method": "HEAD", "host_header": "shop.example"})  # type: ignore[arg-type]
            prober.set_targets({("shop", "A"): ("127.0.0.1", port, cfg)})
            await wait_until(lambda: len(seen) >= 2, 10)
            assert prober.state("shop", "A").up
        finally:
            await prober.stop()
            await runner.cleanup()

    run(main)
    assert seen[0] == ("HEAD", "shop.example")


@pytest.mark.timeout(30)
def test_tcp_check_up_down_up(probe_path: str) -> None:
    async def main() -> None:
        async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.close()

        server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        rec = Recorder()
        prober = Prober(rec)
        cfg = CheckConfig(kind="tcp", **FAST)  # type: ignore[arg-type]
        try:
            prober.set_targets({("db", "pg1"): ("127.0.0.1", port, cfg)})
            await wait_until(lambda: prober.state("db", "pg1").consecutive_successes >= 2, 10)
            assert rec.events == []
            server.close()
            await server.wait_closed()
            await rec.wait_for(lambda: len(rec.events) == 1, 10)
            assert rec.events[0][2] is False and "connect failed" in rec.events[0][3]
            server = await asyncio.start_server(on_conn, "127.0.0.1", port, reuse_address=True)
            await rec.wait_for(lambda: len(rec.events) == 2, 10)
            assert rec.events[1][2] is True
        finally:
            await prober.stop()
            server.close()
            await server.wait_closed()

    run(main)


@pytest.mark.timeout(30)
def test_tcp_check_to_closed_port_fails(probe_path: str) -> None:
    async def main() -> None:
        rec = Recorder()
        prober = Prober(rec)
        try:
            prober.set_targets({("db", "x"): ("127.0.0.1", free_port(), CheckConfig(kind="tcp", **FAST))})  # type: ignore[arg-type]
            await rec.wait_for(lambda: len(rec.events) == 1, 10)
            assert rec.events[0][:3] == ("db", "x", False)
        finally:
            await prober.stop()

    run(main)


@pytest.mark.timeout(30)
def test_tcp_check_times_out_against_a_full_accept_queue_and_recovers(probe_path: str) -> None:
    """A listener that never accepts and whose queue is full drops SYNs: the connect
    hangs, so the bare-socket check must fail by its timeout (not hang, not leak)."""
    async def main() -> None:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        fillers = []
        for _ in range(4):  # fill the accept queue (backlog 0 holds one, plus slack)
            c = socket.socket()
            c.setblocking(False)
            c.connect_ex(("127.0.0.1", port))
            fillers.append(c)
        rec = Recorder()
        prober = Prober(rec)
        cfg = CheckConfig(kind="tcp", interval=0.2, timeout=0.3, rise=1, fall=2, jitter=0.0)
        try:
            prober.set_targets({("db", "q"): ("127.0.0.1", port, cfg)})
            await rec.wait_for(lambda: len(rec.events) == 1, 10)
            assert rec.events[0][2] is False and "connect timeout after 0.3s" in rec.events[0][3]
            st = prober.state("db", "q")
            assert st.last_latency is not None and st.last_latency >= 0.29
            for c in fillers:
                c.close()
            while True:  # drain the queue: the listener accepts from now on
                listener.setblocking(False)
                try:
                    listener.accept()[0].close()
                except BlockingIOError:
                    break
            listener.close()
            server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", port, reuse_address=True)
            try:
                await rec.wait_for(lambda: len(rec.events) == 2, 10)
                assert rec.events[1][2] is True
            finally:
                server.close()
                await server.wait_closed()
        finally:
            await prober.stop()
            for c in fillers:
                c.close()
            listener.close()

    run(main)


@pytest.mark.timeout(30)
def test_jitter_spreads_start_times_and_intervals() -> None:
    async def main() -> None:
        be = FakeBackend()
        port = await be.start()
        prober = Prober(lambda *a: None)
        cfg = CheckConfig(interval=0.5, timeout=0.3, jitter=0.3)
        n = 8
        try:
            prober.set_targets({("shop", f"b{i}"): ("127.0.0.1", port, dataclasses.replace(cfg, path=f"/p{i}"))
                                for i in range(n)})
            await wait_until(lambda: all(len(be.paths_hit(f"/p{i}")) >= 2 for i in range(n)), 10)
        finally:
            await prober.stop()
            await be.stop()
        firsts = [be.paths_hit(f"/p{i}")[0].at for i in range(n)]
        gaps = [be.paths_hit(f"/p{i}")[1].at - be.paths_hit(f"/p{i}")[0].at for i in range(n)]
        # first checks land within jitter*interval (0.15 s) of each other, but not all at once
        assert max(firsts) - min(firsts) > 0.01
        # later waits are interval * (1 +/- 0.3): different per target
        assert max(gaps) - min(gaps) > 0.02
        assert all(g >= 0.5 * 0.7 - 0.05 for g in gaps)

    run(main)


@pytest.mark.timeout(30)
def test_removing_a_target_stops_its_loop() -> None:
    async def main() -> None:
        be = FakeBackend()
        port = await be.start()
        prober = Prober(lambda *a: None)
        keep = CheckConfig(**{**FAST, "path": "/keep"})  # type: ignore[arg-type]
        gone = CheckConfig(**{**FAST, "path": "/gone"})  # type: ignore[arg-type]
        try:
            prober.set_targets({("shop", "keep"): ("127.0.0.1", port, keep), ("shop", "gone"): ("127.0.0.1", port, gone)})
            await wait_until(lambda: len(be.paths_hit("/gone")) >= 2 and len(be.paths_hit("/keep")) >= 2, 10)
            prober.set_targets({("shop", "keep"): ("127.0.0.1", port, keep)})
            with pytest.raises(KeyError):
                prober.state("shop", "gone")
            assert set(prober.targets()) == {("shop", "keep")}
            # a /gone request in flight at removal lands within a check or two of /keep's
            keep_hits = len(be.paths_hit("/keep"))
            await wait_until(lambda: len(be.paths_hit("/keep")) >= keep_hits + 2, 10)
            gone_hits = len(be.paths_hit("/gone"))
            keep_hits = len(be.paths_hit("/keep"))
            await wait_until(lambda: len(be.paths_hit("/keep")) >= keep_hits + 4, 10)  # 4 more intervals
            assert len(be.paths_hit("/gone")) == gone_hits
            # unchanged set_targets does not restart loops
            tasks_before = dict(prober._slots)
            prober.set_targets({("shop", "keep"): ("127.0.0.1", port, keep)})
            assert prober._slots == tasks_before
        finally:
            await prober.stop()
            await be.stop()
        assert all(t.done() for t in tasks_before.values())
        assert prober._session is None

    run(main)


class _Sequence:
    """An rng whose uniform() returns the given values in turn: due times chosen by the test."""

    def __init__(self, values: list[float]) -> None:
        self.values = list(values)

    def uniform(self, a: float, b: float) -> float:
        return self.values.pop(0) if self.values else (a + b) / 2


@pytest.mark.timeout(30)
def test_checks_due_close_together_start_in_one_wake_up(probe_path: str) -> None:
    """Checks due within a target's early allowance (2 % of its interval, at most 50 ms)
    start in one timer wake-up; one due later than that gets its own. At 333 checks a
    second the wake-ups, not the connects, were most of the prober's CPU."""
    wakeups: list[list[tuple[str, str]]] = []

    class Counting(Prober):
        def _tick(self) -> None:
            before = {k: h.checks_total for k, h in self.live_states().items()}
            inflight = {s.key for s in self._inflight.values()}
            super()._tick()
            started = [k for k, h in self.live_states().items() if h.checks_total != before[k]]
            started += [s.key for s in self._inflight.values() if s.key not in inflight]
            if started:
                wakeups.append(sorted(started))

    async def main() -> None:
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        cfg = CheckConfig(kind="tcp", interval=10.0, timeout=1.0, rise=1, fall=1, jitter=0.1)
        # first checks due 0.30, 0.31, 0.32, 0.33 s after adding (within 50 ms), then 0.60 s
        prober = Counting(Recorder(), rng=_Sequence([0.30, 0.31, 0.32, 0.33, 0.60]))
        try:
            prober.set_targets({("s", f"b{i}"): ("127.0.0.1", port, cfg) for i in range(5)})
            await wait_until(lambda: all(h.checks_total >= 1 for h in prober.live_states().values()), 10)
            assert wakeups == [[("s", "b0"), ("s", "b1"), ("s", "b2"), ("s", "b3")], [("s", "b4")]]
        finally:
            await prober.stop()
            server.close()
            await server.wait_closed()

    run(main)



def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.timeout(30)
def test_removing_a_target_with_a_connect_in_flight_closes_its_socket(probe_path: str) -> None:
    """A TCP check hanging against a full accept queue when its target is removed: the
    socket is closed at once (not at the 5 s timeout) and no result is recorded."""
    async def main() -> None:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        fillers = []
        for _ in range(4):  # fill the accept queue: later SYNs are dropped, connects hang
            c = socket.socket()
            c.setblocking(False)
            c.connect_ex(("127.0.0.1", port))
            fillers.append(c)
        results: list[Any] = []
        prober = Prober(lambda *a: None, on_result=lambda s, b, r: results.append(r))
        cfg = CheckConfig(kind="tcp", interval=10.0, timeout=5.0, rise=1, fall=1, jitter=0.0)
        try:
            prober.set_targets({})  # creates nothing yet; the ConnectSet comes with the first check
            prober.set_targets({("db", "warm"): ("127.0.0.1", free_port(), cfg)})  # refused at once
            await wait_until(lambda: len(results) == 1, 10)
            baseline = _open_fds()  # the ConnectSet's epoll fd exists from here on
            prober.set_targets({("db", "hang"): ("127.0.0.1", port, cfg)})
            await wait_until(lambda: _open_fds() == baseline + 1, 5)  # the hanging connect's socket
            await asyncio.sleep(0.2)
            assert len(results) == 1  # still in flight
            prober.set_targets({})
            assert _open_fds() == baseline
            await asyncio.sleep(0.3)
            assert len(results) == 1
        finally:
            await prober.stop()
            for c in fillers:
                c.close()
            listener.close()

    run(main)

"""Check config parsing/validation, jitter maths, and the Prober's rise/fall state machine
driven by scripted check results (no network)."""
from __future__ import annotations

import asyncio
import random

import pytest

from halb.health.checks import CheckConfig, CheckConfigError, CheckResult, parse_status_range
from halb.health.prober import Prober


# --- config -------------------------------------------------------------------------

def test_defaults() -> None:
    cfg = CheckConfig.from_dict({})
    assert (cfg.kind, cfg.method, cfg.path) == ("http", "GET", "/health")
    assert cfg.expect_status == (200, 399)
    assert (cfg.interval, cfg.timeout, cfg.rise, cfg.fall, cfg.jitter) == (1.0, 0.5, 2, 2, 0.1)
    assert CheckConfig.from_dict(None) == cfg


def test_full_http_section() -> None:
    cfg = CheckConfig.from_dict({"kind": "http", "method": "options", "path": "/ready", "expect_status": "200-299",
                                 "expect_body": "ok", "host": "shop.example", "interval": 2, "timeout": 0.25,
                                 "rise": 3, "fall": 1, "jitter": 0.2})
    assert cfg.method == "OPTIONS" and cfg.expect_status == (200, 299) and cfg.host_header == "shop.example"
    assert cfg.to_dict()["expect_status"] == "200-299" and cfg.to_dict()["host"] == "shop.example"
    assert CheckConfig.from_dict(cfg.to_dict()) == cfg  # round trip


def test_tcp_section_and_type_alias() -> None:
    cfg = CheckConfig.from_dict({"type": "TCP", "interval": 0.5})
    assert cfg.kind == "tcp" and cfg.interval == 0.5


@pytest.mark.parametrize("value,expected", [
    ("200-399", (200, 399)), ("204", (204, 204)), (204, (204, 204)), (" 200 - 299 ", (200, 299)), ([500, 503], (500, 503)),
])
def test_status_range_ok(value: object, expected: tuple[int, int]) -> None:
    assert parse_status_range(value) == expected


@pytest.mark.parametrize("value", ["abc", "399-200", "200-300-400", "99", "200-700", True, 3.5, [1], ""])
def test_status_range_bad(value: object) -> None:
    with pytest.raises(CheckConfigError, match="expect_status"):
        parse_status_range(value)


@pytest.mark.parametrize("data,key", [
    ({"intervall": 1}, "health_check.intervall"),
    ({"kind": "udp"}, "health_check.kind"),
    ({"interval": 0}, "health_check.interval"),
    ({"interval": "1s"}, "health_check.interval"),
    ({"timeout": -1}, "health_check.timeout"),
    ({"rise": 0}, "health_check.rise"),
    ({"fall": 1.5}, "health_check.fall"),
    ({"fall": True}, "health_check.fall"),
    ({"jitter": 0.9}, "health_check.jitter"),
    ({"path": "health"}, "health_check.path"),
    ({"method": "DELETE"}, "health_check.method"),
    ({"expect_status": "2xx"}, "health_check.expect_status"),
    ({"expect_body": ""}, "health_check.expect_body"),
    ({"host": "a b"}, "health_check.host"),
    ({"method": "HEAD", "expect_body": "ok"}, "health_check.expect_body"),
    ({"kind": "tcp", "path": "/x"}, "health_check.path"),
    ({"kind": "http", "type": "tcp"}, "health_check.type"),
])
def test_errors_name_the_key(data: dict, key: str) -> None:
    with pytest.raises(CheckConfigError) as info:
        CheckConfig.from_dict(data)
    assert str(info.value).startswith(key), str(info.value)


def test_section_name_used_in_errors() -> None:
    with pytest.raises(CheckConfigError, match=r"^services\.shop\.check\.rise"):
        CheckConfig.from_dict({"rise": -1}, where="services.shop.check")
    with pytest.raises(CheckConfigError, match="must be a table"):
        CheckConfig.from_dict([1, 2], where="x")  # type: ignore[arg-type]


def test_jitter_bounds_and_spread() -> None:
    cfg = CheckConfig(interval=1.0, jitter=0.1)
    rng = random.Random(7)
    delays = [cfg.next_delay(rng) for _ in range(500)]
    assert all(0.9 <= d <= 1.1 for d in delays)
    assert max(delays) - min(delays) > 0.15  # actually spread, not a constant
    firsts = [cfg.first_delay(rng) for _ in range(500)]
    assert all(0.0 <= d <= 0.1 for d in firsts) and max(firsts) - min(firsts) > 0.05
    no_jitter = CheckConfig(interval=1.0, jitter=0.0)
    assert {no_jitter.next_delay(rng) for _ in range(10)} == {1.0}


# --- state machine with scripted results ----------------------------------------------

class ScriptedProber(Prober):
    """A Prober whose checks return a scripted sequence of ok/fail, then repeat the last."""

    def __init__(self, script: list[bool], **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.script = list(script)
        self.calls = 0

    async def _check_once(self, host: str, port: int, cfg: CheckConfig) -> CheckResult:
        ok = self.script[min(self.calls, len(self.script) - 1)]
        self.calls += 1
        return CheckResult(ok=ok, latency=0.001, detail="good" if ok else f"bad #{self.calls}")


FAST = CheckConfig(interval=0.01, timeout=0.01, rise=2, fall=3, jitter=0.0)


async def _run_until_calls(prober: ScriptedProber, n: int) -> None:
    for _ in range(2000):
        if prober.calls >= n:
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"only {prober.calls} checks ran")


@pytest.mark.timeout(30)
def test_hysteresis_reports_transitions_only() -> None:
    events: list[tuple[str, str, bool, str]] = []
    # up,up, fail x2 (not enough), up, fail x3 -> DOWN, ok x1 (not enough), fail, ok x2 -> UP, ok...
    script = [True, True, False, False, True, False, False, False, True, False, True, True, True]

    async def main() -> None:
        prober = ScriptedProber(script, on_transition=lambda *a: events.append(a))
        prober.set_targets({("shop", "A"): ("127.0.0.1", 9, FAST)})
        assert prober.state("shop", "A").up  # assumed UP before any check, not reported
        await _run_until_calls(prober, len(script) + 3)
        await prober.stop()
        st = prober.state("shop", "A")
        assert st.up and st.transitions == 2 and st.last_error == "" and st.last_failure == "bad #10"

    asyncio.run(main())
    assert [(s, b, up) for s, b, up, _ in events] == [("shop", "A", False), ("shop", "A", True)]
    assert "3 consecutive failed checks" in events[0][3] and "bad #8" in events[0][3]
    assert "2 consecutive good checks" in events[1][3]


@pytest.mark.timeout(30)
def test_callback_errors_do_not_kill_the_loop() -> None:
    def boom(*_: object) -> None:
        raise RuntimeError("callback bug")

    async def main() -> None:
        prober = ScriptedProber([False, False, False, False, True], on_transition=boom, on_result=boom)
        prober.set_targets({("shop", "A"): ("127.0.0.1", 9, FAST)})
        await _run_until_calls(prober, 10)
        await prober.stop()
        assert prober.state("shop", "A").up and prober.state("shop", "A").transitions == 2

    asyncio.run(main())


@pytest.mark.timeout(30)
def test_config_change_keeps_verdict_and_bad_targets_rejected() -> None:
    events: list[tuple] = []

    async def main() -> None:
        prober = ScriptedProber([False], on_transition=lambda *a: events.append(a))
        prober.set_targets({("shop", "A"): ("127.0.0.1", 9, FAST)})
        await _run_until_calls(prober, 4)
        assert not prober.state("shop", "A").up
        prober.set_targets({("shop", "A"): ("127.0.0.1", 10, FAST)})  # new port: loop restarts
        st = prober.state("shop", "A")
        assert not st.up and st.port == 10 and st.consecutive_failures == 0
        with pytest.raises(TypeError):
            prober.set_targets({("shop", "A"): ("127.0.0.1", 9, {"interval": 1})})  # type: ignore[dict-item]
        with pytest.raises(ValueError):
            prober.set_targets({("shop", "A"): ("127.0.0.1", 0, FAST)})
        await prober.stop()
        with pytest.raises(RuntimeError):
            prober.set_targets({})

    asyncio.run(main())
    assert len(events) == 1  # no spurious UP from the restart


class FedProber(Prober):
    """A Prober whose checks return results the test hands in one by one."""

    def __init__(self, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.results: asyncio.Queue[CheckResult] = asyncio.Queue()

    async def _check_once(self, host: str, port: int, cfg: CheckConfig) -> CheckResult:
        return await self.results.get()

    async def feed(self, ok: bool, detail: str) -> None:
        before = self.state("shop", "A").checks_total
        await self.results.put(CheckResult(ok=ok, latency=0.001, detail=detail, at=1000.0 + before))
        for _ in range(1000):
            if self.state("shop", "A").checks_total > before:
                return
            await asyncio.sleep(0.002)
        raise AssertionError("the check result was not recorded")


@pytest.mark.timeout(30)
def test_unconfirmed_until_rise_or_fall_and_errors_clear_on_a_good_check() -> None:
    transitions: list[bool] = []

    async def main() -> None:
        p = FedProber(on_transition=lambda s, b, up, d: transitions.append(up))
        p.set_targets({("shop", "A"): ("127.0.0.1", 9, CheckConfig(interval=0.01, rise=2, fall=2, jitter=0.0))})
        st = p.state("shop", "A")
        assert st.up and not st.confirmed and st.last_ok is None      # assumed, not checked
        await p.feed(False, "connect failed: refused")
        st = p.state("shop", "A")
        assert st.up and not st.confirmed and st.last_error == "connect failed: refused"
        await p.feed(False, "connect failed: refused #2")
        st = p.state("shop", "A")
        assert not st.up and st.confirmed
        await p.feed(True, "200")
        st = p.state("shop", "A")
        assert not st.up                                               # rise 2: not yet
        assert st.last_error == ""                                     # the latest check passed
        assert st.last_failure == "connect failed: refused #2" and st.last_failure_wall == 1001.0
        await p.feed(True, "200")
        assert p.state("shop", "A").up and p.state("shop", "A").last_failure == "connect failed: refused #2"
        await p.stop()

    asyncio.run(main())
    assert transitions == [False, True]


@pytest.mark.timeout(30)
def test_a_new_target_is_confirmed_up_after_rise_good_checks_without_a_transition() -> None:
    transitions: list[bool] = []

    async def main() -> None:
        p = FedProber(on_transition=lambda s, b, up, d: transitions.append(up))
        p.set_targets({("shop", "A"): ("127.0.0.1", 9, CheckConfig(interval=0.01, rise=2, fall=2, jitter=0.0))})
        await p.feed(True, "200")
        assert not p.state("shop", "A").confirmed
        await p.feed(True, "200")
        assert p.state("shop", "A").confirmed and p.state("shop", "A").up
        await p.stop()

    asyncio.run(main())
    assert transitions == []

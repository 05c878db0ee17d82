"""Announcement with a fake Raft, a fake VIP and a fake clock: the order of VIP operations."""
from __future__ import annotations

import asyncio
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable

from halb.announce.manager import Announcement
from halb.announce.settings import parse_announce


@dataclass
class FakeStatus:
    state: str
    leader: str | None
    self_addr: str = "me:1"
    term: int = 1
    partners: dict[str, bool] = field(default_factory=dict)


class FakeCluster:
    def __init__(self) -> None:
        self.lease: dict[str, Any] = {}
        self.members: dict[str, Any] = {}


class FakeRaft:
    """Commits every submitted command at once (synchronously) unless `commit` is False."""

    def __init__(self, log: list[str]) -> None:
        self.log = log
        self.leader = True
        self.commit = True
        self.cs = FakeCluster()
        self.renewals = 0
        self.pending: list[Callable[[], None]] = []

    def raft_status(self) -> FakeStatus:
        return FakeStatus("leader" if self.leader else "follower", "me:1" if self.leader else "other:1")

    @contextmanager
    def read(self):
        yield self.cs

    def submit(self, op: str, args: dict[str, Any], *, by: str, cid: str | None = None,
               callback: Callable[[Any, int], None]) -> str:
        self.log.append(f"submit {op} {args.get('held', '')}".strip())
        if op == "lease.renew":
            first = self.cs.lease.get("holder") != args["holder"]
            self.cs.lease = {"holder": args["holder"], "epoch": 1}
            result = {"ok": True, "epoch": 1, "first": first, "handover_from": None}
        else:
            result = {"ok": True, "released": True}
        if self.commit:
            callback(result, 0)
        return cid or "x"


class FakeVip:
    def __init__(self, log: list[str], clock: "FakeClock", hold_cost: float = 0.001) -> None:
        self.log, self.clock, self.hold_cost = log, clock, hold_cost
        self.present = False

    async def ahold(self, valid_lft: int = 1) -> None:
        self.clock.t += self.hold_cost
        self.present = True
        self.log.append("hold")

    async def arelease(self) -> bool:
        was = self.present
        self.present = False
        self.log.append("release")
        return was

    async def asend_garp(self, count: int = 3, interval: float = 0.05) -> int:
        self.log.append("garp")
        return count * 2

    def close(self, release: bool = False) -> None:
        self.present = False


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def make(hold_cost: float = 0.001) -> tuple[Announcement, FakeRaft, FakeVip, FakeClock, list[str]]:
    log: list[str] = []
    clock = FakeClock()
    raft = FakeRaft(log)
    vip = FakeVip(log, clock, hold_cost)
    cfg = parse_announce({"mode": "vip", "vip": "10.0.0.1", "interface": "eth0", "set_arp_sysctls": False,
                          "garp_refresh_after_s": 0, "garp_repeat_s": 0})
    ann = Announcement("n1", raft, cfg, clock=clock, vip=vip)
    ann._loop = None  # callbacks are called synchronously by the fake
    return ann, raft, vip, clock, log


def drive(ann: Announcement, clock: FakeClock, seconds: float, step: float = 0.025) -> None:
    async def go() -> None:
        ann._loop = asyncio.get_running_loop()
        end = clock.t + seconds
        while clock.t < end:
            await ann._step()
            await asyncio.sleep(0)   # let result callbacks queued with call_soon_threadsafe run
            await asyncio.sleep(0)
            clock.t += step
    asyncio.run(go())


def test_waits_then_acquires_refreshes_and_garps() -> None:
    ann, raft, vip, clock, log = make()
    drive(ann, clock, 1.0)
    assert not vip.present                    # still waiting (L*1.02 + margin from creation)
    drive(ann, clock, 1.0)
    assert vip.present and ann.holding
    assert log.count("hold") >= 2 and "garp" in log
    st = ann.status()
    assert st["holds_vip"] and st["holder"] == "n1" and st["lease_remaining_s"] > 1.3


def test_losing_leadership_deletes_the_vip_at_once() -> None:
    ann, raft, vip, clock, log = make()
    drive(ann, clock, 2.0)
    assert vip.present
    raft.leader = False
    drive(ann, clock, 0.025)
    assert not vip.present and not ann.holding


def test_no_commits_means_the_lease_lapses_and_refreshes_stop() -> None:
    ann, raft, vip, clock, log = make()
    drive(ann, clock, 2.0)
    raft.commit = False                        # partitioned: callbacks never come
    drive(ann, clock, 0.2)                     # the last committed renewal's refresh window
    log.clear()
    drive(ann, clock, 0.3)
    assert "hold" not in log                   # no refresh with < 1.3 s of lease left
    assert vip.present                         # (the kernel would drop it ~1 s after the last refresh)
    drive(ann, clock, 1.1)
    assert not vip.present and "release" in log


def test_slow_netlink_refresh_is_undone() -> None:
    ann, raft, vip, clock, log = make(hold_cost=0.35)
    drive(ann, clock, 3.0)
    assert not ann.holding                     # every add finished with < 1.2 s of lease left
    assert log.count("hold") >= 1 and log[log.index("hold") + 1] == "release"


def test_before_transfer_deletes_first_then_releases_with_held_true() -> None:
    ann, raft, vip, clock, log = make()
    drive(ann, clock, 2.0)
    log.clear()

    async def go() -> None:
        ann._loop = asyncio.get_running_loop()
        await ann.before_transfer()
    asyncio.run(go())
    assert log[:2] == ["release", "submit lease.release True"]
    assert not vip.present
    log.clear()
    drive(ann, clock, 1.0)                     # paused: no renewals, no re-adding
    assert "hold" not in log and not any(x.startswith("submit lease.renew") for x in log)


def test_before_transfer_while_waiting_releases_with_held_false() -> None:
    ann, raft, vip, clock, log = make()
    drive(ann, clock, 0.5)
    log.clear()

    async def go() -> None:
        ann._loop = asyncio.get_running_loop()
        await ann.before_transfer()
    asyncio.run(go())
    assert "submit lease.release False" in log


def test_stop_deletes_the_vip() -> None:
    ann, raft, vip, clock, log = make()
    drive(ann, clock, 2.0)

    async def go() -> None:
        ann._loop = asyncio.get_running_loop()
        await ann.stop()
    asyncio.run(go())
    assert not vip.present
    assert log.index("release") < log.index("submit lease.release True")


class FakeHooks:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def notify(self, state: str, vip: str) -> bool:
        self.calls.append((state, vip))
        return True

    async def aclose(self) -> None:
        pass


def test_notify_hooks_fire_on_transitions() -> None:
    ann, raft, vip, clock, log = make()
    hooks = FakeHooks()
    ann.hooks = hooks
    ann._notify("BACKUP")                      # what start() does
    drive(ann, clock, 2.0)
    raft.leader = False
    drive(ann, clock, 0.05)
    assert [s for s, _ in hooks.calls] == ["BACKUP", "MASTER", "BACKUP"]
    assert all(v == "10.0.0.1" for _, v in hooks.calls)


def test_no_garp_after_the_lease_is_gone() -> None:
    """A holder frozen in its GARP refresh sleep must not announce after it resumes."""
    ann, raft, vip, clock, log = make()
    ann.cfg.garp_repeat_s = 0.5
    drive(ann, clock, 2.0)
    assert ann.holding

    async def go() -> None:
        ann._loop = asyncio.get_running_loop()
        task = asyncio.create_task(ann._garp())
        await asyncio.sleep(0)
        clock.t += 10.0                         # "frozen": the lease is long over
        await asyncio.sleep(0.6)                # the repeat timer fires on resume
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    log.clear()
    asyncio.run(go())
    assert log.count("garp") <= 1               # at most the round already under way

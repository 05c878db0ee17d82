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
        # the repeat timer fires on resume (0.5 s), finds the lease gone and ends the loop
        await asyncio.wait_for(task, 5)
    log.clear()
    asyncio.run(go())
    assert log.count("garp") <= 1               # at most the round already under way


class TickRaft(FakeRaft):
    """FakeRaft with a Raft log (pysyncobj's private journal, read via pysyncobj_compat) and
    a status read that can fail in the tick callback only."""

    def __init__(self, log: list[str]) -> None:
        super().__init__(log)
        setattr(self, "_SyncObj__raftLog", [(b"", 1, 1)])
        self.tick_status_broken = False

    def append(self, index: int, term: int) -> None:
        getattr(self, "_SyncObj__raftLog").append((b"x", index, term))


def make_tracking() -> tuple[Announcement, TickRaft, FakeVip, FakeClock]:
    log: list[str] = []
    clock = FakeClock()
    raft = TickRaft(log)
    raft.leader = False
    vip = FakeVip(log, clock)
    cfg = parse_announce({"mode": "vip", "vip": "10.0.0.1", "interface": "eth0", "set_arp_sysctls": False,
                          "garp_refresh_after_s": 0, "garp_repeat_s": 0})
    ann = Announcement("n1", raft, cfg, clock=clock, vip=vip)
    ann.keeper.track_log = True  # what start() does when the raft has addOnTickCallback
    return ann, raft, vip, clock


def tick(ann: Announcement, raft: TickRaft) -> None:
    if raft.tick_status_broken:
        orig = raft.raft_status
        raft.raft_status = lambda: (_ for _ in ()).throw(RuntimeError("status unavailable"))  # type: ignore[method-assign]
        try:
            ann._on_tick()
        finally:
            raft.raft_status = orig  # type: ignore[method-assign]
    else:
        ann._on_tick()


def test_log_change_noted_by_the_tick_shortens_the_wait() -> None:
    ann, raft, vip, clock = make_tracking()
    drive(ann, clock, 5.0)                     # follower; keeper created at 100.0
    raft.append(2, 1)
    tick(ann, raft)                            # noted at 105.0
    clock.t = 110.0
    raft.leader = True                         # won at 110.0: 105 + 1.58 is long past
    drive(ann, clock, 0.1)
    assert vip.present and ann.status()["log_tracking"] == "ok"


def test_failed_tick_falls_back_to_the_full_wait_and_logs_an_error(caplog) -> None:
    """The tick that should have noted the old leader's last entry failed: the wait must
    run from the election (the safe rule), and the failure is an ERROR, not a DEBUG line."""
    ann, raft, vip, clock = make_tracking()
    tick(ann, raft)                            # log (1, 1) noted at 100.0
    drive(ann, clock, 5.0)
    raft.append(2, 1)                          # the old holder's last renewal reaches us at 105.0 ...
    raft.tick_status_broken = True
    with caplog.at_level("ERROR", logger="halb.announce.manager"):
        tick(ann, raft)                        # ... but the tick callback fails
    assert [r.levelname for r in caplog.records] == ["ERROR"]
    assert "full wait" in caplog.records[0].getMessage() and caplog.records[0].exc_info
    raft.tick_status_broken = False
    clock.t = 110.0
    raft.leader = True                         # won at 110.0
    tick(ann, raft)                            # a leader tick proves nothing about what was missed
    drive(ann, clock, 1.5)
    assert not vip.present                     # 110.0 + 1.58 not reached (old code: held at once)
    assert ann.status()["log_tracking"].startswith("failed")
    drive(ann, clock, 0.2)
    assert vip.present


def test_a_successful_follower_tick_ends_the_fallback(caplog) -> None:
    ann, raft, vip, clock = make_tracking()
    tick(ann, raft)
    raft.tick_status_broken = True
    for _ in range(3):
        tick(ann, raft)
    raft.tick_status_broken = False
    raft.append(2, 1)
    clock.t = 105.0
    with caplog.at_level("WARNING", logger="halb.announce.manager"):
        tick(ann, raft)                        # follower tick: notes the change at 105.0
    assert "after 3 failed ticks" in caplog.text
    drive(ann, clock, 0.025)
    assert not ann.keeper.log_tracking_failed and ann.keeper.seen_at == 105.0


def test_repeated_tick_failures_log_one_error_not_one_per_tick(caplog) -> None:
    ann, raft, vip, clock = make_tracking()
    raft.tick_status_broken = True
    with caplog.at_level("ERROR", logger="halb.announce.manager"):
        for _ in range(100):
            tick(ann, raft)
    assert len(caplog.records) == 1


# ---- the data-plane self-check's verdict (halb/dataplane_guard.py feeds it) ----------

def test_failing_dataplane_leader_never_renews_nor_acquires() -> None:
    ann, raft, vip, clock, log = make()
    ann.set_dataplane(False, "service web not listening")
    drive(ann, clock, 3.0)
    assert not vip.present and not ann.holding
    assert not any(x.startswith("submit lease.renew") for x in log)
    assert ann.status()["dataplane_ok"] is False


def test_failing_dataplane_holder_stops_renewing_and_the_lease_lapses() -> None:
    ann, raft, vip, clock, log = make()
    drive(ann, clock, 2.0)
    assert vip.present
    ann.set_dataplane(False, "3 worker process deaths")
    log.clear()
    drive(ann, clock, 0.1)
    assert not any(x.startswith("submit lease.renew") for x in log)
    assert vip.present                          # kept until the hand-over deletes it (fast path)...
    drive(ann, clock, 1.6)
    assert not vip.present and not ann.holding  # ...or the lease runs out (safety net)


def test_dataplane_passing_again_lets_the_leader_renew_and_hold() -> None:
    ann, raft, vip, clock, log = make()
    ann.set_dataplane(False, "x")
    drive(ann, clock, 2.0)
    assert not vip.present
    ann.set_dataplane(True, "")
    drive(ann, clock, 2.0)
    assert vip.present and ann.holding

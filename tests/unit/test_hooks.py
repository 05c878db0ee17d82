"""NotifyHooks with real shell scripts in tmp_path (no root needed)."""
from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from halb.announce.hooks import NotifyHooks

pytestmark = pytest.mark.timeout(30)


def script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def test_runs_script_with_state_and_vip(tmp_path: Path):
    out = tmp_path / "log"
    master = script(tmp_path / "m.sh", f'echo "$1 $2 $HALB_STATE $HALB_VIP" >> {out}\n')
    backup = script(tmp_path / "b.sh", f'echo "$1 $2" >> {out}\nexit 3\n')

    async def main():
        hooks = NotifyHooks(master=master, backup=backup)
        assert hooks.notify("master", "10.99.0.10") is True
        assert hooks.notify("BACKUP", "10.99.0.10") is True
        assert hooks.notify("fault", "10.99.0.10") is False  # no fault script
        await hooks.wait_idle(10)
        return hooks.results

    results = asyncio.run(main())
    # order preserved: MASTER ran before BACKUP
    assert out.read_text().splitlines() == ["MASTER 10.99.0.10 MASTER 10.99.0.10",
                                            "BACKUP 10.99.0.10"]
    assert [(r.state, r.returncode, r.timed_out) for r in results] == [
        ("MASTER", 0, False), ("BACKUP", 3, False)]


def test_notify_never_blocks_and_slow_script_is_killed(tmp_path: Path):
    pidfile = tmp_path / "pid"
    # the script and a child of it both sleep; the whole group must be killed
    slow = script(tmp_path / "slow.sh", f"sleep 30 &\necho $! > {pidfile}\nsleep 30\n")

    async def main():
        hooks = NotifyHooks(master=slow, timeout_s=0.5, kill_grace_s=0.5)
        t0 = time.monotonic()
        hooks.notify("MASTER", "10.99.0.10")
        blocked = time.monotonic() - t0
        # the loop stays responsive while the script runs
        ticks = 0
        for _ in range(5):
            await asyncio.sleep(0.02)
            ticks += 1
        await hooks.wait_idle(10)
        return blocked, ticks, hooks.results, time.monotonic() - t0

    blocked, ticks, results, total = asyncio.run(main())
    assert blocked < 0.05 and ticks == 5
    assert len(results) == 1 and results[0].timed_out
    assert total < 5  # killed long before the script's 30 s
    child = int(pidfile.read_text())
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the script's child survived the timeout kill")


def test_missing_or_broken_script_is_logged_not_raised(tmp_path: Path):
    notexec = tmp_path / "plain.sh"
    notexec.write_text("echo hi\n")  # not executable

    async def main():
        hooks = NotifyHooks(master=tmp_path / "nope.sh", fault=notexec)
        hooks.notify("MASTER", "1.2.3.4")
        hooks.notify("FAULT", "1.2.3.4")
        await hooks.wait_idle(10)
        return hooks.results

    results = asyncio.run(main())
    assert [r.returncode for r in results] == [None, None]


def test_unknown_state_rejected(tmp_path: Path):
    async def main():
        with pytest.raises(ValueError):
            NotifyHooks().notify("leader", "1.2.3.4")
    asyncio.run(main())

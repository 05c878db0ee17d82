"""pysyncobj_compat against a real ReplicatedState (pysyncobj SyncObj, journal on disk).

If a pysyncobj upgrade renames ``SyncObj.__raftLog`` or changes what its entries mean, these
fail loudly, and with them the VIP successor's shortened wait (halb/announce/manager.py) is
known to need attention: at runtime it would fall back to the full wait and log errors.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from halb.config import RaftConfig
from halb.control.pysyncobj_compat import PysyncobjCompatError, last_log_entry
from halb.control.raft import ReplicatedState
from tests.conftest import free_port, wait_until


def _start(data_dir: Path, addr: str) -> ReplicatedState:
    rs = ReplicatedState("n1", addr, [], data_dir, None, RaftConfig(bind=addr))
    wait_until(lambda: rs.raft_status().state == "leader", 10.0, message="single node elected")
    return rs


def _submit(rs: ReplicatedState, n: int) -> None:
    done: list[int] = []
    ev = threading.Event()

    def cb(_result: Any, err: int) -> None:
        done.append(err)
        if len(done) == n:
            ev.set()

    for i in range(n):
        rs.submit("noop.test", {"i": i}, by="test", callback=cb)
    assert ev.wait(10.0), "commands not committed"
    assert done == [0] * n


def _status(rs: ReplicatedState) -> dict[str, Any]:
    return rs.getStatus()


def test_last_log_entry_is_the_committed_index_and_current_term(tmp_path: Path) -> None:
    addr = f"127.0.0.1:{free_port()}"
    rs = _start(tmp_path, addr)
    try:
        wait_until(lambda: last_log_entry(rs)[0] == _status(rs)["commit_idx"], 5.0, message="no-op committed")
        index, term = last_log_entry(rs)
        s = _status(rs)
        assert term == s["raft_term"] >= 1
        _submit(rs, 3)
        after = last_log_entry(rs)
        assert after == (index + 3, term)      # one entry per command, in this term
        assert after[0] == _status(rs)["commit_idx"]
    finally:
        rs.destroy()
    # the journal on disk: a restart sees the same last entry, then its own no-op in a new term
    rs = _start(tmp_path, addr)
    try:
        wait_until(lambda: last_log_entry(rs)[0] == _status(rs)["commit_idx"] > after[0], 5.0,
                   message="restart committed its no-op")
        index2, term2 = last_log_entry(rs)
        assert term2 == _status(rs)["raft_term"] > term
    finally:
        rs.destroy()


def test_a_missing_or_changed_journal_raises_instead_of_guessing() -> None:
    class NoLog:
        pass

    with pytest.raises(PysyncobjCompatError, match="has no _SyncObj__raftLog"):
        last_log_entry(NoLog())
    for bad in ([], [(1, 2)], [(b"", "1", 2)], [{"idx": 1, "term": 2}], [(b"", 1.0, 2)]):
        obj = NoLog()
        setattr(obj, "_SyncObj__raftLog", bad)
        with pytest.raises(PysyncobjCompatError):
            last_log_entry(obj)


def test_idle_node_slows_heartbeats_and_ticks_and_a_write_restores_them(tmp_path: Path) -> None:
    """heartbeat_interval / tick_interval while the log grows, idle_heartbeat_interval after
    idle_after_s without a new entry; a submit switches back before its entry goes out."""
    addr = f"127.0.0.1:{free_port()}"
    raft = RaftConfig(bind=addr, heartbeat_interval=0.02, tick_interval=0.02, idle_heartbeat_interval=0.1,
                      idle_after_s=0.3)
    rs = ReplicatedState("n1", addr, [], tmp_path, None, raft)
    conf = rs._conf
    try:
        wait_until(lambda: rs.raft_status().state == "leader", 10.0, message="single node elected")
        wait_until(lambda: (conf.appendEntriesPeriod, conf.autoTickPeriod) == (0.1, 0.1), 5.0,
                   message="idle timing after the election's no-op")
        seen: list[tuple[float, float]] = []
        ev = threading.Event()

        def cb(_result: Any, err: int) -> None:
            seen.append((conf.appendEntriesPeriod, conf.autoTickPeriod))  # in the tick thread, at commit
            ev.set()

        rs.submit("noop.test", {}, by="test", callback=cb)
        assert ev.wait(10.0)
        assert seen == [(0.02, 0.02)]
        wait_until(lambda: (conf.appendEntriesPeriod, conf.autoTickPeriod) == (0.1, 0.1), 5.0,
                   message="idle timing again")
    finally:
        rs.destroy()
    assert RaftConfig(bind=addr).idle_heartbeat_interval == 0.05  # the default adapts too

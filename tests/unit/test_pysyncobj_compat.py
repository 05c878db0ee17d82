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

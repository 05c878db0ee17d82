"""pysyncobj_compat against a real ReplicatedState (pysyncobj SyncObj, journal on disk).

If a pysyncobj upgrade renames ``SyncObj.__raftLog`` or changes what its entries mean, these
fail loudly, and with them the VIP successor's shortened wait (halb/announce/manager.py) is
known to need attention: at runtime it would fall back to the full wait and log errors.
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pytest

from halb.config import RaftConfig
from halb.control.pysyncobj_compat import (PysyncobjCompatError, last_log_entry, match_indexes, next_heartbeat_time,
                                           raft_clock, send_append_entries_now)
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


# --- the leader's replication internals (write latency: ReplicatedState._push_append_entries) ---

# Slow heartbeats (1 s; elections 3.5-5 s) so that anything that waits for one shows.
SLOW = dict(heartbeat_interval=1.0, tick_interval=1.0, idle_heartbeat_interval=1.0,
            election_timeout_min=3.5, election_timeout_max=5.0,
            connection_timeout=6.0, leader_fallback_timeout=10.0)


@contextmanager
def _cluster(tmp_path: Path, **raft: Any) -> Iterator[tuple[ReplicatedState, list[ReplicatedState]]]:
    """Three ReplicatedStates in this process on loopback; yields (leader, followers)."""
    addrs = [f"127.0.0.1:{free_port()}" for _ in range(3)]
    nodes = [ReplicatedState(f"n{i + 1}", a, [b for b in addrs if b != a], tmp_path / f"n{i + 1}", None,
                             RaftConfig(bind=a, **raft)) for i, a in enumerate(addrs)]
    try:
        leader = wait_until(lambda: next((n for n in nodes if n.raft_status().state == "leader"), None), 30.0,
                            message="a leader")
        followers = [n for n in nodes if n is not leader]
        wait_until(lambda: all(f.raft_status().leader == leader.raft_status().self_addr for f in followers), 10.0,
                   message="followers know the leader")
        yield leader, followers
    finally:
        for n in nodes:
            n.destroy()


def _write(rs: ReplicatedState, i: int) -> None:
    ev = threading.Event()
    errs: list[int] = []

    def cb(_result: Any, err: int) -> None:
        errs.append(err)
        ev.set()

    rs.submit("noop.test", {"i": i}, by="test", callback=cb)
    assert ev.wait(20.0), "write not answered"
    assert errs == [0]


def _in_tick_thread(rs: ReplicatedState, fn: Any) -> Any:
    """Run fn(rs) once in rs's tick thread (pysyncobj state is that thread's) and return its result.
    (The callback is removed from this thread: pysyncobj holds its callback lock while calling.)"""
    out: list[Any] = []
    ev = threading.Event()

    def once() -> None:
        if ev.is_set():
            return
        try:
            out.append(fn(rs))
        except Exception as exc:  # handed to the test thread
            out.append(exc)
        ev.set()

    rs.addOnTickCallback(once)
    rs._notify()
    try:
        assert ev.wait(10.0), "tick callback did not run"
    finally:
        rs.removeOnTickCallback(once)
    if isinstance(out[0], Exception):
        raise out[0]
    return out[0]


def test_leader_internals_read_and_send_append_entries(tmp_path: Path) -> None:
    """match_indexes: one entry per follower, its replicated index; next_heartbeat_time: when the
    next heartbeat is due; send_append_entries_now: sends at once (a follower learns the commit
    index without waiting a heartbeat) and restarts the heartbeat period."""
    with _cluster(tmp_path, push_append_entries=False, **SLOW) as (leader, followers):
        _write(leader, 0)  # committed on the leader: a majority has the entry
        index = last_log_entry(leader)[0]
        match = _in_tick_thread(leader, match_indexes)
        assert sorted(str(n.id) for n in match) == sorted(f.raft_status().self_addr for f in followers)
        assert max(match.values()) == index  # at least one follower acknowledged the entry
        assert all(0 <= v <= index for v in match.values())

        def send(rs: ReplicatedState) -> tuple[float, float, float]:
            before, at = next_heartbeat_time(rs), raft_clock()
            send_append_entries_now(rs)
            return before, at, next_heartbeat_time(rs)

        before, at, after = _in_tick_thread(leader, send)
        assert at + 1.0 <= after <= raft_clock() + 1.0  # restarted: a heartbeat period from the send, on raft_clock
        assert after > before
        # the send carried the commit index: both followers know it well before the next heartbeat
        t0 = time.monotonic()
        wait_until(lambda: all(f.raft_status().commit_index >= index for f in followers), 5.0,
                   interval=0.01, message="followers learned the commit index")
        assert time.monotonic() - t0 < 0.5, "followers waited for a heartbeat"


def test_changed_replication_internals_raise_instead_of_guessing() -> None:
    class Bare:
        pass

    for attr, value in (("_SyncObj__newAppendEntriesTime", None), ("_SyncObj__newAppendEntriesTime", "soon"),
                        ("_SyncObj__newAppendEntriesTime", True)):
        obj = Bare()
        setattr(obj, attr, value)
        with pytest.raises(PysyncobjCompatError):
            next_heartbeat_time(obj)
    with pytest.raises(PysyncobjCompatError, match="not a dict"):
        match_indexes(Bare())
    for bad in ({"n": -1}, {"n": 1.0}, {"n": None}):
        obj = Bare()
        setattr(obj, "_SyncObj__raftMatchIndex", bad)
        with pytest.raises(PysyncobjCompatError):
            match_indexes(obj)
    with pytest.raises(PysyncobjCompatError, match="has no _SyncObj__sendAppendEntries"):
        send_append_entries_now(Bare())


def test_writes_at_leader_and_follower_do_not_wait_for_heartbeats(tmp_path: Path) -> None:
    """With push_append_entries (the default) a write goes out when it is appended and a commit
    when it is reached. Heartbeats here are 1 s apart: a write that waited for one (as with
    heartbeats only, where a follower's write waits for two) would take 1-2 s; these take
    milliseconds, so 0.5 s each is a wide margin on a loaded machine."""
    assert RaftConfig(bind="127.0.0.1:1").push_append_entries is True
    with _cluster(tmp_path, **SLOW) as (leader, followers):
        _write(leader, -1)  # the first write after the election (followers acknowledged the no-op by now)
        for i, node in enumerate([leader, followers[0], followers[1]] * 2):
            with leader.read() as cs:
                applied_before = cs.index  # everything earlier is applied on the leader by now
            t0 = time.monotonic()
            _write(node, i)
            took = time.monotonic() - t0
            assert took < 0.5, f"write {i} at {node.node_id} took {took:.3f}s: it waited for a heartbeat"
            with node.read() as cs:  # read-your-writes: the node that answered has applied it
                assert cs.index >= applied_before + 1

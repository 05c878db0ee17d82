"""The one place that reads pysyncobj internals (pinned to 0.3.x in pyproject.toml).

Also read here (write latency, halb/control/raft.py ``_push_append_entries``): the leader's
next heartbeat time, its per-follower match index, and its private ``__sendAppendEntries``,
so that a leader can send append-entries as soon as it has new entries or a new commit index
instead of waiting for its next heartbeat.

pysyncobj's public ``getStatus()`` reports the log length and the commit index but not the
index and term of the *last* log entry, which the VIP lease needs: a follower notes when its
log last changed (halb/announce/manager.py, LeaseKeeper.on_log_changed) to bound the previous
holder's last renewal. So we read the name-mangled ``SyncObj.__raftLog``: a journal whose
entries are ``(command, index, term)`` tuples.

Every access goes through :func:`last_log_entry`, which checks the shape and raises
:class:`PysyncobjCompatError` instead of returning something that merely looks plausible.
tests/unit/test_pysyncobj_compat.py runs it against a real SyncObj and fails loudly if a
pysyncobj upgrade renames the attribute or changes what the entries mean.
"""
from __future__ import annotations

from typing import Any

from pysyncobj.monotonic import monotonic as _pysyncobj_clock

_RAFT_LOG_ATTR = "_SyncObj__raftLog"
_NEXT_HEARTBEAT_ATTR = "_SyncObj__newAppendEntriesTime"  # monotonic time of the leader's next append-entries
_MATCH_INDEX_ATTR = "_SyncObj__raftMatchIndex"  # leader: node -> highest log index known replicated there
_SEND_APPEND_ENTRIES_ATTR = "_SyncObj__sendAppendEntries"  # leader: send to every connected node now


def raft_clock() -> float:
    """pysyncobj's clock: CLOCK_MONOTONIC_RAW, *not* time.monotonic (CLOCK_MONOTONIC). The two
    drift apart (0.24 s after an hour of uptime here), so every time compared with a pysyncobj
    deadline (next_heartbeat_time, pull_next_heartbeat) must come from this."""
    return _pysyncobj_clock()


class PysyncobjCompatError(RuntimeError):
    """pysyncobj's internals no longer look like the 0.3.x ones this code was written for."""


def last_log_entry(syncobj: Any) -> tuple[int, int]:
    """``(index, term)`` of the last entry in ``syncobj``'s Raft log (never empty: pysyncobj
    seeds it with a no-op). Raises PysyncobjCompatError if the internals changed."""
    try:
        journal = getattr(syncobj, _RAFT_LOG_ATTR)
    except AttributeError:
        raise PysyncobjCompatError(
            f"{type(syncobj).__name__} has no {_RAFT_LOG_ATTR}: pysyncobj internals changed") from None
    try:
        entry = journal[-1]
    except Exception as exc:
        raise PysyncobjCompatError(f"cannot read the last Raft log entry: {exc!r}") from exc
    if not (isinstance(entry, tuple) and len(entry) == 3):
        raise PysyncobjCompatError(f"Raft log entry is not (command, index, term): {entry!r:.200}")
    _command, index, term = entry
    if type(index) is not int or type(term) is not int or index < 0 or term < 0:
        raise PysyncobjCompatError(f"Raft log entry index/term are not non-negative ints: {index!r}, {term!r}")
    return index, term


def pull_next_heartbeat(syncobj: Any, at: float) -> None:
    """Make the leader's next append-entries go out no later than :func:`raft_clock` time ``at``
    (pysyncobj schedules it ``appendEntriesPeriod`` after the previous one). Raises
    PysyncobjCompatError if the internals changed."""
    current = getattr(syncobj, _NEXT_HEARTBEAT_ATTR, None)
    if not isinstance(current, (int, float)):
        raise PysyncobjCompatError(f"{type(syncobj).__name__}.{_NEXT_HEARTBEAT_ATTR} is {current!r}, not a time: "
                                   "pysyncobj internals changed")
    if at < current:
        setattr(syncobj, _NEXT_HEARTBEAT_ATTR, at)


def next_heartbeat_time(syncobj: Any) -> float:
    """:func:`raft_clock` time at which the leader's next append-entries is due. pysyncobj sets it to
    ``now + appendEntriesPeriod`` whenever it sends append-entries, so it grows with every send.
    Raises PysyncobjCompatError if the internals changed."""
    current = getattr(syncobj, _NEXT_HEARTBEAT_ATTR, None)
    if not isinstance(current, (int, float)) or isinstance(current, bool):
        raise PysyncobjCompatError(f"{type(syncobj).__name__}.{_NEXT_HEARTBEAT_ATTR} is {current!r}, not a time: "
                                   "pysyncobj internals changed")
    return float(current)


def match_indexes(syncobj: Any) -> dict[Any, int]:
    """A copy of the leader's ``node -> match index`` (0 until that node's first successful
    append-entries reply in this leader's term; pysyncobj resets it on every election).
    Raises PysyncobjCompatError if the internals changed."""
    table = getattr(syncobj, _MATCH_INDEX_ATTR, None)
    if not isinstance(table, dict):
        raise PysyncobjCompatError(f"{type(syncobj).__name__}.{_MATCH_INDEX_ATTR} is {type(table).__name__}, not a "
                                   "dict: pysyncobj internals changed")
    out = dict(table)
    for node, index in out.items():
        if type(index) is not int or index < 0:
            raise PysyncobjCompatError(f"match index of {node!r} is {index!r}, not a non-negative int")
    return out


def send_append_entries_now(syncobj: Any) -> None:
    """Make the leader send append-entries (new entries and its commit index) to every connected
    node now, as its heartbeat would; this also restarts its heartbeat period. Call only in the
    tick thread. Raises PysyncobjCompatError if the internals changed."""
    send = getattr(syncobj, _SEND_APPEND_ENTRIES_ATTR, None)
    if not callable(send):
        raise PysyncobjCompatError(f"{type(syncobj).__name__} has no {_SEND_APPEND_ENTRIES_ATTR}: "
                                   "pysyncobj internals changed")
    send()

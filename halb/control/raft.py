"""The replicated state: a pysyncobj SyncObj around the pure ClusterState.

Why this shape:
- One `@replicated` entry point (`_apply`) takes one msgpack-encoded command. pysyncobj
  pickles `(funcID, args)` into its log, but args is only ever a `bytes` blob, so no halb
  object is ever pickled and the state machine stays independent of Python versions.
- Snapshots use pysyncobj's serializer hook and are msgpack files we write ourselves.
- The journal is mandatory: without it pysyncobj loses acknowledged writes on a crash
  (see docs/durability in docs/architecture.md).
- pysyncobj runs its own tick thread; state is mutated only there, under a lock that
  readers in the asyncio thread take briefly.
"""
from __future__ import annotations

import functools
import logging
import os
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import msgpack
from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf, replicated
from pysyncobj.config import SERIALIZER_STATE
from pysyncobj.node import TCPNode
from pysyncobj.pipe_notifier import PipeNotifier

from halb.config import RaftConfig
from halb.control.pysyncobj_compat import (PysyncobjCompatError, last_log_entry, match_indexes, next_heartbeat_time,
                                           pull_next_heartbeat, raft_clock, send_append_entries_now)
from halb.control.state import Applied, ClusterState
from halb.control.transport import GuardedTransport, TransportLimits

log = logging.getLogger(__name__)

SNAPSHOT_FORMAT = "halb-snapshot-1"
# The journal holds every command (audit log included): owner-only, also when an older
# version left the directory world-readable.
DATA_DIR_MODE = 0o700
DATA_FILE_MODE = 0o600
RAFT_STATES = {0: "follower", 1: "candidate", 2: "leader"}
FAIL_NAMES = {v: k.lower() for k, v in vars(FAIL_REASON).items() if isinstance(v, int)}


@dataclass(frozen=True)
class RaftStatus:
    """A consistent copy of pysyncobj's status, refreshed in the tick thread."""

    self_addr: str
    state: str
    leader: str | None
    term: int
    has_quorum: bool
    commit_index: int
    last_applied: int
    log_len: int
    partners: dict[str, bool]  # raft address -> connected
    at: float  # monotonic time of this reading


class DialNode(TCPNode):
    """A Raft peer whose identity is its address but which may be *dialled* elsewhere.

    pysyncobj keeps one TCP connection per pair of nodes and identifies the dialler by the
    address it announces, so a fault proxy can only sit on a link if the identity stays
    the same. `dial` maps a peer's address to where to connect (a per-link proxy), which
    lets drills cut or slow exactly the links of one node.
    """

    def __init__(self, address: str, dial: dict[str, str] | None = None, **kwargs: Any) -> None:
        super().__init__(address, **kwargs)
        target = (dial or {}).get(address, address)
        host, port = target.rsplit(":", 1)
        self._dial_host, self._dial_port = host, int(port)

    @property
    def ip(self) -> str:
        return self._dial_host

    @property
    def port(self) -> int:
        return self._dial_port


class ReplicatedState(SyncObj):
    def __init__(
        self,
        node_id: str,
        self_addr: str,
        partners: list[str],
        data_dir: Path,
        password: str | None,
        raft: RaftConfig,
        on_applied: Callable[[dict[str, Any], Applied], None] | None = None,
        on_state_changed: Callable[[str, str], None] | None = None,
    ) -> None:
        self.node_id = node_id
        self._cluster = ClusterState()
        self._lock = threading.RLock()
        self._on_applied = on_applied
        self._on_state_changed = on_state_changed
        self._status: RaftStatus | None = None
        self._status_lock = threading.Lock()
        self.data_dir = data_dir
        self.journal_path = data_dir / "raft.journal"
        self.snapshot_path = data_dir / "raft.snapshot"
        self._tighten_modes()
        conf = SyncObjConf(
            password=password,
            bindAddress=self_addr,  # pysyncobj binds 0.0.0.0 by default: bind only what the operator named
            journalFile=str(self.journal_path),
            fullDumpFile=str(self.snapshot_path),
            serializer=self._write_snapshot,
            serializeChecker=self._snapshot_status,
            deserializer=self._read_snapshot,
            dynamicMembershipChange=True,
            commandsWaitLeader=True,
            raftMinTimeout=raft.election_timeout_min,
            raftMaxTimeout=raft.election_timeout_max,
            appendEntriesPeriod=raft.heartbeat_interval,
            autoTickPeriod=raft.tick_interval,
            appendEntriesUseBatch=raft.append_entries_batch,
            connectionRetryTime=raft.connection_retry,
            connectionTimeout=raft.connection_timeout,
            leaderFallbackTimeout=raft.leader_fallback_timeout,
            logCompactionMinEntries=raft.log_compaction_entries,
            logCompactionMinTime=raft.log_compaction_seconds,
            onStateChanged=self._state_changed,
        )
        self._conf = conf
        self._timing = raft
        self._fast = True  # heartbeat_interval / tick_interval in force (else the idle pair)
        self._adaptive = raft.idle_heartbeat_interval > raft.heartbeat_interval
        self._busy_until = 0.0
        self._seen_index = -1
        self._submitted = False
        self._push = raft.push_append_entries  # see _push_append_entries
        self._pushed_log = -1  # leader: last log index when the previous tick ended (later ones are unsent)
        self._pushed_commit = -1  # leader: highest commit index already sent to the followers
        self._seen_heartbeat_at = 0.0  # leader: next-heartbeat time when the previous tick ended
        self._node_factory = functools.partial(DialNode, dial=dict(raft.dial))
        self._wake: PipeNotifier | None = None
        self._snapshot_child: int | None = None
        self._snapshot_started = 0.0
        limits = TransportLimits(max_frame=raft.max_frame_bytes, auth_timeout=raft.auth_timeout,
                                 max_unauthenticated=raft.max_unauthenticated)
        super().__init__(self_addr, partners, conf, nodeClass=self._node_factory,
                         transportClass=GuardedTransport.with_limits(limits))
        self._tighten_modes()  # pysyncobj has just created the journal with the umask's mode
        self.addOnTickCallback(self._refresh_status)
        self.addOnTickCallback(self._ensure_wake)
        if self._adaptive:
            self.addOnTickCallback(self._adapt_timing)
        if self._push:
            self.addOnTickCallback(self._push_append_entries)  # last: after the status refresh

    def _tighten_modes(self) -> None:
        """Data dir 0700, journal/meta/snapshot 0600, whether new or left by an older version."""
        self.data_dir.mkdir(mode=DATA_DIR_MODE, parents=True, exist_ok=True)
        os.chmod(self.data_dir, DATA_DIR_MODE)
        for path in (self.journal_path, self.journal_path.with_name(self.journal_path.name + ".meta"),
                     self.snapshot_path):
            try:
                os.chmod(path, DATA_FILE_MODE)
            except FileNotFoundError:
                pass

    def _doDestroy(self) -> None:
        """In the tick thread on destroy(): store the commit index (pysyncobj saves it once a
        second) before the journal is flushed and closed, so the process that opens this
        data dir next (a hot restart, halb/takeover.py) starts from where this one was."""
        raft_log = getattr(self, "_SyncObj__raftLog", None)
        if raft_log is not None and hasattr(raft_log, "onOneSecondTimer"):
            try:
                raft_log.onOneSecondTimer()
            except Exception:
                log.exception("could not save the Raft commit index")
        super()._doDestroy()

    # --- the single replicated entry point ------------------------------------------

    @replicated
    def _apply(self, blob: bytes) -> dict[str, Any]:
        try:
            cmd = msgpack.unpackb(blob, raw=False, strict_map_key=False)
            if not isinstance(cmd, dict):
                raise ValueError("command is not a map")
        except Exception as exc:  # a bad entry must not stop the state machine
            return {"ok": False, "error": "invalid", "message": f"undecodable command: {exc}"}
        with self._lock:
            applied = self._cluster.apply(cmd)
        if self._on_applied is not None:
            try:
                self._on_applied(cmd, applied)
            except Exception:  # listeners must never break replication
                log.exception("on_applied listener failed")
        return applied.result

    def submit(self, op: str, args: dict[str, Any], *, by: str, cid: str | None = None,
               callback: Callable[[Any, int], None]) -> str:
        """Queue one command; `callback(result, fail_code)` runs in the tick thread after
        commit and local apply (fail_code 0) or on failure. Returns the command id."""
        cid = cid or uuid.uuid4().hex
        cmd = {"op": op, "args": args, "id": cid, "by": by, "node": self.node_id, "at": time.time()}
        self._submitted = True
        self._apply(msgpack.packb(cmd, use_bin_type=True), callback=callback)
        self._notify()
        return cid

    def _restore_fast(self) -> None:
        self._fast = True
        self._conf.appendEntriesPeriod = self._timing.heartbeat_interval
        self._conf.autoTickPeriod = self._timing.tick_interval

    def _adapt_timing(self) -> None:
        """On-tick callback: fast heartbeats and ticks while the log grows, slow when idle.

        Write latency needs a 20 ms heartbeat (a commit waits for one, a follower's answer
        for the next); an idle cluster does not, and 50 heartbeats a second to each
        follower, encrypted, were half of an idle leader's CPU. pysyncobj reads both
        periods from its conf on every tick, so changing them here takes effect at once.
        A new entry (submitted here, forwarded by a follower, or received from the leader)
        switches back to fast before the entry's heartbeat goes out: callbacks run after
        the tick has queued new commands, and the next heartbeat is pulled forward.
        """
        if not self._adaptive:
            return
        try:
            index = last_log_entry(self)[0]
        except PysyncobjCompatError:
            log.exception("cannot read the Raft log index: heartbeats stay at heartbeat_interval")
            self._adaptive = False
            self._restore_fast()
            return
        now = time.monotonic()
        if index != self._seen_index or self._submitted:
            self._seen_index = index
            self._submitted = False
            self._busy_until = now + self._timing.idle_after_s
        fast = now < self._busy_until
        if fast == self._fast:
            return
        self._fast = fast
        t = self._timing
        self._conf.appendEntriesPeriod = t.heartbeat_interval if fast else t.idle_heartbeat_interval
        self._conf.autoTickPeriod = t.tick_interval if fast else t.idle_heartbeat_interval
        if fast:
            try:  # pysyncobj's clock, not time.monotonic: they drift apart
                pull_next_heartbeat(self, raft_clock() + t.heartbeat_interval)
            except PysyncobjCompatError:
                log.exception("cannot pull the next heartbeat forward")

    def _push_append_entries(self) -> None:
        """On-tick callback (leader): send append-entries now when this tick added log entries
        or advanced the commit index, instead of at the next heartbeat.

        Why: in batch mode pysyncobj sends new entries only with its next heartbeat, and a
        follower learns a commit only with the heartbeat after that. Traced on an idle loopback
        cluster (heartbeat 20 ms), a write at the leader spent 20 of its 23 ms waiting for the
        heartbeat that carried its entry, and a write at a follower 40 of its 46 ms waiting for
        that one and the next (which told it the commit index). pysyncobj's own per-command mode
        (append_entries_batch = false) sends too, but one message per command.

        Order within a pysyncobj tick: commit index computed from the replies read in the last
        poll -> apply -> heartbeat if due -> queued commands appended to the log -> these
        callbacks -> poll. So here, entries appended this tick are unsent, and a commit index
        advanced this tick is unsent unless a heartbeat went out in this tick. Everything queued
        in one tick goes out in one append-entries (batching: concurrent writes share messages).
        Only changes trigger a send: an idle node sends nothing more than its heartbeats.

        Safety gate: sends are skipped (heartbeats alone, as before) while a connected follower
        has not yet acknowledged anything in this leader's term (match index 0). Until then its
        log may hold entries of an older term; several append-entries in flight to such a
        follower can undo each other's log repair (pysyncobj resets its next index on each
        "missing entry" reply, see docs/failover.md "Tried and not kept"). After one successful
        reply a follower's log is a prefix of the leader's, so back-to-back sends stay ordered.
        """
        st = self._status
        if not self._push or st is None:
            return
        if st.state != "leader":
            self._pushed_log = self._pushed_commit = -1
            return
        try:
            index = last_log_entry(self)[0]
            commit = st.commit_index
            heartbeat_at = next_heartbeat_time(self)
            if heartbeat_at > self._seen_heartbeat_at:  # pysyncobj sent one this tick, after computing the commit
                self._pushed_commit = max(self._pushed_commit, commit)
            if (index > self._pushed_log or commit > self._pushed_commit) and self._followers_synced():
                send_append_entries_now(self)
                self._pushed_commit = commit
                heartbeat_at = next_heartbeat_time(self)
            self._pushed_log = index
            self._seen_heartbeat_at = heartbeat_at
        except PysyncobjCompatError:
            log.exception("cannot send append-entries early: writes wait for heartbeats")
            self._push = False

    def _followers_synced(self) -> bool:
        """Every connected follower has acknowledged an entry in this leader's term."""
        return all(index > 0 for node, index in match_indexes(self).items() if self.isNodeConnected(node))

    def _ensure_wake(self) -> None:
        """Subscribe the wake-up pipe from the tick thread (the poller is that thread's)."""
        if self._wake is None:
            self._wake = PipeNotifier(self._poller)

    def _notify(self) -> None:
        """Wake the tick thread so it queues the command now, not after its poll timeout.
        pysyncobj only does this itself with appendEntriesUseBatch=False (config.py says
        why that stays off); entries still go out batched, with the next heartbeat."""
        wake = self._wake
        if wake is not None:
            try:
                wake.notify()
            except OSError:  # pipe full: the tick thread is busy and will look anyway
                pass

    # --- reads ------------------------------------------------------------------------

    @contextmanager
    def read(self) -> Iterator[ClusterState]:
        """Hold the state lock while reading; keep the block short and never block in it."""
        with self._lock:
            yield self._cluster

    def raft_status(self) -> RaftStatus:
        """Cached status (a method, not a property: SyncObj.__init__ probes every attribute)."""
        with self._status_lock:
            st = self._status
        return st if st is not None else self._read_status()

    def _refresh_status(self) -> None:
        st = self._read_status()
        with self._status_lock:
            self._status = st

    def _read_status(self) -> RaftStatus:
        s = self.getStatus()
        partners = {k[len("partner_node_status_server_"):]: v == 2 for k, v in s.items()
                    if k.startswith("partner_node_status_server_")}
        leader = s.get("leader")
        return RaftStatus(
            self_addr=str(s["self"]), state=RAFT_STATES.get(s["state"], str(s["state"])),
            leader=str(leader) if leader is not None else None, term=s["raft_term"],
            has_quorum=bool(s["has_quorum"]), commit_index=s["commit_idx"], last_applied=s["last_applied"],
            log_len=s["log_len"], partners=partners, at=time.monotonic(),
        )

    def _state_changed(self, old: int, new: int) -> None:
        if self._on_state_changed is not None:
            try:
                self._on_state_changed(RAFT_STATES.get(old, str(old)), RAFT_STATES.get(new, str(new)))
            except Exception:
                log.exception("on_state_changed listener failed")

    # --- snapshots (msgpack, written by a forked child) --------------------------------

    def _write_snapshot(self, filename: str, data: tuple[Any, Any, Any]) -> None:
        """Start writing a snapshot in a forked child and return at once.

        Why a fork: pysyncobj calls this in the tick thread, and building and packing the
        whole state took ~1 s at 10,000 backends. Meanwhile no heartbeat went out and the
        state lock was held, so followers started elections (dozens of leader changes
        while backends were being added). The child gets a copy-on-write image of the
        state as of this moment (taken under the lock, so consistent with the log index
        pysyncobj is compacting to), writes it next to the snapshot and renames it over
        the old one, so the old snapshot stays valid until the new one is complete.
        `_snapshot_status` (pysyncobj's serializeChecker) reports when the child is done;
        only then does pysyncobj drop the log entries the snapshot covers.

        pysyncobj itself then tries to rename `filename` (its temp name, which we never
        create) and treats the failure as "in progress" until the checker answers. The
        child lives well under a second; it inherits the process's sockets for that time
        (as pysyncobj's own fork mode does), so a port closed meanwhile frees up after it.
        """
        last, prev, cluster = data
        members = sorted(n.id if hasattr(n, "id") else str(n) for n in cluster)
        if self._snapshot_child is not None:  # pysyncobj never asks while one runs; be safe anyway
            os.waitpid(self._snapshot_child, 0)
            self._snapshot_child = None
        with self._lock:
            pid = os.fork()
            if pid == 0:  # the child: only this thread exists; never log or take other locks
                code = 1
                try:
                    self._dump_snapshot(str(self.snapshot_path), self._cluster.to_dict(), last, prev, members)
                    code = 0
                finally:
                    os._exit(code)
        self._snapshot_child = pid
        self._snapshot_started = time.monotonic()

    @staticmethod
    def _dump_snapshot(path: str, state: dict[str, Any], last: Any, prev: Any, members: list[str]) -> None:
        blob = msgpack.packb({"format": SNAPSHOT_FORMAT, "state": state, "last": list(last), "prev": list(prev),
                              "cluster": members}, use_bin_type=True)
        tmp = path + ".writing"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, DATA_FILE_MODE)  # renamed over raft.snapshot
        os.fchmod(fd, DATA_FILE_MODE)  # a temporary file left by a crashed writer keeps its old mode otherwise
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _snapshot_status(self) -> int:
        pid = self._snapshot_child
        if pid is None:
            return SERIALIZER_STATE.NOT_SERIALIZING
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            done, status = pid, -1
        if done == 0:
            return SERIALIZER_STATE.SERIALIZING
        self._snapshot_child = None
        took = time.monotonic() - self._snapshot_started
        if status == 0:
            log.info("raft snapshot written in %.2fs (background)", took)
            return SERIALIZER_STATE.SUCCESS
        log.warning("raft snapshot writer failed (wait status %s); the log is kept until the next try", status)
        return SERIALIZER_STATE.FAILED

    def _read_snapshot(self, filename: str) -> tuple[Any, Any, Any]:
        with open(filename, "rb") as f:
            d = msgpack.unpackb(f.read(), raw=False, strict_map_key=False)
        if d.get("format") != SNAPSHOT_FORMAT:
            raise ValueError(f"{filename}: not a halb snapshot (format {d.get('format')!r})")
        with self._lock:
            self._cluster = ClusterState.from_dict(d["state"])
        if self._on_applied is not None:
            self._on_applied({"op": "snapshot.loaded"}, Applied({"ok": True}, []))
        # pysyncobj compares entries as tuples; lists would make it discard the journal
        return tuple(d["last"]), tuple(d["prev"]), {self._node_factory(a) for a in d["cluster"]}


def fail_reason_name(code: int) -> str:
    return FAIL_NAMES.get(code, f"error {code}")

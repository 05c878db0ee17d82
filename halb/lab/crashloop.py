"""The lab's data-plane fault: a node's worker processes crash-loop while the node lives.

Why this fault (``halb lab failover --fault dataplane``): the data-plane self-check
(halb/dataplane/selfcheck.py) fails on two things, a service without a bound listener
and ``dataplane_worker_deaths`` worker deaths within ``dataplane_worker_window_s``. A
listener that does not bind only happens when a route is (re)applied (a new service, a
changed port), so it is a change of the cluster's configuration, not a fault of one
running holder; the test for it is tests/netns/test_vip_dataplane_check.py. A crash loop
is what goes wrong with a running holder: a worker that dies on a poison request, a bad
build, the OOM killer; the pool respawns it (0.5, 1, 2 ... s back-off) and it dies again.
:class:`CrashLoop` plays that crash: it SIGKILLs every worker process of one node as soon
as it sees one (every ``interval``), while the node process itself, its Raft and its own
listeners, stays alive and in the majority.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

WORKER_MARKER = b"halb.dataplane.workers"  # in a worker's command line (python -m halb.dataplane.workers)


def parent_of(stat_line: str) -> int:
    """The parent pid in a /proc/PID/stat line (the command name may hold spaces and ')')."""
    return int(stat_line.rpartition(")")[2].split()[1])


def child_pids(parent: int, marker: bytes = WORKER_MARKER, proc: Path = Path("/proc")) -> list[int]:
    """Live children of ``parent`` whose command line contains ``marker``, by pid.

    Scans /proc (``/proc/PID/task/TID/children`` needs CONFIG_PROC_CHILDREN, not on every
    kernel); a process that exits during the scan is skipped."""
    out = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if parent_of((entry / "stat").read_text()) != parent:
                continue
            if marker in (entry / "cmdline").read_bytes():
                out.append(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue
    return sorted(out)


class CrashLoop:
    """Kill every data-plane worker of node ``node_pid`` as soon as it appears, until stopped.

    ``kills`` holds the time.monotonic() of every SIGKILL that hit a live worker."""

    def __init__(self, node_pid: int, interval: float = 0.02) -> None:
        self.node_pid, self.interval = node_pid, interval
        self.kills: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name="crash-loop", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def kill_once(self) -> int:
        """SIGKILL the node's workers now; how many were hit."""
        hit = 0
        for pid in child_pids(self.node_pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            self.kills.append(time.monotonic())
            hit += 1
        return hit

    def _main(self) -> None:
        while not self._stop.is_set():
            self.kill_once()
            self._stop.wait(self.interval)

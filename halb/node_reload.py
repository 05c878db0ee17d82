"""`halb node reload`: start the takeover process detached and wait for its verdict.

Why a separate command rather than a signal to the running node: the new process must be a
fresh interpreter (new code after an upgrade), and systemd's ExecReload needs a command whose
exit code says whether the reload worked. The new process reports on a pipe (``--ready-fd``):
``READY <pid>`` once it serves, ``FAIL <why>`` if it gave up; a pipe that closes without a
line means it died. Its stdout/stderr stay this command's (the journal under systemd).
"""
from __future__ import annotations

import os
import select
import subprocess
import sys
import time

from halb.config import ConfigError, load_config


def reload_node(config_path: str, timeout: float) -> tuple[int, str]:
    """(exit code, message): 0 taken over, 1 the takeover failed (old process serves on),
    2 bad config (nothing started)."""
    try:
        cfg = load_config(config_path)
    except ConfigError as exc:
        return 2, f"halb: config error: {exc}; the running node is unchanged"
    rfd, wfd = os.pipe()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "halb", "node", "run", "--config", config_path, "--takeover",
             "--ready-fd", str(wfd)],
            pass_fds=[wfd], stdin=subprocess.DEVNULL, start_new_session=True)
    finally:
        os.close(wfd)
    try:
        line = _read_line(rfd, timeout)
    finally:
        os.close(rfd)
    if line.startswith("READY"):
        return 0, f"halb: node {cfg.node_id} reloaded: pid {proc.pid} took over"
    if line.startswith("FAIL"):
        why = line[4:].strip()
        _reap(proc)
        return 1, f"halb: reload of node {cfg.node_id} failed: {why}"
    if proc.poll() is None and not line:
        proc.terminate()  # no verdict in time: it must not linger half-started
        _reap(proc)
        return 1, f"halb: reload of node {cfg.node_id} failed: no answer from pid {proc.pid} within {timeout:g}s"
    _reap(proc)
    return 1, (f"halb: reload of node {cfg.node_id} failed: the new process exited {proc.returncode} "
               "before it was ready (see its log)")


def _read_line(fd: int, timeout: float) -> str:
    buf = b""
    deadline = time.monotonic() + timeout
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        buf += chunk
    return buf.decode(errors="replace").strip()


def _reap(proc: subprocess.Popen[bytes]) -> None:
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()

"""keepalived-style notify scripts: run an operator's script on MASTER/BACKUP/FAULT.

Why: operators moving from keepalived have scripts that, for example, start a service
or page someone when a node takes or loses the VIP. halb runs them the same way: the
script gets ``STATE VIP`` as arguments (STATE upper-case: MASTER, BACKUP, FAULT) and the
environment variables ``HALB_STATE`` and ``HALB_VIP``.

Rules: :meth:`NotifyHooks.notify` never blocks the caller (it only queues); scripts run
one at a time in the order notified, so a MASTER script never races the BACKUP script
that follows it; each run is killed (its whole process group: SIGTERM, then SIGKILL
after a short grace) once it exceeds ``timeout_s``; the exit status is logged. A script
that cannot be started is logged, never raised into the VIP logic.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

STATES = ("MASTER", "BACKUP", "FAULT")


@dataclass(frozen=True)
class HookResult:
    state: str
    vip: str
    script: str
    returncode: int | None   # None: could not start
    timed_out: bool
    duration_s: float
    output: str              # last bytes of stdout+stderr, for the log


class NotifyHooks:
    """Per-state scripts (None = nothing to run for that state)."""

    def __init__(self, master: str | Path | None = None, backup: str | Path | None = None,
                 fault: str | Path | None = None, timeout_s: float = 5.0,
                 kill_grace_s: float = 1.0, max_queue: int = 64, keep_results: int = 100) -> None:
        self.scripts: dict[str, str | None] = {
            "MASTER": str(master) if master else None,
            "BACKUP": str(backup) if backup else None,
            "FAULT": str(fault) if fault else None,
        }
        self.timeout_s = timeout_s
        self.kill_grace_s = kill_grace_s
        self.max_queue = max_queue
        self.keep_results = keep_results
        self.results: list[HookResult] = []
        self._queue: asyncio.Queue[tuple[str, str, str]] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def notify(self, state: str, vip: str) -> bool:
        """Queue the script for ``state``; returns False if there is none (or dropped).

        Must be called from the event loop thread (use ``loop.call_soon_threadsafe``
        from elsewhere). Returns at once.
        """
        st = state.upper()
        if st not in STATES:
            raise ValueError(f"unknown notify state {state!r}; expected one of {STATES}")
        script = self.scripts[st]
        if script is None:
            return False
        loop = asyncio.get_running_loop()
        if self._queue is None or self._loop is not loop:
            self._loop = loop
            self._queue = asyncio.Queue()
            self._worker = None
        if self._queue.qsize() >= self.max_queue:
            log.warning("notify queue full (%d); dropping %s hook for %s", self.max_queue, st, vip)
            return False
        self._queue.put_nowait((st, vip, script))
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._drain(), name="halb-notify-hooks")
        return True

    async def wait_idle(self, timeout: float | None = None) -> None:
        """Wait until every queued script has finished (tests, orderly shutdown)."""
        if self._worker is not None:
            await asyncio.wait_for(asyncio.shield(self._worker), timeout)

    async def aclose(self) -> None:
        """Drop queued runs and stop (a running script is killed)."""
        if self._queue is not None:
            while not self._queue.empty():
                self._queue.get_nowait()
        if self._worker is not None and not self._worker.done():
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass

    async def _drain(self) -> None:
        assert self._queue is not None
        while not self._queue.empty():
            state, vip, script = self._queue.get_nowait()
            result = await self._run(state, vip, script)
            self.results.append(result)
            del self.results[:-self.keep_results]

    async def _run(self, state: str, vip: str, script: str) -> HookResult:
        start = time.monotonic()
        env = {**os.environ, "HALB_STATE": state, "HALB_VIP": vip}
        try:
            proc = await asyncio.create_subprocess_exec(
                script, state, vip, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
                env=env, start_new_session=True)  # own process group: kill its children too
        except OSError as exc:
            log.error("notify %s: cannot run %s: %s", state, script, exc)
            return HookResult(state, vip, script, None, False, time.monotonic() - start, str(exc))
        timed_out = False
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), self.timeout_s)
        except asyncio.TimeoutError:
            timed_out = True
            out = await self._kill(proc)
        except asyncio.CancelledError:
            await self._kill(proc)
            raise
        duration = time.monotonic() - start
        text = (out or b"")[-2000:].decode(errors="replace").strip()
        rc = proc.returncode
        if timed_out:
            log.warning("notify %s %s: %s killed after %.1fs timeout", state, vip, script, self.timeout_s)
        elif rc == 0:
            log.info("notify %s %s: %s exited 0 in %.2fs", state, vip, script, duration)
        else:
            log.warning("notify %s %s: %s exited %s in %.2fs: %s", state, vip, script, rc, duration, text)
        return HookResult(state, vip, script, rc, timed_out, duration, text)

    async def _kill(self, proc: asyncio.subprocess.Process) -> bytes:
        for sig, wait in ((signal.SIGTERM, self.kill_grace_s), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(proc.pid, sig)  # the group we created with start_new_session
            except ProcessLookupError:
                pass
            try:
                await asyncio.wait_for(proc.wait(), wait)
                break
            except asyncio.TimeoutError:
                continue
        out = b""
        if proc.stdout is not None:
            try:
                out = await asyncio.wait_for(proc.stdout.read(), 1.0)
            except (asyncio.TimeoutError, Exception):
                pass
        return out

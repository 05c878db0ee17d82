"""Bridge from asyncio to pysyncobj's tick thread for writes, with a hard deadline.

A write answers only after commit and local apply, and *always* answers within the
deadline: pysyncobj never calls back while a leader is partitioned away, so the deadline
is what turns "no quorum" into a clear error instead of a hang.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from halb.control.commands import CommandError, validate_command
from halb.control.raft import ReplicatedState, fail_reason_name

# state-machine error codes -> HTTP status (the API layer uses this table)
ERROR_STATUS = {"invalid": 400, "not_found": 404, "conflict": 409, "denied": 403, "internal": 500}


class WriteError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass
class CommandWriter:
    raft: ReplicatedState
    timeout: float = 3.0

    async def write(self, op: str, args: dict[str, Any], *, by: str, cid: str | None = None,
                    timeout: float | None = None) -> dict[str, Any]:
        try:  # nothing invalid reaches the log: refuse here with the reason (apply re-checks)
            args = validate_command(op, args)
        except CommandError as exc:
            raise WriteError(ERROR_STATUS.get(exc.code, 400), exc.code, exc.message) from None
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[tuple[Any, int]] = loop.create_future()

        def done(result: Any, err: int) -> None:  # runs in the tick thread
            loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result((result, err)))

        deadline = self.timeout if timeout is None else timeout
        cid = self.raft.submit(op, args, by=by, cid=cid, callback=done)
        try:
            result, err = await asyncio.wait_for(fut, deadline)
        except asyncio.TimeoutError:
            st = self.raft.raft_status()
            why = "no leader is known" if st.leader is None else f"leader {st.leader} did not commit it"
            raise WriteError(
                503, "no_quorum",
                f"write not committed within {deadline:g}s ({why}; this node sees quorum={st.has_quorum}). "
                f"It may still apply if quorum returns; retrying with Idempotency-Key {cid} is safe.",
            ) from None
        if err != 0:
            raise WriteError(503, fail_reason_name(err), f"write failed: {fail_reason_name(err)}; retry is safe "
                             f"with Idempotency-Key {cid}")
        if not result.get("ok"):
            code = result.get("error", "invalid")
            raise WriteError(ERROR_STATUS.get(code, 400), code, result.get("message", "rejected"))
        return result

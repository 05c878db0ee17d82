"""The announcers' control loop: one step now, then again on a wake-up or after a tick.

Why a shared piece: the VIP/DNS announcer (manager.py) and the BGP one (bgp_manager.py)
need the same guarantees: a failing step is logged and retried after a pause (never ends
the loop, never spins), cancellation ends it, and a wake-up (a committed entry, a finished
contact) runs the next step at once instead of after the tick.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

ERROR_PAUSE_S = 0.2


async def run_steps(step: Callable[[], Awaitable[None]], wake: asyncio.Event, tick_s: float,
                    log: logging.Logger, what: str, on_error: Callable[[], None] | None = None) -> None:
    """Run ``step`` forever (until cancelled); ``on_error`` after a step that raised."""
    while True:
        try:
            await step()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s step failed", what)
            if on_error is not None:
                on_error()
            await asyncio.sleep(ERROR_PAUSE_S)
        wake.clear()
        try:
            await asyncio.wait_for(wake.wait(), tick_s)
        except asyncio.TimeoutError:
            pass

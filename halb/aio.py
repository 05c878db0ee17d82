"""Run a coroutine on uvloop when it is installed (it is a dependency on Linux), else on
asyncio's default loop. One place, so every halb process chooses its loop the same way."""
from __future__ import annotations

import asyncio
from typing import Any, Callable, Coroutine, TypeVar

T = TypeVar("T")


def loop_factory(use_uvloop: bool = True) -> Callable[[], asyncio.AbstractEventLoop] | None:
    if use_uvloop:
        try:
            import uvloop

            return uvloop.new_event_loop
        except ImportError:  # pragma: no cover
            pass
    return None


def run(coro: Coroutine[Any, Any, T], *, use_uvloop: bool = True) -> T:
    with asyncio.Runner(loop_factory=loop_factory(use_uvloop)) as runner:
        return runner.run(coro)

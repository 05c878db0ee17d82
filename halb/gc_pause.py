"""Keep full garbage collections from stalling Raft and writes while the state grows.

Why: CPython's full (generation 2) collection walks every tracked object while holding the
GIL, so it stops the asyncio loop *and* pysyncobj's tick thread. While 10,000 backends were
added (`make bench-control`) a node ran one every 3-4 s, each 100-400 ms long and freeing
nothing (the objects are the replicated state, routing and health targets, all alive):
the slowest writes (0.4-0.7 s) finished right after such pauses, and a 400 ms stall of
the tick thread is as long as a Raft election timeout (0.3-0.6 s).

What: after a full collection that took at least `slow_s`, the next call of
`freeze_if_due()` (from the node's routing loop, i.e. on the asyncio thread, after a
change) moves every object alive at that moment into the permanent generation
(`gc.freeze()`), which later collections skip. So each slow full collection is paid once
for the objects it saw, and full collections stay proportional to what is new since.
The gc callback only sets a flag: it may run in any thread, in the middle of any
allocation, so it does nothing else.

Cost: an object frozen while alive that later becomes part of a reference cycle is never
collected (plain garbage without cycles is still freed by reference counting, frozen or
not). Freezes happen only after slow full collections, i.e. while the heap grows by many
objects; once they are frozen, full collections are short again and the trigger stops
firing. The data plane's worker processes freeze once at start for the same reason
(halb/dataplane/run.py).
"""
from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

SLOW_FULL_COLLECTION_S = 0.05  # a heartbeat period is 0.02-0.05 s: longer pauses delay Raft


@dataclass
class GcFreezer:
    slow_s: float = SLOW_FULL_COLLECTION_S
    freezes: int = 0
    _started: float = 0.0
    _slowest: float = 0.0  # longest full collection since the last freeze (seconds)
    _installed: bool = False

    def install(self) -> "GcFreezer":
        if not self._installed:
            gc.callbacks.append(self._on_gc)
            self._installed = True
        return self

    def uninstall(self) -> None:
        if self._installed:
            gc.callbacks.remove(self._on_gc)
            self._installed = False

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if info.get("generation") != 2:
            return
        if phase == "start":
            self._started = time.perf_counter()
            return
        took = time.perf_counter() - self._started
        if took >= self.slow_s and took > self._slowest:
            self._slowest = took

    @property
    def due(self) -> bool:
        return self._slowest > 0.0

    def freeze_if_due(self) -> bool:
        """Freeze what is alive now if a full collection was slow since the last freeze."""
        if not self.due:
            return False
        took, self._slowest = self._slowest, 0.0
        before = gc.get_freeze_count()
        gc.freeze()
        self.freezes += 1
        log.info("a full garbage collection took %.0f ms: %d long-lived objects moved out of its reach "
                 "(gc.freeze, %d in all)", took * 1000, gc.get_freeze_count() - before, gc.get_freeze_count())
        return True

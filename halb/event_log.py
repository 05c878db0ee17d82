"""Audit events in the node log: only the ones that are new to this process.

Every applied command's events used to be logged as `event KIND: message`, including
the journal replay at start, so a restarted node wrote `leader.elected ... (term 1)` and
every old change again, as if they had just happened. An event carries the wall-clock
time it was submitted (`at`); one submitted before this process started is history
(journal replay, or catch-up from the leader after downtime) and is logged at DEBUG, with
one INFO line saying that history is being replayed. Caveat: across machines, a clock
that lags this node's by more than the time since start could make a new event look old
(it is then only at DEBUG; `halb events` shows every event either way).
"""
from __future__ import annotations

import logging
from typing import Any


class EventLog:
    def __init__(self, logger: logging.Logger, started_at: float) -> None:
        self.log = logger
        self.started_at = started_at
        self.replayed = 0

    def applied(self, events: list[Any]) -> None:
        for event in events:
            if event.at >= self.started_at:
                self.log.info("event %s: %s", event.kind, event.message)
                continue
            if self.replayed == 0:
                self.log.info("applying events recorded before this process started (journal replay or "
                              "catch-up); they are not logged as new (see `halb events`)")
            self.replayed += 1
            self.log.debug("replayed event #%s %s: %s", event.seq, event.kind, event.message)

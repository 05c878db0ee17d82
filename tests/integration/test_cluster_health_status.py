"""Issue 12 item 4: `cluster status` says degraded while a balancer is down, and does not
name a dead node as leader."""
from __future__ import annotations

import signal
import time

import pytest

from tests.conftest import wait_until

pytestmark = pytest.mark.timeout(120)

GRACE = 0.1  # s after the kill for the survivors' Raft connections to see it closed


def test_status_degraded_and_no_dead_leader_after_kill(cluster_factory) -> None:
    c = cluster_factory()
    st = c.cli_json("cluster", "status")
    assert st["health"] == "ok" and st["health_detail"]["tolerates"] == 1
    assert "health: ok" in c.cli("cluster", "status").stdout

    leader = c.leader()
    survivor = next(n for n in c.nodes if n != leader)
    c.kill(leader, signal.SIGKILL)
    killed_at = time.monotonic()
    named_dead = []
    deadline = killed_at + 3.0
    while time.monotonic() < deadline:  # bounded poll of the survivor's view
        asked = time.monotonic()
        s = c.status(survivor)
        dead_flagged = any(m["leader"] and m["id"] == leader for m in s["members"])
        if (s["leader"] == leader or dead_flagged) and asked - killed_at > GRACE:
            named_dead.append(round(asked - killed_at, 3))
    assert named_dead == [], f"dead {leader} named leader at {named_dead} s after the kill"

    new_leader = c.leader(among=[n for n in c.nodes if n != leader])
    st = wait_until(lambda: (lambda s: s if s["health"] == "degraded" else None)(c.cli_json("cluster", "status")),
                    10, 0.1, "status degraded")
    assert st["leader"] == new_leader
    assert st["health_detail"]["down"] == [leader] and st["health_detail"]["tolerates"] == 0
    table = c.cli("cluster", "status").stdout
    assert f"health: DEGRADED ({leader} down; tolerates no further balancer loss)" in table, table

    # a second loss: the last node sees no quorum
    other = next(n for n in c.nodes if n not in (leader, survivor))
    c.kill(other, signal.SIGKILL)
    wait_until(lambda: c.status(survivor)["health"] == "no_quorum", 10, 0.1, "no_quorum on the last node")
    assert "health: NO QUORUM" in c.cli("cluster", "status").stdout

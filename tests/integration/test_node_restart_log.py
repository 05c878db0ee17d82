"""Issue 12 item 6: a restarted node does not log old events (its journal replay) as new."""
from __future__ import annotations

import signal

import pytest

from tests.conftest import wait_until

pytestmark = pytest.mark.timeout(120)


def test_restarted_node_logs_only_new_events(cluster_factory) -> None:
    c = cluster_factory()
    c.cli("backend", "weight", "A", "50", "--service", "checkout")
    old = c.cli_json("events")
    assert any(e["kind"] == "leader.elected" for e in old)
    victim = next(n for n in c.nodes if n != c.leader())
    wait_until(lambda: c.status(victim)["last_event"] >= max(e["seq"] for e in old), 15, 0.1, "victim caught up")
    c.kill(victim, signal.SIGTERM)
    c.nodes[victim].proc.wait(15)
    log_path = c.directory / "logs" / f"{victim}.log"
    offset = len(log_path.read_bytes())

    c.start(victim)
    wait_until(lambda: c.status(victim)["last_event"] >= max(e["seq"] for e in old), 20, 0.1, "victim replayed")
    c.cli("backend", "weight", "B", "60", "--service", "checkout")
    new = [e for e in c.cli_json("events") if e["seq"] > max(x["seq"] for x in old)]
    assert new, "the weight change made no event"
    wait_until(lambda: c.status(victim)["last_event"] >= new[-1]["seq"], 15, 0.1, "victim applied the new event")
    after = log_path.read_bytes()[offset:].decode()

    def line(e: dict) -> str:
        return f"event {e['kind']}: {e['message']}"

    assert "applying events recorded before this process started" in after, after
    recurring = {line(e) for e in new}  # e.g. the same liveness message again, newly submitted
    replayed = [e for e in old if line(e) not in recurring]
    assert any(e["kind"] == "leader.elected" for e in replayed)
    logged = after.splitlines()

    def was_logged(e: dict) -> bool:  # the whole message: "live members: n1, n2" is a prefix of "... n3"
        return any(entry.endswith(line(e)) for entry in logged)

    for e in replayed:
        assert not was_logged(e), f"old event logged as new: {e}\n{after}"
    weight = next(e for e in new if e["kind"] == "backend.weight")
    assert was_logged(weight), f"new event not logged: {weight}\n{after}"

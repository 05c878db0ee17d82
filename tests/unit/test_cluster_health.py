"""`cluster status` health: ok / degraded / no_quorum, and no dead leader named."""
from __future__ import annotations

from halb.cluster_health import assess, shared_addresses, visible_leader


def members(*connected: bool) -> list[dict]:
    return [{"id": f"n{i + 1}", "raft": f"h:{i}", "in_raft_config": True, "connected": c}
            for i, c in enumerate(connected)]


def test_all_connected_is_ok_and_tolerates_one_loss() -> None:
    h = assess(members(True, True, True), True)
    assert h["health"] == "ok" and h["tolerates"] == 1 and h["down"] == []


def test_one_of_three_down_is_degraded_and_tolerates_nothing_more() -> None:
    h = assess(members(True, False, True), True)
    assert h["health"] == "degraded" and h["tolerates"] == 0 and h["down"] == ["n2"]


def test_minority_side_is_no_quorum() -> None:
    assert assess(members(True, False, False), False)["health"] == "no_quorum"
    # even if pysyncobj still believes it has quorum, seeing too few voters is no quorum
    assert assess(members(True, False, False), True)["health"] == "no_quorum"


def test_members_outside_the_raft_config_do_not_count() -> None:
    rows = members(True, True, True) + [{"id": "n4", "raft": "h:9", "in_raft_config": False, "connected": False}]
    assert assess(rows, True)["health"] == "ok"


def test_leader_named_only_when_self_or_connected() -> None:
    assert visible_leader("a:1", "a:1", {}) == "a:1"
    assert visible_leader("b:1", "a:1", {"b:1": True}) == "b:1"
    assert visible_leader("b:1", "a:1", {"b:1": False}) is None
    assert visible_leader(None, "a:1", {"b:1": True}) is None


def test_shared_addresses_use_the_service_port() -> None:
    assert shared_addresses("127.0.0.11:8080", ["127.0.0.10"]) == ["127.0.0.10:8080"]
    assert shared_addresses("127.0.0.11:8080", []) == []
    assert shared_addresses("[::1]:8080", ["::1"]) == ["[::1]:8080"]

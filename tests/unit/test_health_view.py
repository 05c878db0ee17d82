"""The backends view's verdict/observation columns: "pending" until reports exist."""
from __future__ import annotations

from halb.health.prober import BackendHealth
from halb.health.view import local_view, observation_states, verdict_of

VOTERS = ["n1", "n2", "n3"]
UP = {"up": True, "at": 1.0, "detail": ""}
DOWN = {"up": False, "at": 1.0, "detail": "connect failed"}


def test_no_reports_is_pending_not_up() -> None:
    assert observation_states({}, VOTERS) == {"n1": "pending", "n2": "pending", "n3": "pending"}
    assert verdict_of(None, {}, VOTERS) == "pending"


def test_up_needs_a_majority_of_up_reports() -> None:
    assert verdict_of({"verdict": "up"}, {"n1": UP}, VOTERS) == "pending"
    assert verdict_of({"verdict": "up"}, {"n1": UP, "n2": DOWN}, VOTERS) == "pending"  # 1 up, 1 down, 1 unknown
    assert verdict_of({"verdict": "up"}, {"n1": UP, "n3": UP}, VOTERS) == "up"
    assert observation_states({"n1": UP, "n2": DOWN}, VOTERS) == {"n1": "up", "n2": "down", "n3": "pending"}


def test_down_and_held_verdicts_are_shown_as_the_cluster_holds_them() -> None:
    assert verdict_of({"verdict": "down"}, {"n1": DOWN, "n2": DOWN}, VOTERS) == "down"
    assert verdict_of({"verdict": "held"}, {"n1": UP, "n2": UP, "n3": UP}, VOTERS) == "held"


def test_reports_of_non_voters_do_not_count() -> None:
    assert verdict_of({"verdict": "up"}, {"n1": UP, "n9": UP}, VOTERS) == "pending"
    assert verdict_of({"verdict": "up"}, {"n1": UP}, ["n1"]) == "up"


def test_local_view_pending_then_settled_and_errors() -> None:
    h = BackendHealth(last_error="connect failed", last_failure="connect failed", last_failure_wall=5.0, last_ok=False)
    v = local_view(h)
    assert v is not None and v["state"] == "pending" and v["up"] is True and v["last_error"] == "connect failed"
    h.confirmed, h.last_error, h.last_ok = True, "", True
    v = local_view(h)
    assert v is not None and v["state"] == "up" and v["last_error"] is None
    assert v["last_failure"] == "connect failed" and v["last_failure_at"] == 5.0
    h.up = False
    assert local_view(h)["state"] == "down"  # type: ignore[index]
    assert local_view(None) is None

"""The gradient limit (halb/dataplane/adaptive.py) with made-up time: it grows while
latency stays near the minimum, shrinks when latency rises, and settles just above the
worker count of a simulated saturated server."""
from __future__ import annotations

import pytest

from halb.dataplane.adaptive import GradientLimit, GradientParams


def run_saturated(lim: GradientLimit, workers: int, work_s: float, seconds: float, t0: float = 0.0,
                  per_window: int = 20) -> list[int]:
    """Demand always fills the limit; latency = work * max(1, in flight / workers) (the
    requests above the worker count queue inside the server). Returns the limit per window."""
    p = lim.params
    t, seen = t0, []
    while t < t0 + seconds:
        for i in range(per_window):
            in_flight = lim.limit
            t += p.window_s / per_window
            lim.sample(t, work_s * max(1.0, in_flight / workers), in_flight)
        seen.append(lim.limit)
    return seen


@pytest.mark.parametrize("workers", [3, 10, 40, 200])
def test_converges_just_above_the_servers_worker_count(workers: int) -> None:
    lim = GradientLimit(GradientParams(initial_limit=4 if workers > 4 else 1))
    seen = run_saturated(lim, workers, 0.05, 60.0)
    tail = seen[-40:]
    assert min(tail) >= workers, tail  # never settles below what the server can work on
    assert max(tail) <= workers * 1.1 + max(1, 0.1 * workers * 1.1) + 1, tail  # tolerance + one growth step
    assert lim.min_rtt == pytest.approx(0.05)


def test_follows_a_server_that_loses_half_its_workers() -> None:
    lim = GradientLimit()
    run_saturated(lim, 20, 0.05, 30.0)
    assert 20 <= lim.limit <= 25
    seen = run_saturated(lim, 10, 0.05, 30.0, t0=30.0)
    assert 10 <= min(seen[-20:]) and max(seen[-20:]) <= 13


def test_does_not_grow_when_the_limit_is_not_used() -> None:
    lim = GradientLimit(GradientParams(initial_limit=10))
    for i in range(400):  # 2 requests in flight, fast: near the minimum, but only 20 % used
        lim.sample(i * 0.01, 0.05, 2)
    assert lim.updates > 10 and lim.limit == 10


def test_latency_rise_shrinks_by_at_most_the_min_gradient() -> None:
    lim = GradientLimit(GradientParams(initial_limit=100, min_samples=1, window_s=1.0))
    lim.sample(0.0, 0.05, 100)
    lim.sample(1.0, 0.05, 100)  # window closes at min latency: grows (+10)
    assert lim.limit == 110
    lim.sample(2.0, 1.0, 110)  # 20x slower: the gradient would be 0.055, clamped to 0.5
    assert lim.limit == 55


def test_min_rtt_is_forgotten_after_the_horizon() -> None:
    lim = GradientLimit(GradientParams(min_samples=1, window_s=1.0, min_rtt_horizon_s=5.0))
    lim.sample(0.0, 0.01, 1)
    lim.sample(1.0, 0.01, 1)
    assert lim.min_rtt == 0.01
    for t in range(2, 10):  # the backend is slower for good (e.g. moved): a new baseline
        lim.sample(float(t), 0.1, 1)
    assert lim.min_rtt == pytest.approx(0.1)


@pytest.mark.parametrize("kw", [dict(min_limit=0), dict(initial_limit=2000), dict(window_s=0), dict(tolerance=-1),
                                dict(min_gradient=0), dict(used_fraction=2)])
def test_bad_parameters_are_refused(kw: dict) -> None:
    with pytest.raises(ValueError):
        GradientParams(**kw)


def test_bad_samples_are_ignored() -> None:
    lim = GradientLimit(GradientParams(min_samples=1, window_s=0.1))
    assert not lim.sample(0.0, float("nan"), 1) and not lim.sample(0.0, -1.0, 1)
    assert lim.updates == 0

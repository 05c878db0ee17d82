"""The load meter lists only backends with traffic (sparse /v1/load at 10,000 idle
backends) and still counts the first requests of a backend that was idle."""
from __future__ import annotations

from typing import Any

from halb.load_meter import LoadMeter


def test_idle_backends_are_not_listed_and_first_requests_count() -> None:
    counters: dict[str, Any] = {"services": {"web": {"backends": {
        "idle": {"requests": 0, "in_flight": 0}, "busy": {"requests": 0, "in_flight": 0}}}}}
    meter = LoadMeter("n1", lambda: counters, lambda: [], "t", window_s=10.0)
    meter.sample(now=100.0)
    assert meter.local() == {}
    counters["services"]["web"]["backends"]["busy"] = {"requests": 20, "in_flight": 2}
    meter.sample(now=101.0)  # 20 requests since the previous sample, one second ago
    assert meter.local() == {"web": {"busy": {"rps": 20.0, "conns": 2, "conns_avg": 2.0}}}
    counters["services"]["web"]["backends"]["busy"] = {"requests": 40, "in_flight": 0}
    meter.sample(now=102.0)
    assert meter.local() == {"web": {"busy": {"rps": 20.0, "conns": 0, "conns_avg": 1.0}}}  # mean of 2 and 0
    del counters["services"]["web"]["backends"]["busy"]  # removed: its window goes too
    meter.sample(now=103.0)
    assert meter.local() == {} and not meter._windows and not meter._conn_windows


def test_demand_counts_arrivals_not_only_what_reached_a_backend() -> None:
    """Under limits the backends' rate is capped; the service's arrivals show the overload."""
    counters: dict[str, Any] = {"services": {"web": {"requests": 0, "backends": {"a": {"requests": 0, "in_flight": 0}}}}}
    meter = LoadMeter("n1", lambda: counters, lambda: [], "t", window_s=10.0)
    meter.sample(now=100.0)
    assert meter.demand() == {}
    counters["services"]["web"] = {"requests": 30, "backends": {"a": {"requests": 20, "in_flight": 5}}}
    meter.sample(now=101.0)  # 30 arrived, 20 sent on, 10 queued or shed
    assert meter.demand() == {"web": 30.0}
    assert meter.local()["web"]["a"]["rps"] == 20.0
    assert meter.cluster()["demand"] == {"web": 30.0}


def test_capacity_shares_come_from_every_members_window_rates() -> None:
    counters: dict[str, Any] = {"services": {"web": {"backends": {"a": {"requests": 0, "in_flight": 0}}}}}
    meter = LoadMeter("n1", lambda: counters, lambda: [], "t", window_s=10.0)
    assert meter.shares() == ({}, 1.0)  # no cluster view yet: enforce everything
    meter._rates_by_member = {"n1": {"web": 30.0}, "n2": {"web": 10.0}}
    assert meter.shares() == ({"web": 0.75}, 0.5)

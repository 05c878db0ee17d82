"""halb_check_latency_seconds (halb/metrics.py CheckLatency): the same exposition as
prometheus_client's Histogram, and series of backends no longer checked end."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from halb.metrics import LATENCY_BUCKETS, CheckLatency

SAMPLES = [0.0005, 0.001, 0.0011, 0.003, 0.05, 0.2, 0.999, 1.0, 2.5]


def lines(text: bytes) -> list[str]:
    return [ln for ln in text.decode().splitlines() if "_created" not in ln]


def test_exposition_matches_prometheus_client_histogram() -> None:
    ours = CheckLatency("n1")
    reg = CollectorRegistry(auto_describe=False)
    reg.register(ours)
    ref_reg = CollectorRegistry()
    ref = Histogram("halb_check_latency_seconds", "Active health check latency", ["node", "service", "backend"],
                    buckets=LATENCY_BUCKETS, registry=ref_reg)
    for i, x in enumerate(SAMPLES):
        backend = f"b{i % 2}"
        ours.observe("web", backend, x)
        ref.labels("n1", "web", backend).observe(x)
    assert lines(generate_latest(reg)) == lines(generate_latest(ref_reg))


def test_backends_no_longer_checked_leave_the_output() -> None:
    checked = {("web", "b1"): None, ("web", "b2"): None}
    ours = CheckLatency("n1", lambda: checked)
    reg = CollectorRegistry(auto_describe=False)
    reg.register(ours)
    ours.observe("web", "b1", 0.01)
    ours.observe("web", "b2", 0.01)
    assert 'backend="b2"' in generate_latest(reg).decode()
    del checked[("web", "b2")]
    text = generate_latest(reg).decode()
    assert 'backend="b1"' in text and 'backend="b2"' not in text

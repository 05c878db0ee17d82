"""Random payloads, half-closes and resets on both sides through TCP mode, bytes checked end
to end (tests/relay_stress.py), on both TCP paths; on the C relay also with small buffers,
so partial sends, flow control and the per-run read budget are taken all the time."""
from __future__ import annotations

import pytest

from halb.dataplane import tcp_relay
from halb.dataplane.testing import run
from tests.integration.tcp_paths import tcp_path  # noqa: F401  (autouse: both TCP paths)
from tests.relay_stress import BEHAVIOURS, stress

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("bufsize", [65536, 4096, 7])
def test_random_traffic_arrives_intact_and_nothing_leaks(tcp_path: str, bufsize: int,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    if tcp_path == "asyncio" and bufsize != 65536:
        pytest.skip("the relay buffer size is the C relay's")
    monkeypatch.setattr(tcp_relay, "RELAY_BUFSIZE", bufsize)
    max_payload = 300_000 if bufsize >= 4096 else 20_000
    out = run(stress(clients=120, concurrency=24, seed=bufsize, max_payload=max_payload), timeout=100)
    assert not out.failures, out.failures[:10]
    assert set(out.counts) == set(BEHAVIOURS), out.counts
    assert out.bytes_checked > 0

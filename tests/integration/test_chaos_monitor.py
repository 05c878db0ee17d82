"""The chaos monitor against a real node: real field names, and failures in the report.

Before, the monitor guessed status fields and swallowed every polling error, so a wrong
token, a wrong service name or a renamed field gave a drill report with a quiet, empty
timeline. Now each is counted (poll, node, error) and shown in the report.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from tests.conftest import free_port


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def monitor_for(cluster: Any, token: str | None = None, service: str | None = None,
                extra_apis: dict[str, str] | None = None) -> Any:
    from halb.chaos.monitor import Monitor

    t0 = time.monotonic()
    apis = {n.id: n.api for n in cluster.spec.nodes} | (extra_apis or {})
    return Monitor(apis, cluster.token if token is None else token, service or cluster.spec.service_name,
                   lambda: time.monotonic() - t0, status_interval=0.05, backends_interval=0.05, events_interval=0.05,
                   tls=cluster.tls)


@pytest.mark.timeout(60)
def test_reads_a_real_status_and_backends_without_failures(cluster_factory: Any) -> None:
    c = cluster_factory(n=1)

    async def go() -> Any:
        m = monitor_for(c)
        await m.start()
        await m.stop()
        return m

    m = run(go())
    v = m.views["n1"]
    assert v.reachable and v.leader == "n1" and v.raft_state == "leader" and v.has_quorum
    assert v.vip_held is None                  # the test cluster runs announce mode none
    assert m.agreed_leader() == "n1"
    assert set(m.verdicts) == {name for name, _ in c.spec.backends}
    assert m.failures_report() == []


@pytest.mark.timeout(60)
def test_polling_failures_are_counted_and_reported(cluster_factory: Any) -> None:
    c = cluster_factory(n=1)
    dead = f"127.0.0.1:{free_port()}"          # nothing listens here

    async def go(m: Any) -> Any:
        await m.start()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:     # until the loops have run a few rounds each
            got = {(f["poll"], f["node"]): f["count"] for f in m.failures_report()}
            if min(got.get(("status", "n9"), 0), got.get(("backends", "n1"), 0)) >= 3:
                break
            await asyncio.sleep(0.05)
        await m.stop()
        return m

    m = run(go(monitor_for(c, service="no-such-service", extra_apis={"n9": dead})))
    rows = {(f["poll"], f["node"]): f for f in m.failures_report()}
    assert rows[("status", "n9")]["error"].startswith("unreachable")
    assert rows[("status", "n9")]["count"] >= 3       # counted, not one row per poll
    assert rows[("backends", "n1")]["error"] == "HTTP 404"
    assert rows[("backends", "n1")]["count"] >= 3
    assert rows[("status", "n9")]["last_t"] > rows[("status", "n9")]["first_t"]
    assert not m.views["n9"].reachable and m.views["n1"].reachable
    kinds = [e for e in m.timeline if e["kind"] == "monitor.poll_failed"]
    assert {(e["poll"], e["node"]) for e in kinds} == set(rows)   # one timeline event per kind

    bad = run(go(monitor_for(c, token="wrong-token")))
    rows = {(f["poll"], f["node"]): f for f in bad.failures_report()}
    assert rows[("status", "n1")]["error"] == "HTTP 401"
    assert not bad.views["n1"].reachable

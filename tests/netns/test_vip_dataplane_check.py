"""VIP mode: the holder whose listener cannot bind (the port is taken in its namespace)
hands the VIP over (issue 16, keepalived's track_script). Real namespaces, root only."""
from __future__ import annotations

import socket
import time
from typing import Iterator

import pytest

from halb.announce.sysctl import run_in_netns
from halb.lab.cluster import BACKEND_PORT
from halb.lab.failover import Client, FailoverRun

from .helpers import lab_failover_run

pytestmark = pytest.mark.timeout(120)
PORT = 8090  # the new service's port; taken in the holder's namespace before it binds


@pytest.fixture
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FailoverRun]:
    with lab_failover_run(tmp_path_factory, "c-") as fr:
        yield fr


def test_holder_whose_listener_cannot_bind_hands_the_vip_over(run: FailoverRun) -> None:
    c, lab = run.cluster, run.cluster.lab
    holder = run.wait_steady()
    other = next(lb for lb in c.lbs if lb != holder)

    def block() -> socket.socket:
        s = socket.socket()
        s.setsockopt(socket.SOL_IP, 15, 1)  # IP_FREEBIND: the VIP may be on this host or not
        s.bind((lab.vip, PORT))
        s.listen(1)
        return s

    blocker = run_in_netns(lab.hosts[holder].ns, block)
    client = Client(lab.ns("client"), lab.vip, port=PORT)
    client.start()
    try:
        backends = [{"name": n, "address": f"{lab.hosts[be].ip}:{BACKEND_PORT}"}
                    for n, be in zip(("A", "B", "C"), c.bes)]
        code, body = c.api(other, "POST", "/v1/services", {"name": "web", "listen": f"{lab.vip}:{PORT}",
                                                             "backends": backends})
        assert code in (200, 201), body
        t_created = time.monotonic()
        deadline = time.monotonic() + 10
        check = None
        while time.monotonic() < deadline and check is None:
            code, body = c.api(holder, "GET", "/v1/dataplane-check")
            check = body if code == 200 and body.get("ok") is False else None
            time.sleep(0.02)
        assert check is not None and "web" in check["reason"], check
        failed_at = check["failing_since"]
        deadline = time.monotonic() + 10
        moved_at = None
        while time.monotonic() < deadline and moved_at is None:
            moved_at = next((t for t, h in run.sampler.samples
                             if t >= failed_at and len(h) == 1 and h[0] != holder), None)
            time.sleep(0.02)
        assert moved_at is not None, "the VIP never moved"
        deadline = time.monotonic() + 10
        first_ok = None
        while time.monotonic() < deadline and first_ok is None:
            first_ok = next((r.done for r in list(client.reqs) if r.ok and r.sent >= t_created), None)
            time.sleep(0.02)
        assert first_ok is not None, "the new service never answered through the VIP"
        print(f"VIP moved {moved_at - failed_at:.3f}s after the holder's check failed "
              f"({failed_at - t_created:.3f}s after the service was created); first good response "
              f"through the VIP {first_ok - failed_at:.3f}s after the check failed")
        assert moved_at - failed_at < 2.0
        assert run.max_holders_overall() == 1
        time.sleep(2.0)  # the broken node does not take the VIP back
        assert all(holder not in h for t, h in run.sampler.samples if t >= moved_at)
    finally:
        client.stop()
        blocker.close()

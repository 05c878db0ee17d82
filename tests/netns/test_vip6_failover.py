"""IPv6 VIP in the lab: a 3-node cluster announcing ``vips = [v4, v6]``; a client in the client
namespace reaches the service over IPv6 (HTTP to ``[fd00:99::10]:8080``) before and after the
holder is killed, and never sees two holders of either VIP.

Also checks how the IPv6 VIP is configured on the holder (nodad, deprecated so it is never
a source address, /128) and that the client's neighbour entry for the IPv6 VIP points at the
new holder's MAC right after the failover (the unsolicited NA did it, not a timeout).
"""
from __future__ import annotations

import time
from typing import Iterator

import pytest

from halb.lab.failover import FailoverRun, Sampler

from .helpers import lab_failover_run, neigh_mac

pytestmark = pytest.mark.timeout(150)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FailoverRun]:
    with lab_failover_run(tmp_path_factory, "6-", ipv6=True, steady_timeout=None) as fr:
        v4 = Sampler(fr.cluster, vip=fr.cluster.lab.vip)  # the IPv4 VIP must move with the IPv6 one
        v4.start()
        try:
            fr.wait_steady(timeout=40)
            fr.v4_sampler = v4  # type: ignore[attr-defined]
            yield fr
        finally:
            v4.stop()





def test_client_reaches_the_ipv6_vip_over_ipv6(run: FailoverRun) -> None:
    holder = run.wait_steady()
    lab = run.cluster.lab
    assert run.client.host == lab.vip6 and run.client.recent_ok(50)
    assert run.cluster.vip_holders(lab.vip6) == [holder] == run.cluster.vip_holders(lab.vip)
    line = lab.ip(holder, "-6", "-o", "addr", "show", "dev", "eth0", check=False).stdout
    mine = [ln for ln in line.splitlines() if f" {lab.vip6}/128 " in ln]
    assert mine and "nodad" in mine[0] and "deprecated" in mine[0], line
    assert neigh_mac(lab, "client", lab.vip6) == lab.hosts[holder].mac


def test_sigkill_of_the_holder_moves_the_ipv6_vip_and_the_client_follows(run: FailoverRun) -> None:
    t = run.trial("kill")
    assert t.new_holder not in (None, t.holder), t
    assert t.max_holders == 1, t
    assert t.gap_s < 10.0, t  # a bound that catches "waited for the neighbour entry to expire"
    lab = run.cluster.lab
    new = t.new_holder
    assert new is not None
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not run.client.recent_ok(50):
        time.sleep(0.05)
    assert run.client.recent_ok(50), "client not served over IPv6 after the failover"
    assert neigh_mac(lab, "client", lab.vip6) == lab.hosts[new].mac
    assert run.cluster.vip_holders(lab.vip6) == [new] == run.cluster.vip_holders(lab.vip)


def test_never_two_holders_of_either_vip(run: FailoverRun) -> None:
    assert run.max_holders_overall() == 1
    assert max((len(h) for _, h in run.v4_sampler.samples), default=0) == 1  # type: ignore[attr-defined]

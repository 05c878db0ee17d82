"""A real 3-node halb cluster in namespaces: the VIP follows the quorum lease, never two holders.

One cluster per module (starting it costs a few seconds); a client in the client namespace
requests the VIP every 10 ms and a sampler reads every balancer's addresses every 10 ms for
the whole module, so the last test can assert that no sample ever showed two holders.
"""
from __future__ import annotations

import socket
import time
from typing import Iterator

import pytest
from dnslib import DNSRecord

from halb.announce.sysctl import run_in_netns
from halb.lab import Lab
from halb.lab.cluster import DNS_PORT, LabCluster
from halb.lab.failover import FailoverRun

from .conftest import RUN_PREFIX
from .helpers import lab_failover_run

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FailoverRun]:
    with lab_failover_run(tmp_path_factory, "f-") as fr:
        yield fr


def holders_during(run: FailoverRun, seconds: float) -> list[tuple[str, ...]]:
    t0 = time.monotonic()
    time.sleep(seconds)
    return [h for t, h in run.sampler.samples if t >= t0]


def test_exactly_one_node_holds_the_vip(run: FailoverRun) -> None:
    holder = run.wait_steady()
    seen = holders_during(run, 1.5)
    assert seen and all(h == (holder,) for h in seen), set(seen)
    views = {lb: run.cluster.status(lb)["announce"] for lb in run.cluster.lbs}
    assert {v["holder"] for v in views.values()} == {run.cluster.node_id(holder)}
    assert [lb for lb, v in views.items() if v["holds_vip"]] == [holder]
    assert views[holder]["lease_remaining_s"] > 0
    assert run.client.recent_ok(50)


def test_sigkill_of_the_holder_moves_the_vip(run: FailoverRun) -> None:
    t = run.trial("kill")
    assert t.new_holder not in (None, t.holder)
    assert t.max_holders == 1
    assert t.old_gone_s is not None and t.garp_s is not None and t.old_gone_s < t.garp_s
    assert t.gap_s < 4.0


def test_frozen_holder_loses_the_vip_by_itself_first(run: FailoverRun) -> None:
    t = run.trial("freeze")
    assert t.new_holder not in (None, t.holder)
    assert t.max_holders == 1
    # the kernel removed the frozen node's VIP (valid_lft) before the new holder added it
    assert t.old_gone_s is not None and t.garp_s is not None and t.old_gone_s < t.garp_s < 5.0
    # resumed (SIGCONT; the trial watched 2 s after it) it steps down and never re-adds the VIP
    after = [h for ts, h in run.sampler.samples if ts >= time.monotonic() - 2.5]
    assert after and all(len(h) <= 1 and t.holder not in h for h in after), set(after)


def test_partitioned_holder_drops_the_vip(run: FailoverRun) -> None:
    t = run.trial("partition")
    assert t.new_holder not in (None, t.holder)
    assert t.max_holders == 1
    assert t.old_gone_s is not None and t.garp_s is not None and t.old_gone_s < t.garp_s
    assert t.gap_s < 4.0


def test_planned_transfer_has_a_small_gap(run: FailoverRun) -> None:
    t = run.trial("transfer")
    assert t.new_holder not in (None, t.holder)
    assert t.max_holders == 1
    assert t.garp_s is not None and t.garp_s < 0.6
    assert t.gap_s < 0.6


def test_no_sample_ever_showed_two_holders(run: FailoverRun) -> None:
    assert len(run.sampler.samples) > 1000
    assert run.max_holders_overall() == 1


# ---- DNS mode ------------------------------------------------------------------------

def dns_a(lab: Lab, server: str, name: str = "checkout.halb") -> list[str] | None:
    def ask() -> list[str] | None:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(0.5)
        try:
            s.sendto(DNSRecord.question(name).pack(), (server, DNS_PORT))
            reply = DNSRecord.parse(s.recv(2048))
            return sorted(str(rr.rdata) for rr in reply.rr)
        except OSError:
            return None
        finally:
            s.close()
    return run_in_netns(lab.ns("client"), ask)


def test_dns_answers_follow_the_lease_holder(tmp_path_factory: pytest.TempPathFactory) -> None:
    lab = Lab(prefix=RUN_PREFIX + "d-", state_dir=tmp_path_factory.mktemp("labstate"))
    cluster = LabCluster(lab, tmp_path_factory.mktemp("dnscluster"), mode="dns")
    try:
        lab.up()
        cluster.start(backends=False)

        def agreed() -> tuple[str | None, str | None]:
            st = [cluster.status(lb) for lb in cluster.lbs if cluster.alive(lb)]
            holders = {s["announce"]["holder"] for s in st if s}
            answers = {tuple(dns_a(lab, lab.hosts[lb].ip) or ()) for lb in cluster.lbs if cluster.alive(lb)}
            if len(holders) == 1 and len(answers) == 1:
                return holders.pop(), (next(iter(answers)) or (None,))[0]
            return None, None

        def wait_agreed(not_holder: str | None = None, timeout: float = 15.0) -> tuple[str, str]:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                holder, addr = agreed()
                if holder and holder != not_holder and addr:
                    return holder, addr
                time.sleep(0.2)
            raise AssertionError(f"DNS answers never agreed on a holder other than {not_holder}")

        holder, addr = wait_agreed()
        assert addr == lab.hosts[cluster.lb_of(holder)].ip
        cluster.kill(cluster.lb_of(holder))
        t0 = time.monotonic()
        new, new_addr = wait_agreed(not_holder=holder)
        print(f"DNS answer moved {holder} -> {new} in {time.monotonic() - t0:.2f}s")
        assert new_addr == lab.hosts[cluster.lb_of(new)].ip
    finally:
        cluster.stop()
        lab.down(all_with_prefix=True)

"""BGP mode in the lab: three balancers announce one service address to a BIRD 2 router
that spreads flows with ECMP; each failure takes exactly the failed balancer out.

One lab and one cluster for the module (building them costs ~10 s); every test puts the
cluster back to "three next hops" before it ends, and the fixture removes every namespace
and process it made even when a test fails.
"""
from __future__ import annotations

import signal

import pytest

from halb.lab.bgp_router import next_hops, sessions
from tests.system_tools import require_tools
from .helpers import wait_for

pytestmark = pytest.mark.timeout(300)

LBS = ("lb1", "lb2", "lb3")


@pytest.fixture(scope="module")
def bgp(tmp_path_factory):
    from halb.lab import Lab
    from halb.lab.cluster import LabCluster
    from tests.netns.conftest import RUN_PREFIX

    require_tools({"bird": "bird2", "birdc": "bird2"})
    lab = Lab(prefix=RUN_PREFIX + "g-", state_dir=tmp_path_factory.mktemp("bgpstate"), topology="bgp")
    cluster = LabCluster(lab, tmp_path_factory.mktemp("bgprun"), mode="bgp")
    try:
        lab.up()
        cluster.start()
        assert wait_for(lambda: len(next_hops(lab)) == 3, 40) is not None, \
            f"router never saw three next hops: {next_hops(lab)}, sessions {sessions(lab)}"
        yield lab, cluster
    finally:
        cluster.stop()
        lab.down(all_with_prefix=True)


def ip_of(lab, lb: str) -> str:
    return lab.hosts[lb].ip


def restore(lab, cluster) -> None:
    """Every node running, unfrozen, unpartitioned; three next hops again."""
    for lb in LBS:
        lab.heal(lb)
        if cluster.alive(lb):
            cluster.signal_group(lb, signal.SIGCONT)
        else:
            cluster.start_node(lb)
    assert wait_for(lambda: len(next_hops(lab)) == 3, 40) is not None, \
        f"not back to three next hops: {next_hops(lab)}, sessions {sessions(lab)}"


def requests_per_node(cluster) -> dict[str, int]:
    out = {}
    for lb in LBS:
        code, body = cluster.api(lb, "GET", "/v1/dataplane?service=checkout")
        assert code == 200, body
        out[lb] = int(body["services"]["checkout"]["requests"])
    return out


def client_requests(lab, n: int) -> int:
    """n new connections from the client to the service address; how many answered 200."""
    import http.client

    from halb.announce.sysctl import run_in_netns

    addr = lab.service_addresses[0]

    def go() -> int:
        ok = 0
        for _ in range(n):
            conn = http.client.HTTPConnection(addr, 8080, timeout=2)
            try:
                conn.request("GET", "/health")
                ok += conn.getresponse().status == 200
            except OSError:
                pass
            finally:
                conn.close()
        return ok

    return run_in_netns(lab.ns("client"), go, timeout=n * 2 + 10)


def test_three_balancers_announce_and_client_flows_reach_all_three(bgp):
    lab, cluster = bgp
    assert next_hops(lab) == sorted(ip_of(lab, lb) for lb in LBS)
    for lb in LBS:
        st = cluster.status(lb)
        assert st is not None
        ann = st["announce"]["announcements"]
        assert ann == [{"address": lab.service_addresses[0], "services": ["checkout"], "announced": True,
                        "accepted": True, "reason": "ok"}], ann
        established = [{"name": "router1", "state": "up", "info": "Established"}]
        assert wait_for(lambda: (cluster.status(lb) or {}).get("announce", {}).get("sessions") == established,
                        5, 0.2) is not None  # the status view polls birdc once a second
    before = requests_per_node(cluster)
    assert client_requests(lab, 90) == 90
    after = requests_per_node(cluster)
    served = {lb: after[lb] - before[lb] for lb in LBS}
    assert all(v > 0 for v in served.values()), served  # L4 hash: new source ports spread


def test_kill_one_and_the_router_drops_it(bgp):
    lab, cluster = bgp
    gone = ip_of(lab, "lb3")
    cluster.kill("lb3")  # SIGKILL: its BIRD dies with it (PR_SET_PDEATHSIG), the session closes
    took = wait_for(lambda: gone not in next_hops(lab), 5)
    assert took is not None and took < 2.0, f"router kept {gone}: {next_hops(lab)}"
    assert next_hops(lab) == sorted(ip_of(lab, lb) for lb in ("lb1", "lb2"))
    assert client_requests(lab, 20) == 20
    restore(lab, cluster)


def test_freeze_one_and_bfd_drops_it(bgp):
    lab, cluster = bgp
    gone = ip_of(lab, "lb2")
    cluster.signal_group("lb2", signal.SIGSTOP)  # node and its BIRD: a frozen machine
    try:
        took = wait_for(lambda: gone not in next_hops(lab), 5)
        assert took is not None and took < 1.0, f"not dropped within 1 s (BFD 100 ms x 3): {next_hops(lab)}"
        assert not sessions(lab)["lb2"].startswith("up"), sessions(lab)  # BFD took the session down
        assert client_requests(lab, 20) == 20
    finally:
        cluster.signal_group("lb2", signal.SIGCONT)
    restore(lab, cluster)


def test_partition_from_raft_withdraws_while_the_bgp_session_stays_up(bgp):
    lab, cluster = bgp
    gone = ip_of(lab, "lb1")
    lab.partition("lb1", ["lb2", "lb3"])  # Raft cut; the router is still reachable
    try:
        took = wait_for(lambda: gone not in next_hops(lab), 8)
        assert took is not None, f"a node without a Raft majority kept announcing: {next_hops(lab)}"
        assert took < 3.0 + 0.5, took  # its last contact + lease_s (3 s in bgp mode), plus scheduling slack
        assert sessions(lab)["lb1"] == "up Established"  # it withdrew on its own, the session is up
        def withdrawn_for_quorum() -> bool:
            ann = ((cluster.status("lb1") or {}).get("announce") or {}).get("announcements") or [{}]
            return ann[0].get("announced") is False and "Raft majority" in ann[0].get("reason", "")
        assert wait_for(withdrawn_for_quorum, 4, 0.1) is not None, cluster.status("lb1")
    finally:
        lab.heal("lb1")
    restore(lab, cluster)


def test_drain_withdraws_and_undrain_announces_again(bgp):
    lab, cluster = bgp
    gone = ip_of(lab, "lb2")
    code, body = cluster.api("lb2", "POST", "/v1/announce/drain", {"drain": True})
    assert code == 200 and body["draining"] is True, body
    # it answers once withdrawn; no client was connected, so nothing was waited for
    assert body["drain"]["phase"] == "withdrawn" and body["drain"]["connections_left"] == 0, body
    try:
        assert wait_for(lambda: gone not in next_hops(lab), 3) is not None, next_hops(lab)
        # the address stays on lo so flows that were on their way are still served
        out = lab.ip("lb2", "-4", "addr", "show", "dev", "lo").stdout
        assert f" {lab.service_addresses[0]}/32" in out
        assert client_requests(lab, 20) == 20
    finally:
        code, body = cluster.api("lb2", "POST", "/v1/announce/drain", {"drain": False})
    assert code == 200 and body["draining"] is False
    restore(lab, cluster)


def test_no_eligible_backend_withdraws_everywhere(bgp):
    lab, cluster = bgp
    for be in ("A", "B", "C"):
        code, body = cluster.api("lb1", "POST", f"/v1/services/checkout/backends/{be}/maint")
        assert code == 200, body
    try:
        assert wait_for(lambda: next_hops(lab) == [], 5) is not None, next_hops(lab)
        st = cluster.status("lb3")
        assert "no eligible backend" in st["announce"]["announcements"][0]["reason"]
    finally:
        for be in ("A", "B", "C"):
            cluster.api("lb1", "POST", f"/v1/services/checkout/backends/{be}/enable")
    restore(lab, cluster)


def test_sigterm_withdraws_before_the_node_exits(bgp):
    lab, cluster = bgp
    gone = ip_of(lab, "lb3")
    proc = cluster.procs["lb3"]
    proc.send_signal(signal.SIGTERM)
    withdrawn = wait_for(lambda: gone not in next_hops(lab), 5)
    still_running = proc.poll() is None
    assert withdrawn is not None
    assert still_running  # withdraw first, then stop (withdraw_wait_s = 0.5 s between)
    assert wait_for(lambda: proc.poll() is not None, 10) is not None and proc.returncode == 0
    restore(lab, cluster)

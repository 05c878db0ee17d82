"""BGP mode without sockets: quorum contact, the announce rule, [announce] mode = "bgp"
parsing, and the BIRD config it renders (checked by the real `bird -p` parser)."""
from __future__ import annotations

import subprocess

import pytest

from halb.announce.bgp import (
    BgpSettings, Inputs, QuorumContact, RouterPeer, ServiceAddress, decide, eligible_services,
)
from halb.announce.bird import parse_protocols, render_config
from halb.announce.lease import LeaseParams
from halb.announce.settings import AnnounceConfigError, parse_announce
from halb.dataplane.snapshot import BackendRoute, ServiceRoute
from tests.system_tools import require_tools

P = LeaseParams()  # lease 1.5 s, renew every 0.15 s, refresh while > 1.3 s remain


# ---- quorum contact ---------------------------------------------------------------------

def test_no_contact_before_the_first_commit():
    c = QuorumContact(P)
    assert not c.fresh(0.0) and not c.may_refresh(0.0) and c.remaining(0.0) == 0.0
    assert c.due(0.0)


def test_contact_is_the_submit_time_of_the_newest_commit():
    c = QuorumContact(P)
    t = c.begin("a", 10.0)
    assert c.on_result("a", t, ok=True)
    assert c.until == 10.0 + P.lease_s
    assert c.fresh(11.4) and not c.fresh(11.5)
    # refresh only while more than refresh_min_remaining_s is left: the kernel lifetime
    # (<= 1.15 s) then ends before the contact does
    assert c.may_refresh(10.19) and not c.may_refresh(10.2 + 1e-9)


def test_a_late_older_result_does_not_move_contact_back_nor_forward():
    c = QuorumContact(P)
    t1 = c.begin("old", 1.0)
    t2 = c.begin("new", 1.2)
    assert c.on_result("new", t2, ok=True)
    assert not c.on_result("old", t1, ok=True)
    assert c.contact_at == 1.2


def test_failed_contacts_extend_nothing():
    c = QuorumContact(P)
    t = c.begin("x", 5.0)
    assert not c.on_result("x", t, ok=False)
    assert c.contact_at is None and not c.fresh(5.0)


def test_partitioned_node_stops_submitting_at_the_bound_and_lapses():
    """A partitioned node's contacts never answer: at most max_outstanding in flight, and
    the last committed one runs out lease_s later whatever it keeps submitting."""
    c = QuorumContact(P)
    t = c.begin("ok", 0.0)
    c.on_result("ok", t, ok=True)
    now, submitted = 0.0, 0
    while now < 4.0:
        if c.due(now):
            c.begin(f"lost{submitted}", now)
            submitted += 1
        now += 0.01
    assert submitted == P.max_outstanding  # none answered within 4 s (< the 5 s give-up)
    assert not c.fresh(P.lease_s) and c.fresh(P.lease_s - 0.01)
    # unanswered for 5 s: they stop counting and submitting resumes
    assert c.due(0.15 + 5.0 + 0.01 + P.renew_interval_s * P.max_outstanding)


def test_due_every_renew_interval():
    c = QuorumContact(P)
    c.on_result("a", c.begin("a", 0.0), ok=True)
    assert not c.due(0.1) and c.due(0.15)


# ---- the announce rule --------------------------------------------------------------------

ADDR = ServiceAddress("10.99.100.10", ("checkout",))
GOOD = Inputs(quorum=True, dataplane_ok=True, dataplane_reason="", eligible={"checkout": True, "other": False})


def test_announces_when_every_condition_holds():
    d = decide(ADDR, GOOD)
    assert (d.accept, d.announce, d.reason) == (True, True, "ok")


@pytest.mark.parametrize("change, reason", [
    ({"quorum": False}, "Raft majority"),
    ({"dataplane_ok": False, "dataplane_reason": "listener checkout unbound"}, "listener checkout unbound"),
    ({"eligible": {"checkout": False}}, "no eligible backend in checkout"),
    ({"eligible": {}}, "does not exist"),
    ({"stopping": True}, "stopping"),
])
def test_withdraws_and_removes_the_address_for_each_failed_condition(change, reason):
    d = decide(ADDR, Inputs(**{**GOOD.__dict__, **change}))
    assert not d.accept and not d.announce
    assert reason in d.reason


def test_draining_withdraws_but_keeps_serving_flows_in_flight():
    d = decide(ADDR, Inputs(**{**GOOD.__dict__, "draining": True}))
    assert d.accept and not d.announce and d.reason == "draining"


def test_draining_node_that_loses_quorum_gives_the_address_up_too():
    d = decide(ADDR, Inputs(**{**GOOD.__dict__, "draining": True, "quorum": False}))
    assert not d.accept


def test_address_without_services_needs_any_service_with_a_backend():
    anyaddr = ServiceAddress("10.99.100.11")
    assert decide(anyaddr, GOOD).announce
    assert not decide(anyaddr, Inputs(**{**GOOD.__dict__, "eligible": {"a": False, "b": False}})).announce
    assert "no service" in decide(anyaddr, Inputs(**{**GOOD.__dict__, "eligible": {}})).reason


def test_one_of_several_services_with_a_backend_is_enough():
    a = ServiceAddress("10.99.100.10", ("checkout", "other"))
    assert decide(a, GOOD).announce


def test_eligible_services_reads_the_routes():
    def route(name, *backends):
        return ServiceRoute(name=name, mode="http", listen_host="10.99.100.10", listen_port=8080, backends=backends)
    up = BackendRoute("A", "10.0.0.1", 80, 1)
    down = BackendRoute("B", "10.0.0.2", 80, 1, healthy=False)
    drained = BackendRoute("C", "10.0.0.3", 80, 1, admin_state="drain")
    zero = BackendRoute("D", "10.0.0.4", 80, 0)
    got = eligible_services({"a": route("a", down, up), "b": route("b", down, drained, zero), "c": route("c")})
    assert got == {"a": True, "b": False, "c": False}


# ---- config ---------------------------------------------------------------------------------

BASE = {"mode": "bgp", "local_as": 65001, "local_address": "10.99.0.11",
        "routers": [{"address": "10.99.0.1", "as": 65000}],
        "addresses": ["10.99.100.10", {"address": "10.99.100.11/32", "services": ["checkout"]}]}


def test_parse_bgp_defaults():
    cfg = parse_announce(dict(BASE))
    b = cfg.bgp
    assert b is not None
    assert b.local_as == 65001 and b.router_id == "10.99.0.11"
    assert b.routers == (RouterPeer("10.99.0.1", 65000, "", None),)
    assert b.addresses == (ServiceAddress("10.99.100.10", ()), ServiceAddress("10.99.100.11", ("checkout",)))
    assert (b.bfd, b.bfd_interval_ms, b.bfd_multiplier, b.hold_time_s, b.interface) == (True, 100, 3, 9, "lo")
    assert b.med is None and b.communities == ()
    assert cfg.lease.lease_s == 3.0  # bgp's default: a slow election must not withdraw every balancer


def test_parse_bgp_router_id_from_listen_host():
    raw = {k: v for k, v in BASE.items() if k != "local_address"}
    assert parse_announce(raw, listen_host="10.99.0.12").bgp.router_id == "10.99.0.12"


@pytest.mark.parametrize("change, key, words", [
    ({"local_as": 0}, "local_as", "AS number"),
    ({"local_as": "65001"}, "local_as", "must be a int"),
    ({"routers": []}, "routers", "at least one"),
    ({"routers": [{"address": "10.99.0.1"}]}, "routers[0].as", "AS number"),
    ({"routers": [{"address": "router", "as": 1}]}, "routers[0].address", "IPv4"),
    ({"routers": [{"address": "10.99.0.1", "as": 1, "port": 179}]}, "routers[0].port", "unknown key"),
    ({"routers": [{"address": "10.99.0.1", "as": 1, "name": "halb_x"}]}, "routers[0].name", "reserved"),
    ({"routers": [{"address": "10.99.0.1", "as": 1, "password": 'a"b'}]}, "routers[0].password", "quotes"),
    ({"addresses": []}, "addresses", "at least one"),
    ({"addresses": ["10.99.100.0/24"]}, "addresses[0]", "IPv4"),
    ({"addresses": ["10.99.100.10", "10.99.100.10"]}, "addresses[1]", "twice"),
    ({"addresses": [{"address": "10.99.100.10", "services": "checkout"}]}, "addresses[0].services", "list"),
    ({"hold_time_s": 2}, "hold_time_s", "3-65535"),
    ({"bfd_interval_ms": 1}, "bfd_interval_ms", "10-10000"),
    ({"communities": ["65000"]}, "communities[0]", "ASN:VALUE"),
    ({"communities": ["65000:70000"]}, "communities[0]", "0-65535"),
    ({"med": -5}, "med", "0-4294967295"),
    ({"local_address": "", "router_id": ""}, "router_id", "required unless local_address"),
    ({"vip": "10.0.0.1"}, "vip", "unknown key for mode 'bgp'"),
    ({"lease_s": 1.0}, "lease_s", "lease_s must exceed"),
])
def test_parse_bgp_errors_name_the_key(change, key, words):
    with pytest.raises(AnnounceConfigError) as exc:
        parse_announce({**BASE, **change})
    assert exc.value.key == key
    assert words in exc.value.reason


def test_config_file_error_names_file_and_key(tmp_path):
    from halb.config import ConfigError, load_config

    p = tmp_path / "n1.toml"
    p.write_text('node_id = "n1"\ndata_dir = "d"\ntoken_file = "token"\n'
                 '[raft]\nbind = "127.0.0.1:7100"\n[api]\nbind = "127.0.0.1:7000"\n'
                 '[announce]\nmode = "bgp"\nlocal_as = 65001\nlocal_address = "10.0.0.1"\n'
                 'addresses = ["10.99.100.10"]\n[[announce.routers]]\naddress = "10.0.0.254"\nas = 99999999999\n')
    with pytest.raises(ConfigError) as exc:
        load_config(p)
    assert str(p) in str(exc.value) and "announce.routers[0].as" in str(exc.value)


# ---- BIRD config ----------------------------------------------------------------------------

SETTINGS = BgpSettings(
    local_as=65001, local_address="10.99.0.11", router_id="10.99.0.11",
    routers=(RouterPeer("10.99.0.1", 65000), RouterPeer("10.99.0.2", 65000, "edge2", "s3cret")),
    addresses=(ServiceAddress("10.99.100.10"), ServiceAddress("10.99.100.11")),
    med=20, communities=((65000, 100),))


def test_rendered_config_exports_only_the_service_addresses():
    text = render_config(SETTINGS, "n1")
    assert "import where net ~ [ 10.99.100.10/32, 10.99.100.11/32 ]" in text
    assert "if net ~ [ 10.99.100.10/32, 10.99.100.11/32 ] then" in text
    assert "bgp_med = 20;" in text and "bgp_community.add((65000,100));" in text
    assert "protocol bgp router1 {" in text and "protocol bgp edge2 {" in text
    assert text.count("bfd on;") == 2 and "min tx interval 100 ms;" in text
    assert "import none;" in text
    assert text.count("strict bind on;") == 2  # BGP port only on local_address


def test_bird_parses_the_rendered_config(tmp_path):
    tools = require_tools({"bird": "bird2"})
    for s in (SETTINGS, BgpSettings(local_as=4200000000, routers=(RouterPeer("192.0.2.1", 64512),),
                                    addresses=(ServiceAddress("198.51.100.7"),), router_id="192.0.2.10",
                                    bfd=False, hold_time_s=0)):
        conf = tmp_path / "bird.conf"
        conf.write_text(render_config(s, "n1"))
        proc = subprocess.run([tools["bird"], "-p", "-c", str(conf)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr + conf.read_text()


def test_parse_protocols():
    text = """BIRD 2.0.12 ready.
Name       Proto      Table      State  Since         Info
device1    Device     ---        up     04:08:54.923
halb_bfd   BFD        ---        up     04:08:54.923
router1    BGP        ---        up     04:08:58.889  Established
edge2      BGP        ---        start  2026-12-05 04:08:54  Active        Socket: Connection refused
"""
    rows = {p.name: p for p in parse_protocols(text)}
    assert rows["router1"].proto == "BGP" and rows["router1"].state == "up" and rows["router1"].info == "Established"
    assert rows["edge2"].state == "start" and rows["edge2"].info.startswith("Active")
    assert "Name" not in rows and "BIRD" not in rows


# ---- the lease.contact command and the status table ------------------------------------------

def test_lease_contact_commits_and_changes_nothing():
    from halb.control.state import ClusterState

    st = ClusterState()
    before = (dict(st.lease), st.event_seq, dict(st.services))
    applied = st.apply({"op": "lease.contact", "args": {"node": "n1"}, "id": "c1", "by": "node:n1",
                        "node": "n1", "at": 1.0})
    assert applied.result == {"ok": True, "node": "n1"} and applied.events == []
    assert (dict(st.lease), st.event_seq, dict(st.services)) == before
    bad = st.apply({"op": "lease.contact", "args": {"node": "n1", "x": 1}, "id": "c2", "by": "t", "node": "n1",
                    "at": 1.0})
    assert bad.result["ok"] is False and bad.result["error"] == "invalid"


def test_cluster_status_table_shows_each_members_announcements(capsys):
    from halb.cli.cluster_cmd import print_status

    ann = {"address": "10.99.2.10", "services": ["checkout"], "announced": True, "accepted": True, "reason": "ok"}
    members = [
        {"id": "n1", "raft_state": "leader", "raft": "a:1", "api": "a:2", "in_raft_config": True,
         "dataplane_ok": True, "announcements": [ann]},
        {"id": "n2", "raft_state": "follower", "raft": "b:1", "api": "b:2", "in_raft_config": True,
         "dataplane_ok": True, "announcements": [dict(ann, announced=False,
                                                       reason="no contact with a Raft majority within the lease")]},
        {"id": "n3", "raft_state": "follower", "raft": "c:1", "api": "c:2", "in_raft_config": True,
         "dataplane_ok": None, "announcements": None},
    ]
    print_status({"leader": "n1", "term": 3, "node": "n1", "raft_state": "leader", "health": "ok",
                  "health_detail": {"voters": 3, "tolerates": 1}, "members": members, "services": []})
    out = capsys.readouterr().out
    assert "SERVICE ADDRESS" in out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith(("n1 ", "n2 ", "n3 "))
             and "10.99.2.10" in line or line.startswith("n3 ") and "unknown" in line}
    assert "announced" in lines["n1"] and "withdrawn: no contact with a Raft majority" in lines["n2"]
    assert "unknown" in lines["n3"]


def test_sessions_switch_over_birds_control_socket(tmp_path):
    """set_sessions talks to BIRD's socket itself (no birdc spawn: a drain refuses SYNs
    while it runs); a real bird, a session to a router that is not there."""
    import asyncio

    from halb.announce.bird import BirdError, BirdProcess

    tools = require_tools({"bird": "bird2", "birdc": "bird2"})
    s = BgpSettings(local_as=65001, routers=(RouterPeer("127.0.0.2", 65000),),
                    addresses=(ServiceAddress("198.51.100.7"),), local_address="127.0.0.1",
                    router_id="127.0.0.1", bfd=False, bird=tools["bird"], birdc=tools["birdc"])
    bird = BirdProcess(s, "n1", tmp_path / "bird")

    async def main():
        bird.write_config()
        bird.start()
        try:
            await bird.wait_ready()
            await bird.set_sessions(False)
            assert "router1: already disabled" in await bird.command("disable router1")
            assert [p.state for p in await bird.protocols() if p.name == "router1"] == ["down"]
            await bird.set_sessions(True)
            assert "enabled" in await bird.command("enable router1")
            with pytest.raises(BirdError, match="syntax error"):
                await bird.command("disable no_such_protocol")
        finally:
            bird.stop()

    asyncio.run(asyncio.wait_for(main(), 30))

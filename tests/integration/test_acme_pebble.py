"""ACME through the cluster against a real CA (issue 13, "ACME, cluster-wide"): Debian's
pebble, with real HTTP-01 validation (no PEBBLE_VA_ALWAYS_VALID). The domain resolves
(pebble-challtestsrv's DNS) to a node that is *not* the leader, so the validation can only
succeed if a follower answers the challenge the leader published through Raft. Then a
renewal (validated again: authorization reuse off), and a failing order that leaves the
old certificate serving."""
from __future__ import annotations

import json
import os
import urllib.request

import pytest

from halb.demo.launcher import Child
from tests.certs_util import make_ca, make_leaf
from tests.conftest import Cluster, free_port, wait_until, _port_open
from tests.system_tools import require_tools

pytestmark = pytest.mark.timeout(240)


def start_pebble(c: Cluster, tmp, dns_ip: str) -> tuple[str, str, int]:
    """pebble + pebble-challtestsrv on loopback; returns (directory URL, CA bundle path,
    challtestsrv management port). pebble validates HTTP-01 on the cluster's service port."""
    tools = require_tools({"pebble": "pebble", "pebble-challtestsrv": "pebble"})
    ca = make_ca("pebble listener CA")
    leaf = make_leaf(ca, ["127.0.0.1", "localhost"])
    (tmp / "pebble.pem").write_text(leaf.cert_pem)
    (tmp / "pebble.key").write_text(leaf.key_pem())
    (tmp / "ca.pem").write_text(ca.cert_pem)
    dns_port, mgmt_port, acme_port, pebble_mgmt = free_port(), free_port(), free_port(), free_port()
    cts = Child("challtestsrv", [tools["pebble-challtestsrv"], "-defaultIPv4", dns_ip, "-defaultIPv6", "",
                                 "-dns01", f"127.0.0.1:{dns_port}", "-management", f"127.0.0.1:{mgmt_port}",
                                 "-http01", "", "-https01", "", "-tlsalpn01", ""], c.directory / "logs" / "cts.log")
    cts.start()
    c.extra.append(cts)
    config = {"pebble": {"listenAddress": f"127.0.0.1:{acme_port}",
                         "managementListenAddress": f"127.0.0.1:{pebble_mgmt}",
                         "certificate": str(tmp / "pebble.pem"), "privateKey": str(tmp / "pebble.key"),
                         "httpPort": int(c.spec.service_port), "tlsPort": free_port(),
                         "ocspResponderURL": "", "externalAccountBindingRequired": False}}
    (tmp / "pebble.json").write_text(json.dumps(config))
    env = dict(os.environ, PEBBLE_VA_NOSLEEP="1", PEBBLE_WFE_NONCEREJECT="0", PEBBLE_AUTHZREUSE="0")
    env.pop("PEBBLE_VA_ALWAYS_VALID", None)
    peb = Child("pebble", [tools["pebble"], "-config", str(tmp / "pebble.json"), "-dnsserver",
                           f"127.0.0.1:{dns_port}"], c.directory / "logs" / "pebble.log")
    peb.start(env=env)
    c.extra.append(peb)
    wait_until(lambda: _port_open(f"127.0.0.1:{acme_port}") and _port_open(f"127.0.0.1:{mgmt_port}"), 15, 0.1,
               "pebble and challtestsrv listening")
    return f"https://127.0.0.1:{acme_port}/dir", str(tmp / "ca.pem"), mgmt_port


def set_a_record(mgmt_port: int, host: str, address: str) -> None:
    """Replace HOST's A record (challtestsrv's add-a appends, so clear first)."""
    for path, body in (("clear-a", {"host": host}), ("add-a", {"host": host, "addresses": [address]})):
        req = urllib.request.Request(f"http://127.0.0.1:{mgmt_port}/{path}", method="POST",
                                     data=json.dumps(body).encode())
        with urllib.request.urlopen(req, timeout=5) as resp:
            assert resp.status == 200


def test_acme_order_validated_on_a_follower_then_renewed(cluster_factory, tmp_path):
    c = cluster_factory(n=3, run_backends=True)
    leader = c.leader()
    follower = next(n.id for n in c.spec.nodes if n.id != leader)
    c.wait_serving()
    directory, bundle, mgmt = start_pebble(c, tmp_path, c.spec_of(follower).host)
    set_a_record(mgmt, "shop.example.", c.spec_of(follower).host)

    out = c.cli("cert", "acme", "shop", "--domain", "shop.example", "--directory", directory,
                "--ca-bundle", bundle, "--json", "--timeout", "90", timeout=120)
    issued = json.loads(out.stdout)
    assert issued["source"] == "acme" and issued["sans"] == ["shop.example"], issued
    assert issued["acme"]["status"] == "issued" and issued["acme"]["failures"] == 0
    assert "Pebble" in issued["issuer"] or "pebble" in issued["issuer"].lower(), issued["issuer"]
    # the leader ordered it; the validation reached the follower only (DNS pointed there)
    logs = (c.directory / "logs" / f"{leader}.log").read_text()
    assert "ACME: ordering shop" in logs
    pebble_log = (c.directory / "logs" / "pebble.log").read_text()
    assert "shop.example" in pebble_log
    for n in c.nodes:  # every node has it (served from the store by TLS frontends)
        wait_until(lambda n=n: any(r["name"] == "shop" and r["fingerprint"] == issued["fingerprint"]
                                   for r in c.get(n, "/v1/certs")[1]["certs"]), 5, 0.1, f"{n} has the certificate")
    # no challenge answer is left behind
    for n in c.nodes:
        wait_until(lambda n=n: c.get(n, "/v1/certs")[1]["acme_challenges_pending"] == 0, 5, 0.1,
                   f"{n}: challenge answers withdrawn")

    # renewal: a new certificate (validated again), the events name it
    renewed = json.loads(c.cli("cert", "renew", "shop", "--json", "--timeout", "90", timeout=120).stdout)
    assert renewed["fingerprint"] != issued["fingerprint"] and renewed["source"] == "acme"
    kinds = [e["kind"] for e in c.get(leader, "/v1/events?last=200")[1]["events"]]
    assert kinds.count("cert.acme_requested") == 1 and "cert.added" in kinds and "cert.replaced" in kinds
    assert "cert.acme_renew_requested" in kinds

    # a renewal the CA cannot validate (DNS now points where nothing listens): an event with
    # the reason, exit 1, and the current certificate keeps serving
    set_a_record(mgmt, "shop.example.", "127.0.0.1")
    failed = c.cli("cert", "renew", "shop", "--timeout", "90", check=False, timeout=120)
    assert failed.returncode == 1 and "failed" in failed.stderr, failed
    rows = {r["name"]: r for r in c.cli_json("cert", "list")}
    assert rows["shop"]["fingerprint"] == renewed["fingerprint"]
    assert rows["shop"]["acme"]["status"] == "failing" and rows["shop"]["acme"]["last_error"]
    events = c.get(leader, "/v1/events?last=50")[1]["events"]
    failure = [e for e in events if e["kind"] == "cert.acme_failed"]
    assert failure and "current certificate keeps serving" in failure[-1]["message"]

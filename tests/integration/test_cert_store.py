"""Certificates in the replicated state on a real three-node cluster (issue 13,
"Certificates in the replicated state"): added through one node, every node has it within
5 s; the private key is in no journal or snapshot file, in no answer and no log; a bad pair
is refused and changes nothing."""
from __future__ import annotations

import base64
import json
import re

import pytest

from halb.api.client import Client
from halb.certs.sealing import KeySealer
from tests.certs_util import make_ca, make_leaf
from tests.conftest import Cluster, wait_until

pytestmark = pytest.mark.timeout(150)
NODES = ("n1", "n2", "n3")


def cert_names(c: Cluster, node: str) -> set[str]:
    code, body = c.get(node, "/v1/certs")
    assert code == 200, body
    return {r["name"] for r in body["certs"]}


def key_fragments(key_pem: str) -> list[bytes]:
    """Byte strings that would betray the key: its PEM lines and the raw DER."""
    lines = [ln for ln in key_pem.splitlines() if ln and not ln.startswith("-----")]
    der = base64.b64decode("".join(lines))
    return [ln.encode() for ln in lines if len(ln) >= 40] + [der[i:i + 24] for i in range(0, len(der) - 24, 24)]


def test_certificate_reaches_every_node_and_its_key_no_file(cluster_factory, tmp_path):
    c = cluster_factory(n=3, extra_raft={"log_compaction_entries": 30})
    ca = make_ca()
    leaf = make_leaf(ca, ["shop.example", "*.shop.example"])
    (tmp_path / "shop.pem").write_text(leaf.cert_pem + ca.cert_pem)
    key_pem = leaf.key_pem()
    (tmp_path / "shop.key").write_text(key_pem)
    follower = next(n for n in NODES if n != c.leader())

    out = c.cli("cert", "add", "shop", "--cert", str(tmp_path / "shop.pem"), "--key", str(tmp_path / "shop.key"),
                "--json", node=follower)
    added = json.loads(out.stdout)
    assert added["sans"] == ["shop.example", "*.shop.example"] and added["source"] == "file"
    for n in NODES:
        wait_until(lambda n=n: cert_names(c, n) == {"shop"}, 5, 0.05, f"{n} has the certificate")
    listed = c.cli_json("cert", "list")
    assert [(r["name"], r["source"], r["sans"]) for r in listed] == [("shop", "file", ["shop.example",
                                                                                        "*.shop.example"])]
    assert listed[0]["not_after"] == pytest.approx(leaf.cert.not_valid_after_utc.timestamp())

    # every node holds the sealed key, and it opens with the cluster secret to the same key
    secret = (c.directory / "secret").read_text().strip()
    client = Client(list(c.apis), c.token, 10, tls=c.tls)
    # enough writes for a log compaction, so a snapshot file exists too
    for i in range(40):
        client.put("/v1/services/checkout/backends/A/weight", {"weight": 1 + i % 5})
    for n in NODES:
        wait_until((c.directory / "data" / n / "raft.snapshot").exists, 15, 0.1, f"{n} snapshot")

    files = [p for p in (c.directory / "data").rglob("*") if p.is_file()]
    assert any("journal" in p.name for p in files) and any(p.name == "raft.snapshot" for p in files), files
    fragments = key_fragments(key_pem)
    for p in files + list((c.directory / "logs").glob("*.log")):
        blob = p.read_bytes()
        assert b"PRIVATE KEY" not in blob, p
        assert not any(f in blob for f in fragments), f"{p} holds private-key bytes"
    assert "PRIVATE" not in out.stdout + out.stderr

    # the stored form is the sealed one, and it is this key
    sealed = re.search(rb"v1\.[A-Za-z0-9_-]{40,}={0,2}", (c.directory / "data" / "n1" / "raft.snapshot").read_bytes())
    assert sealed is not None
    opened = KeySealer(secret).open(sealed.group().decode(), "shop")
    assert b"".join(opened.split(b"\n")[1:-2]) == b"".join(key_pem.encode().split(b"\n")[1:-2])


def test_a_bad_pair_is_refused_and_changes_nothing(cluster_factory, tmp_path):
    c = cluster_factory(n=3)
    ca = make_ca()
    leaf, other = make_leaf(ca, ["shop.example"]), make_leaf(ca, ["other.example"])
    (tmp_path / "shop.pem").write_text(leaf.cert_pem)
    (tmp_path / "other.key").write_text(other.key_pem())
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    events_before = c.get("n1", "/v1/events?last=1000")[1]["events"]

    mismatch = c.cli("cert", "add", "shop", "--cert", str(tmp_path / "shop.pem"), "--key",
                     str(tmp_path / "other.key"), check=False)
    assert mismatch.returncode == 1 and "does not belong" in mismatch.stderr, mismatch
    junk = c.cli("cert", "add", "shop", "--cert", str(tmp_path / "junk.pem"), "--key",
                 str(tmp_path / "other.key"), check=False)
    assert junk.returncode == 1 and "not PEM" in junk.stderr, junk
    missing = c.cli("cert", "add", "shop", "--cert", str(tmp_path / "nope.pem"), "--key",
                    str(tmp_path / "other.key"), check=False)
    assert missing.returncode == 2 and "cannot read the certificate file" in missing.stderr, missing
    gone = c.cli("cert", "remove", "shop", check=False)
    assert gone.returncode == 1 and "does not exist" in gone.stderr

    assert all(cert_names(c, n) == set() for n in NODES)
    kinds = [e["kind"] for e in c.get("n1", "/v1/events?last=1000")[1]["events"][len(events_before):]]
    assert not any(k.startswith("cert.") for k in kinds), kinds

"""halb/demo/edge.py (the demo's HTTPS edge: demo CA, edge file, printed commands) and
halb/demo/ws_client.py (target parsing). TLS checked with real handshakes over a socketpair."""
from __future__ import annotations

import ssl
import stat
from pathlib import Path

import pytest

from halb.demo.edge import (
    DEMO_CA_CERT, DEMO_CA_KEY, DemoEdge, EdgeError, edge_commands, ensure_demo_ca, read_edge, write_edge,
)
from halb.demo.ws_client import WsClientError, parse_target
from halb.pki import issue_server_cert
from tests.unit.test_pki_tls import handshake


def _server(tmp_path: Path, issued) -> ssl.SSLContext:
    (tmp_path / "site.crt").write_bytes(issued.cert_pem)
    (tmp_path / "site.key").write_bytes(issued.key_pem)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tmp_path / "site.crt", tmp_path / "site.key")
    return ctx


def test_demo_ca_is_kept_private_and_reused(tmp_path):
    ca, made = ensure_demo_ca(tmp_path)
    assert made
    assert stat.S_IMODE((tmp_path / DEMO_CA_KEY).stat().st_mode) == 0o600
    again, made_again = ensure_demo_ca(tmp_path)
    assert not made_again and again.cert == ca.cert
    (tmp_path / DEMO_CA_KEY).unlink()
    with pytest.raises(ValueError, match="remove"):
        ensure_demo_ca(tmp_path)


def test_demo_ca_vouches_for_localhost_names_only(tmp_path):
    """Trusting demo-ca.crt trusts *.localhost and nothing else: the name constraint holds
    even for a certificate the demo CA's key did sign."""
    ca, _ = ensure_demo_ca(tmp_path)
    client = ssl.create_default_context(cafile=str(tmp_path / DEMO_CA_CERT))
    site = issue_server_cert(ca, ["shop.localhost", "catalog.shop.localhost"])
    assert handshake(_server(tmp_path, site), client, "catalog.shop.localhost").startswith("TLSv1.")
    rogue = issue_server_cert(ca, ["bank.example"])
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(_server(tmp_path, rogue), client, "bank.example")


def test_edge_file_round_trip_and_bad_files(tmp_path):
    assert read_edge(tmp_path) is None  # an older layout: no demo edge
    edge = DemoEdge(port=9443, catalog_backends=[("A", "127.0.0.1:9001")])
    write_edge(tmp_path, edge)
    assert read_edge(tmp_path) == edge
    (tmp_path / "demo-edge.json").write_text('{"port": 1, "nonsense": 2}')
    with pytest.raises(EdgeError, match="demo-edge.json"):
        read_edge(tmp_path)
    (tmp_path / "demo-edge.json").write_text("[")
    with pytest.raises(EdgeError):
        read_edge(tmp_path)


def test_routes_cover_two_hosts_and_a_path_prefix():
    routes = {(r["host"], r["path_prefix"]): r["service"] for r in DemoEdge().routes()}
    assert routes == {("shop.localhost", "/"): "checkout", ("shop.localhost", "/catalog/"): "catalog",
                      ("catalog.shop.localhost", "/"): "catalog"}


def test_printed_commands_name_every_node_and_the_demo_ca(tmp_path):
    fe = {"name": "web", "port": 8443, "http_port": 8000, "redirect_https": True,
          "listen": ["127.0.0.11:8443", "127.0.0.12:8443"]}
    cmds = dict(edge_commands(tmp_path, DemoEdge(), fe))
    ca = str((tmp_path / DEMO_CA_CERT).resolve())
    shop = cmds["Host shop.localhost -> checkout"]
    assert shop == (f"curl -sS --cacert {ca} --resolve shop.localhost:8443:127.0.0.11,127.0.0.12 "
                    "https://shop.localhost:8443/products")
    assert "http://shop.localhost:8000/products" in cmds["plain HTTP answers 308 to HTTPS"]
    ws = next(c for w, c in cmds.items() if w.startswith("WebSocket"))
    assert "demo ws wss://shop.localhost:8443/ws" in ws and f"--cacert {ca}" in ws
    no_redirect = dict(edge_commands(tmp_path, DemoEdge(), dict(fe, redirect_https=False)))
    assert "plain HTTP answers 308 to HTTPS" not in no_redirect


def test_ws_target_parsing():
    t = parse_target("wss://shop.localhost/ws")
    assert (t.port, t.secure, t.addresses) == (443, True, ("shop.localhost",))
    t = parse_target("ws://shop.localhost:8080/ws", "shop.localhost:8080:127.0.0.11,127.0.0.12")
    assert (t.port, t.secure, t.addresses) == (8080, False, ("127.0.0.11", "127.0.0.12"))
    for url, resolve in [("https://x/ws", ""), ("wss://x:99999/", ""), ("wss://x:1/", "y:1:127.0.0.1"),
                         ("wss://x:1/", "x:2:127.0.0.1"), ("wss://x:1/", "x:1:"), ("wss://x:1/", "nonsense")]:
        with pytest.raises(WsClientError):
            parse_target(url, resolve)

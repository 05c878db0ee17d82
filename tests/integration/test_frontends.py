"""Frontends and routes on a real three-node cluster (issue 13, "Frontends and routes").

Host and path routing: two Hosts and a path prefix on one frontend port reach three
different services on every node; an unknown Host gets the default service, or a JSON 404
once there is none; a port one node cannot bind is a warning of that node until it binds. TLS: a certificate added with `halb cert add` through one node is
served by all three within 5 s (a real ssl client verifying against the test CA, with
SNI), a wildcard SAN works, a replaced certificate is served within 5 s, and the plain
port answers 308 to the https:// URL."""
from __future__ import annotations

import http.client
import json
import socket
import ssl
import time

import pytest

from halb.api.client import ApiError, Client
from halb.demo.launcher import Child, halb_argv
from tests.certs_util import make_ca, make_leaf
from tests.conftest import Cluster, _port_open, free_port, wait_until

pytestmark = pytest.mark.timeout(180)
NODES = ("n1", "n2", "n3")


def add_service(c: Cluster, client: Client, name: str) -> None:
    """An HTTP service with one demo backend named after it (X-Served-By: NAME)."""
    address = f"127.0.0.1:{free_port()}"
    child = Child(f"backend-{name}", halb_argv("demo", "backend", "--name", name, "--listen", address,
                                               "--db", str(c.db)), c.directory / "logs" / f"backend-{name}.log")
    child.start()
    c.extra.append(child)
    wait_until(lambda: _port_open(address), 15, 0.05, f"backend {name} listening")
    host = c.spec.nodes[0].host
    client.post("/v1/services", {"name": name, "listen": f"{host}:{free_port(host)}",
                                 "backends": [{"name": name, "address": address}]})


def host_of(c: Cluster, node: str) -> str:
    return c.spec_of(node).host


def request(address: tuple[str, int], host: str, path: str = "/health", *, tls: ssl.SSLContext | None = None,
            sni: str | None = None) -> tuple[int, dict[str, str], bytes]:
    if tls is None:
        conn: http.client.HTTPConnection = http.client.HTTPConnection(*address, timeout=5)
    else:
        conn = http.client.HTTPSConnection(*address, timeout=5, context=tls)
        conn._tunnel_host = None  # type: ignore[attr-defined]
    try:
        if tls is not None:  # connect with an explicit SNI (server_hostname), verifying the chain
            raw = socket.create_connection(address, timeout=5)
            conn.sock = tls.wrap_socket(raw, server_hostname=sni or host)
        conn.request("GET", path, headers={"Host": host})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def served_by(address: tuple[str, int], host: str, path: str = "/health", **kw: object) -> str | None:
    return request(address, host, path, **kw)[1].get("x-served-by")  # type: ignore[arg-type]


def test_two_hosts_and_a_path_prefix_reach_three_services_on_every_node(cluster_factory):
    c = cluster_factory(n=3, run_backends=True)
    client = Client(list(c.apis), c.token, 10, tls=c.tls)
    add_service(c, client, "catalog")
    add_service(c, client, "blog")
    port = free_port(host_of(c, "n1"))
    out = c.cli("frontend", "add", "web", "--port", str(port), "--default-service", "checkout", "--json")
    assert json.loads(out.stdout)["port"] == port
    c.cli("route", "add", "web", "--host", "shop.example", "--service", "checkout")
    c.cli("route", "add", "web", "--host", "shop.example", "--path-prefix", "/api/", "--service", "catalog")
    c.cli("route", "add", "web", "--host", "Blog.Example", "--service", "blog", node="n2")

    missing = c.cli("route", "add", "web", "--host", "x.example", "--service", "nope", check=False)
    assert missing.returncode == 1 and "service 'nope' does not exist" in missing.stderr, missing
    bad = c.cli("route", "add", "web", "--host", "x.example:80", "--service", "blog", check=False)
    assert bad.returncode == 1 and "without port" in bad.stderr, bad
    clash = c.cli("frontend", "add", "web2", "--port", str(port), check=False)
    assert clash.returncode == 1 and "already used by frontend 'web'" in clash.stderr, clash

    listed = c.cli_json("frontend", "list")
    assert [(f["name"], f["port"], f["tls"]) for f in listed] == [("web", port, False)]
    assert sorted(listed[0]["listen"]) == sorted(f"{host_of(c, n)}:{port}" for n in NODES)
    assert [(r["host"], r["path_prefix"], r["service"]) for r in listed[0]["routes"]] == [
        ("blog.example", "/", "blog"), ("shop.example", "/", "checkout"), ("shop.example", "/api/", "catalog")]

    text = c.cli("frontend", "list").stdout
    assert "web" in text and "http:" + str(port) in text and "shop.example  /api/" in text, text
    for n in NODES:
        addr = (host_of(c, n), port)
        wait_until(lambda addr=addr: served_by(addr, "blog.example") == "blog", 10, 0.1, f"{n} routes blog")
        assert served_by(addr, "shop.example") in {"A", "B", "C"}  # the checkout service's backends
        assert served_by(addr, "shop.example", "/api/products") == "catalog"
        assert served_by(addr, "shop.example:" + str(port), "/api/x?y=1") == "catalog"
        assert served_by(addr, "BLOG.example") == "blog"
        assert served_by(addr, "unknown.example") in {"A", "B", "C"}  # the default service

    # a service that routes use cannot be removed; without a default an unknown Host is a 404
    with pytest.raises(ApiError) as refused:
        client.delete("/v1/services/catalog")
    assert refused.value.status == 409 and "route web shop.example/api/" in refused.value.message
    c.cli("route", "remove", "web", "--host", "shop.example", "--path-prefix", "/api/")
    for n in NODES:  # routes change in place: the same port, the next request sees it
        wait_until(lambda n=n: served_by((host_of(c, n), port), "shop.example", "/api/x") in {"A", "B", "C"}, 10,
                   0.1, f"{n} dropped the /api/ route")
    c.cli("frontend", "remove", "web")
    port2 = free_port(host_of(c, "n1"))
    c.cli("frontend", "add", "bare", "--port", str(port2))
    c.cli("route", "add", "bare", "--host", "*.example", "--service", "blog")
    for n in NODES:
        addr = (host_of(c, n), port2)
        wait_until(lambda addr=addr: served_by(addr, "x.example") == "blog", 10, 0.1, f"{n} wildcard route")
        status, headers, raw = request(addr, "unknown.test", "/cart")
        assert status == 404 and headers["content-type"] == "application/json", (status, raw)
        doc = json.loads(raw)
        assert doc["error"] == "not_found" and "no route" in doc["message"] and doc["request_id"]
        wait_until(lambda addr=(host_of(c, n), port): not _port_open(f"{addr[0]}:{addr[1]}"), 10, 0.1,
                   f"{n} closed the removed frontend's port")

    # a port that one node cannot bind: a warning of that node, the others serve
    port3 = free_port(host_of(c, "n1"))
    blocker = socket.socket()
    blocker.bind((host_of(c, "n2"), port3))
    blocker.listen()
    try:
        c.cli("frontend", "add", "blocked", "--port", str(port3), "--default-service", "blog")
        wait_until(lambda: any("frontend blocked: cannot listen" in w for w in c.status("n2")["local_warnings"]),
                   10, 0.1, "n2 reports the frontend it cannot bind")
        out = c.cli("cluster", "status", node="n2").stdout
        assert "WARNING: frontend on n2: frontend blocked: cannot listen" in out, out
        for n in ("n1", "n3"):
            wait_until(lambda n=n: served_by((host_of(c, n), port3), "any.example") == "blog", 10, 0.1,
                       f"{n} serves the frontend")
            assert c.status(n)["local_warnings"] == []
        blocker.close()  # the port is free again: n2 binds it at its next retry (frontend_sync.RETRY_S)
        wait_until(lambda: served_by((host_of(c, "n2"), port3), "any.example") == "blog", 15, 0.2,
                   "n2 binds the frontend once the port is free")
        wait_until(lambda: c.status("n2")["local_warnings"] == [], 5, 0.1, "n2's warning clears")
    finally:
        blocker.close()


def test_tls_certificate_added_through_one_node_is_served_by_all_within_5s(cluster_factory, tmp_path):
    c = cluster_factory(n=3, run_backends=True)
    port = free_port(host_of(c, "n1"))
    http_port = free_port(host_of(c, "n1"))
    c.cli("frontend", "add", "web", "--port", str(port), "--tls", "--http-port", str(http_port),
          "--redirect-https", "--default-service", "checkout")
    ca = make_ca()
    leaf = make_leaf(ca, ["shop.example", "*.shop.example"])
    (tmp_path / "shop.pem").write_text(leaf.cert_pem + ca.cert_pem)
    (tmp_path / "shop.key").write_text(leaf.key_pem())
    tls = ssl.create_default_context(cadata=ca.cert_pem)  # verifies chain and hostname (SNI name)
    tls.set_alpn_protocols(["http/1.1"])

    follower = next(n for n in NODES if n != c.leader())
    t0 = time.monotonic()
    c.cli("cert", "add", "shop", "--cert", str(tmp_path / "shop.pem"), "--key", str(tmp_path / "shop.key"),
          node=follower)
    added = time.monotonic()
    for n in NODES:
        addr = (host_of(c, n), port)
        wait_until(lambda addr=addr: served_by(addr, "shop.example", tls=tls) in {"A", "B", "C"},
                   5 - (time.monotonic() - added), 0.05, f"{n} serves the new certificate")
        assert served_by(addr, "www.shop.example", tls=tls) in {"A", "B", "C"}  # wildcard SAN
        raw = socket.create_connection(addr, timeout=5)
        with tls.wrap_socket(raw, server_hostname="shop.example") as s:
            assert s.version() in ("TLSv1.2", "TLSv1.3") and s.selected_alpn_protocol() == "http/1.1"
        # the plain port redirects to the TLS one, path and query kept
        status, headers, _ = request((host_of(c, n), http_port), "shop.example", "/cart?x=1")
        assert status == 308 and headers["location"] == f"https://shop.example:{port}/cart?x=1"
    assert time.monotonic() - t0 < 30

    # replaced (a new key and a new SAN): every node serves the new one within 5 s
    new = make_leaf(ca, ["shop.example", "new.example"])
    (tmp_path / "new.pem").write_text(new.cert_pem + ca.cert_pem)
    (tmp_path / "new.key").write_text(new.key_pem())
    c.cli("cert", "add", "shop", "--replace", "--cert", str(tmp_path / "new.pem"), "--key",
          str(tmp_path / "new.key"), node="n3")
    replaced = time.monotonic()
    want = new.cert.public_bytes(__import__("cryptography.hazmat.primitives.serialization",
                                            fromlist=["Encoding"]).Encoding.DER)

    def peer_cert(addr: tuple[str, int], sni: str) -> bytes:
        with tls.wrap_socket(socket.create_connection(addr, timeout=5), server_hostname=sni) as s:
            return s.getpeercert(binary_form=True)

    for n in NODES:
        addr = (host_of(c, n), port)
        wait_until(lambda addr=addr: peer_cert(addr, "new.example") == want, 5 - (time.monotonic() - replaced),
                   0.05, f"{n} serves the replaced certificate")
        with pytest.raises(ssl.SSLCertVerificationError):
            peer_cert(addr, "www.shop.example")  # the wildcard left with the old certificate

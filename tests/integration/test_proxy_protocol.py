"""PROXY protocol on a real three-node cluster (issue 13): `send_proxy` v1 and v2 in HTTP
and TCP mode, checked by a backend that parses the header with an independent library and
reports the client address; `accept_proxy` takes the client address from a balancer in
front (X-Forwarded-For) and closes connections without a header."""
from __future__ import annotations

import json
import socket
import sys

import pytest

from halb.api.client import Client
from halb.demo.launcher import Child
from tests.conftest import Cluster, _port_open, free_port, wait_until
from halb.dataplane.proxy_protocol import header

pytestmark = pytest.mark.timeout(120)


def start_proxy_backend(c: Cluster, name: str, *flags: str) -> str:
    address = f"127.0.0.1:{free_port()}"
    child = Child(f"proxy-backend-{name}", [sys.executable, "-m", "tests.proxy_backend", "--listen", address, *flags],
                  c.directory / "logs" / f"proxy-backend-{name}.log")
    child.start()
    c.extra.append(child)
    wait_until(lambda: _port_open(address), 10, 0.05, f"{name} listening")
    return address


def add_service(c: Client, name: str, mode: str, port: int, backend: str, **options: object) -> None:
    c.post("/v1/services", {"name": name, "mode": mode, "listen": f"127.0.0.1:{port}", "options": options,
                            "backends": [{"name": "p", "address": backend}]})


def exchange(host: str, port: int, payload: bytes, timeout: float = 5) -> tuple[bytes, int]:
    """Send payload from a known local port; returns (everything the proxy answered, local port)."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(payload)
        chunks = []
        while True:
            data = s.recv(65536)
            if not data:
                break
            chunks.append(data)
        return b"".join(chunks), s.getsockname()[1]


def body_of(raw: bytes) -> dict:
    return json.loads(raw.split(b"\r\n\r\n", 1)[1] if raw.startswith(b"HTTP/") else raw)


def serving(host: str, port: int) -> bool:
    return _port_open(f"{host}:{port}")


def test_send_proxy_v1_and_v2_in_http_and_tcp_mode(cluster_factory):
    c = cluster_factory(n=3)
    client = Client(list(c.apis), c.token, 10, tls=c.tls)
    backend = start_proxy_backend(c, "pp")
    ports = {}
    for name, mode, version in (("h1", "http", "v1"), ("h2", "http", "v2"), ("t1", "tcp", "v1"), ("t2", "tcp", "v2")):
        ports[name] = free_port()
        add_service(client, name, mode, ports[name], backend, send_proxy=version)
    node_host = c.spec_of("n2").host
    for name, port in ports.items():
        wait_until(lambda port=port: serving(node_host, port), 10, 0.05, f"{name} listening on n2")
    for name, port in ports.items():
        version = "v" + name[1]
        for _ in range(3):  # HTTP mode: each request a fresh backend connection with its own header
            req = b"GET /who HTTP/1.1\r\nHost: shop\r\nConnection: close\r\n\r\n" if name[0] == "h" else b"hi"
            raw, local_port = exchange(node_host, port, req)
            report = body_of(raw)
            assert report["proxy"] == version, (name, report)
            assert report["source"] == f"127.0.0.1:{local_port}", (name, report)  # the client, not the proxy
            assert report["dest"] == f"{node_host}:{port}", (name, report)


def test_accept_proxy_takes_the_client_address_and_refuses_connections_without_one(cluster_factory):
    c = cluster_factory(n=3)
    client = Client(list(c.apis), c.token, 10, tls=c.tls)
    backend = start_proxy_backend(c, "plain", "--no-proxy")
    port = free_port()
    add_service(client, "edge", "http", port, backend, accept_proxy=True)
    host = c.spec_of("n1").host
    wait_until(lambda: serving(host, port), 10, 0.05, "edge listening")
    req = b"GET / HTTP/1.1\r\nHost: shop\r\nConnection: close\r\n\r\n"
    for version, client_ip in (("v1", "203.0.113.7"), ("v2", "198.51.100.9"), ("v1", "2001:db8::7")):
        dst = "::1" if ":" in client_ip else host
        raw, _ = exchange(host, port, header(version, ((client_ip, 40000), (dst, port))) + req)
        assert raw.startswith(b"HTTP/1.1 200"), raw
        assert body_of(raw)["xff"] == client_ip
    # the header split over several writes still works
    with socket.create_connection((host, port), timeout=5) as s:
        h = header("v2", (("192.0.2.1", 1234), (host, port)))
        s.sendall(h[:5])
        s.sendall(h[5:20])
        s.sendall(h[20:] + req)
        raw = b"".join(iter(lambda: s.recv(65536), b""))
    assert body_of(raw)["xff"] == "192.0.2.1"
    # without a header: closed with no answer, and counted
    raw, _ = exchange(host, port, req)
    assert raw == b""
    raw, _ = exchange(host, port, b"PROXY TCP4 nonsense\r\n" + req)
    assert raw == b""
    stats = c.get("n1", "/v1/dataplane?service=edge")[1]
    assert stats["services"]["edge"]["rejected"] >= 2, stats


def test_frontend_accept_proxy_reads_the_header_before_tls_and_on_the_plain_port(cluster_factory, tmp_path):
    """A TLS frontend behind another balancer: the PROXY header comes before the TLS
    handshake (as HAProxy's `send-proxy` sends it), on the TLS port and on its plain port;
    the backend's X-Forwarded-For is the header's address; no header: closed, counted."""
    import ssl

    from tests.certs_util import make_ca, make_leaf

    c = cluster_factory(n=3)
    client = Client(list(c.apis), c.token, 10, tls=c.tls)
    backend = start_proxy_backend(c, "plain", "--no-proxy")
    host = c.spec_of("n1").host
    add_service(client, "edge", "http", free_port(), backend)
    port, http_port = free_port(host), free_port(host)
    out = c.cli("frontend", "add", "web", "--port", str(port), "--tls", "--http-port", str(http_port),
                "--accept-proxy", "--default-service", "edge")
    assert "PROXY header required" in out.stdout, out.stdout
    ca = make_ca()
    leaf = make_leaf(ca, ["shop.example"])
    (tmp_path / "shop.pem").write_text(leaf.cert_pem + ca.cert_pem)
    (tmp_path / "shop.key").write_text(leaf.key_pem())
    c.cli("cert", "add", "shop", "--cert", str(tmp_path / "shop.pem"), "--key", str(tmp_path / "shop.key"))
    tls = ssl.create_default_context(cadata=ca.cert_pem)
    req = b"GET / HTTP/1.1\r\nHost: shop.example\r\nConnection: close\r\n\r\n"

    def over_tls(proxy_header: bytes) -> bytes:
        with socket.create_connection((host, port), timeout=5) as raw:
            raw.sendall(proxy_header)
            with tls.wrap_socket(raw, server_hostname="shop.example") as s:
                s.sendall(req)
                return b"".join(iter(lambda: s.recv(65536), b""))

    wait_until(lambda: serving(host, port) and serving(host, http_port), 10, 0.05, "frontend listening")
    for version, client_ip in (("v1", "203.0.113.7"), ("v2", "198.51.100.9")):
        raw = wait_until(lambda: over_tls(header(version, ((client_ip, 40000), (host, port)))), 10, 0.1,
                         "the certificate served")
        assert raw.startswith(b"HTTP/1.1 200") and body_of(raw)["xff"] == client_ip, raw
    raw, _ = exchange(host, http_port, header("v1", (("192.0.2.5", 1234), (host, http_port))) + req)
    assert raw.startswith(b"HTTP/1.1 200") and body_of(raw)["xff"] == "192.0.2.5", raw
    # no header: the TLS ClientHello (or a plain request) is not a PROXY header: closed
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        with socket.create_connection((host, port), timeout=5) as raw_sock:
            with tls.wrap_socket(raw_sock, server_hostname="shop.example") as s:
                s.sendall(req)
                if not s.recv(65536):
                    raise ConnectionError("closed without an answer")
    raw, _ = exchange(host, http_port, req)
    assert raw == b""
    fe = [f for f in c.get("n1", "/v1/frontends")[1]["frontends"] if f["name"] == "web"][0]
    assert fe["accept_proxy"] is True

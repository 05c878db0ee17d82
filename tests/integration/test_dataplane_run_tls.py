"""`python -m halb.dataplane.run --tls-cert --tls-key` (the HTTPS cases of `make bench`):
a real TLS client verifying against the CA gets the origin's answer through the TLS
frontend, keep-alive and session resumption work (the bench's new-connection case relies on
it, as HAProxy's does), and bad certificate input exits with a clear error. `--frontend`
serves the same frontend in plain HTTP (bench/instr.py --frontend)."""
from __future__ import annotations

import socket
import ssl
import subprocess
import sys
from pathlib import Path

import pytest

from halb.dataplane.testing import free_port, processes, spawn_origin, spawn_proxy
from tests.certs_util import make_ca, make_leaf

pytestmark = pytest.mark.timeout(60)
GET = b"GET / HTTP/1.1\r\nHost: bench.example\r\n\r\n"


@pytest.fixture()
def pki(tmp_path: Path) -> tuple[Path, Path, Path]:
    ca = make_ca()
    leaf = make_leaf(ca, ["bench.example", "127.0.0.1"])
    (tmp_path / "ca.pem").write_text(ca.cert_pem)
    (tmp_path / "chain.pem").write_text(leaf.cert_pem + ca.cert_pem)
    (tmp_path / "key.pem").write_text(leaf.key_pem())
    return tmp_path / "ca.pem", tmp_path / "chain.pem", tmp_path / "key.pem"


def _response(tls: ssl.SSLSocket) -> bytes:
    """One response with a Content-Length body."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = tls.recv(65536)
        assert chunk, f"connection closed mid-head: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        body += tls.recv(65536)
    return head + b"\r\n\r\n" + body


def test_tls_frontend_serves_verified_https_with_keepalive_and_resumption(pki):
    ca, chain, key = pki
    with processes() as procs:
        origin = spawn_origin("o1")
        procs.append(origin)
        proxy = spawn_proxy("--listen", f"127.0.0.1:{free_port()}", "--backend", f"o1=127.0.0.1:{origin.port}",
                            "--tls-cert", str(chain), "--tls-key", str(key))
        procs.append(proxy)
        client = ssl.create_default_context(cafile=str(ca))
        client.set_alpn_protocols(["h2", "http/1.1"])
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as raw, \
                client.wrap_socket(raw, server_hostname="bench.example") as tls:
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
            assert tls.selected_alpn_protocol() == "http/1.1"
            for _ in range(2):  # two requests on one TLS connection
                tls.sendall(GET)
                resp = _response(tls)
                assert resp.startswith(b"HTTP/1.1 200"), resp[:200]
                assert resp.endswith(b"ok o1\n")
            session = tls.session
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as raw, \
                client.wrap_socket(raw, server_hostname="bench.example", session=session) as tls:
            tls.sendall(GET)
            assert _response(tls).startswith(b"HTTP/1.1 200")
            assert tls.session_reused, "the TLS frontend did not resume the session (tickets off?)"
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as raw:  # plain HTTP: no answer
            raw.sendall(GET)
            raw.settimeout(5)
            try:
                assert not raw.recv(100).startswith(b"HTTP/")
            except ConnectionResetError:
                pass


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "halb.dataplane.run", "--listen", f"127.0.0.1:{free_port()}",
                           "--backend", "o=127.0.0.1:9", *args], capture_output=True, text=True, timeout=30,
                          stdin=subprocess.DEVNULL)


def test_a_key_of_another_certificate_is_a_clear_error(pki, tmp_path):
    ca, chain, _ = pki
    other = tmp_path / "other.pem"
    other.write_text(make_leaf(make_ca(), ["x.example"]).key_pem())
    r = _run("--tls-cert", str(chain), "--tls-key", str(other))
    assert r.returncode != 0
    assert "--tls-cert/--tls-key: cannot load" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("args,message", [
    (["--tls-cert", "x.pem"], "--tls-cert and --tls-key go together"),
    (["--tls-cert", "/nonexistent/c.pem", "--tls-key", "/nonexistent/k.pem"], "cannot load /nonexistent/c.pem"),
    (["--tls-cert", "c.pem", "--tls-key", "k.pem", "--mode", "tcp"], "--mode http and --workers 1 only"),
])
def test_bad_tls_arguments_are_refused(args, message):
    r = _run(*args)
    assert r.returncode != 0
    assert message in r.stderr and "Traceback" not in r.stderr


def test_plain_frontend_serves_http_through_a_host_route_and_the_default():
    """`--frontend` (bench/instr.py --frontend: the bench's frontend without TLS) with
    `--route-host`: requests with the routed Host (any case, with a port) and with another
    Host (the default service) are answered over plain HTTP on one keep-alive connection;
    `--frontend` with TCP mode is refused."""
    with processes() as procs:
        origin = spawn_origin("o1")
        procs.append(origin)
        proxy = spawn_proxy("--listen", f"127.0.0.1:{free_port()}", "--backend", f"o1=127.0.0.1:{origin.port}",
                            "--frontend", "--route-host", "bench.example")
        procs.append(proxy)
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as raw:
            for host in (b"bench.example", b"other.example", b"Bench.Example:80"):
                raw.sendall(b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
                resp = _response(raw)  # type: ignore[arg-type]
                assert resp.startswith(b"HTTP/1.1 200") and resp.endswith(b"ok o1\n"), resp[:200]
    assert subprocess.run([sys.executable, "-m", "halb.dataplane.run", "--frontend", "--mode", "tcp"],
                          capture_output=True, text=True, timeout=30).returncode == 2

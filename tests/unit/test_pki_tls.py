"""halb/pki.py (CA and node certificates) and halb/tls.py (the admin API's SSL contexts),
checked with real TLS handshakes over a socketpair, no network."""
from __future__ import annotations

import datetime as dt
import ipaddress
import socket
import ssl
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from halb.pki import CA_DAYS, NODE_DAYS, PkiError, issue_node_cert, load_issued, new_ca, subject_alt_name
from halb.tls import AdminTls, TlsError, client_context, server_context


def _write(d: Path, ca, node) -> tuple[Path, Path, Path]:
    (d / "ca.crt").write_bytes(ca.cert_pem)
    (d / "node.crt").write_bytes(node.cert_pem)
    (d / "node.key").write_bytes(node.key_pem)
    return d / "ca.crt", d / "node.crt", d / "node.key"


def handshake(server: ssl.SSLContext, client: ssl.SSLContext, hostname: str) -> str:
    """One TLS handshake between the contexts; returns the negotiated version."""
    a, b = socket.socketpair()
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            with server.wrap_socket(a, server_side=True) as s:
                s.recv(1)
        except (ssl.SSLError, OSError) as exc:
            errors.append(exc)

    t = threading.Thread(target=serve)
    t.start()
    try:
        with client.wrap_socket(b, server_hostname=hostname) as c:
            version = c.version()
            c.sendall(b"x")
        return version or ""
    finally:
        b.close()
        t.join(5)
        a.close()


def test_ca_and_node_cert_shape():
    ca = new_ca("test")
    node = issue_node_cert(ca, "n1", ["10.0.0.1", "lb1.example.net"])
    for cert in (ca.cert, node.cert):
        assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
        assert cert.public_key().curve.name == "secp256r1"
    assert ca.cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not node.cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = node.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.1")]
    assert san.get_values_for_type(x509.DNSName) == ["lb1.example.net"]
    ca_life = ca.cert.not_valid_after_utc - ca.cert.not_valid_before_utc
    node_life = node.cert.not_valid_after_utc - node.cert.not_valid_before_utc
    assert ca_life >= dt.timedelta(days=CA_DAYS) and node_life >= dt.timedelta(days=NODE_DAYS)
    assert node.cert.issuer == ca.cert.subject
    node.cert.verify_directly_issued_by(ca.cert)


def test_subject_alt_name_refuses_what_is_no_host():
    assert isinstance(subject_alt_name("fd00::1"), x509.IPAddress)
    for bad in ("", "bad_host!", "-x.example", "a" * 64 + ".example", "x..y"):
        with pytest.raises(PkiError):
            subject_alt_name(bad)


def test_load_issued_refuses_a_foreign_key():
    ca, other = new_ca("a"), new_ca("b")
    assert load_issued(ca.cert_pem, ca.key_pem).cert == ca.cert
    with pytest.raises(PkiError, match="does not belong"):
        load_issued(ca.cert_pem, other.key_pem)
    with pytest.raises(PkiError):
        load_issued(b"junk", ca.key_pem)


def test_handshake_verifies_against_the_ca_and_the_host(tmp_path):
    ca = new_ca("test")
    ca_file, cert, key = _write(tmp_path, ca, issue_node_cert(ca, "n1", ["127.0.0.1"]))
    server = server_context(cert, key)
    assert handshake(server, client_context(ca_file), "127.0.0.1") in ("TLSv1.2", "TLSv1.3")
    with pytest.raises(ssl.SSLCertVerificationError):  # the system trust store does not know our CA
        handshake(server, client_context(None), "127.0.0.1")
    with pytest.raises(ssl.SSLCertVerificationError):  # right CA, wrong host
        handshake(server, client_context(ca_file), "127.0.0.2")
    other = tmp_path / "other.crt"
    other.write_bytes(new_ca("other").cert_pem)
    with pytest.raises(ssl.SSLCertVerificationError):  # a cert from another cluster's CA
        handshake(server, client_context(other), "127.0.0.1")


def test_server_refuses_below_tls_1_2(tmp_path):
    # (a handshake with a TLS 1.1 client cannot show it here: OpenSSL 3 refuses 1.1 on the
    # client side already, so the server would never be asked)
    ca = new_ca("test")
    _, cert, key = _write(tmp_path, ca, issue_node_cert(ca, "n1", ["127.0.0.1"]))
    assert server_context(cert, key).minimum_version == ssl.TLSVersion.TLSv1_2


def test_context_errors_say_why(tmp_path):
    ca = new_ca("test")
    ca_file, cert, key = _write(tmp_path, ca, issue_node_cert(ca, "n1", ["127.0.0.1"]))
    other_key = tmp_path / "other.key"
    other_key.write_bytes(issue_node_cert(ca, "n2", ["127.0.0.2"]).key_pem)
    with pytest.raises(TlsError, match="does not belong"):
        server_context(cert, other_key)
    with pytest.raises(TlsError, match="does not exist"):
        server_context(tmp_path / "missing.crt", key)
    junk = tmp_path / "junk.crt"
    junk.write_text("not a cert")
    with pytest.raises(TlsError, match="PEM"):
        server_context(junk, key)
    with pytest.raises(TlsError, match="does not exist"):
        client_context(tmp_path / "nope.crt")
    with pytest.raises(TlsError, match="no PEM certificate"):
        client_context(junk)


def test_admin_tls_urls_and_contexts(monkeypatch, tmp_path):
    assert AdminTls().url("10.0.0.1:7000", "/v1/status") == "https://10.0.0.1:7000/v1/status"
    assert AdminTls(plain=True).url("10.0.0.1:7000", "/x") == "http://10.0.0.1:7000/x"
    assert AdminTls().url("http://10.0.0.1:7000", "/x") == "http://10.0.0.1:7000/x"  # the address's scheme wins
    assert AdminTls().context_for("http://h:1/x") is None
    assert AdminTls().for_addresses(["http://a:1", "http://b:1"]).plain  # a dev cluster: members' bare HOST:PORT too
    assert not AdminTls().for_addresses(["http://a:1", "b:1"]).plain
    ctx = AdminTls().context_for("https://h:1/x")
    assert ctx is not None and ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2
    monkeypatch.setenv("HALB_CA_FILE", str(tmp_path / "ca.crt"))
    assert AdminTls.from_env().ca_file == str(tmp_path / "ca.crt")
    assert AdminTls.from_env(str(tmp_path / "x.crt")).ca_file == str(tmp_path / "x.crt")  # --ca-file wins


def test_admin_tls_context_follows_a_rewritten_ca_file(tmp_path):
    """A process that outlives one cluster (chaos runs, tests) must not keep trusting the
    previous CA at the same path, nor distrust the new one."""
    ca_file = tmp_path / "ca.crt"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, second = new_ca("first"), new_ca("second")
    _, cert, key = _write(tmp_path / "a", first, issue_node_cert(first, "n1", ["127.0.0.1"]))
    _, cert2, key2 = _write(tmp_path / "b", second, issue_node_cert(second, "n1", ["127.0.0.1"]))
    tls = AdminTls(ca_file=str(ca_file))
    ca_file.write_bytes(first.cert_pem)
    assert handshake(server_context(cert, key), tls.context(), "127.0.0.1")
    ca_file.write_bytes(second.cert_pem)  # same path, next cluster
    assert handshake(server_context(cert2, key2), tls.context(), "127.0.0.1")
    with pytest.raises(ssl.SSLCertVerificationError):  # and the old cluster's node is no longer trusted
        handshake(server_context(cert, key), tls.context(), "127.0.0.1")


def test_cli_with_a_bad_ca_file_is_a_usage_error(tmp_path):
    import os
    import subprocess
    import sys

    junk = tmp_path / "junk.crt"
    junk.write_text("no certificate here")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HALB_")}
    env.update(HALB_CLUSTER="127.0.0.1:1", HALB_TOKEN="t" * 32)
    for extra, message in (({"HALB_CA_FILE": str(tmp_path / "missing.crt")}, "does not exist"),
                           ({"HALB_CA_FILE": str(junk)}, "holds no PEM certificate")):
        proc = subprocess.run([sys.executable, "-m", "halb", "cluster", "status"], capture_output=True, text=True,
                              env=dict(env, **extra), timeout=30)
        assert proc.returncode == 2 and "bad_ca_file" in proc.stderr and message in proc.stderr, proc.stderr

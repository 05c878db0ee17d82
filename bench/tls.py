"""The HTTPS cases of `make bench`: one ECDSA P-256 certificate served by both proxies,
with the same protocol settings, so the comparison is of TLS termination, not of settings.

halb takes chain and key as `python -m halb.dataplane.run --tls-cert --tls-key` (a TLS
frontend built by halb/certs/tls.py, as a node serves HTTPS); HAProxy takes them
concatenated in one file (`bind ... ssl crt FILE`). Matched on both sides: TLS 1.2 minimum,
halb's TLS 1.2 cipher list (certs/tls.CIPHERS_TLS12), OpenSSL's default TLS 1.3 suites and
groups, ALPN http/1.1, session tickets on (both servers' default). wrk resumes sessions on
reconnect, so the new-connection case measures resumed handshakes on both (checked with
HAProxy's `SslFrontendSessionReuse_pct` and halb's `session_stats()` hits: see
bench/NOTES.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from halb.certs.tls import CIPHERS_TLS12
from halb.pki import issue_node_cert, new_ca

TLS_NOTE = ("one ECDSA P-256 certificate (a private CA from halb/pki.py, SAN 127.0.0.1) for both proxies; "
            "HAProxy `bind ... ssl crt FILE alpn http/1.1` with `ssl-default-bind-options ssl-min-ver TLSv1.2` and "
            "`ssl-default-bind-ciphers` set to halb's TLS 1.2 list; TLS 1.3 suites and groups are OpenSSL's defaults "
            "on both; session tickets on for both (their default), and wrk resumes sessions on reconnect; halb runs "
            "`python -m halb.dataplane.run --tls-cert --tls-key` (a TLS frontend, halb/certs/tls.py)")


@dataclass(frozen=True)
class TlsFiles:
    chain: Path  # leaf + CA, PEM
    key: Path  # the leaf's private key, PEM
    combined: Path  # chain + key in one file, as HAProxy's `crt` wants it


def make_cert(directory: Path) -> TlsFiles:
    """A fresh CA and a P-256 server certificate for 127.0.0.1, written under `directory`."""
    ca = new_ca("bench")
    leaf = issue_node_cert(ca, "bench", ["127.0.0.1", "localhost"])
    files = TlsFiles(directory / "tls-chain.pem", directory / "tls-key.pem", directory / "tls-haproxy.pem")
    files.chain.write_bytes(leaf.cert_pem + ca.cert_pem)
    files.key.write_bytes(leaf.key_pem)
    files.combined.write_bytes(leaf.cert_pem + ca.cert_pem + leaf.key_pem)
    for p in (files.key, files.combined):
        p.chmod(0o600)
    return files


def halb_tls_args(tls: TlsFiles | None) -> list[str]:
    return [] if tls is None else ["--tls-cert", str(tls.chain), "--tls-key", str(tls.key)]


def haproxy_tls(conf: str, tls: TlsFiles) -> str:
    """`conf` (bench/run.py's HAPROXY_CONF) with TLS on its frontend's bind line."""
    glob = (f"  ssl-default-bind-ciphers {CIPHERS_TLS12}\n"
            "  ssl-default-bind-options ssl-min-ver TLSv1.2\n")
    conf = conf.replace("global\n", "global\n" + glob, 1)
    lines = []
    for line in conf.splitlines():
        if line.strip().startswith("bind "):
            line += f" ssl crt {tls.combined} alpn http/1.1"
        lines.append(line)
    return "\n".join(lines) + "\n"

"""The cluster's certificate authority and node certificates (pure functions, no files).

`halb cluster init` makes one CA per cluster and one certificate per node for its admin
API. Why a private CA rather than self-signed node certificates: a client (the CLI, a
peer node) then trusts one file, `ca.crt`, and every node of the cluster, also one added
later, is verified by it. ECDSA P-256: small keys, fast handshakes, supported by every
TLS 1.2+ client. Lifetimes (docs/deploy.md, "Certificates"): the CA 10 years, node
certificates 2 years; renew node certificates with `halb cluster init --renew-certs`.
"""
from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_DAYS = 3650
NODE_DAYS = 730
# A clock a few minutes behind the issuer's must not see a fresh certificate as "not yet valid".
BACKDATE = dt.timedelta(minutes=5)


class PkiError(ValueError):
    """A host name that cannot go into a certificate, or PEM data that is not what it should be."""


@dataclass(frozen=True)
class Issued:
    """A private key and the certificate for it."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def subject_alt_name(host: str) -> x509.GeneralName:
    """An IP SAN for an address, a DNS SAN for a name (clients match IPs only against IP SANs)."""
    host = host.strip("[]")
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    labels = host.rstrip(".").split(".")
    if not host or len(host) > 253 or not all(
            lab and len(lab) <= 63 and lab.replace("-", "").isalnum() and lab.isascii()
            and not lab.startswith("-") and not lab.endswith("-") for lab in labels):
        raise PkiError(f"{host!r} is neither an IP address nor a DNS name")
    return x509.DNSName(host.rstrip(".").lower())


def new_ca(cluster_name: str, *, days: int = CA_DAYS, now: dt.datetime | None = None,
           common_name: str = "", permitted_dns: list[str] | None = None) -> Issued:
    """A self-signed CA that may sign leaf certificates only (path length 0).

    `permitted_dns` adds a critical name constraint: the CA can then vouch for those DNS
    names and names under them only (the demo CA: `localhost`), so trusting it in a
    browser trusts nothing else."""
    now = now or _now()
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, (common_name or f"halb cluster CA {cluster_name}")[:64])])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - BACKDATE).not_valid_after(now + dt.timedelta(days=days)))
    if permitted_dns:
        builder = builder.add_extension(x509.NameConstraints(
            permitted_subtrees=[x509.DNSName(n) for n in permitted_dns], excluded_subtrees=None), critical=True)
    cert = (builder
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256()))
    return Issued(key, cert)


def issue_node_cert(ca: Issued, node_id: str, hosts: list[str], *, days: int = NODE_DAYS,
                    now: dt.datetime | None = None) -> Issued:
    """A server (and client) certificate for one node's admin API, valid for `hosts`."""
    if not hosts:
        raise PkiError(f"node {node_id}: a certificate needs at least one host")
    return _issue(ca, f"halb node {node_id}", hosts, [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
                  days=days, now=now)


def issue_server_cert(ca: Issued, hosts: list[str], *, days: int = NODE_DAYS, now: dt.datetime | None = None) -> Issued:
    """A TLS server certificate (server auth only) for `hosts`, e.g. a site a frontend serves."""
    if not hosts:
        raise PkiError("a certificate needs at least one host")
    return _issue(ca, hosts[0], hosts, [ExtendedKeyUsageOID.SERVER_AUTH], days=days, now=now)


def _issue(ca: Issued, common_name: str, hosts: list[str], usages: list[x509.ObjectIdentifier], *, days: int,
           now: dt.datetime | None) -> Issued:
    sans: list[x509.GeneralName] = []
    for h in hosts:
        san = subject_alt_name(h)
        if san not in sans:
            sans.append(san)
    now = now or _now()
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64])]))
            .issuer_name(ca.cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
            .sign(ca.key, hashes.SHA256()))
    return Issued(key, cert)


def load_issued(cert_pem: bytes, key_pem: bytes) -> Issued:
    """A CA (or node) key pair read back from PEM; refuses a key that does not match the certificate."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
    except ValueError as exc:
        raise PkiError(f"not a PEM certificate and key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError("the key is not an ECDSA key")
    if key.public_key().public_numbers() != cert.public_key().public_numbers():  # type: ignore[union-attr]
        raise PkiError("the key does not belong to the certificate")
    return Issued(key, cert)


def expires(cert: x509.Certificate) -> dt.datetime:
    return cert.not_valid_after_utc

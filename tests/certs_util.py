"""Make real X.509 certificates for tests (a CA and leaves signed by it) with cryptography."""
from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID


@dataclass
class Issued:
    cert: x509.Certificate
    key: object

    @property
    def cert_pem(self) -> str:
        return self.cert.public_bytes(serialization.Encoding.PEM).decode()

    def key_pem(self, password: bytes | None = None) -> str:
        enc = serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
        return self.key.private_bytes(serialization.Encoding.PEM,  # type: ignore[attr-defined]
                                      serialization.PrivateFormat.PKCS8, enc).decode()


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def make_key(kind: str = "ec") -> object:
    if kind == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    bits = int(kind.removeprefix("rsa") or 2048)
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def make_ca(name: str = "halb test CA") -> Issued:
    key = make_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(_now() - datetime.timedelta(days=1))
            .not_valid_after(_now() + datetime.timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return Issued(cert, key)


def make_leaf(ca: Issued, sans: list[str] | None, *, key: object | None = None, days: float = 90,
              start_days: float = -1) -> Issued:
    """A leaf for `sans` (DNS names or IPs; None: no SAN extension at all)."""
    key = key or make_key()
    b = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "leaf")]))
         .issuer_name(ca.cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(_now() + datetime.timedelta(days=start_days))
         .not_valid_after(_now() + datetime.timedelta(days=days)))
    if sans is not None:
        names: list[x509.GeneralName] = []
        for s in sans:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(s)))
            except ValueError:
                names.append(x509.DNSName(s))
        b = b.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return Issued(b.sign(ca.key, hashes.SHA256()), key)  # type: ignore[arg-type]

"""Check a certificate chain and its private key before they go anywhere near Raft.

Everything an operator can get wrong is refused here with a sentence that says what: not
PEM, an encrypted or unsupported key, a key that belongs to another certificate, an expired
or not-yet-valid leaf, no subjectAltName (TLS clients ignore the CN). What passes is
normalised (leaf first, PEM re-encoded, the key as unencrypted PKCS#8) so every node loads
the same bytes.
"""
from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtensionOID

MAX_CHAIN_BYTES = 32 * 1024
MAX_KEY_BYTES = 16 * 1024
MAX_CHAIN_CERTS = 8
MAX_SANS = 100
MIN_RSA_BITS = 2048
NOT_BEFORE_SKEW_S = 300.0  # a clock a few minutes behind the issuer's is not an error


class CertError(ValueError):
    """A chain or key that cannot be served; the message says why."""


@dataclass(frozen=True)
class CertInfo:
    """What the cluster records about a certificate (public facts only)."""
    sans: tuple[str, ...]
    not_before: float
    not_after: float
    fingerprint: str  # SHA-256 of the leaf, hex
    issuer: str
    key_type: str


@dataclass(frozen=True)
class CheckedPair:
    info: CertInfo
    chain_pem: str
    key_pem: bytes  # unencrypted PKCS#8; seal it before it leaves this process


def _certs(chain_pem: str) -> list[x509.Certificate]:
    if len(chain_pem.encode()) > MAX_CHAIN_BYTES:
        raise CertError(f"the certificate chain is larger than {MAX_CHAIN_BYTES // 1024} KiB")
    if "-----BEGIN CERTIFICATE-----" not in chain_pem:
        raise CertError("the certificate file is not PEM (no '-----BEGIN CERTIFICATE-----' block)")
    try:
        certs = x509.load_pem_x509_certificates(chain_pem.encode())
    except ValueError as exc:
        raise CertError(f"the certificate file is not valid PEM: {exc}") from None
    if len(certs) > MAX_CHAIN_CERTS:
        raise CertError(f"the chain has {len(certs)} certificates; at most {MAX_CHAIN_CERTS}")
    return certs


def _key(key_pem: str) -> rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey:
    if len(key_pem.encode()) > MAX_KEY_BYTES:
        raise CertError(f"the key file is larger than {MAX_KEY_BYTES // 1024} KiB")
    if "PRIVATE KEY-----" not in key_pem:
        raise CertError("the key file is not a PEM private key (no '-----BEGIN ... PRIVATE KEY-----' block)")
    try:
        key = serialization.load_pem_private_key(key_pem.encode(), password=None)
    except TypeError:
        raise CertError("the private key is encrypted; give the unencrypted key (the cluster encrypts it "
                        "with its own secret)") from None
    except (ValueError, Exception) as exc:  # cryptography raises several types for garbage
        raise CertError(f"the private key cannot be read: {exc}") from None
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            raise CertError(f"the RSA key has {key.key_size} bits; at least {MIN_RSA_BITS}")
        return key
    if isinstance(key, ec.EllipticCurvePrivateKey):
        if key.curve.name not in ("secp256r1", "secp384r1"):
            raise CertError(f"the EC key uses curve {key.curve.name}; use P-256 or P-384")
        return key
    raise CertError(f"unsupported key type {type(key).__name__}; use RSA (>= 2048 bits) or ECDSA P-256/P-384")


def _sans(cert: x509.Certificate) -> tuple[str, ...]:
    try:
        ext = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
    except x509.ExtensionNotFound:
        raise CertError("the certificate has no subjectAltName; TLS clients ignore the CN, so it would "
                        "match no name") from None
    names = [n.lower() for n in ext.get_values_for_type(x509.DNSName)]
    names += [str(ipaddress.ip_address(a)) for a in ext.get_values_for_type(x509.IPAddress)]
    if not names:
        raise CertError("the certificate's subjectAltName has no DNS name or IP address")
    if len(names) > MAX_SANS:
        raise CertError(f"the certificate has {len(names)} names; at most {MAX_SANS}")
    return tuple(names)


def _public(key: object) -> bytes:
    return key.public_bytes(serialization.Encoding.DER,  # type: ignore[attr-defined]
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def check_pair(chain_pem: str, key_pem: str, now: float) -> CheckedPair:
    """The chain (leaf first or anywhere: the leaf is the one the key belongs to) and key,
    checked at time `now` (unix seconds). Raises CertError with the reason."""
    certs = _certs(chain_pem)
    key = _key(key_pem)
    mine = _public(key.public_key())
    leaves = [c for c in certs if _public(c.public_key()) == mine]
    if not leaves:
        raise CertError("the private key does not belong to any certificate in the file "
                        "(a key/certificate mismatch)")
    leaf = leaves[0]
    rest = [c for c in certs if c is not leaf]
    not_before = leaf.not_valid_before_utc.timestamp()
    not_after = leaf.not_valid_after_utc.timestamp()
    if not_after <= now:
        when = datetime.datetime.fromtimestamp(not_after, datetime.timezone.utc).isoformat(timespec="seconds")
        raise CertError(f"the certificate expired at {when}")
    if not_before > now + NOT_BEFORE_SKEW_S:
        when = datetime.datetime.fromtimestamp(not_before, datetime.timezone.utc).isoformat(timespec="seconds")
        raise CertError(f"the certificate is not valid before {when}")
    info = CertInfo(sans=_sans(leaf), not_before=not_before, not_after=not_after,
                    fingerprint=leaf.fingerprint(hashes.SHA256()).hex(), issuer=leaf.issuer.rfc4514_string()[:200],
                    key_type=("RSA" if isinstance(key, rsa.RSAPrivateKey) else f"ECDSA {key.curve.name}"))
    chain = "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in [leaf, *rest])
    pkcs8 = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption())
    return CheckedPair(info=info, chain_pem=chain, key_pem=pkcs8)


__all__ = ["CertError", "CertInfo", "CheckedPair", "check_pair"]

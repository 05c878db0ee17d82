"""Encrypt certificate private keys with a key derived from the cluster secret.

Why: a certificate's key must reach every node through Raft, but the Raft journal and
snapshots sit on disk and are copied into backups. The key is sealed with AES-256-GCM under
HKDF-SHA256(cluster secret), with the certificate's name as associated data so a sealed key
cannot be moved to another name. Anyone with the cluster secret can already join Raft and
read everything, so this adds no new trust root; it keeps the key out of files that leak
more easily than the secret file (0600, never in the journal).

The sealed form is text: "v1." + base64url(nonce || ciphertext+tag).
"""
from __future__ import annotations

import base64
import os
import re

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

VERSION = "v1."
_SALT = b"halb certificate keys"
_INFO = b"halb cert key sealing v1"
_NONCE = 12
SEALED_RE = re.compile(r"^v1\.[A-Za-z0-9_-]{40,24000}={0,2}$")


class SealError(ValueError):
    """A sealed key that does not open with this cluster's secret (or is damaged)."""


def is_sealed(text: object) -> bool:
    """Shape only: what the state machine accepts, so plaintext PEM can never be stored."""
    return isinstance(text, str) and SEALED_RE.match(text) is not None


class KeySealer:
    """Seals and opens private keys for one cluster secret."""

    def __init__(self, secret: str) -> None:
        if not secret:
            raise ValueError("a cluster secret is needed to seal certificate keys")
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=_SALT, info=_INFO).derive(secret.encode())
        self._aead = AESGCM(key)

    def seal(self, plaintext: bytes, name: str) -> str:
        nonce = os.urandom(_NONCE)
        blob = nonce + self._aead.encrypt(nonce, plaintext, name.encode())
        return VERSION + base64.urlsafe_b64encode(blob).decode()

    def open(self, sealed: str, name: str) -> bytes:
        if not is_sealed(sealed):
            raise SealError("not a sealed key")
        try:
            blob = base64.urlsafe_b64decode(sealed[len(VERSION):])
            return self._aead.decrypt(blob[:_NONCE], blob[_NONCE:], name.encode())
        except (InvalidTag, ValueError):
            raise SealError(f"the key of certificate {name!r} does not open with this node's cluster secret "
                            "(different secret, or damaged)") from None


__all__ = ["KeySealer", "SealError", "is_sealed"]

"""Named API tokens: role names, how a token is made and how it is stored (a hash only).

A token is 32 random bytes (URL-safe text with a `halb_` prefix), so a plain SHA-256 is
enough to store it: there is nothing to brute-force that a slow KDF would protect (unlike
a password). The cluster keeps `{name, role, hash}` in the replicated state (commands
`token.add` / `token.revoke`); the token itself is shown once, to whoever added it.

The node's own token (its config's token_file) is not in the state: it is the built-in
`admin` token named BOOTSTRAP_NAME, and nodes use it for their calls to each other.
"""
from __future__ import annotations

import hashlib
import secrets

ROLES = ("read", "operator", "admin")  # each role can do everything the ones before it can
BOOTSTRAP_NAME = "bootstrap"
TOKEN_PREFIX = "halb_"
HASH_HEX_LEN = 64
MAX_TOKENS = 256  # each request compares against every hash (~0.1 us each): keep the scan short


def role_allows(role: str, required: str) -> bool:
    """Does a token with `role` satisfy `required`? Unknown roles satisfy nothing."""
    if role not in ROLES or required not in ROLES:
        return False
    return ROLES.index(role) >= ROLES.index(required)


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: bytes | str) -> str:
    """Hex SHA-256 of the token as sent (bytes: the Authorization header may hold anything)."""
    raw = token.encode("utf-8", "surrogateescape") if isinstance(token, str) else token
    return hashlib.sha256(raw).hexdigest()


def is_token_hash(value: object) -> bool:
    return (isinstance(value, str) and len(value) == HASH_HEX_LEN
            and all(c in "0123456789abcdef" for c in value))


__all__ = ["ROLES", "BOOTSTRAP_NAME", "MAX_TOKENS", "role_allows", "new_token", "hash_token", "is_token_hash"]

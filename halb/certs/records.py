"""The public face of a stored certificate: what lists, events and answers may show."""
from __future__ import annotations

from typing import Any

PUBLIC_FIELDS = ("name", "sans", "not_before", "not_after", "source", "fingerprint", "issuer", "key_type", "at", "by")


def cert_summary(record: dict[str, Any]) -> dict[str, Any]:
    """Everything but the chain and the sealed key (the sealed key is safe, but an answer
    has no use for it, and `--json` output ends up in tickets and chat)."""
    return {k: record.get(k) for k in PUBLIC_FIELDS}


__all__ = ["cert_summary", "PUBLIC_FIELDS"]

"""The public face of a stored certificate: what lists, events and answers may show."""
from __future__ import annotations

from typing import Any

PUBLIC_FIELDS = ("name", "sans", "not_before", "not_after", "source", "fingerprint", "issuer", "key_type", "at", "by")


def cert_summary(record: dict[str, Any]) -> dict[str, Any]:
    """Everything but the chain and the sealed key (the sealed key is safe, but an answer
    has no use for it, and `--json` output ends up in tickets and chat)."""
    return {k: record.get(k) for k in PUBLIC_FIELDS}


ORDER_FIELDS = ("name", "domains", "directory", "email", "at", "by", "renew_requested", "failures", "failed_at",
                "last_error")


def acme_order_summary(order: dict[str, Any]) -> dict[str, Any]:
    """An ACME order without its CA bundle (long, and not what a list is read for)."""
    return {k: order.get(k) for k in ORDER_FIELDS}


def cert_add_args(name: str, pair: Any, key_sealed: str, *, source: str, replace: bool) -> dict[str, Any]:
    """The `cert.add` command for a checked pair (pem.CheckedPair) whose key is sealed."""
    info = pair.info
    return {"name": name, "chain": pair.chain_pem, "key_sealed": key_sealed, "sans": list(info.sans),
            "not_before": info.not_before, "not_after": info.not_after, "fingerprint": info.fingerprint,
            "issuer": info.issuer, "key_type": info.key_type, "source": source, "replace": replace}


__all__ = ["acme_order_summary", "cert_add_args", "cert_summary", "ORDER_FIELDS", "PUBLIC_FIELDS"]

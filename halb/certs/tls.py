"""TLS server contexts from the replicated certificate store, and SNI selection.

`CertSet.build(records, sealer, previous)` opens each sealed key (sealing.py) and loads
chain + key into an `ssl.SSLContext` of its own; a certificate that cannot be opened or
loaded is reported in `errors` and skipped, never stopping the others. Contexts of
certificates that did not change are reused from `previous` (no decrypt, no reload on an
unrelated change). The key is handed to OpenSSL through an anonymous memory file
(memfd_create), so the plaintext never touches a file system.

`select_cert` (pure, tests/unit/test_frontend_tls.py) picks a certificate for an SNI name:
an exact SAN first, then a wildcard SAN one label deep (`*.shop.example` covers
`a.shop.example`, not `a.b.shop.example` nor `shop.example`: RFC 6125), else the
default: the frontend's `default_cert` if it exists, else the oldest certificate in the
store (first added, then by name), so adding a certificate never changes which one a
client without SNI gets. Among several certificates with the same SAN the one that expires
last wins (a renewed certificate added next to the old one takes over at once).

`server_context(pick)` is the listening context: TLS 1.2+, Mozilla "intermediate" ciphers
for TLS 1.2, ALPN http/1.1, and an `sni_callback` that switches the connection to the
chosen certificate's context. A certificate change swaps the CertSet the callback reads:
new handshakes get the new certificate, open connections keep theirs.
"""
from __future__ import annotations

import logging
import os
import ssl
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable

log = logging.getLogger(__name__)

# Mozilla intermediate (v5.7) for TLS 1.2; TLS 1.3 suites are OpenSSL's defaults
CIPHERS_TLS12 = ":".join((
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES256-GCM-SHA384", "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
    "DHE-RSA-AES128-GCM-SHA256", "DHE-RSA-AES256-GCM-SHA384", "DHE-RSA-CHACHA20-POLY1305",
))
ALPN = ["http/1.1"]


def _direct_binder() -> Callable[..., Any] | None:
    """`_tlsdirect.bind` when the optional C extension is built and finds the libssl that
    CPython's _ssl uses; None otherwise (or with HALB_TLS_DIRECT=0): CPython's methods."""
    if os.environ.get("HALB_TLS_DIRECT", "1") == "0":
        return None
    if sys.implementation.name != "cpython" or not (3, 11) <= sys.version_info[:2] <= (3, 13):
        return None  # _tlsdirect.c reads _ssl._SSLSocket's first fields: checked on 3.11-3.13 only
    try:
        import _ssl

        from halb.certs import _tlsdirect
    except ImportError:
        return None
    path = getattr(_ssl, "__file__", None)
    if not path or not _tlsdirect.load(path):
        return None
    return _tlsdirect.bind  # type: ignore[no-any-return]


_bind_direct = _direct_binder()


def tls_direct() -> bool:
    """Whether TLS records go through halb/certs/_tlsdirect.c (logged at start-up)."""
    return _bind_direct is not None


class DirectSSLObject(ssl.SSLObject):
    """An `ssl.SSLObject` whose per-record calls skip ssl.py's forwarding methods.

    uvloop's (and asyncio's) SSL protocol looks `read`, `write` and `pending` up once per
    connection and calls them for every record; on `ssl.SSLObject` each is a Python method
    that only forwards to the C object (`self._sslobj.read(len)` and so on): three Python
    frames per keep-alive request. Bound to the C methods directly they are one C call
    each (bench/NOTES.md, "HTTPS"). With the optional C extension (_tlsdirect.c) they are
    halb's own C calls on the same OpenSSL connection: no GIL round trip per OpenSSL call,
    no 256 KiB buffer per record; anything but success goes through CPython's methods, so
    errors, close_notify and want-read surface exactly as ssl.SSLObject raises them. The C
    `read` needs its size (no default of 1024) and takes no explicit `buffer=None`; both
    protocols always pass a size, and a buffer only when they have one. Everything else
    is ssl.SSLObject's.
    """

    @classmethod
    def _create(cls, *args: Any, **kwargs: Any) -> "DirectSSLObject":
        obj: DirectSSLObject = super()._create(*args, **kwargs)  # type: ignore[misc]
        c = obj._sslobj  # type: ignore[attr-defined]
        d = _bind_direct(c, c.read, c.write) if _bind_direct is not None else None
        src = d if d is not None else c
        obj.read, obj.write, obj.pending = src.read, src.write, src.pending  # type: ignore[method-assign]
        return obj


def _base_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.sslobject_class = DirectSSLObject
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(CIPHERS_TLS12)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.set_alpn_protocols(ALPN)
    return ctx


def load_context(chain_pem: str, key_pem: bytes) -> ssl.SSLContext:
    """A server context holding one certificate chain and its key."""
    ctx = _base_context()
    data = chain_pem.encode() + b"\n" + key_pem
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("halb-cert", getattr(os, "MFD_CLOEXEC", 0))
        try:
            os.write(fd, data)
            ctx.load_cert_chain(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        return ctx
    with tempfile.NamedTemporaryFile() as f:  # not Linux: a 0600 file, deleted at once
        f.write(data)
        f.flush()
        ctx.load_cert_chain(f.name)
    return ctx


@dataclass(frozen=True)
class SniIndex:
    exact: dict[str, str] = field(default_factory=dict)  # san -> cert name
    wildcard: dict[str, str] = field(default_factory=dict)  # "shop.example" (from *.shop.example) -> name
    oldest: str | None = None

    @classmethod
    def build(cls, records: dict[str, dict[str, Any]]) -> "SniIndex":
        """`records`: cert name -> {"sans", "not_after", "at"} (of the certificates that loaded)."""
        exact: dict[str, str] = {}
        wildcard: dict[str, str] = {}
        by_expiry = sorted(records.items(), key=lambda kv: (float(kv[1].get("not_after") or 0), kv[0]))
        for name, rec in by_expiry:  # later expiry overwrites earlier: the longest-valid one wins
            for san in rec.get("sans") or []:
                san = str(san).lower().rstrip(".")
                if san.startswith("*."):
                    wildcard[san[2:]] = name
                else:
                    exact[san] = name
        oldest = min(records, key=lambda n: (float(records[n].get("at") or 0), n)) if records else None
        return cls(exact, wildcard, oldest)


def select_cert(index: SniIndex, server_name: str | None, default_cert: str = "",
                available: Any = None) -> str | None:
    """The certificate name for an SNI `server_name` (None: the client sent none)."""
    if server_name:
        name = server_name.lower().rstrip(".")
        hit = index.exact.get(name)
        if hit is not None:
            return hit
        dot = name.find(".")
        if dot > 0:
            hit = index.wildcard.get(name[dot + 1:])
            if hit is not None:
                return hit
    if default_cert and (available is None or default_cert in available):
        return default_cert
    return index.oldest


@dataclass(frozen=True)
class CertSet:
    """Loaded certificates of this node: name -> context, the SNI index, and why the others
    did not load (name -> reason)."""
    contexts: dict[str, ssl.SSLContext] = field(default_factory=dict)
    index: SniIndex = field(default_factory=SniIndex)
    errors: dict[str, str] = field(default_factory=dict)
    versions: dict[str, tuple[str, str]] = field(default_factory=dict)  # name -> (chain, key_sealed)

    @classmethod
    def build(cls, records: dict[str, dict[str, Any]], sealer: Any, previous: "CertSet | None" = None) -> "CertSet":
        contexts: dict[str, ssl.SSLContext] = {}
        versions: dict[str, tuple[str, str]] = {}
        errors: dict[str, str] = {}
        loaded: dict[str, dict[str, Any]] = {}
        for name, rec in sorted(records.items()):
            try:
                version = (str(rec["chain"]), str(rec["key_sealed"]))
                old = previous.contexts.get(name) if previous is not None else None
                if old is not None and previous.versions.get(name) == version:  # type: ignore[union-attr]
                    ctx = old
                else:
                    if sealer is None:
                        raise ValueError("this node has no cluster secret to open the key with")
                    ctx = load_context(version[0], sealer.open(version[1], name))
            except Exception as exc:  # isolate: one bad certificate must not stop the others
                errors[name] = f"cannot load certificate: {type(exc).__name__}: {exc}"[:300]
                continue
            contexts[name], versions[name], loaded[name] = ctx, version, rec
        return cls(contexts, SniIndex.build(loaded), errors, versions)

    def pick(self, server_name: str | None, default_cert: str = "") -> ssl.SSLContext | None:
        name = select_cert(self.index, server_name, default_cert, self.contexts)
        return self.contexts.get(name) if name is not None else None


def server_context(current: Callable[[], CertSet], default_cert: Callable[[], str]) -> ssl.SSLContext:
    """The listening context of a TLS frontend; the certificate is chosen per handshake."""
    ctx = _base_context()

    def sni(obj: Any, server_name: str | None, _ctx: ssl.SSLContext) -> int | None:
        chosen = current().pick(server_name, default_cert())
        if chosen is None:
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME if server_name else ssl.ALERT_DESCRIPTION_HANDSHAKE_FAILURE
        obj.context = chosen
        return None

    ctx.sni_callback = sni
    return ctx


__all__ = ["CertSet", "DirectSSLObject", "SniIndex", "load_context", "select_cert", "server_context", "tls_direct"]

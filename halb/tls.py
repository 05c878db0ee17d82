"""TLS for the admin API: one place builds every SSL context and every admin URL.

The node serves HTTPS with its certificate (`server_context`); everything that calls an
admin API (the CLI's Client, peer nodes, the chaos monitor, the lab, the launcher's
leader wait) uses an `AdminTls`, which says whether to speak https (verifying the server
against the cluster CA, or the system's trust store when no CA file is given) or plain
http (only for a node started with `--insecure-dev` and no certificate). Nobody else
builds an `ssl.SSLContext` for the admin API, so the rules (TLS 1.2+, hostname checked,
no unverified fallback) live here once.

An address may carry its scheme (`http://127.0.0.1:7000`): that wins over the default,
so `HALB_CLUSTER` can name a dev cluster without TLS.
"""
from __future__ import annotations

import functools
import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MIN_VERSION = ssl.TLSVersion.TLSv1_2


class TlsError(ValueError):
    """A certificate, key or CA file that cannot be used; the message says why."""


def server_context(cert_file: str | os.PathLike[str], key_file: str | os.PathLike[str]) -> ssl.SSLContext:
    """The admin API's server side: TLS 1.2 or newer, the node's certificate and key."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = MIN_VERSION
    try:
        ctx.load_cert_chain(str(cert_file), str(key_file))
    except FileNotFoundError as exc:
        raise TlsError(f"file {exc.filename or cert_file} does not exist") from None
    except PermissionError as exc:
        raise TlsError(f"cannot read {exc.filename or cert_file}: permission denied") from None
    except ssl.SSLError as exc:
        reason = "the key does not belong to the certificate" if "KEY_VALUES_MISMATCH" in str(exc) else \
            f"not a PEM certificate and private key ({exc.reason or exc})"
        raise TlsError(reason) from None
    return ctx


def client_context(ca_file: str | os.PathLike[str] | None = None) -> ssl.SSLContext:
    """Verifies the server's certificate and host name: against `ca_file` (the cluster CA)
    when given, else against the system's trust store. There is no unverified mode."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.minimum_version = MIN_VERSION
    if ca_file is not None:
        try:
            ctx.load_verify_locations(cafile=str(ca_file))
        except FileNotFoundError:
            raise TlsError(f"CA file {ca_file} does not exist") from None
        except PermissionError:
            raise TlsError(f"cannot read CA file {ca_file}: permission denied") from None
        except ssl.SSLError as exc:
            raise TlsError(f"CA file {ca_file} holds no PEM certificate ({exc.reason or exc})") from None
    return ctx


@functools.lru_cache(maxsize=32)
def _cached_client_context(ca_file: str | None, _content: bytes) -> ssl.SSLContext:
    return client_context(ca_file)


def _ca_content(path: str | None) -> bytes:
    """Part of the cache key: a CA file rewritten in place (a new cluster in the same
    directory) must not be answered with the context of the old one. The file is small
    (one certificate); reading it costs far less than the handshake it serves."""
    if path is None:
        return b""
    try:
        with open(path, "rb") as f:
            return f.read(1 << 20)
    except OSError:
        return b""  # client_context raises the clear error


def has_scheme(address: str) -> bool:
    return address.startswith(("http://", "https://"))


@dataclass(frozen=True)
class AdminTls:
    """How a client reaches admin APIs. `plain`: http:// (an --insecure-dev node without a
    certificate); else https:// verified against `ca_file` (None: system trust store)."""

    ca_file: str | None = None
    plain: bool = False

    @classmethod
    def from_env(cls, ca_file: str | None = None) -> "AdminTls":
        """The CLI's choice: `--ca-file`, else `HALB_CA_FILE` (cluster.env sets it)."""
        chosen = ca_file or os.environ.get("HALB_CA_FILE") or None
        return cls(ca_file=str(Path(chosen).expanduser()) if chosen else None)

    def for_addresses(self, addresses: list[str]) -> "AdminTls":
        """Plain when every given address says http:// (an --insecure-dev cluster), so the
        addresses the cluster reports itself (members' `api`, bare HOST:PORT) get http too."""
        if addresses and all(a.startswith("http://") for a in addresses):
            return AdminTls(self.ca_file, plain=True)
        return self

    @property
    def scheme(self) -> str:
        return "http" if self.plain else "https"

    def url(self, address: str, path: str) -> str:
        """`address` is HOST:PORT (this client's scheme) or a full `scheme://HOST:PORT`."""
        base = address if has_scheme(address) else f"{self.scheme}://{address}"
        return base.rstrip("/") + path

    def context(self) -> ssl.SSLContext:
        """The verifying client context (cached per CA file: building one reads the trust store)."""
        return _cached_client_context(self.ca_file, _ca_content(self.ca_file))

    def context_for(self, url: str) -> ssl.SSLContext | None:
        """For urllib's `urlopen(..., context=)`: None for http:// URLs."""
        return self.context() if url.startswith("https://") else None

    def connector(self, **kw: Any) -> Any:
        """An aiohttp connector whose https requests verify against this CA (http ones stay
        plain). Also when `plain`: an https:// address is still verified, never trusted blindly."""
        import aiohttp

        return aiohttp.TCPConnector(ssl=self.context(), **kw)

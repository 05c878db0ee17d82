"""Reach a node's status page from a test over whatever the node serves: HTTP, or HTTPS.

The scheme is found by trying a TLS handshake on the admin port, so these tests need no
knowledge of how the harness configures TLS. Over HTTPS the client trusts exactly the
certificate the node presents (pinned, with OpenSSL's partial-chain flag so the leaf is its
own trust anchor) and the browser gets the same pin as an SPKI hash: neither ignores
certificate errors in general.
"""
from __future__ import annotations

import base64
import hashlib
import http.client
import socket
import ssl
from dataclasses import dataclass, field
from http.cookies import SimpleCookie
from urllib.parse import urlencode

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat


@dataclass(frozen=True)
class Origin:
    """scheme://host:port of one node's admin API, and the certificate it serves (HTTPS)."""

    host: str
    port: int
    cert_pem: str | None = None

    @property
    def scheme(self) -> str:
        return "https" if self.cert_pem else "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    def spki_sha256(self) -> str:
        """base64 SHA-256 of the certificate's SubjectPublicKeyInfo (Chromium's
        --ignore-certificate-errors-spki-list pins exactly this key)."""
        assert self.cert_pem, "plain HTTP has no certificate"
        cert = x509.load_pem_x509_certificate(self.cert_pem.encode())
        spki = cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
        return base64.b64encode(hashlib.sha256(spki).digest()).decode()

    def ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cadata=self.cert_pem)
        ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN  # the pinned leaf is the trust anchor
        ctx.check_hostname = False  # exactly this certificate is trusted, whatever names it lists
        return ctx


def origin_of(api: str, timeout: float = 3.0) -> Origin:
    """`api` is host:port (or a URL): HTTPS if the port completes a TLS handshake."""
    hostport = api.split("://", 1)[-1].rstrip("/")
    host, port = hostport.rsplit(":", 1)
    host = host.strip("[]")
    probe = ssl.create_default_context()
    probe.check_hostname, probe.verify_mode = False, ssl.CERT_NONE  # only to learn what it serves
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as raw:
            with probe.wrap_socket(raw, server_hostname=host) as tls:
                der = tls.getpeercert(binary_form=True)
    except (ssl.SSLError, ConnectionError, socket.timeout):
        return Origin(host, int(port))
    return Origin(host, int(port), ssl.DER_cert_to_PEM_cert(der) if der else None)


@dataclass
class Reply:
    status: int
    headers: http.client.HTTPMessage
    text: str
    cookies: SimpleCookie = field(default_factory=SimpleCookie)


def request(origin: Origin, method: str, path: str, *, cookie: str | None = None, token: str | None = None,
            form: dict[str, str] | None = None, body: bytes | None = None, headers: dict[str, str] | None = None,
            timeout: float = 10.0) -> Reply:
    """One request, no redirects followed, the cookie (if any) sent by hand: the test sees
    exactly what the node answers, Set-Cookie attributes included."""
    if origin.cert_pem:
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(origin.host, origin.port, timeout=timeout,
                                                                       context=origin.ssl_context())
    else:
        conn = http.client.HTTPConnection(origin.host, origin.port, timeout=timeout)
    hdrs = dict(headers or {})
    if cookie is not None:
        hdrs["Cookie"] = cookie
    if token is not None:
        hdrs["Authorization"] = f"Bearer {token}"
    if form is not None:
        body = urlencode(form).encode()
        hdrs["Content-Type"] = "application/x-www-form-urlencoded"
    try:
        conn.request(method, path, body=body, headers=hdrs)
        resp = conn.getresponse()
        text = resp.read().decode("utf-8", "replace")
        jar: SimpleCookie = SimpleCookie()
        for value in resp.headers.get_all("Set-Cookie") or []:
            jar.load(value)
        return Reply(resp.status, resp.headers, text, jar)
    finally:
        conn.close()

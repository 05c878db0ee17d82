"""Request-target and Host checks of RFC 9112 section 3.2, for heads the llhttp path parsed.

Why a module of its own: the C fast path (_fasthttp.c) only takes origin-form requests
with exactly one Host (HTTP/1.1) and declines everything else, so these rules run only on
the slower llhttp path, and only for the unusual heads (no Host, or a target that does not
start with "/"): the usual request pays one comparison in HttpClientConn.

- An HTTP/1.1 request without Host is answered 400 (a request with two Host lines is
  refused while its headers are parsed).
- absolute-form ("GET http://shop.example/x HTTP/1.1"): the URI's authority wins over the
  Host header (a server MUST ignore Host then); the backend gets origin-form and a Host
  line carrying that authority, so Host, X-Forwarded-Host and the path agree whatever the
  client sent. Only http/https, no userinfo, no empty authority (RFC 9110 4.2.1, 4.2.4).
- asterisk-form ("OPTIONS * HTTP/1.1") passes unchanged.
"""
from __future__ import annotations


class BadTarget(ValueError):
    """The request must be answered 400 with this message."""


def resolve(url: bytes, host: bytes | None, version: str) -> tuple[bytes, bytes | None]:
    """(url, host) to forward for a request whose target is not origin-form or whose Host
    is missing; raises BadTarget for what RFC 9112 says to answer with 400."""
    if url[:1] == b"/" or url == b"*":
        if host is None and version != "1.0":
            raise BadTarget("HTTP/1.1 request without Host header")
        return url, host
    scheme, sep, rest = url.partition(b"://")
    if not sep or scheme.lower() not in (b"http", b"https"):
        raise BadTarget("request target must be origin-form or an http(s) absolute URI")
    if host is None and version != "1.0":
        raise BadTarget("HTTP/1.1 request without Host header")
    end = len(rest)
    for stop in (b"/", b"?", b"#"):
        i = rest.find(stop)
        if 0 <= i < end:
            end = i
    authority = rest[:end]
    if not authority or b"@" in authority:
        raise BadTarget("absolute URI without a host, or with userinfo")
    path = rest[end:]
    if not path[:1] == b"/":
        path = b"/" + path  # "http://h" and "http://h?q" have the path "/"
    return path, authority


def replace_host_line(lines: list[bytes], host: bytes) -> None:
    """Put "Host: <host>" where the client's Host line was (forwarded header lines as the
    llhttp path builds them: the proxy writes that line as "Host: ", no other line starts
    so), or first when there was none (HTTP/1.0)."""
    line = b"Host: " + host + b"\r\n"
    for i, old in enumerate(lines):
        if old.startswith(b"Host: "):
            lines[i] = line
            return
    lines.insert(0, line)

"""Responses the proxy itself generates: JSON bodies clients and operators can parse.

Every generated error carries the request id, so a customer's report can be matched with
the proxy's and the backend's logs.
"""
from __future__ import annotations

import json

REASONS = {
    400: b"Bad Request", 404: b"Not Found", 405: b"Method Not Allowed", 408: b"Request Timeout",
    413: b"Content Too Large", 431: b"Request Header Fields Too Large", 500: b"Internal Server Error",
    502: b"Bad Gateway", 503: b"Service Unavailable", 504: b"Gateway Timeout",
}

CODES = {
    400: "bad_request", 404: "not_found", 405: "method_not_allowed", 408: "request_timeout", 413: "payload_too_large",
    431: "headers_too_large", 500: "internal_error", 502: "bad_gateway", 503: "service_unavailable",
    504: "gateway_timeout",
}


def error_response(status: int, message: str, request_id: bytes | str = b"", *,
                   retry_after: int | None = None, close: bool = False, reason: str | None = None) -> bytes:
    """A complete HTTP/1.1 response with a JSON body ``{error, message, request_id}``, plus
    ``reason`` (a stable machine-readable cause, e.g. ``queue_timeout``) when given."""
    rid = request_id.decode("latin-1") if isinstance(request_id, bytes) else request_id
    doc = {"error": CODES.get(status, "error"), "message": message, "request_id": rid}
    if reason is not None:
        doc["reason"] = reason
    body = json.dumps(doc).encode()
    head = [b"HTTP/1.1 %d %s\r\n" % (status, REASONS.get(status, b"Error")),
            b"Content-Type: application/json\r\n", b"Content-Length: %d\r\n" % len(body),
            b"Cache-Control: no-store\r\n"]
    if rid:
        head.append(b"X-Request-Id: " + rid.encode("latin-1") + b"\r\n")
    if retry_after is not None:
        head.append(b"Retry-After: %d\r\n" % retry_after)
    if close:
        head.append(b"Connection: close\r\n")
    head.append(b"\r\n")
    return b"".join(head) + body

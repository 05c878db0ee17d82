"""Requests aiohttp refuses before any handler: JSON answers, and no credential in any log.

Real aiohttp servers on 127.0.0.1 (in-process), real oversized headers over a socket.
"""
from __future__ import annotations

import asyncio
import json
import logging

import pytest
from aiohttp import web

from halb.api.protocol import AdminRunner, install_log_redaction, redact

TOKEN = "Zq7-real-token-value-0123456789"


async def _serve_and_send(runner: web.AppRunner, head: bytes) -> tuple[bytes, bytes]:
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(head)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 5)
        writer.close()
    finally:
        await runner.cleanup()
    status_line, _, rest = data.partition(b"\r\n")
    headers, _, body = rest.partition(b"\r\n\r\n")
    return status_line + b"\r\n" + headers, body


async def _ok(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


def _app() -> web.Application:
    app = web.Application()
    app.router.add_get("/", _ok)
    return app


OVERSIZED = (b"GET / HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode() + b"x" * 9000 + b"\r\n\r\n")


def test_admin_runner_answers_json_and_logs_no_header_value(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    head, body = asyncio.run(_serve_and_send(AdminRunner(_app(), access_log=None), OVERSIZED))
    assert head.startswith(b"HTTP/1.") and b" 400 " in head.split(b"\r\n")[0]
    assert b"application/json" in head
    err = json.loads(body)
    assert err["error"] == "header_too_large" and TOKEN not in body.decode()
    assert "refused a malformed request" in caplog.text and "LineTooLong" in caplog.text
    assert TOKEN not in caplog.text


def test_log_redaction_also_covers_a_plain_runner(caplog: pytest.LogCaptureFixture) -> None:
    """Defence in depth: served without AdminRunner, aiohttp still answers text/plain, but
    its ERROR log line (which quotes the header value) is stripped of the detail."""
    install_log_redaction()
    caplog.set_level(logging.DEBUG)
    asyncio.run(_serve_and_send(web.AppRunner(_app(), access_log=None), OVERSIZED))
    assert "Error handling request" in caplog.text and "detail withheld" in caplog.text
    assert TOKEN not in caplog.text


def test_redact_hides_credential_looking_values() -> None:
    assert TOKEN not in redact(f"header b'Bearer {TOKEN}...' rejected")
    assert TOKEN not in redact(f"Authorization: {TOKEN}")
    assert redact("nothing secret here") == "nothing secret here"

"""The admin API's connection layer: JSON errors and no credentials in logs, even for
requests aiohttp rejects before any handler (or middleware) runs.

aiohttp's low-level parser refuses an oversized or malformed request head itself: its
`RequestHandler.handle_error` answers `400 text/plain` quoting the offending bytes, and logs
them at ERROR through the `aiohttp.server` logger (with a traceback whose exception message
quotes up to ~100 bytes of the header value: `b'Bearer <the real token>...'`). Two fixes:

- `AdminRunner` serves the app with a RequestHandler whose `handle_error` answers
  `{"error", "message"}` JSON like every other admin API error and logs one WARNING line
  naming the error class only, never its message;
- `install_log_redaction` puts a filter on aiohttp's loggers (defence in depth, also for
  anything served without AdminRunner): a parse error's detail is withheld and anything
  that looks like an Authorization value is replaced by `<redacted>`.
"""
from __future__ import annotations

import json
import logging
import re
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMethod, HttpProcessingError, InvalidURLError, LineTooLong
from aiohttp.web_protocol import RequestHandler

log = logging.getLogger("halb.api.server")

REDACTED = "<redacted>"
_SECRET = re.compile(r"(?i)\b(bearer|basic|token|authorization)(\s*[:=]?\s*)[^\s'\",]+")
# a logger's filters apply to records created on that very logger (not its children): name each
_REDACT_LOGGERS = ("aiohttp.server", "aiohttp.web", "aiohttp.access", "aiohttp.internal", "halb.api.server")


def redact(text: str) -> str:
    return _SECRET.sub(lambda m: f"{m.group(1)}{m.group(2)}{REDACTED}", text)


def describe_parse_error(exc: BaseException | None) -> tuple[str, str]:
    """(error code, message) for a request aiohttp could not parse; quotes nothing from it."""
    if isinstance(exc, LineTooLong):
        return "header_too_large", "a request line or header is too long (limit 8190 bytes); request refused"
    if isinstance(exc, InvalidURLError):
        return "bad_request", "the request target is not a valid URL"
    if isinstance(exc, BadHttpMethod):
        return "bad_request", "the request method is not valid HTTP"
    if isinstance(exc, HttpProcessingError):
        return "bad_request", f"malformed HTTP request ({type(exc).__name__})"
    return "bad_request", "malformed HTTP request"


class _RedactFilter(logging.Filter):
    """Withhold parse-error details and redact credential-looking values in aiohttp's logs."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        try:
            message = record.getMessage()
        except Exception:  # a broken format must not hide the record
            message = str(record.msg)
        if isinstance(exc, HttpProcessingError):
            message += f" ({type(exc).__name__}; detail withheld: it may quote request headers)"
            record.exc_info, record.exc_text = None, None
        elif record.exc_info:
            # render the traceback now so the redaction also covers it
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        record.msg, record.args = redact(message), None
        return True


_FILTER = _RedactFilter()


def install_log_redaction() -> None:
    """Idempotent: attach the filter to aiohttp's loggers once per process."""
    for name in _REDACT_LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)


class AdminRequestHandler(RequestHandler):
    """aiohttp's per-connection protocol with a JSON, credential-free `handle_error`."""

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if isinstance(exc, HttpProcessingError):
            code, text = describe_parse_error(exc)
            log.warning("refused a malformed request from %s: %s (status %d)", request.remote,
                        type(exc).__name__, status)
        else:
            code, text = "internal", "internal error; see the node's log"
            log.error("request from %s failed outside the API handlers: %s", request.remote,
                      type(exc).__name__ if exc is not None else "no exception")
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; cannot send the error")
        resp = web.Response(status=status, text=json.dumps({"error": code, "message": text}),
                            content_type="application/json")
        resp.force_close()
        return resp


class _AdminServer(web.Server):
    def __call__(self) -> RequestHandler:
        return AdminRequestHandler(self, loop=self._loop, **self._kwargs)


class AdminRunner(web.AppRunner):
    """AppRunner whose connections use AdminRequestHandler."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # web.Server builds its protocol in __call__; the subclass only swaps that class
        server.__class__ = _AdminServer
        return server

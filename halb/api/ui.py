"""The status page at /ui: a login form, a cookie holding the token, and a page that polls.

Authentication is the API's own: the cookie carries an API token, and `auth_middleware`
(halb/api/server.py) checks it exactly like a bearer token on every request (hash compared
against the bootstrap token and this node's copy of the replicated token table, then the
route's role), so a revoked token's cookie stops working when the revoke applies here.
What differs, and why:

- the cookie is read only for GET/HEAD under /ui (`cookie_credential`): it never
  authenticates the JSON API (/v1 stays bearer-only) and never a write, so a page on
  another site that makes the browser send the cookie (CSRF) can at most cause a read
  whose answer it cannot see; SameSite=Strict keeps the browser from sending it at all;
- the two POSTs the page has (sign in, sign out) refuse cross-site requests by their
  Origin / Sec-Fetch-Site headers (login CSRF: signing someone in with your token);
- the cookie is HttpOnly (no script reads it), SameSite=Strict, Path=/ui, and Secure when
  the node serves HTTPS. On plain HTTP (`--insecure-dev`) it cannot be Secure (the browser
  would drop it), so the token then crosses the network in clear like a bearer header;
- answers carry a strict Content-Security-Policy: scripts and styles only from this node,
  no inline script, no framing. Nothing external is ever loaded.

The token is never written into HTML or logs: the login form is never re-filled, and
the log names the token (its name, not its value).
"""
from __future__ import annotations

import logging
from importlib import resources
from urllib.parse import parse_qs
from typing import Any, Callable

from aiohttp import web

from halb.api.roles import Identity
from halb.api.ui_render import render_live, render_login, render_status_page, take_snapshot
from halb.tokens import role_allows

log = logging.getLogger("halb.api.server")  # the logger protocol.install_log_redaction filters

COOKIE = "halb_ui"
COOKIE_PATH = "/ui"
COOKIE_MAX_AGE = 12 * 3600  # a forgotten browser tab does not stay signed in for good
MAX_TOKEN_LEN = 512  # real tokens are ~48 characters; anything longer is not one
MAX_FORM_BYTES = 4096
FORM_TYPE = "application/x-www-form-urlencoded"  # what the sign-in form posts
LOGIN, LOGOUT, LIVE = "/ui/login", "/ui/logout", "/ui/live"
STATIC = {"/ui/static/app.js": ("app.js", "text/javascript"), "/ui/static/style.css": ("style.css", "text/css")}
# reachable without a valid token: the login form (GET /ui answers it then), the two POSTs, the assets
PUBLIC_PATHS = frozenset({"/ui", LOGIN, LOGOUT, *STATIC})
READ_METHODS = frozenset({"GET", "HEAD"})
SECURITY_HEADERS = {
    "Content-Security-Policy": ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                                "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"),
    "X-Content-Type-Options": "nosniff",
    # not no-referrer: with it Chromium sends `Origin: null` on the page's own form posts
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}

Identify = Callable[[bytes], "Identity | None"]


def is_ui_path(path: str) -> bool:
    return path == COOKIE_PATH or path.startswith(COOKIE_PATH + "/")


def cookie_credential(request: web.Request) -> bytes | None:
    """The token in the status page's cookie, for a read under /ui only (else None)."""
    if request.method not in READ_METHODS or not is_ui_path(request.path):
        return None
    value = request.cookies.get(COOKIE)
    if not value or len(value) > MAX_TOKEN_LEN:
        return None
    return value.encode("utf-8", "surrogateescape")


def is_public(request: web.Request) -> bool:
    """Routes the auth middleware lets through without a valid token (the handler decides)."""
    return request.path in PUBLIC_PATHS


def cross_site(request: web.Request) -> bool:
    """A browser request made by another site's page (the headers browsers set themselves)."""
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None and site not in ("same-origin", "none"):
        return True
    origin = request.headers.get("Origin")
    return origin is not None and origin != f"{request.scheme}://{request.host}"


async def read_token_form(request: web.Request) -> str | None:
    """The `token` field of the sign-in form, or None for anything but a small UTF-8
    urlencoded form. Parsed here rather than with aiohttp's request.post(): that also takes
    multipart and raised (a 500) on malformed multipart or non-UTF-8 bodies."""
    if request.content_type != FORM_TYPE or (request.content_length or 0) > MAX_FORM_BYTES:
        return None
    raw = await request.read()  # whole body; aiohttp refuses one over client_max_size (413)
    if len(raw) > MAX_FORM_BYTES:
        return None
    try:
        fields = parse_qs(raw.decode("utf-8"), keep_blank_values=True, strict_parsing=False, max_num_fields=8,
                          errors="strict")
    except (UnicodeDecodeError, ValueError):
        return None
    values = fields.get("token", [""])
    return values[0].strip() if len(values) == 1 else None


class StatusPage:
    """The /ui routes of one node. `views` is its ClusterViews; `identify` maps a presented
    token to its identity the same way the API's middleware does (None: unknown token)."""

    def __init__(self, views: Any, identify: Identify) -> None:
        self.views = views
        self.identify = identify
        pkg = resources.files("halb.api") / "ui_static"
        self.static = {path: ((pkg / name).read_bytes(), ctype) for path, (name, ctype) in STATIC.items()}

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_get("/ui", self.index)
        router.add_get("/ui/", self.redirect_index)
        router.add_get(LIVE, self.live)
        router.add_post(LOGIN, self.login)
        router.add_post(LOGOUT, self.logout)
        for path in self.static:
            router.add_get(path, self.asset)

    # --- handlers --------------------------------------------------------------------

    async def index(self, request: web.Request) -> web.Response:
        ident = request.get("identity")
        if not isinstance(ident, Identity) or not role_allows(ident.role, "read"):
            had_cookie = COOKIE in request.cookies
            resp = self._login(request, "Your sign-in is no longer valid (token revoked?); sign in again."
                               if had_cookie else "", 200)
            if had_cookie:
                self._clear(resp, request.secure)
            return resp
        return self._html(render_status_page(take_snapshot(self.views), ident.name, ident.role))

    async def redirect_index(self, request: web.Request) -> web.Response:
        return self._redirect()

    async def live(self, request: web.Request) -> web.Response:
        """The refreshing part of the page (the middleware has checked the token and role)."""
        return self._html(render_live(take_snapshot(self.views)))

    async def login(self, request: web.Request) -> web.Response:
        if cross_site(request):
            return self._login(request, "Sign-in refused: the form was posted from another site.", 403)
        token = await read_token_form(request)
        if token is None:
            return self._login(request, "Sign-in refused: send the form's field 'token' as "
                               "application/x-www-form-urlencoded UTF-8.", 400)
        ident = self.identify(token.encode()) if 0 < len(token) <= MAX_TOKEN_LEN else None
        if ident is None or not role_allows(ident.role, "read"):
            log.info("status page: refused a sign-in with an unknown token from %s", request.remote)
            return self._login(request, "Unknown token.", 401)
        log.info("status page: token %r (%s) signed in from %s", ident.name, ident.role, request.remote)
        resp = self._redirect()
        resp.set_cookie(COOKIE, token, max_age=COOKIE_MAX_AGE, path=COOKIE_PATH, httponly=True,
                        samesite="Strict", secure=request.secure)
        return resp

    async def logout(self, request: web.Request) -> web.Response:
        if cross_site(request):
            return self._login(request, "Sign-out refused: the form was posted from another site.", 403)
        resp = self._redirect()
        self._clear(resp, request.secure)
        return resp

    async def asset(self, request: web.Request) -> web.Response:
        body, ctype = self.static[request.path]
        resp = web.Response(body=body, content_type=ctype, charset="utf-8")
        self._secure(resp)
        resp.headers["Cache-Control"] = "no-cache"
        return resp

    # --- helpers ---------------------------------------------------------------------

    def _login(self, request: web.Request, message: str, status: int) -> web.Response:
        return self._html(render_login(message, self.views.node_id, plain_http=not request.secure), status=status)

    def _html(self, text: str, status: int = 200) -> web.Response:
        resp = web.Response(text=text, status=status, content_type="text/html", charset="utf-8")
        self._secure(resp)
        return resp

    def _redirect(self) -> web.Response:
        """303 to the page (returned, not raised: errors_middleware turns raised HTTP
        exceptions into JSON errors)."""
        resp = web.Response(status=303, headers={"Location": "/ui"})
        self._secure(resp)
        return resp

    @staticmethod
    def _secure(resp: web.StreamResponse) -> None:
        resp.headers.update(SECURITY_HEADERS)

    @staticmethod
    def _clear(resp: web.StreamResponse, secure: bool) -> None:
        resp.set_cookie(COOKIE, "", max_age=0, expires="Thu, 01 Jan 1970 00:00:00 GMT", path=COOKIE_PATH,
                        httponly=True, samesite="Strict", secure=secure)

__all__ = ["StatusPage", "COOKIE", "cookie_credential", "is_public", "is_ui_path", "cross_site"]

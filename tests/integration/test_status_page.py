"""The status page's sign-in over plain HTTP requests (no browser): what a node answers
without a cookie, with a bad token, with a cross-site form, with a read token's cookie, after
that token is revoked and after signing out. The browser test is test_status_page_browser.py."""
from __future__ import annotations

import time
from typing import Any

import pytest

from tests.conftest import wait_until
from tests.integration.status_page_client import Origin, Reply, origin_of, request

pytestmark = pytest.mark.timeout(120)
COOKIE = "halb_ui"


def sign_in(origin: Origin, token: str, **headers: str) -> Reply:
    return request(origin, "POST", "/ui/login", form={"token": token}, headers=headers)


def is_login_form(reply: Reply) -> bool:
    return 'action="/ui/login"' in reply.text and 'name="token"' in reply.text and 'id="live"' not in reply.text


def test_status_page_sign_in_cookie_and_refusals(cluster_factory: Any) -> None:
    c = cluster_factory(n=1)
    origin = origin_of(c.api("n1"))
    reader = c.cli("token", "add", "wallboard", "--role", "read").stdout.strip()
    bad = "halb_" + "x" * 43

    # without a cookie: the login form (server-rendered, strict CSP), and the live part refused
    page = request(origin, "GET", "/ui")
    assert page.status == 200 and is_login_form(page), page.text[:500]
    assert ('id="plain-http"' in page.text) == (origin.scheme == "http")  # says when the token travels in clear
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]
    assert "frame-ancestors 'none'" in page.headers["Content-Security-Policy"]
    live = request(origin, "GET", "/ui/live")
    assert live.status == 401 and '"unauthorized"' in live.text
    assert request(origin, "GET", "/ui/static/app.js").status == 200  # assets need no token

    # a bad token: refused, no cookie, not echoed back
    refused = sign_in(origin, bad)
    assert refused.status == 401 and is_login_form(refused) and "Unknown token" in refused.text
    assert bad not in refused.text and COOKIE not in refused.cookies
    assert request(origin, "GET", "/ui/live", cookie=f"{COOKIE}={bad}").status == 401
    # a malformed form (multipart, not UTF-8): the form again with 400, never a 500
    for ctype, body in (("multipart/form-data; boundary=xyz", b"--xyz\r\nContent-Disposition: form-data\r\n\r\nx"),
                        ("application/x-www-form-urlencoded", b"token=%ff%fe")):
        malformed = request(origin, "POST", "/ui/login", body=body, headers={"Content-Type": ctype})
        assert malformed.status == 400 and is_login_form(malformed), (ctype, malformed.status, malformed.text[:200])
    # a good token posted from another site's page (login CSRF): refused
    cross = sign_in(origin, reader, Origin="https://evil.example")
    assert cross.status == 403 and COOKIE not in cross.cookies
    cross = sign_in(origin, reader, **{"Sec-Fetch-Site": "cross-site"})
    assert cross.status == 403 and COOKIE not in cross.cookies

    # a read token signs in: 303 to the page with a cookie the page's scripts cannot read
    ok = sign_in(origin, reader, Origin=origin.url, **{"Sec-Fetch-Site": "same-origin"})
    assert ok.status == 303 and ok.headers["Location"] == "/ui"
    morsel = ok.cookies[COOKIE]
    assert morsel.value == reader
    assert morsel["httponly"] and morsel["samesite"] == "Strict" and morsel["path"] == "/ui"
    assert bool(morsel["secure"]) == (origin.scheme == "https")  # Secure over HTTPS; --insecure-dev HTTP cannot
    cookie = f"{COOKIE}={reader}"
    page = request(origin, "GET", "/ui", cookie=cookie)
    assert page.status == 200 and 'id="live"' in page.text and 'data-member="n1"' in page.text
    for name, _ in c.spec.backends:
        assert f'data-backend="checkout/{name}"' in page.text
    assert "wallboard" in page.text and reader not in page.text  # names the token, never shows it
    live = request(origin, "GET", "/ui/live", cookie=cookie)
    assert live.status == 200 and 'data-member="n1"' in live.text and "<html" not in live.text
    # the cookie is the page's only: the JSON API and any write still need a bearer token
    assert request(origin, "GET", "/v1/status", cookie=cookie).status == 401
    assert request(origin, "POST", "/v1/services/checkout/backends/A/drain", cookie=cookie).status == 401
    assert request(origin, "GET", "/v1/status", token=reader).status == 200  # the same token as a bearer: fine

    # revoked: its cookie stops working on the next request (checked like a bearer token)
    c.cli("token", "revoke", "wallboard")
    wait_until(lambda: request(origin, "GET", "/ui/live", cookie=cookie).status == 401, 5, 0.1,
               "the revoked token's cookie refused")
    again = request(origin, "GET", "/ui", cookie=cookie)
    assert again.status == 200 and is_login_form(again) and "no longer valid" in again.text
    assert again.cookies[COOKIE].value == "" and again.cookies[COOKIE]["max-age"] == "0"

    # sign out: the cookie is cleared
    out = request(origin, "POST", "/ui/logout", cookie=f"{COOKIE}={c.token}", headers={"Origin": origin.url})
    assert out.status == 303 and out.cookies[COOKIE].value == "" and out.cookies[COOKIE]["max-age"] == "0"

    time.sleep(0.2)  # let the node flush its log
    logs = "".join(p.read_text() for p in (c.directory / "logs").glob("*.log"))  # whole logs, not a tail
    assert "wallboard" in logs  # the sign-in is logged by the token's name ...
    for secret in (reader, bad, c.token):  # ... and no token value is
        assert secret not in logs

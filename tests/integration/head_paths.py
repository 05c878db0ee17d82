"""Run every test of a module on both HTTP head paths: import `head_path` into the module."""
from __future__ import annotations

import pytest


@pytest.fixture(autouse=True, params=["c-fast-path", "llhttp-only"])
def head_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test here runs twice: with the C head fast path and with llhttp alone."""
    from halb.dataplane import http_proxy
    if request.param == "llhttp-only":
        monkeypatch.setattr(http_proxy, "fast_request", None)
        monkeypatch.setattr(http_proxy, "fast_response", None)
    elif not http_proxy.accelerated():
        pytest.skip("halb.dataplane._fasthttp is not built here")
    return request.param

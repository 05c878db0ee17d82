"""Run every test of a module on both TCP mode paths: import `tcp_path` into the module."""
from __future__ import annotations

import pytest


@pytest.fixture(autouse=True, params=["c-relay", "asyncio"])
def tcp_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test here runs twice: on the C relay (halb.dataplane._tcprelay) and on the
    asyncio Protocols (tcp_proxy.TcpClientConn, the path without the extension)."""
    from halb.dataplane import tcp_relay
    if request.param == "asyncio":
        monkeypatch.setattr(tcp_relay, "Relay", None)
    elif not tcp_relay.available():
        pytest.skip("halb.dataplane._tcprelay is not built here (or HALB_TCP_RELAY=python)")
    return request.param

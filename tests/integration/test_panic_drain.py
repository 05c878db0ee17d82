"""Panic mode (fail open) must not send new requests to drained backends (issue 12 item 11),
nor to ones this worker ejected while another active backend is left, through a real data
plane on 127.0.0.1 with real origins."""
from __future__ import annotations

import asyncio

import pytest

from halb.dataplane.engine import DataPlane
from halb.dataplane.origin import Origin
from halb.dataplane.snapshot import BackendRoute
from halb.dataplane.testing import raw_request, run, service, snapshot

pytestmark = pytest.mark.timeout(60)


async def fetch(port: int) -> str:
    r = await raw_request(port, b"GET / HTTP/1.1\r\nHost: shop.test\r\n\r\n", timeout=10.0)
    assert r.status == 200, r.status
    return r.headers["x-backend"]


def test_panic_never_picks_a_drained_backend() -> None:
    async def main() -> None:
        origins = [Origin(n) for n in ("A", "B", "C")]
        ports = [await o.start() for o in origins]
        dp = DataPlane("test")
        try:
            # every backend fails its checks (panic: fail open), B is drained by the operator
            bs = [BackendRoute(name=n, host="127.0.0.1", port=p, weight=1, healthy=False,
                               admin_state="drain" if n == "B" else "active")
                  for n, p in zip("ABC", ports)]
            await dp.start(snapshot(service("web", bs, panic_threshold=0.5)))
            port = dp.bound_port("web")
            seen = [await fetch(port) for _ in range(12)]
            assert dp.stats()["services"]["web"]["panic"] is True
            assert set(seen) == {"A", "C"}, seen  # old code: B took a third of them
            assert dp.stats()["services"]["web"]["backends"]["B"]["requests"] == 0
        finally:
            await dp.stop()
            for o in origins:
                o.close()

    run(main())


def test_panic_skips_ejected_backend_while_another_active_one_is_left() -> None:
    async def main() -> None:
        origins = [Origin(n) for n in ("A", "C")]
        ports = [await o.start() for o in origins]
        # "B" is an address nothing listens on: the first connect is refused and ejects it
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            dead = s.getsockname()[1]
        dp = DataPlane("test")
        try:
            bs = [BackendRoute(name="A", host="127.0.0.1", port=ports[0], weight=1, healthy=False),
                  BackendRoute(name="B", host="127.0.0.1", port=dead, weight=1, healthy=False),
                  BackendRoute(name="C", host="127.0.0.1", port=ports[1], weight=1, healthy=False)]
            await dp.start(snapshot(service("web", bs, panic_threshold=0.5, retry_budget_min=100)))
            port = dp.bound_port("web")
            for _ in range(6):  # B gets tried at most until its first refused connect
                await fetch(port)
            b = dp.stats()["services"]["web"]["backends"]["B"]
            assert b["ejected"] is True
            before = b["requests"]
            seen = [await fetch(port) for _ in range(12)]
            assert set(seen) <= {"A", "C"}
            assert dp.stats()["services"]["web"]["backends"]["B"]["requests"] == before
            assert dp.stats()["services"]["web"]["panic"] is True
        finally:
            await dp.stop()
            for o in origins:
                o.close()

    run(main())

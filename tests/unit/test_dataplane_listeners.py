"""Listening sockets: SO_REUSEPORT sharing and IP_FREEBIND for a VIP not yet on this host."""
from __future__ import annotations

import socket
import sys

import pytest

from halb.dataplane.listeners import make_listen_socket


@pytest.mark.skipif(sys.platform != "linux", reason="IP_FREEBIND is Linux-only")
def test_freebind_allows_binding_an_address_not_on_this_host() -> None:
    s = make_listen_socket("192.0.2.123", 0)  # TEST-NET-1: never configured here
    try:
        assert s.getsockname()[0] == "192.0.2.123"
    finally:
        s.close()


def test_reuseport_lets_two_sockets_share_a_port() -> None:
    a = make_listen_socket("127.0.0.1", 0)
    try:
        port = a.getsockname()[1]
        b = make_listen_socket("127.0.0.1", port)
        try:
            assert b.getsockname()[1] == port
            assert a.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
        finally:
            b.close()
    finally:
        a.close()


def test_engine_serves_every_service_on_the_shared_host_and_follows_updates() -> None:
    """[dataplane] shared_hosts: one extra listener per (service, shared host) on the
    service's port, sharing its runtime; re-opened when the port changes, closed with it."""
    import asyncio

    from halb.dataplane.engine import DataPlane
    from halb.dataplane.testing import run, service, snapshot

    def accepts(host: str, port: int) -> bool:
        try:
            with socket.create_connection((host, port), timeout=1):
                return True
        except OSError:
            return False

    async def main() -> None:
        dp = DataPlane("t", shared_hosts=["127.0.0.10"])
        await dp.start(snapshot(service("shop", [("127.0.0.1", 9)])))
        try:
            port = dp.bound_port("shop")
            assert accepts("127.0.0.10", port)
            lst = dp.shared.listeners[("shop", "127.0.0.10")]
            assert lst.rt is dp.listeners["shop"].rt and lst.port == port
            from tests.conftest import free_port

            new_port = free_port()
            dp.update(snapshot(service("shop", [("127.0.0.1", 9)], port=new_port), version=2))
            await asyncio.sleep(0.05)
            assert dp.shared.listeners[("shop", "127.0.0.10")].port == new_port
            assert accepts("127.0.0.10", new_port) and not accepts("127.0.0.10", port)
            dp.update(snapshot(version=3))
            await asyncio.sleep(0.05)
            assert dp.shared.listeners == {} and not accepts("127.0.0.10", new_port)
        finally:
            await dp.stop()

    run(main(), timeout=20)

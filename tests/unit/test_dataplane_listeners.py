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

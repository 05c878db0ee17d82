"""A connection the burst acceptor took but could not set up: a TLS client that left or
failed during its handshake is ordinary (DEBUG, so nobody can flood the log with it);
anything else stays a WARNING that names the exception. The socket is closed either way."""
from __future__ import annotations

import logging
import socket
import ssl

import pytest

from halb.dataplane.accept_burst import BurstAcceptor


@pytest.mark.parametrize("exc,level", [
    (ConnectionResetError(), logging.DEBUG),
    (ssl.SSLError(1, "wrong version number"), logging.DEBUG),
    (TimeoutError(), logging.DEBUG),
    (RuntimeError("protocol factory failed"), logging.WARNING),
])
def test_setup_failures_are_logged_by_kind(caplog, exc, level):
    sock = socket.socket()
    with caplog.at_level(logging.DEBUG, logger="halb.dataplane.accept_burst"):
        BurstAcceptor._done(sock, exc)
    assert sock.fileno() == -1  # closed
    [rec] = [r for r in caplog.records if r.name == "halb.dataplane.accept_burst"]
    assert rec.levelno == level
    assert type(exc).__name__ in rec.getMessage()


def test_a_connection_set_up_is_left_alone(caplog):
    sock = socket.socket()
    with caplog.at_level(logging.DEBUG, logger="halb.dataplane.accept_burst"):
        BurstAcceptor._done(sock, None)
    assert sock.fileno() != -1 and not caplog.records
    sock.close()

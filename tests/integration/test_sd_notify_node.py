"""systemd notify protocol with real node processes (issue 15): the test plays systemd,
binding the NOTIFY_SOCKET datagram socket itself (abstract namespace, the `@` form)."""
from __future__ import annotations

import os
import signal
import socket
import time
import uuid

import pytest

from tests.conftest import wait_until

pytestmark = pytest.mark.timeout(120)

WATCHDOG_USEC = 3_000_000  # the node pings every 1 s


class FakeSystemd:
    def __init__(self) -> None:
        self.name = f"halb-sd-test-{uuid.uuid4().hex[:12]}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(b"\0" + self.name.encode())
        self.messages: list[tuple[float, str]] = []

    def env(self) -> dict[str, str]:
        return dict(os.environ, NOTIFY_SOCKET=f"@{self.name}", WATCHDOG_USEC=str(WATCHDOG_USEC))

    def collect(self, seconds: float) -> list[tuple[float, str]]:
        """Every message that arrives within `seconds` (each datagram may hold several lines)."""
        got: list[tuple[float, str]] = []
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                break
            now = time.monotonic()
            got.extend((now, line) for line in data.decode().splitlines())
        self.messages.extend(got)
        return got

    def wait_for(self, line: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(m == line for _, m in self.collect(0.2)):
                return
        raise AssertionError(f"no {line} within {timeout}s; got {[m for _, m in self.messages][-20:]}")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def systemd() -> FakeSystemd:
    fake = FakeSystemd()
    yield fake
    fake.close()


def test_ready_watchdog_status_stopping(cluster_factory, systemd: FakeSystemd) -> None:
    c = cluster_factory(start=False)
    node = c.start("n1", env=systemd.env())
    alone = systemd.collect(3.0)  # no majority yet: pings and status, but not ready
    lines = [m for _, m in alone]
    assert "WATCHDOG=1" in lines, lines
    assert "READY=1" not in lines, lines
    assert any(m.startswith("STATUS=") and "waiting for a Raft majority" in m for m in lines), lines

    c.start("n2")
    c.start("n3")
    systemd.wait_for("READY=1", 30)
    leader = c.leader()
    c.wait_registered()

    def status_names_leader() -> bool:
        systemd.collect(0.3)
        return any(m.startswith("STATUS=") and f"leader {leader};" in m for _, m in systemd.messages)

    wait_until(status_names_leader, 10, 0, "a STATUS= line naming the leader")
    window = systemd.collect(6.0)
    pings = [t for t, m in window if m == "WATCHDOG=1"]
    interval = WATCHDOG_USEC / 1e6
    assert len(pings) >= 2 * 6.0 / interval, f"{len(pings)} pings in 6 s"
    gaps = [b - a for a, b in zip(pings, pings[1:])]
    assert max(gaps) < interval / 2, f"a gap of {max(gaps):.2f}s: fewer than two pings per {interval}s interval"
    statuses = [m for _, m in window if m.startswith("STATUS=")]
    assert len(statuses) <= 2, f"STATUS= sent although nothing changed: {statuses}"
    assert "READY=1" not in [m for _, m in window], "READY=1 sent twice"

    os.kill(node.pid, signal.SIGSTOP)  # a frozen loop must stop the pings
    try:
        systemd.collect(0.3)  # whatever was already in flight
        frozen = systemd.collect(2 * interval)
        assert [m for _, m in frozen if m == "WATCHDOG=1"] == [], frozen
    finally:
        os.kill(node.pid, signal.SIGCONT)
    systemd.wait_for("WATCHDOG=1", 2 * interval)

    node.signal(signal.SIGTERM)
    systemd.wait_for("STOPPING=1", 10)
    assert node.proc.wait(15) == 0
    assert any(m.startswith("STATUS=stopping: signal SIGTERM") for _, m in systemd.messages)

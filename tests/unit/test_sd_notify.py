"""What the node tells systemd and when (halb/sd_notify.py), plus the shipped unit file."""
from __future__ import annotations

import socket
from pathlib import Path

import pytest

from halb.sd_notify import Notifier, StatusChanges, StatusFacts, is_ready, socket_address, watchdog_interval
from halb.systemd_unit import UnitOptions, render_unit

ROOT = Path(__file__).resolve().parents[2]


def test_socket_address_abstract_and_path() -> None:
    assert socket_address("@halb/notify") == b"\0halb/notify"
    assert socket_address("/run/systemd/notify") == "/run/systemd/notify"


@pytest.mark.parametrize("env, expected", [
    ({}, None),
    ({"WATCHDOG_USEC": "3000000"}, 1.0),
    ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "42"}, 1.0),
    ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "43"}, None),  # meant for another process
    ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "x"}, None),
    ({"WATCHDOG_USEC": "soon"}, None),
    ({"WATCHDOG_USEC": "0"}, None),
])
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    assert watchdog_interval(env, 42) == expected


def test_status_sent_only_when_facts_change() -> None:
    changes = StatusChanges()
    waiting = StatusFacts("follower", None, None, 0)
    led = StatusFacts("follower", "n2", None, 1)
    first = changes.changed(waiting)
    assert first is not None and "waiting for a Raft majority" in first
    assert changes.changed(waiting) is None
    assert changes.changed(led) == "follower; leader n2; VIP holder none; 1 service"
    assert changes.changed(led) is None
    assert changes.changed(StatusFacts("follower", "n2", "n3", 1)) == "follower; leader n2; VIP holder n3; 1 service"
    assert changes.changed(StatusFacts("leader", "n1", "n1", 3)) == "leader; leader n1; VIP holder n1; 3 services"


def test_ready_needs_listeners_a_leader_and_sync() -> None:
    assert is_ready(True, "127.0.0.1:7100", True)
    assert not is_ready(False, "127.0.0.1:7100", True)
    assert not is_ready(True, None, True)
    assert not is_ready(True, "127.0.0.1:7100", False)


def test_notifier_sends_datagrams_and_survives_a_missing_socket(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    recv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    recv.bind(str(path))
    recv.settimeout(2)
    notifier = Notifier.from_env({"NOTIFY_SOCKET": str(path)})
    assert notifier is not None
    try:
        assert notifier.send("READY=1")
        assert recv.recv(100) == b"READY=1"
        recv.close()
        path.unlink()
        assert not notifier.send("WATCHDOG=1")  # systemd went away: logged, not raised
    finally:
        notifier.close()
    assert Notifier.from_env({}) is None
    assert Notifier.from_env({"NOTIFY_SOCKET": "relative"}) is None


def test_shipped_unit_is_the_generated_one() -> None:
    shipped = (ROOT / "contrib" / "systemd" / "halb-node@.service").read_text()
    assert shipped == render_unit()
    for line in ("Type=notify", "NotifyAccess=all", "WatchdogSec=10s", "Restart=on-failure",
                 "ExecReload=/opt/halb/venv/bin/halb node reload --config /etc/halb/%i/node.toml",
                 "ExecStart=/opt/halb/venv/bin/halb node run --config /etc/halb/%i/node.toml",
                 "AmbientCapabilities=CAP_NET_ADMIN CAP_NET_RAW CAP_NET_BIND_SERVICE", "StateDirectory=halb/%i"):
        assert line in shipped.splitlines()


@pytest.mark.parametrize("opts", [UnitOptions(venv="relative"), UnitOptions(venv="/a b"), UnitOptions(user="ro ot"),
                                  UnitOptions(watchdog_sec=1)])
def test_unit_options_refused(opts: UnitOptions) -> None:
    with pytest.raises(ValueError):
        render_unit(opts)

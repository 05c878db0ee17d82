"""`cluster up`'s supervisor pieces: taken-port detection and restart with back-off."""
from __future__ import annotations

import os
import socket
import sys
import time

from halb.dataplane.listeners import make_listen_socket
from halb.demo.launcher import Child
from halb.demo.supervise import Supervisor, listening_pids, port_taken, taken_addresses
from tests.conftest import wait_until


def test_reuseport_listener_counts_as_taken_and_names_its_pid() -> None:
    s = make_listen_socket("127.0.0.1", 0)  # SO_REUSEPORT, as the nodes bind
    try:
        addr = f"127.0.0.1:{s.getsockname()[1]}"
        assert port_taken(addr)
        assert listening_pids(addr) == [os.getpid()]
        (t,) = taken_addresses([("n1 api", addr)])
        assert t.what == "n1 api" and t.pids == [os.getpid()]
    finally:
        s.close()
    assert not port_taken(addr) and taken_addresses([("n1 api", addr)]) == []


def test_bound_but_not_listening_is_not_reported_as_a_listener() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        addr = f"127.0.0.1:{s.getsockname()[1]}"
        assert listening_pids(addr) == []


def test_dead_child_is_restarted_with_doubling_backoff(tmp_path) -> None:
    said: list[str] = []
    sup = Supervisor(say=said.append, pid_dir=tmp_path / "run")
    child = sup.start(Child("x", [sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "x.log"))
    first = child.pid
    assert (tmp_path / "run" / "x.pid").read_text().strip() == str(first)
    wait_until(lambda: not child.alive(), 10, 0.02, "child exits")
    now = time.monotonic()
    sup.poll(now)
    assert said[-1].startswith(f"x (pid {first}) exited with 3; restarting in 1s")
    sup.poll(now + 0.5)  # not yet due
    assert child.pid == first
    sup.poll(now + 1.0)
    assert child.pid != first and said[-1] == f"restarted x (pid {child.pid}, restart 1)"
    assert (tmp_path / "run" / "x.pid").read_text().strip() == str(child.pid)
    wait_until(lambda: not child.alive(), 10, 0.02, "child exits again")
    sup.poll(now + 1.1)
    assert "restarting in 2s" in said[-1]
    sup.stop_all()
    assert not list((tmp_path / "run").glob("*.pid"))


def test_no_restart_only_reports(tmp_path) -> None:
    said: list[str] = []
    sup = Supervisor(say=said.append, restart=False)
    child = sup.start(Child("x", [sys.executable, "-c", "pass"], tmp_path / "x.log"))
    wait_until(lambda: not child.alive(), 10, 0.02, "child exits")
    first = child.pid
    for k in range(3):
        sup.poll(time.monotonic() + 100 * k)
    assert child.pid == first and len(said) == 1 and "not restarted" in said[0]

"""The lab builds and removes exactly its own namespaces, also after a crash."""
from __future__ import annotations

import errno
import subprocess
import sys
import time

import pytest

from halb.lab import Lab, list_netns

from .conftest import RUN_PREFIX
from .helpers import connect_errno

pytestmark = pytest.mark.timeout(60)


def _host_links() -> str:
    return subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout


def test_up_down_creates_and_removes_everything(tmp_path):
    lab = Lab(prefix=RUN_PREFIX + "u-", state_dir=tmp_path)
    links_before = _host_links()
    try:
        t0 = time.monotonic()
        state = lab.up()
        print(f"lab up took {time.monotonic() - t0:.2f}s")
        existing = set(list_netns())
        assert set(lab.namespaces) <= existing
        assert len(lab.namespaces) == 8
        assert sorted(state["namespaces"]) == sorted(lab.namespaces) and state["complete"]
        assert lab.state_file.exists()
        # nothing appeared in the host's own namespace
        assert _host_links() == links_before
        # every host has lo up and its address; the client reaches lb1 and be3 over the bridge
        for h in lab.hosts.values():
            out = lab.ip(h.name, "-o", "-4", "addr").stdout
            assert f"{h.ip}/24" in out and "127.0.0.1" in out
            assert h.mac in lab.ip(h.name, "link", "show", "dev", "eth0").stdout
        assert connect_errno(lab, "client", lab.hosts["lb1"].ip) == errno.ECONNREFUSED
        assert connect_errno(lab, "client", lab.hosts["be3"].ip) == errno.ECONNREFUSED
        st = lab.status()
        assert st["up"] is True
    finally:
        removed = lab.down()
    assert sorted(removed) == sorted(lab.namespaces)
    assert not [n for n in list_netns() if n.startswith(lab.prefix)]
    assert not lab.state_file.exists()
    assert lab.down() == []  # idempotent


def test_down_after_crash_without_state_file(tmp_path):
    lab = Lab(prefix=RUN_PREFIX + "c-", state_dir=tmp_path)
    other = Lab(prefix=RUN_PREFIX + "c-x", state_dir=tmp_path)  # a neighbour lab's name space
    try:
        lab.up()
        # simulate a crash: the state file is gone and a process still runs inside
        lab.state_file.unlink()
        proc = lab.spawn("lb2", ["sleep", "60"])
        # and an unrelated namespace that merely shares the prefix start must survive
        subprocess.run(["ip", "netns", "add", other.prefix + "keep"], check=True)
        t0 = time.monotonic()
        removed = Lab(prefix=lab.prefix, state_dir=tmp_path).down()
        print(f"lab down (crash leftovers) took {time.monotonic() - t0:.2f}s")
        assert sorted(removed) == sorted(lab.namespaces)
        assert proc.wait(timeout=10) is not None  # the process inside was stopped
        left = list_netns()
        assert not [n for n in left if n in lab.namespaces]
        assert other.prefix + "keep" in left
        # a half-built lab (crash during `up`) is cleaned too
        subprocess.run(["ip", "netns", "add", lab.prefix + "sw"], check=True)
        subprocess.run(["ip", "netns", "add", lab.prefix + "lb1"], check=True)
        assert sorted(lab.down()) == sorted([lab.prefix + "sw", lab.prefix + "lb1"])
    finally:
        lab.down()
        subprocess.run(["ip", "netns", "del", other.prefix + "keep"], capture_output=True)
    assert not [n for n in list_netns() if n.startswith(lab.prefix)]


def test_cli_up_status_exec_down(tmp_path):
    prefix = RUN_PREFIX + "cli-"
    base = [sys.executable, "-m", "halb", "lab", "--prefix", prefix, "--state-dir", str(tmp_path)]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*base, *args], capture_output=True, text=True, timeout=60)

    try:
        up = run("up")
        assert up.returncode == 0, up.stderr
        assert run("status").returncode == 0
        ex = run("exec", "client", "--", "ip", "-o", "-4", "addr", "show", "dev", "eth0")
        assert ex.returncode == 0 and "10.99.0.100/24" in ex.stdout
        down = run("down")
        assert down.returncode == 0 and "removed 8" in down.stdout
        assert run("status").returncode == 3
        assert run("down").returncode == 0
    finally:
        Lab(prefix=prefix, state_dir=tmp_path).down(all_with_prefix=True)


def test_partition_and_heal(clean_lab):
    lab = clean_lab
    lb2, lb3 = lab.hosts["lb2"].ip, lab.hosts["lb3"].ip
    assert connect_errno(lab, "lb1", lb2) == errno.ECONNREFUSED
    lab.partition("lb1", ["lb2"])
    assert lab.blackholes("lb1") == [f"{lb2}/32"]
    assert lab.blackholes("lb2") == [f"{lab.hosts['lb1'].ip}/32"]
    t0 = time.monotonic()
    assert connect_errno(lab, "lb1", lb2) == errno.EINVAL  # fails at once, no timeout
    assert connect_errno(lab, "lb2", lab.hosts["lb1"].ip) == errno.EINVAL
    assert time.monotonic() - t0 < 1.0
    assert connect_errno(lab, "lb1", lb3) == errno.ECONNREFUSED  # others unaffected
    lab.heal("lb1")
    assert lab.blackholes("lb1") == [] and lab.blackholes("lb2") == []
    assert connect_errno(lab, "lb1", lb2) == errno.ECONNREFUSED

"""`halb cluster up`, the command behind `make demo`: starts backends and nodes, serves
traffic through every balancer, and stops every process it started on SIGTERM."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import make_cluster, wait_until

pytestmark = pytest.mark.timeout(120)


def children_of(pid: int) -> set[int]:
    kids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid:
            kids.add(int(entry.name))
    return kids


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    return state != "Z"


def test_cluster_up_serves_and_stops_everything(tmp_path):
    c = make_cluster(tmp_path / "demo")
    proc = subprocess.Popen([sys.executable, "-m", "halb", "cluster", "up", "--config-dir", str(c.directory)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    kids: set[int] = set()
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "press Ctrl-C" in line:
                break
        out = "".join(lines)
        assert "leader:" in out and "curl -s http://" in out, out
        kids = children_of(proc.pid)
        assert len(kids) == 6  # three backends, three nodes
        st = c.cli_json("cluster", "status")
        assert st["leader"] and sorted(m["raft_state"] for m in st["members"]) == ["follower", "follower", "leader"]
        assert st["services"][0]["listen"] == sorted(c.service_address(n) for n in ("n1", "n2", "n3"))
        served = set()
        for addr in st["services"][0]["listen"]:
            for _ in range(3):
                with urllib.request.urlopen(f"http://{addr}/products", timeout=5) as resp:
                    assert resp.status == 200
                    served.add(resp.headers["X-Served-By"])
                    assert json.loads(resp.read())["products"]
        assert served == {"A", "B", "C"}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        for pid in kids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert proc.returncode == 0
    assert not [pid for pid in kids if alive(pid)], "cluster up left children running"

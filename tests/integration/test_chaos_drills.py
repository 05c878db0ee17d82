"""End to end: `halb chaos run` starts its own cluster, injects faults under load and reports.

The short CI subset (kill leader, kill backend, partition leader) must pass with zero
client-visible errors and an intact ledger, and a deliberately broken cluster (no balancer
retries, health checks that never fire) must make the kill-backend drill FAIL: a drill that
cannot fail proves nothing.

The CLI runs as a child process; on a test timeout it gets SIGTERM (its own clean-up stops
every process it started, by PID) before anything harsher.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
DRILLS = ROOT / "chaos" / "drills"


def run_chaos(*args: str, timeout: float = 150) -> subprocess.CompletedProcess[str]:
    proc = subprocess.Popen([sys.executable, "-m", "halb", "chaos", "run", "--no-progress", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=40)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        raise AssertionError(f"halb chaos run timed out after {timeout}s\n{out}\n{err}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def report(directory: Path, slug: str) -> dict[str, Any]:
    return json.loads((directory / f"{slug}.json").read_text())


def assert_clean_pass(r: dict[str, Any]) -> None:
    assert r["result"] == "passed", r["failures"]
    assert r["client_visible_errors"] == 0
    assert r["load"]["total"]["requests"] > 300
    assert r["ledger"]["intact"] and r["ledger"]["acknowledged"] > 100
    assert r["ledger"]["lost_count"] == 0 and r["ledger"]["duplicated_count"] == 0
    for when in ("before", "after"):
        assert all(p["ok"] is not False for p in r["hypothesis"][when]), r["hypothesis"][when]


def assert_no_leftover_processes(r: dict[str, Any]) -> None:
    for name, pid in r["target"]["pids"].items():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        # a zombie is gone for our purposes; anything else was left running
        state = Path(f"/proc/{pid}/stat").read_text().split()[2] if Path(f"/proc/{pid}/stat").exists() else "Z"
        assert state == "Z", f"{name} (pid {pid}) still running after the drill"


@pytest.mark.timeout(240)
def test_kill_leader_and_kill_backend_pass_with_report(tmp_path: Path) -> None:
    out = tmp_path / "report"
    proc = run_chaos(str(DRILLS / "kill-leader.toml"), str(DRILLS / "kill-backend.toml"), "--cluster", "local",
                     "--report", str(out), timeout=200)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    kl = report(out, "kill-leader")
    assert_clean_pass(kl)
    killed = [f for f in kl["faults"] if f["label"].startswith("kill n")]
    assert len(killed) == 1 and killed[0]["end"] > killed[0]["start"]
    old = killed[0]["label"].split()[-1]
    changes = [e for e in kl["events"] if e["kind"] == "leader.change" and e["t"] > killed[0]["start"]]
    assert any(e["to"] not in (None, old) for e in changes), changes
    assert any(e["kind"] == "fault.injected" for e in kl["events"])
    assert any(e["kind"] == "audit:leader.elected" for e in kl["events"])
    assert kl["load"]["total"]["client_retries"] > 0  # clients did hit the dead balancer, and moved on
    assert_no_leftover_processes(kl)

    kb = report(out, "kill-backend")
    assert_clean_pass(kb)
    assert any(f["label"] == "kill backend B" for f in kb["faults"])
    verdicts = [(e["backend"], e["to"]) for e in kb["events"] if e["kind"] == "verdict.change"]
    assert ("B", "down") in verdicts and verdicts[-1] == ("B", "up"), verdicts
    assert_no_leftover_processes(kb)

    for name in ("kill-leader.html", "kill-backend.html", "kill-leader.png", "index.html", "summary.json"):
        assert (out / name).stat().st_size > 0
    assert "data:image/png;base64," in (out / "kill-leader.html").read_text()
    assert "PASSED" in proc.stdout


@pytest.mark.timeout(150)
def test_partition_leader_passes(tmp_path: Path) -> None:
    out = tmp_path / "report"
    proc = run_chaos(str(DRILLS / "partition-leader.toml"), "--cluster", "local", "--report", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    r = report(out, "partition-leader")
    assert_clean_pass(r)
    part = [f for f in r["faults"] if f["label"].startswith("partition ")]
    assert len(part) == 1
    old = part[0]["label"].split()[-1]
    assert any(e["kind"] == "leader.change" and e["to"] not in (None, old) for e in r["events"])
    assert_no_leftover_processes(r)


@pytest.mark.timeout(150)
def test_kill_backend_fails_on_a_cluster_without_retries_and_health_checks(tmp_path: Path) -> None:
    broken = tmp_path / "kill-backend-broken.toml"
    broken.write_text((DRILLS / "kill-backend.toml").read_text()
                      + "\n[cluster]\nservice_options = { retries = 0 }\nhealth = { interval = 3600 }\n")
    out = tmp_path / "report"
    proc = run_chaos(str(broken), "--cluster", "local", "--report", str(out))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    r = report(out, "kill-backend-broken")
    assert r["result"] == "failed"
    assert r["client_visible_errors"] > 0
    text = " ".join(r["failures"])
    assert "error_rate" in text and "http 502" in text, text  # no balancer retry: B's requests fail
    assert "FAIL" in proc.stdout
    assert_no_leftover_processes(r)


def test_invalid_drill_exits_2_and_names_file_and_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('title = "x"\n[[method]]\naction = "kill-balancer"\n')
    proc = run_chaos(str(bad), "--report", str(tmp_path / "r"), timeout=30)
    assert proc.returncode == 2
    assert f"{bad}: method[0].target: is required" in proc.stderr

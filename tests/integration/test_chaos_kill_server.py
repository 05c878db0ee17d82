"""The kill-server-a drill end to end, as `halb chaos run` runs it from a clean clone."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(200)
def test_kill_server_a_drill_passes_with_one_server_down_event(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "halb", "chaos", "run", str(REPO / "chaos/drills/kill-server-a.toml"),
                           "--cluster", "local", "--report", str(tmp_path), "--no-progress"],
                          capture_output=True, text=True, timeout=180, cwd=tmp_path)
    report = json.loads((tmp_path / "kill-server-a.json").read_text())
    assert proc.returncode == 0, (proc.stderr[-3000:], report.get("failures"))
    assert report["client_visible_errors"] == 0
    down = [e for e in report["events"] if e["kind"] == "audit:server.down"]
    assert len(down) == 1 and down[0]["message"].startswith("server A DOWN (2 instances: checkout/A, checkout/A2)")
    assert not [e for e in report["events"] if e["kind"] == "audit:backend.verdict" and "DOWN" in e["message"]]
    steps = {s["description"]: s for s in report["steps"]}
    assert "does not survive another server loss" in steps["report: does not survive another server loss"]["detail"]

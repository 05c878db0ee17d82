"""The lab's data-plane fault (halb/lab/crashloop.py) and its pieces that need no
namespaces: finding a node's worker processes, killing them as they appear, the node
config with workers, the summary's detection/hand-over split, and the CLI refusing the
fault in bgp mode. Real child processes of this test stand in for a node's workers."""
from __future__ import annotations

import os
import subprocess
import sys
import time

from click.testing import CliRunner

from halb.cli.lab_cmd import lab
from halb.config import load_config
from halb.lab.cluster import LabCluster
from halb.lab.crashloop import CrashLoop, child_pids, parent_of
from halb.lab.failover import Trial, summary
from halb.lab.topology import Lab

SLEEPER = "import time; time.sleep(30)"


def _spawn(*extra: str) -> subprocess.Popen[bytes]:
    # argv carries the marker the way `python -m halb.dataplane.workers ...` does
    return subprocess.Popen([sys.executable, "-c", SLEEPER, *extra])


def test_parent_of_reads_ppid_even_when_the_command_name_has_spaces_and_parens():
    assert parent_of("4242 (odd) name)) S 17 4242 4242 0 -1 4194560") == 17


def test_child_pids_finds_only_marked_children_of_the_parent():
    worker, other = _spawn("halb.dataplane.workers", "3"), _spawn("something-else")
    try:
        assert child_pids(os.getpid()) == [worker.pid]
        assert child_pids(worker.pid) == []  # it has no children
    finally:
        for p in (worker, other):
            p.kill()
            p.wait()


def test_crash_loop_kills_each_worker_as_it_appears_and_spares_the_rest():
    bystander = _spawn("not-a-worker")
    loop = CrashLoop(os.getpid(), interval=0.01)
    loop.start()
    procs = []
    try:
        for _ in range(3):  # a pool respawning its worker, which dies again
            p = _spawn("halb.dataplane.workers")
            procs.append(p)
            assert p.wait(10) == -9
        assert len(loop.kills) == 3
        assert bystander.poll() is None
    finally:
        loop.stop()
        for p in (bystander, *procs):
            p.kill()
            p.wait()
    after = _spawn("halb.dataplane.workers")  # stopped: no more kills
    try:
        time.sleep(0.1)
        assert after.poll() is None and len(loop.kills) == 3
    finally:
        after.kill()
        after.wait()


def test_lab_config_with_workers_runs_that_many_data_plane_processes(tmp_path):
    lab = Lab(state_dir=tmp_path / "state")
    for workers in (1, 2):
        paths = LabCluster(lab, tmp_path / f"w{workers}", workers=workers).write_configs()
        assert {load_config(p).dataplane.workers for p in paths} == {workers}


def _trial(fault: str, gap: float, garp: float, detect: float | None) -> Trial:
    return Trial(fault=fault, holder="lb1", gap_s=gap, garp_s=garp, max_holders=1, old_gone_s=garp,
                 new_holder="lb2", failed_requests=0, outages_s=[gap], detect_s=detect)


def test_summary_splits_dataplane_trials_into_detection_and_hand_over():
    trials = [_trial("dataplane", 0.1, 1.70, 1.60), _trial("dataplane", 0.2, 1.90, 1.65),
              _trial("kill", 1.5, 1.5, None)]
    s = summary(trials)
    dp = s["by_fault"]["dataplane"]
    assert dp["n"] == 2 and dp["p50_gap_s"] == 0.1 and dp["p99_gap_s"] == 0.2
    assert dp["p50_detect_s"] == 1.60 and dp["p99_detect_s"] == 1.65
    assert dp["p50_handover_s"] == 0.1 and dp["p99_handover_s"] == 0.25
    assert "p50_detect_s" not in s["by_fault"]["kill"]
    assert s["trials"][0]["detect_s"] == 1.60 and "detect_s" not in s["trials"][2]


def test_cli_refuses_the_dataplane_fault_in_bgp_mode(tmp_path):
    res = CliRunner().invoke(lab, ["--prefix", "hdpt-", "--state-dir", str(tmp_path), "failover",
                                   "--mode", "bgp", "--fault", "dataplane"])
    assert res.exit_code == 1
    assert "--fault dataplane is VIP-only" in res.output

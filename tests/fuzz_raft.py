"""Fuzz the Raft port of a real 3-node cluster (not part of `make test`; `make fuzz-raft`).

Starts three real `halb node run` processes on 127.0.0.0/8 (tests/conftest.py's harness),
then runs one phase per attack of tests/raft_attacks.py against one node (leader and
followers in turn) while a bounded write loop commits through the leader's API:

    huge    2 GiB length prefix, then a stream     random  random bytes
    half    stalled partial frames                  idle    2,000 idle connections
    frames  honest/edge-case prefixes, split sends  replay  garbage after a valid handshake frame

Per phase it asserts: no election (every node's term and leader unchanged), every write
commits (HTTP 200, each under 1 s), the attacked node's RSS grows less than 64 MiB, the
node stays up. It prints the attacked node's CPU share and RSS per phase next to an idle
baseline. Exit code 0 = all phases held, 1 = a finding (the table says which), 2 = setup.

    .venv/bin/python tests/fuzz_raft.py [--seconds 60] [--keep]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import Cluster, make_cluster  # noqa: E402
from tests.integration.test_raft_port_attacks import put_weight, rss, terms  # noqa: E402

PHASES = ("huge", "random", "half", "idle", "frames", "replay")
RSS_GROWTH_MAX = 64 << 20
WRITE_MAX_S = 1.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


@dataclass
class Phase:
    name: str
    victim: str
    seconds: float
    cpu_pct: float = 0.0
    rss_start: int = 0
    rss_max: int = 0
    writes: int = 0
    write_max_s: float = 0.0
    findings: list[str] = field(default_factory=list)
    attacker: dict = field(default_factory=dict)


def run_phase(c: Cluster, name: str, victim_role: str, seconds: float) -> Phase:
    leader = c.leader()
    followers = [n for n in c.nodes if n != leader]
    victim = leader if victim_role == "leader" else followers[0]
    ph = Phase(name, f"{victim} ({victim_role})", seconds)
    pid = c.status(victim)["pid"]
    before = terms(c)
    ph.rss_start = ph.rss_max = rss(pid)
    cpu0, t0 = cpu_seconds(pid), time.monotonic()
    attacker = None
    if name != "baseline":
        extra = ["--secret-file", str(c.directory / "secret")] if name == "replay" else []
        attacker = subprocess.Popen([sys.executable, "-m", "tests.raft_attacks", "--target", c.spec_of(victim).raft,
                                     "--duration", str(seconds), "--attacks", name, *extra],
                                    cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        end, weight, bad = t0 + seconds, 1, []
        while time.monotonic() < end and ph.writes < 40 * seconds:  # bounded in time and count
            weight = weight % 200 + 1
            code, took = put_weight(c.api(leader), c.token, weight)
            ph.writes += 1
            ph.write_max_s = max(ph.write_max_s, took)
            if code != 200 or took >= WRITE_MAX_S:
                bad.append((code, round(took, 3)))
            ph.rss_max = max(ph.rss_max, rss(pid))
            time.sleep(0.03)  # pacing of the load loop
        ph.cpu_pct = 100 * (cpu_seconds(pid) - cpu0) / (time.monotonic() - t0)
        if attacker is not None:
            out, err = attacker.communicate(timeout=seconds + 30)
            if attacker.returncode != 0:
                ph.findings.append(f"attacker failed: {err[-500:]}")
            else:
                ph.attacker = json.loads(out)[name]
    finally:
        if attacker is not None and attacker.poll() is None:
            attacker.kill()
            attacker.wait(5)
    after = terms(c)
    if after != before:
        ph.findings.append(f"election: {before} -> {after}")
    if bad:
        ph.findings.append(f"{len(bad)} writes failed or took >= {WRITE_MAX_S} s: {bad[:5]}")
    if ph.rss_max - ph.rss_start >= RSS_GROWTH_MAX:
        ph.findings.append(f"RSS grew {(ph.rss_max - ph.rss_start) >> 20} MiB")
    if not c.nodes[victim].alive():
        ph.findings.append("the attacked node died")
    a = ph.attacker
    if a and a.get("still_open_at_end", 0) and a.get("oldest_open_at_end_s", 0) > 7.0:
        ph.findings.append(f"a connection outlived the auth deadline: {a['oldest_open_at_end_s']:.1f} s")
    return ph


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=60.0, help="total attack time, split over the phases")
    p.add_argument("--keep", action="store_true", help="keep the cluster directory (logs) afterwards")
    args = p.parse_args(argv)
    per = max(3.0, args.seconds / len(PHASES))
    tmp = Path(tempfile.mkdtemp(prefix="halb-fuzz-raft-"))
    c = make_cluster(tmp / "cluster", 3)
    phases: list[Phase] = []
    try:
        c.start_all()
        try:
            c.leader(timeout=30)
            c.wait_registered(30)
        except AssertionError as exc:
            print(f"setup failed: {exc}\n{c.logs()}", file=sys.stderr)
            return 2
        phases.append(run_phase(c, "baseline", "leader", 3.0))
        for i, name in enumerate(PHASES):
            phases.append(run_phase(c, name, "leader" if i % 2 == 0 else "follower", per))
    finally:
        c.stop_all()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"{'phase':8} {'victim':15} {'s':>4} {'cpu%':>5} {'rss MiB':>12} {'writes':>6} {'max s':>6}  "
          "attacker: opened/closed-by-server, longest open")
    for ph in phases:
        a = ph.attacker
        att = f"{a['opened']}/{a['closed_by_server']}, {a['max_open_s']:.1f} s" if a else "-"
        print(f"{ph.name:8} {ph.victim:15} {ph.seconds:4.0f} {ph.cpu_pct:5.0f} "
              f"{ph.rss_start >> 20:5}->{ph.rss_max >> 20:<5} {ph.writes:6} {ph.write_max_s:6.3f}  {att}")
        for f in ph.findings:
            print(f"    FINDING: {f}")
    if args.keep:
        print(f"cluster directory kept: {tmp}")
    return 1 if any(ph.findings for ph in phases) else 0


if __name__ == "__main__":
    sys.exit(main())

"""The overload drill end to end, and its negative control (issue 14).

`chaos/drills/overload-lose-server.toml`: open-loop load at 70 % of servers A, B and C's
capacity (demo backends with 10 workers x 200 ms), 30 % checkout (critical) and 70 % browse
(low) on the same processes; server A is killed. With limits, checkout never fails and
keeps its p99, browse is shed with 503 + Retry-After, and no process ever has more
requests in flight than its capacity (its own /stats). The same drill without limits must
FAIL: the survivors are pushed past their capacity and checkout's latency grows.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.test_chaos_drills import DRILLS, assert_no_leftover_processes, report, run_chaos

DRILL = DRILLS / "overload-lose-server.toml"


def _stats_within_capacity(stats: dict[str, dict]) -> None:
    assert set(stats) == {"A", "B", "C"}
    for name, st in stats.items():
        assert st["capacity"] == 10, (name, st)
        assert st["max_in_flight"] <= st["capacity"], (name, st)


@pytest.mark.timeout(150)
def test_overload_lose_server_passes_with_limits(tmp_path: Path) -> None:
    out = tmp_path / "report"
    proc = run_chaos(str(DRILL), "--cluster", "local", "--report", str(out), timeout=130)
    r = report(out, "overload-lose-server")
    assert proc.returncode == 0, (r["failures"], proc.stdout[-2000:], proc.stderr[-2000:])
    assert r["result"] == "passed"
    reqs = r["requests"]
    checkout = [o for o in reqs if o["kind"] == "checkout"]
    browse = [o for o in reqs if o["kind"] == "products"]
    assert len(checkout) > 400 and len(browse) > 1000
    assert all(o["status"] == 201 and not o["error"] for o in checkout)
    shed = [o for o in browse if o["status"] != 200]
    assert shed, "the survivors had no spare capacity: some browse requests must be shed"
    assert all(o["status"] == 503 and o.get("retry_after") for o in shed), shed[:3]
    # before the fault, under the drill's load, the report said: losing A sheds browse
    step = next(st for st in r["steps"] if st["description"] == "report: losing A would shed browse")
    assert step["status"] == "ok" and "if server A fails: degraded (sheds low priority)" in step["detail"], step
    assert "would be shed: browse (low)" in step["detail"], step
    after = {p["name"]: p for p in r["hypothesis"]["after"]}
    assert after["checkout_p99_ratio"]["ok"] and after["checkout_p99_ratio"]["value"] <= 2
    # every backend's /stats as read before the fault and at the end (B and C carried everything)
    for when in ("before", "end"):
        _stats_within_capacity(r["backend_stats"][when])
    assert r["backend_stats"]["end"]["B"]["max_in_flight"] == 10  # B was used to its capacity, not beyond
    assert r["ledger"]["intact"] and r["ledger"]["lost_count"] == 0
    assert_no_leftover_processes(r)


@pytest.mark.timeout(150)
def test_overload_drill_fails_without_limits(tmp_path: Path) -> None:
    text = DRILL.read_text()
    assert text.count(", max_conns = 5 }") == 3 and text.count("\nmax_conns = 5\n") == 1
    broken = tmp_path / "overload-no-limits.toml"
    # limits off; without declared capacity the report cannot predict the loss, so its step goes too
    head, _, rest = text.partition("# report-step")
    text = head + rest.partition("# end of report-step")[2]
    broken.write_text(text.replace(", max_conns = 5 }", " }").replace("\nmax_conns = 5\n", "\n"))
    out = tmp_path / "report"
    proc = run_chaos(str(broken), "--cluster", "local", "--report", str(out), timeout=130)
    r = report(out, "overload-no-limits")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert r["result"] == "failed"
    after = {p["name"]: p for p in r["hypothesis"]["after"]}
    assert after["backend_capacity"]["ok"] is False, after["backend_capacity"]
    over = [n for n, st in r["backend_stats"]["end"].items() if st["max_in_flight"] > st["capacity"]]
    assert {"B", "C"} <= set(over), r["backend_stats"]["end"]
    assert "backend_capacity" in " ".join(r["failures"])
    assert_no_leftover_processes(r)

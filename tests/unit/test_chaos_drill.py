"""Drill files: the catalog parses, and every mistake is reported as 'file: key: reason'."""
from __future__ import annotations

from pathlib import Path

import pytest

from halb.chaos.drill import DrillError, load_drill, method_length

DRILLS = sorted((Path(__file__).resolve().parents[2] / "chaos" / "drills").glob("*.toml"))

MINIMAL = """
title = "t"
[[method]]
action = "kill-balancer"
target = "leader"
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "drill.toml"
    p.write_text(text)
    return p


def test_catalog_is_complete_and_valid() -> None:
    names = {p.stem for p in DRILLS}
    assert {"kill-leader", "kill-follower", "freeze-leader", "partition-leader", "kill-backend", "kill-two-backends",
            "raft-link-latency", "slow-backend", "rolling-restart", "drain-backend", "lose-quorum"} <= names
    for p in DRILLS:
        d = load_drill(p)
        assert d.title and d.method, p
        assert d.duration <= 30, f"{p.name}: keep drills short"


def test_minimal_drill_defaults(tmp_path: Path) -> None:
    d = load_drill(write(tmp_path, MINIMAL))
    assert d.load.rate == 50 and d.load.client_retry == "idempotent"
    assert d.steady_state.error_rate is not None and d.steady_state.error_rate.max == 0
    assert d.steady_state.one_leader and d.steady_state.ledger and d.steady_state.verdicts is None
    assert d.method[0].args == {"target": "leader"}
    assert d.slug == "drill"


def test_full_step_shape(tmp_path: Path) -> None:
    d = load_drill(write(tmp_path, """
title = "t"
duration = 12
[load]
rate = 20
attempt_timeout = 1
[cluster]
service_options = { retries = 0 }
health = { interval = 3600 }
[steady_state]
error_rate = 0.01
p99_latency_ms = { max = 800 }
vip_holders = false
verdicts = { B = "down" }
[[method]]
action = "add-toxic"
link = "raft:leader:follower"
type = "latency"
stream = "both"
attributes = { latency = 300 }
at = 1
pauses = { before = 0.5, after = 2 }
[[method]]
action = "wait-until"
condition = "verdict"
backend = "B"
is = "down"
timeout = 5
at = 2
[[rollbacks]]
action = "remove-toxic"
link = "raft:leader:follower"
"""))
    assert d.load.rate == 20 and d.load.attempt_timeout == 1.0
    assert d.cluster.service_options == {"retries": 0} and d.cluster.health == {"interval": 3600}
    assert d.steady_state.error_rate.max == 0.01 and d.steady_state.p99_latency_ms.max == 800
    assert d.steady_state.vip_holders is None and d.steady_state.verdicts == {"B": "down"}
    s = d.method[0]
    assert (s.at, s.pause_before, s.pause_after) == (1.0, 0.5, 2.0)
    assert s.args["attributes"] == {"latency": 300} and s.args["toxicity"] == 1.0
    assert d.rollbacks[0].args["link"] == "raft:leader:follower"
    assert method_length(d) >= 2.5


@pytest.mark.parametrize("text,key,reason", [
    ('title = "t"\n', "method", "is required"),
    ('title = "t"\nmethod = []\n', "method", "at least one step"),
    ('[[method]]\naction = "pause"\nseconds = 1\n', "title", "is required"),
    ('colour = "red"\n' + MINIMAL, "colour", "unknown key"),
    ('title = "t"\n[[method]]\naction = "explode"\n', "method[0].action", "unknown action 'explode'"),
    ('title = "t"\n[[method]]\naction = "kill-balancer"\n', "method[0].target", "is required"),
    ('title = "t"\n[[method]]\naction = "kill-balancer"\ntarget = 3\n', "method[0].target", "must be a str"),
    ('title = "t"\n[[method]]\naction = "kill-balancer"\ntarget = "n1"\nsignal = 9\n', "method[0].signal", "unknown key"),
    ('title = "t"\n[[method]]\naction = "wait-until"\ncondition = "sunny"\n', "method[0].condition", "unknown condition"),
    ('title = "t"\n[[method]]\naction = "wait-until"\ncondition = "verdict"\nbackend = "B"\nis = "dead"\n',
     "method[0].is", "verdict"),
    ('title = "t"\n[[method]]\naction = "wait-until"\ncondition = "verdict"\nis = "up"\n', "method[0].backend",
     "is required"),
    ('title = "t"\n[[method]]\naction = "add-toxic"\nlink = "raft:n1"\ntype = "latency"\n', "method[0].link",
     "raft:NODE:NODE"),
    ('title = "t"\n[[method]]\naction = "add-toxic"\nlink = "backend:B"\ntype = "fire"\n', "method[0].type",
     "unknown toxic type"),
    ('title = "t"\n[[method]]\naction = "pause"\nseconds = 1\nat = 5\n[[method]]\naction = "pause"\nseconds = 1\nat = 2\n',
     "method[1].at", "earlier"),
    ('title = "t"\n[[method]]\naction = "pause"\nseconds = 1\npauses = { during = 1 }\n', "method[0].pauses.during",
     "unknown key"),
    (MINIMAL + '[steady_state]\nerror_rate = "low"\n', "steady_state.error_rate", "max"),
    (MINIMAL + '[steady_state]\nverdicts = { B = "sideways" }\n', "steady_state.verdicts.B", "must be one of"),
    (MINIMAL + '[load]\nrate = 0\n', "load.rate", "must be within"),
    (MINIMAL + '[load]\nclient_retry = "always"\n', "load.client_retry", "must be one of"),
    (MINIMAL + '[steady_state]\ncheckout_p99_ratio = "2x"\n', "steady_state.checkout_p99_ratio", "max"),
    (MINIMAL + '[cluster]\nbackend_process = { capacity = -1 }\n', "cluster.backend_process.capacity",
     "must be within"),
    (MINIMAL + '[cluster.browse]\nname = "checkout"\n', "cluster.browse.name", "other than checkout"),
    (MINIMAL + '[cluster.browse]\nweight = 3\n', "cluster.browse.weight", "unknown key"),
    ('title = "t"\n[[method]]\naction = "drain-backend"\ntarget = "B"\nexpect_error = 200\n', "method[0].expect_error",
     "400-599"),
])
def test_errors_name_file_key_and_reason(tmp_path: Path, text: str, key: str, reason: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(DrillError) as info:
        load_drill(path)
    err = info.value
    assert err.file == str(path)
    assert err.key == key, str(err)
    assert reason in err.reason, str(err)
    assert str(err).startswith(f"{path}: {key}: ")


def test_invalid_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DrillError, match="not valid TOML"):
        load_drill(write(tmp_path, "title = \n"))
    with pytest.raises(DrillError, match="does not exist"):
        load_drill(tmp_path / "nope.toml")


def test_overload_drill_shape() -> None:
    """The overload drill: two services on capacity-limited processes, limits within capacity."""
    d = load_drill(Path(__file__).resolve().parents[2] / "chaos" / "drills" / "overload-lose-server.toml")
    cap = d.cluster.backend_process["capacity"]
    work_s = d.cluster.backend_process["work_ms"] / 1000
    assert d.cluster.browse is not None and d.cluster.browse["options"]["priority"] == "low"
    assert d.cluster.service_options["priority"] == "critical"
    for be in d.cluster.backends.values():  # the two services' limits together fit one process
        assert be["max_conns"] + d.cluster.browse["max_conns"] <= cap
    total = len(d.cluster.backends) * cap / work_s  # requests/s the three servers can serve
    assert d.load.rate == pytest.approx(0.7 * total) and d.load.checkout_share == 0.3
    ss = d.steady_state
    assert ss.checkout_errors is not None and ss.checkout_errors.max == 0
    assert ss.checkout_p99_ratio is not None and ss.checkout_p99_ratio.max == 2
    assert ss.shed_retry_after and ss.backend_capacity and ss.error_rate is None

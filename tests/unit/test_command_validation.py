"""Strict command validation (halb/control/commands.py) and the state machine as the authority.

Property tests throw random and mutated command payloads at `ClusterState.apply` directly:
apply never raises, a refused command leaves the state as it was, and valid commands still
apply. Example tests pin the cases from issue 11 (options "abc", hash_key 5, max_rps 1e999,
NaN, two services on one port) and the peak_ewma / ewma naming (issue 12).
"""
from __future__ import annotations

import copy
import json
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from halb.control.commands import OPS, CommandError, validate_command
from halb.control.state import ClusterState
from halb.model import listen_conflict, service_from
from halb.service_options import OPTION_SPECS, ServiceOptions, validate_options


def cmd(op: str, args: Any, **env: Any) -> dict[str, Any]:
    return {"op": op, "args": args, "id": env.pop("id", None), "by": "test", "node": "n1", "at": 100.0, **env}


def base_state() -> ClusterState:
    s = ClusterState()
    for c in (
        cmd("member.register", {"id": "n1", "raft": "127.0.0.1:7001", "api": "127.0.0.1:8001"}),
        cmd("service.add", {"name": "web", "listen": "127.0.0.1:8080", "backends": {
            "a": {"name": "a", "address": "127.0.0.1:9001"}, "b": {"name": "b", "address": "127.0.0.1:9002"}}}),
        cmd("health.observe", {"service": "web", "backend": "a", "up": False}),
    ):
        assert s.apply(c).result["ok"], c
    return s


def snapshot(s: ClusterState) -> str:
    """Everything a command may change, except the bookkeeping every apply touches."""
    d = s.to_dict()
    d.pop("index"), d.pop("applied_ids")
    return json.dumps(d, sort_keys=True, default=repr)


def apply_ok(s: ClusterState, c: dict[str, Any]) -> dict[str, Any]:
    return s.apply(c).result


# --- the payloads from the issue ---------------------------------------------------------

@pytest.mark.parametrize("bad, why", [
    ({"options": "abc"}, "options must be an object"),
    ({"hash_key": 5}, "hash_key"),
    ({"hash_key": "header:"}, "hash_key"),
    ({"options": {"retries": float("nan")}}, "option retries"),
    ({"options": {"connect_timeout": float("inf")}}, "option connect_timeout"),
    ({"options": {"connect_timeout": 0}}, "option connect_timeout"),
    ({"options": {"retires": 1}}, "unknown option 'retires'"),
    ({"options": {"server_aware": "yes"}}, "option server_aware"),
    ({"options": {"fail_policy": "open"}}, "option fail_policy"),
    ({"options": {"retry_on_status": [502, 700]}}, "option retry_on_status"),
    ({"options": {"flap_changes": 0}}, "option flap_changes"),
    ({"options": {"health": "fast"}}, "option health"),
    ({"options": {"health": {"interval": float("nan")}}}, "option health.interval"),
    ({"algorithm": "fastest"}, "algorithm 'fastest'"),
    ({"mode": "udp"}, "service mode"),
    ({"listen": 8080}, "listen"),
    ({"backends": [{"name": "x", "address": "1.2.3.4:5", "max_rps": float("inf")}]}, "max_rps"),
    ({"backends": [{"name": "x", "address": "1.2.3.4:5", "max_rps": float("nan")}]}, "max_rps"),
    ({"backends": [{"name": "x", "address": "1.2.3.4:5", "weight": 1.5}]}, "weight"),
    ({"backends": [{"name": "x", "address": "1.2.3.4:5", "colour": "red"}]}, "unknown field"),
    ({"backends": "x"}, "backends"),
    ({"tags": ["a"]}, "unknown field"),
])
def test_service_add_refuses_bad_fields_and_changes_nothing(bad: dict[str, Any], why: str) -> None:
    s = base_state()
    before = snapshot(s)
    result = apply_ok(s, cmd("service.add", {"name": "api", "listen": "127.0.0.1:8081", **bad}))
    assert result["ok"] is False and result["error"] == "invalid", result
    assert why in result["message"], result["message"]
    assert snapshot(s) == before
    with pytest.raises(CommandError) as err:
        validate_command("service.add", {"name": "api", "listen": "127.0.0.1:8081", **bad})
    assert why in err.value.message


def test_update_validates_the_merged_options_and_keeps_the_old_service() -> None:
    s = base_state()
    before = snapshot(s)
    for args in ({"name": "web", "options": {"retries": -1}}, {"name": "web", "hash_key": 5},
                 {"name": "web", "options": "abc"}, {"name": "web", "algorithm": None},
                 {"name": "web", "listen": "nohost"}, {"name": "web"}, {"name": "web", "mode": "tcp"}):
        result = apply_ok(s, cmd("service.update", args))
        assert result["ok"] is False and result["error"] == "invalid", (args, result)
    assert snapshot(s) == before
    result = apply_ok(s, cmd("service.update", {"name": "web", "options": {"retries": 0, "connect_timeout": 1}}))
    assert result["ok"], result
    assert s.services["web"].options == {"retries": 0, "connect_timeout": 1.0}


def test_event_and_health_and_lease_args_are_checked() -> None:
    s = base_state()
    before = snapshot(s)
    bad = [
        cmd("event.record", {"kind": "x", "message": "m", "data": {"v": float("inf")}}),
        cmd("event.record", {"kind": "x", "message": "m", "data": {"cmd": 1}}),
        cmd("event.record", {"kind": 5, "message": "m"}),
        cmd("health.observe", {"service": "web", "backend": "a", "up": "no"}),
        cmd("health.observe_many", {"observations": [{"service": "web", "backend": "a", "up": True}, 5]}),
        cmd("health.observe_many", {"observations": [{"service": "web", "backend": "a", "up": True},
                                                     {"service": "web", "backend": "zz", "up": True}]}),
        cmd("health.liveness", {"live": [None]}),
        cmd("lease.renew", {"holder": "n1", "term": "3"}),
        cmd("lease.renew", {"holder": "n1", "term": 2.5}),
        cmd("lease.release", {"holder": "n1", "held": "yes"}),
        cmd("backend.state", {"service": "web", "name": "a", "state": ["drain"]}),
        cmd("backend.weight", {"service": "web", "name": "a", "weight": True}),
        cmd("backend.limits", {"service": "web", "name": "a"}),  # changes nothing
        cmd("backend.limits", {"service": "web", "name": "a", "max_conns": -1}),
        cmd("backend.limits", {"service": "web", "name": "a", "max_conns": 2.5}),
        cmd("backend.limits", {"service": "web", "name": "a", "max_conns": True}),
        cmd("backend.limits", {"service": "web", "name": "a", "max_rps": float("inf")}),
        cmd("backend.limits", {"service": "web", "name": "a", "max_rps": "10"}),
        cmd("backend.limits", {"service": "web", "name": "a", "max_rps": 1, "weight": 3}),
        cmd("backend.limits", {"service": "web", "name": "zz", "max_rps": 1}),
        cmd("member.register", {"id": "n2", "raft": "127.0.0.1:7002", "api": "127.0.0.1:8002", "listen_host": 5}),
        {"op": "service.remove", "args": {"name": "web"}, "id": ["not", "hashable"]},
        {"op": "service.remove", "args": {"name": "web"}, "at": "yesterday"},
        {"op": "service.remove", "args": {"name": "web"}, "at": float("nan")},
        "service.remove",
        {"op": 5},
    ]
    for c in bad:
        result = apply_ok(s, c)
        assert result["ok"] is False, (c, result)
        assert result["error"] in ("invalid", "not_found"), (c, result)
    assert snapshot(s) == before


# --- listen clash: same port, any host ---------------------------------------------------

def test_two_services_on_one_port_conflict_whatever_the_host() -> None:
    s = base_state()
    before = snapshot(s)
    for listen in ("127.0.0.1:8080", "10.1.2.3:8080", "0.0.0.0:8080", "example.com:8080"):
        for mode in ("http", "tcp"):
            result = apply_ok(s, cmd("service.add", {"name": "other", "mode": mode, "listen": listen}))
            assert result["ok"] is False and result["error"] == "conflict", result
            assert "port 8080" in result["message"] and "'web'" in result["message"]
    assert snapshot(s) == before
    assert apply_ok(s, cmd("service.add", {"name": "other", "listen": "127.0.0.1:8081"}))["ok"]
    # update onto the taken port is refused; onto its own port (host change) is fine
    result = apply_ok(s, cmd("service.update", {"name": "other", "listen": "127.0.0.2:8080"}))
    assert result["error"] == "conflict"
    assert s.services["other"].listen == "127.0.0.1:8081"
    assert apply_ok(s, cmd("service.update", {"name": "web", "listen": "127.0.0.9:8080"}))["ok"]
    # a service without listen clashes with nobody
    assert apply_ok(s, cmd("service.add", {"name": "dark"}))["ok"]


def test_seed_with_two_services_on_one_port_is_refused_whole() -> None:
    s = ClusterState()
    result = apply_ok(s, cmd("seed", {"services": [{"name": "a", "listen": "127.0.0.1:9000"},
                                                   {"name": "b", "listen": "127.0.0.2:9000", "mode": "tcp"}]}))
    assert result["ok"] is False and result["error"] == "conflict" and "port 9000" in result["message"]
    assert s.services == {} and not s.seeded


def test_listen_conflict_is_one_reusable_function() -> None:
    svcs = [service_from({"name": "web", "listen": "127.0.0.1:80"})]
    assert listen_conflict(svcs, "10.0.0.1:80", "tcp") is not None
    assert listen_conflict(svcs, "10.0.0.1:80", "http", exclude="web") is None
    assert listen_conflict(svcs, "10.0.0.1:81", "http") is None
    assert listen_conflict(svcs, "", "http") is None


# --- peak_ewma is the one name; ewma stays an alias ----------------------------------------

def test_peak_ewma_is_canonical_and_ewma_an_alias() -> None:
    s = ClusterState()
    assert apply_ok(s, cmd("service.add", {"name": "a", "listen": "127.0.0.1:1", "algorithm": "peak_ewma"}))["ok"]
    assert apply_ok(s, cmd("service.add", {"name": "b", "listen": "127.0.0.1:2", "algorithm": "ewma"}))["ok"]
    assert s.services["a"].algorithm == s.services["b"].algorithm == "peak_ewma"
    # state written before the rename (algorithm "ewma") still loads, normalised
    d = s.to_dict()
    d["services"]["b"]["algorithm"] = "ewma"
    assert ClusterState.from_dict(d).services["b"].algorithm == "peak_ewma"


# --- options schema and the dataclass stay in step ----------------------------------------

def test_every_dataplane_option_has_a_schema_and_its_default_passes() -> None:
    from dataclasses import fields
    defaults = {f.name: (list(f.default) if isinstance(f.default, tuple) else f.default)
                for f in fields(ServiceOptions)}
    assert set(defaults) <= set(OPTION_SPECS)
    assert validate_options(defaults) == {k: (float(v) if OPTION_SPECS[k].kind == "float" else v)
                                          for k, v in defaults.items()}


def test_dataplane_import_path_still_works() -> None:
    from dataclasses import fields

    from halb.dataplane.options import ServiceOptions as DataPlaneOptions
    # the data plane's class only adds limits derived from the local descriptor limit
    assert issubclass(DataPlaneOptions, ServiceOptions)
    assert {f.name for f in fields(DataPlaneOptions)} == {f.name for f in fields(ServiceOptions)}


# --- property tests: random and mutated payloads at apply ---------------------------------

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-2 ** 70, max_value=2 ** 70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["web", "a", "b", "n1", "127.0.0.1:8080", "127.0.0.1:9003", "1.2.3.4:5", "peak_ewma",
                     "ewma", "http", "tcp", "drain", "source", "header:X-User", "abc", "", "header:"]),
)
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(
        ["name", "listen", "mode", "algorithm", "hash_key", "options", "backends", "address", "weight",
         "service", "backend", "up", "state", "id", "raft", "api", "kind", "message", "data", "holder", "term",
         "held", "live", "observations", "services", "retries", "health", "interval", "x"]), inner, max_size=5)),
    max_leaves=12)

VALID = [
    cmd("service.add", {"name": "api", "listen": "127.0.0.1:8090", "algorithm": "p2c",
                        "options": {"retries": 1, "health": {"path": "/h"}},
                        "backends": [{"name": "c", "address": "127.0.0.1:9003", "weight": 5}]}),
    cmd("service.update", {"name": "web", "options": {"flap_changes": 3}, "algorithm": "maglev",
                           "hash_key": "header:X-User"}),
    cmd("backend.add", {"service": "web", "backend": {"name": "c", "address": "127.0.0.1:9003", "max_rps": 10}}),
    cmd("backend.state", {"service": "web", "name": "a", "state": "drain"}),
    cmd("backend.weight", {"service": "web", "name": "b", "weight": 7}),
    cmd("backend.limits", {"service": "web", "name": "a", "max_conns": 5, "max_rps": 12.5}),
    cmd("backend.limits", {"service": "web", "name": "b", "max_rps": 0}),
    cmd("backend.remove", {"service": "web", "name": "b"}),
    cmd("health.observe", {"service": "web", "backend": "a", "up": True, "detail": "ok"}),
    cmd("health.observe_many", {"observations": [{"service": "web", "backend": "a", "up": True},
                                                 {"service": "web", "backend": "b", "up": False}]}),
    cmd("health.liveness", {"live": ["n1"]}),
    cmd("health.release", {"service": "web", "backend": "a"}),
    cmd("member.register", {"id": "n2", "raft": "127.0.0.1:7002", "api": "127.0.0.1:8002"}),
    cmd("event.record", {"kind": "note", "message": "hello", "data": {"k": [1, 2.5, None]}}),
    cmd("lease.renew", {"holder": "n1", "term": 3}),
    cmd("lease.renew", {"holder": "n1", "term": 4, "address": "192.0.2.10"}),  # DNS-mode announcer
    cmd("lease.release", {"holder": "n1", "held": True}),
    cmd("service.remove", {"name": "web"}),
]


@st.composite
def mutated(draw: st.DrawFn) -> dict[str, Any]:
    """A valid command with one field replaced, dropped or added (the interesting near misses)."""
    c = copy.deepcopy(draw(st.sampled_from(VALID)))
    target = c["args"]
    path = []
    while isinstance(target, (dict, list)) and target and draw(st.booleans()):
        key = draw(st.sampled_from(sorted(target)) if isinstance(target, dict) else
                   st.integers(0, len(target) - 1))
        if not isinstance(target[key], (dict, list)):
            break
        path.append(key)
        target = target[key]
    action = draw(st.sampled_from(["replace", "drop", "add"]))
    if isinstance(target, dict) and target:
        key = draw(st.sampled_from(sorted(target)))
        if action == "replace":
            target[key] = draw(json_values)
        elif action == "drop":
            del target[key]
        else:
            target[draw(st.text(min_size=1, max_size=8))] = draw(json_values)
    elif isinstance(target, list) and target:
        target[draw(st.integers(0, len(target) - 1))] = draw(json_values)
    return c


random_commands = st.one_of(
    mutated(),
    st.builds(cmd, st.sampled_from(OPS), json_values),
    st.builds(lambda op, args, at, cid: {"op": op, "args": args, "at": at, "id": cid},
              st.one_of(st.sampled_from(OPS), json_scalars), json_values, json_scalars, json_scalars),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(c=random_commands)
def test_apply_never_raises_and_a_refusal_changes_nothing(c: dict[str, Any]) -> None:
    s = base_state()
    before = snapshot(s)
    result = s.apply(c).result  # must not raise
    assert isinstance(result, dict) and isinstance(result.get("ok"), bool)
    if not result["ok"]:
        assert result["error"] in ("invalid", "not_found", "conflict") and result["message"], result
        assert snapshot(s) == before, result
    else:
        # whatever was accepted is valid state: JSON without NaN/inf (the API emits it)
        json.dumps(s.to_dict(), allow_nan=False)
        ClusterState.from_dict(json.loads(json.dumps(s.to_dict())))
    # the API's pre-check and apply agree: what validate_command refuses, apply refuses
    if isinstance(c, dict) and isinstance(c.get("op"), str):
        try:
            validate_command(c["op"], c.get("args"))
        except CommandError:
            assert result["ok"] is False


@pytest.mark.parametrize("c", VALID, ids=[c["op"] for c in VALID])
def test_valid_commands_still_apply(c: dict[str, Any]) -> None:
    s = base_state()
    result = s.apply(copy.deepcopy(c)).result
    assert result["ok"], result


def test_flap_damping_survives_bad_legacy_options_and_endless_flapping() -> None:
    """Options restored from an old snapshot are not re-validated: damping falls back to
    the defaults instead of raising half-way through a health command; and the doubling
    hold never overflows a float however long a backend flaps."""
    s = base_state()
    d = s.to_dict()
    d["services"]["web"]["options"] = {"flap_changes": "abc", "flap_max_hold_s": 1e300, "flap_hold_s": 1e300}
    s = ClusterState.from_dict(d)
    at = 100.0
    for i in range(3000):
        at += 1.0
        r = s.apply(cmd("health.observe", {"service": "web", "backend": "b", "up": i % 2 == 1}, at=at)).result
        assert r["ok"], r
        assert math.isfinite(s.verdicts["web/b"]["hold_until"])


def test_legacy_state_with_values_the_model_now_refuses_still_loads() -> None:
    """Snapshots written before strict validation: an infinite capacity is restored as 0
    (not declared) instead of stopping the node; bad options do not break health commands."""
    s = base_state()
    d = s.to_dict()
    d["services"]["web"]["backends"]["a"]["max_rps"] = float("inf")
    d["services"]["web"]["options"] = "abc"
    d["services"]["web"]["algorithm"] = "ewma"
    restored = ClusterState.from_dict(d)
    assert restored.services["web"].backends["a"].max_rps == 0.0
    assert restored.services["web"].algorithm == "peak_ewma"
    r = restored.apply(cmd("health.observe", {"service": "web", "backend": "b", "up": False})).result
    assert r["ok"], r


def test_backend_limits_set_only_what_is_given() -> None:
    s = base_state()
    assert apply_ok(s, cmd("backend.limits", {"service": "web", "name": "a", "max_conns": 5, "max_rps": 12}))["ok"]
    assert (s.services["web"].backends["a"].max_conns, s.services["web"].backends["a"].max_rps) == (5, 12.0)
    assert apply_ok(s, cmd("backend.limits", {"service": "web", "name": "a", "max_conns": 0}))["ok"]
    assert (s.services["web"].backends["a"].max_conns, s.services["web"].backends["a"].max_rps) == (0, 12.0)
    assert s.events[-1].kind == "backend.limits" and "max_conns 5 -> 0" in s.events[-1].message

"""Service seeds in a node config pass the same strict validation as an API write, and the
errors name the file, the key and the reason (issue 11: seeds; issue 12: peak_ewma)."""
from __future__ import annotations

from pathlib import Path

import pytest

from halb.config import ConfigError, load_config, service_seed_to_dict
from halb.control.state import ClusterState

HEAD = """
node_id = "n1"
token_file = "token"
[raft]
bind = "127.0.0.11:7100"
[api]
bind = "127.0.0.11:7000"
"""
SERVICE = """
[[services]]
name = "checkout"
listen = "127.0.0.11:8080"
"""


def load(tmp_path: Path, text: str):
    p = tmp_path / "node.toml"
    p.write_text(HEAD + text)
    (tmp_path / "token").write_text("t" * 40)
    return load_config(p)


@pytest.mark.parametrize("extra, key, reason", [
    ('options = { retires = 1 }', "services[0].options", "unknown option 'retires'"),
    ('options = { retries = -1 }', "services[0].options", "option retries"),
    ('options = { connect_timeout = inf }', "services[0].options", "option connect_timeout"),
    ('options = { request_timeout = nan }', "services[0].options", "option request_timeout"),
    ('options = { fail_policy = "open" }', "services[0].options", "option fail_policy"),
    ('options = { server_aware = "yes" }', "services[0].options", "option server_aware"),
    ('health = { interval = -1 }', "services[0].health", "health.interval"),
    ('health = { colour = "red" }', "services[0].health", "health.colour"),
    ('hash_key = "header:"', "services[0].hash_key", "hash_key"),
    ('algorithm = "fastest"', "services[0].algorithm", "algorithm 'fastest'"),
])
def test_bad_service_seed_names_file_key_and_reason(tmp_path: Path, extra: str, key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as err:
        load(tmp_path, SERVICE + extra + "\n")
    assert err.value.key == key, str(err.value)
    assert reason in err.value.reason, str(err.value)
    assert str(err.value).startswith(str(tmp_path / "node.toml"))


def test_backend_max_rps_must_be_finite(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load(tmp_path, SERVICE + '[[services.backends]]\nname = "A"\naddress = "127.0.0.1:1"\nmax_rps = inf\n')
    assert err.value.key == "services[0].backends[0].max_rps" and "finite" in err.value.reason


def test_two_seeds_on_one_port_are_refused_whatever_the_host(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load(tmp_path, SERVICE + '[[services]]\nname = "other"\nmode = "tcp"\nlisten = "127.0.0.99:8080"\n')
    assert err.value.key == "services[1].listen"
    assert "port 8080" in err.value.reason and "'checkout'" in err.value.reason


def test_peak_ewma_and_ewma_in_config_both_seed_peak_ewma(tmp_path: Path) -> None:
    cfg = load(tmp_path, SERVICE + 'algorithm = "ewma"\noptions = { ewma_decay_s = 5, retries = 0 }\n'
               'health = { path = "/h", interval = 1 }\n'
               '[[services]]\nname = "b"\nlisten = "127.0.0.11:8081"\nalgorithm = "peak_ewma"\n')
    assert [s.algorithm for s in cfg.services] == ["peak_ewma", "peak_ewma"]
    # and the seed command built from it applies
    st = ClusterState()
    res = st.apply({"op": "seed", "args": {"services": [service_seed_to_dict(s) for s in cfg.services]},
                    "id": "x", "at": 1.0, "by": "t", "node": "n1"}).result
    assert res == {"ok": True, "seeded": True}
    assert st.services["checkout"].algorithm == "peak_ewma"
    assert st.services["checkout"].options["ewma_decay_s"] == 5.0
    assert st.services["checkout"].options["health"] == {"path": "/h", "interval": 1}

"""Invalid node configs produce errors naming the file, the key and the reason."""
from __future__ import annotations

from pathlib import Path

import pytest

from halb.config import ConfigError, load_config

GOOD = """
node_id = "n1"
secret_file = "secret"
token_file = "token"
[raft]
bind = "127.0.0.11:7100"
peers = ["127.0.0.12:7100", "127.0.0.13:7100"]
[api]
bind = "127.0.0.11:7000"
[[services]]
name = "checkout"
listen = "127.0.0.11:8080"
[[services.backends]]
name = "A"
address = "127.0.0.21:8080"
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "node.toml"
    p.write_text(text)
    (tmp_path / "secret").write_text("s" * 40)
    (tmp_path / "token").write_text("t" * 40)
    return p


def test_good_config_loads(tmp_path):
    cfg = load_config(write(tmp_path, GOOD))
    assert cfg.node_id == "n1" and cfg.raft.peers == ["127.0.0.12:7100", "127.0.0.13:7100"]
    assert cfg.services[0].backends[0].address == "127.0.0.21:8080"
    assert cfg.data_dir == tmp_path / "data" / "n1"
    assert cfg.read_secret() == "s" * 40
    assert cfg.raft.push_append_entries is True
    off = load_config(write(tmp_path, GOOD.replace('peers = ["127.0.0.12:7100", "127.0.0.13:7100"]',
                                                   'peers = ["127.0.0.12:7100", "127.0.0.13:7100"]\n'
                                                   'push_append_entries = false')))
    assert off.raft.push_append_entries is False


@pytest.mark.parametrize("change, key, reason", [
    (("[api]", "[api]\ncolour = 1"), "api.colour", "unknown key"),
    (('bind = "127.0.0.11:7000"', 'bind = "127.0.0.11"'), "api.bind", "must be HOST:PORT"),
    (('bind = "127.0.0.11:7000"', 'bind = "127.0.0.11:99999"'), "api.bind", "outside 1-65535"),
    (('peers = ["127.0.0.12:7100", "127.0.0.13:7100"]', 'peers = ["127.0.0.12:7100", "x:y"]'), "raft.peers[1]",
     "not a number"),
    (('peers = ["127.0.0.12:7100", "127.0.0.13:7100"]', 'peers = ["127.0.0.11:7100"]'), "raft.peers",
     "own address"),
    (('name = "A"', 'name = "A"\nweight = -3'), "services[0].backends[0].weight", "between 0 and 10000"),
    (('listen = "127.0.0.11:8080"', 'listen = "127.0.0.11:8080"\nmode = "udp"'), "services[0].mode", "must be one of"),
    (('listen = "127.0.0.11:8080"', 'listen = "127.0.0.11:8080"\nalgorithm = "random"'), "services[0].algorithm",
     "must be one of"),
    (('node_id = "n1"', 'node_id = "n 1"'), "node_id", "may only contain"),
    (('node_id = "n1"', 'node_id = 7'), "node_id", "must be a str"),
    (('peers = ["127.0.0.12:7100", "127.0.0.13:7100"]',
      'peers = ["127.0.0.12:7100", "127.0.0.13:7100"]\nidle_heartbeat_interval = 0.01'),
     "raft.idle_heartbeat_interval", "at least heartbeat_interval"),
    (('peers = ["127.0.0.12:7100", "127.0.0.13:7100"]',
      'peers = ["127.0.0.12:7100", "127.0.0.13:7100"]\nidle_heartbeat_interval = 0.2'),
     "raft.idle_heartbeat_interval", "a third of election_timeout_min"),
    (('peers = ["127.0.0.12:7100", "127.0.0.13:7100"]',
      'peers = ["127.0.0.12:7100", "127.0.0.13:7100"]\npush_append_entries = "yes"'),
     "raft.push_append_entries", "bool"),
])
def test_invalid_config_names_file_key_and_reason(tmp_path, change, key, reason):
    path = write(tmp_path, GOOD.replace(*change))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert err.value.key == key
    assert reason in err.value.reason
    assert str(err.value).startswith(f"{path}: {key}: ")


def test_duplicate_backend_and_service_names(tmp_path):
    text = GOOD + '[[services.backends]]\nname = "A"\naddress = "127.0.0.22:8080"\n'
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text))
    assert err.value.key == "services[0].backends[1].name" and "used twice" in err.value.reason
    text = GOOD + '[[services]]\nname = "checkout"\nlisten = "127.0.0.11:8081"\n'
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text))
    assert err.value.key == "services" and "used twice" in err.value.reason


def test_missing_required_keys_and_files(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, GOOD.replace('token_file = "token"\n', "")))
    assert err.value.key == "token_file" and err.value.reason == "is required"
    path = write(tmp_path, GOOD.replace('secret_file = "secret"', 'secret_file = "missing-secret"'))
    cfg = load_config(path)
    with pytest.raises(ConfigError) as err:
        cfg.read_secret()
    assert err.value.key == "secret_file" and "does not exist" in err.value.reason
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "nope.toml")
    assert "file does not exist" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "node_id = \n"))
    assert "not valid TOML" in str(err.value)


def test_short_secret_is_refused(tmp_path):
    cfg = load_config(write(tmp_path, GOOD))
    (tmp_path / "secret").write_text("short")
    with pytest.raises(ConfigError) as err:
        cfg.read_secret()
    assert "fewer than 16" in err.value.reason


def test_cli_reports_config_error_and_exits_2(tmp_path):
    import subprocess
    import sys

    path = write(tmp_path, GOOD.replace("[api]", "[api]\ncolour = 1"))
    proc = subprocess.run([sys.executable, "-m", "halb", "node", "run", "--config", str(path)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert f"{path}: api.colour: unknown key" in proc.stderr


def test_shared_hosts_parse_and_validate(tmp_path):
    cfg = load_config(write(tmp_path, GOOD.replace("[[services]]", '[dataplane]\nshared_hosts = ["127.0.0.10"]\n[[services]]', 1)))
    assert cfg.dataplane.shared_hosts == ["127.0.0.10"]
    assert load_config(write(tmp_path, GOOD)).dataplane.shared_hosts == []
    for bad, reason in (('["localhost"]', "not an IP address"), ('["127.0.0.10", "127.0.0.10"]', "listed twice"),
                        ('"127.0.0.10"', "must be a list")):
        path = write(tmp_path, GOOD.replace("[[services]]", f"[dataplane]\nshared_hosts = {bad}\n[[services]]", 1))
        with pytest.raises(ConfigError) as err:
            load_config(path)
        assert err.value.key == "dataplane.shared_hosts" and reason in err.value.reason, str(err.value)


def test_capacity_share_auto_splits_only_where_several_nodes_serve_one_address() -> None:
    """"auto": a shared host or a DNS answer means several nodes serve at once (each takes a
    share); a VIP holder or a node's own address means one node serves (it enforces all)."""
    from halb.config import effective_capacity_share

    assert effective_capacity_share("auto", ["127.0.0.10"], "none") == "cluster"
    assert effective_capacity_share("auto", [], "dns") == "cluster"
    assert effective_capacity_share("auto", [], "vip") == "node"
    assert effective_capacity_share("auto", [], "none") == "node"
    assert effective_capacity_share("node", ["127.0.0.10"], "dns") == "node"
    assert effective_capacity_share("cluster", [], "vip") == "cluster"


def test_capacity_share_defaults_to_auto_and_refuses_unknown_values(tmp_path):
    assert load_config(write(tmp_path, GOOD)).dataplane.capacity_share == "auto"
    bad = GOOD.replace("[[services]]", '[dataplane]\ncapacity_share = "half"\n[[services]]', 1)
    assert bad != GOOD
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, bad))
    assert "capacity_share" in str(e.value) and "auto, node, cluster" in str(e.value)


def test_access_log_path_is_relative_to_the_config_and_the_buffer_is_bounded(tmp_path):
    assert load_config(write(tmp_path, GOOD)).dataplane.access_log == ""  # off by default
    cfg = load_config(write(tmp_path, GOOD.replace("[[services]]", '[dataplane]\naccess_log = "logs/access.log"\n'
                                                                   'access_log_buffer = 65536\n[[services]]', 1)))
    assert cfg.dataplane.access_log == str(tmp_path / "logs" / "access.log")
    assert cfg.dataplane.access_log_buffer == 65536
    absolute = load_config(write(tmp_path, GOOD.replace("[[services]]", '[dataplane]\naccess_log = "/var/log/halb/a.log"'
                                                                        '\n[[services]]', 1)))
    assert absolute.dataplane.access_log == "/var/log/halb/a.log"
    for bad, key, reason in (('access_log = "logs/"', "access_log", "must name a file"),
                             ("access_log = 1", "access_log", "must be"),
                             ("access_log_buffer = 100", "access_log_buffer", "between 65536")):
        with pytest.raises(ConfigError) as err:
            load_config(write(tmp_path, GOOD.replace("[[services]]", f"[dataplane]\n{bad}\n[[services]]", 1)))
        assert err.value.key == f"dataplane.{key}" and reason in err.value.reason, str(err.value)

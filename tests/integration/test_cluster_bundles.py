"""Three nodes started from `halb cluster init --node` bundles, nothing edited by hand:
the admin API speaks HTTPS only, verified against the cluster CA (issue 15)."""
from __future__ import annotations

import json
import os
import random
import socket
import ssl
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from halb.demo.launcher import Child, halb_argv
from tests.conftest import free_port, wait_until

pytestmark = pytest.mark.timeout(120)


def port_free_on_all(hosts: list[str]) -> int:
    """One port number free on every host (the bundles give all nodes the same ports)."""
    for _ in range(50):
        port = free_port(hosts[0])
        try:
            for h in hosts[1:]:
                with socket.socket() as s:
                    s.bind((h, port))
            return port
        except OSError:
            continue
    raise RuntimeError("no common free port")


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("HALB_")}


def halb_with_env_file(env_file: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`. ENV_FILE && halb ARGS` in a shell, as an operator would run it."""
    cmd = f'. "{env_file}" && exec "$0" -m halb "$@"'
    return subprocess.run(["sh", "-c", cmd, sys.executable, *args], capture_output=True, text=True,
                          env=clean_env(), timeout=30)


@pytest.fixture
def bundle_cluster(tmp_path: Path):
    net = f"127.{random.randint(1, 254)}.{random.randint(0, 254)}"
    hosts = [f"{net}.{i}" for i in (1, 2, 3)]
    api_port, raft_port = port_free_on_all(hosts), port_free_on_all(hosts)
    d = tmp_path / "bundles"
    init = subprocess.run(halb_argv("cluster", "init", str(d), *(f"--node=n{i + 1}={h}" for i, h in enumerate(hosts)),
                                    "--api-port", str(api_port), "--raft-port", str(raft_port),
                                    "--data-dir", str(tmp_path / "state")),
                          capture_output=True, text=True, env=clean_env(), timeout=30)
    assert init.returncode == 0, init.stderr
    nodes = {}
    try:
        for i in (1, 2, 3):
            child = Child(f"n{i}", halb_argv("node", "run", "--config", str(d / f"n{i}" / "node.toml")),
                          tmp_path / "logs" / f"n{i}.log")
            child.start(env=clean_env())
            nodes[f"n{i}"] = child
        yield d, hosts, api_port, nodes
    finally:
        for child in nodes.values():
            child.stop()
        for p in sorted((tmp_path / "logs").glob("*.log")):  # shown by pytest when the test fails
            print(f"==== {p.name}\n{p.read_text()[-3000:]}")


def test_bundle_files_and_modes(bundle_cluster):
    d, hosts, api_port, _ = bundle_cluster
    for i in (1, 2, 3):
        b = d / f"n{i}"
        assert sorted(p.name for p in b.iterdir()) == ["ca.crt", "node.crt", "node.key", "node.toml", "secret",
                                                       "token"]
        for secret in ("node.key", "secret", "token"):
            assert stat.S_IMODE((b / secret).stat().st_mode) == 0o600, (b / secret)
        assert (b / "ca.crt").read_bytes() == (d / "operator" / "ca.crt").read_bytes()
        assert "ca.key" not in {p.name for p in b.iterdir()}  # the CA's key never goes to a machine
    assert stat.S_IMODE((d / "operator" / "token").stat().st_mode) == 0o600
    assert stat.S_IMODE((d / "ca" / "ca.key").stat().st_mode) == 0o600
    env = (d / "operator" / "cluster.env").read_text()
    assert f"HALB_CLUSTER={','.join(f'{h}:{api_port}' for h in hosts)}" in env


def test_status_over_https_plain_http_and_untrusted_clients_fail(bundle_cluster):
    d, hosts, api_port, nodes = bundle_cluster

    def status() -> dict | None:
        proc = halb_with_env_file(d / "operator" / "cluster.env", "cluster", "status", "--json")
        if proc.returncode != 0:
            return None
        st = json.loads(proc.stdout)
        return st if st.get("leader") and len([m for m in st["members"] if m.get("id")]) == 3 else None

    st = wait_until(status, 40, 0.3, "cluster status through operator/cluster.env")
    assert sorted(m["id"] for m in st["members"]) == ["n1", "n2", "n3"]
    # every member answered its own status over HTTPS (the CLI asks each one)
    assert {m["raft_state"] for m in st["members"]} <= {"leader", "follower"}, st["members"]
    assert all(n.alive() for n in nodes.values())

    host = hosts[0]
    # plain HTTP to the admin port: no HTTP answer, the server speaks only TLS
    with socket.create_connection((host, api_port), timeout=5) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        reply = b""
        try:
            while chunk := s.recv(4096):
                reply += chunk
        except ConnectionResetError:
            pass
    assert not reply.startswith(b"HTTP/"), reply[:80]
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)) as plain:
        urllib.request.urlopen(f"http://{host}:{api_port}/healthz", timeout=5)
    assert not isinstance(plain.value, urllib.error.HTTPError)  # no HTTP status came back at all

    # a client that trusts the system store, not the cluster CA: a real handshake failure
    with pytest.raises(urllib.error.URLError) as untrusted:
        urllib.request.urlopen(f"https://{host}:{api_port}/healthz", timeout=5, context=ssl.create_default_context())
    assert isinstance(untrusted.value.reason, ssl.SSLCertVerificationError), untrusted.value
    # ... and one that trusts another cluster's CA
    other = d.parent / "other"
    subprocess.run(halb_argv("cluster", "init", str(other), "--node", f"n1={host}", "--data-dir", str(other)),
                   check=True, capture_output=True, env=clean_env(), timeout=30)
    ctx = ssl.create_default_context(cafile=str(other / "operator" / "ca.crt"))
    with pytest.raises(urllib.error.URLError) as foreign:
        urllib.request.urlopen(f"https://{host}:{api_port}/healthz", timeout=5, context=ctx)
    assert isinstance(foreign.value.reason, ssl.SSLCertVerificationError), foreign.value
    # the right CA: the same request succeeds (the failures above were about trust, nothing else)
    ok = ssl.create_default_context(cafile=str(d / "operator" / "ca.crt"))
    with urllib.request.urlopen(f"https://{host}:{api_port}/healthz", timeout=5, context=ok) as resp:
        assert resp.status == 200

    # the CLI without the CA: exit 3 (no node reachable), saying the certificate is not trusted
    env = dict(clean_env(), HALB_CLUSTER=f"{host}:{api_port}", HALB_TOKEN_FILE=str(d / "operator" / "token"))
    proc = subprocess.run(halb_argv("cluster", "status"), capture_output=True, text=True, env=env, timeout=30)
    assert proc.returncode == 3 and "TLS certificate not trusted" in proc.stderr, proc.stderr
    # with --ca-file it works
    proc = subprocess.run(halb_argv("--ca-file", str(d / "operator" / "ca.crt"), "cluster", "status"),
                          capture_output=True, text=True, env=env, timeout=30)
    assert proc.returncode == 0 and "leader:" in proc.stdout, proc.stderr


def test_init_refuses_bad_node_values(tmp_path: Path):
    for args, message in ((["--node", "n1=10.0.0.1", "--node", "n1=10.0.0.2"], "node id 'n1' is given twice"),
                          (["--node", "n1=10.0.0.1", "--node", "n2=10.0.0.1"], "address '10.0.0.1' is given twice"),
                          (["--node", "n1"], "expected ID=ADDRESS"),
                          (["--node", "n1=10.0.0.1:7000"], "without a port"),
                          (["--node", "n1=not a host"], "neither an IP address nor a host name"),
                          (["--node", "bad id=10.0.0.1"], "node id"),
                          (["--node", "n1=10.0.0.1", "--vip", "10.0.0.100/24"], "--vip needs --interface"),
                          (["--node", "n1=lb1.example.net", "--dns", "shop"], "must be an IPv4 address")):
        proc = subprocess.run(halb_argv("cluster", "init", str(tmp_path / "x"), *args), capture_output=True,
                              text=True, env=clean_env(), timeout=30)
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr)
        assert not (tmp_path / "x").exists()  # nothing written for a refused command


def test_vip_bundle_validates(tmp_path: Path):
    from halb.config import load_config

    proc = subprocess.run(halb_argv("cluster", "init", str(tmp_path / "b"), "--node", "n1=10.0.0.1",
                                    "--node", "n2=10.0.0.2", "--node", "n3=10.0.0.3", "--vip", "10.0.0.100/24",
                                    "--interface", "eth0"), capture_output=True, text=True, env=clean_env(), timeout=30)
    assert proc.returncode == 0, proc.stderr
    cfg = load_config(tmp_path / "b" / "n2" / "node.toml")
    assert cfg.announce == {"mode": "vip", "vip": "10.0.0.100", "interface": "eth0"}
    assert cfg.raft.peers == ["10.0.0.1:7100", "10.0.0.3:7100"] and cfg.api.bind == "10.0.0.2:7000"
    assert cfg.dataplane.listen_host == "" and cfg.data_dir == Path("/var/lib/halb/n2")
    assert cfg.api.tls_cert == tmp_path / "b" / "n2" / "node.crt"


def test_vip_bundle_with_ipv4_and_ipv6_vips(tmp_path: Path):
    from halb.announce.settings import parse_announce
    from halb.config import load_config

    argv = ["cluster", "init", str(tmp_path / "b"), "--node", "n1=10.0.0.1", "--node", "n2=10.0.0.2",
            "--node", "n3=10.0.0.3", "--vip", "10.0.0.100/24", "--vip", "fd00::100/64", "--interface", "eth0"]
    proc = subprocess.run(halb_argv(*argv), capture_output=True, text=True, env=clean_env(), timeout=30)
    assert proc.returncode == 0, proc.stderr
    cfg = load_config(tmp_path / "b" / "n1" / "node.toml")
    assert cfg.announce == {"mode": "vip", "vips": ["10.0.0.100", "fd00::100"], "interface": "eth0"}
    assert parse_announce(cfg.announce).vips == ["10.0.0.100", "fd00::100"]
    proc = subprocess.run(halb_argv(*argv[:-2], "--vip", "FD00::100", "--interface", "eth0", "--force"),
                          capture_output=True, text=True, env=clean_env(), timeout=30)
    assert proc.returncode == 2 and "given twice" in proc.stderr, proc.stderr


def test_node_without_tls_refuses_unless_insecure_dev(tmp_path: Path):
    (tmp_path / "token").write_text("t" * 32)
    (tmp_path / "secret").write_text("s" * 32)
    api = f"127.0.0.1:{free_port()}"
    cfg = tmp_path / "n1.toml"
    cfg.write_text(f'node_id = "n1"\ntoken_file = "token"\nsecret_file = "secret"\n'
                   f'[raft]\nbind = "127.0.0.1:{free_port()}"\n[api]\nbind = "{api}"\n')
    child = Child("n1", halb_argv("node", "run", "--config", str(cfg)), tmp_path / "n1.log")
    child.start()
    try:
        assert child.proc.wait(20) == 2
    finally:
        child.stop()
    assert "api.tls_cert is not set" in (tmp_path / "n1.log").read_text()
    dev = Child("n1", halb_argv("node", "run", "--config", str(cfg), "--insecure-dev"), tmp_path / "dev.log")
    dev.start()
    try:
        def healthz() -> bool:
            with urllib.request.urlopen(f"http://{api}/healthz", timeout=2) as resp:
                return resp.status == 200
        wait_until(healthz, 20, 0.2, "the --insecure-dev node answering plain HTTP")
        log = (tmp_path / "dev.log").read_text()
        assert "WARNING" in log and "ADMIN API WITHOUT TLS (--insecure-dev)" in log
    finally:
        dev.stop()

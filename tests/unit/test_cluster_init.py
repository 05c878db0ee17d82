"""`halb cluster init` and the committed local config set."""
from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

from halb.config import load_config
from halb.demo.launcher import ClusterSpec, node_config_text

REPO = Path(__file__).resolve().parents[2]


def test_init_writes_configs_secrets_0600_and_env(tmp_path):
    d = tmp_path / "c"
    proc = subprocess.run([sys.executable, "-m", "halb", "cluster", "init", str(d)], capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 0, proc.stderr
    for name in ("secret", "token"):
        mode = stat.S_IMODE(os.stat(d / name).st_mode)
        assert mode == 0o600, oct(mode)
        assert len((d / name).read_text().strip()) >= 32
    assert (d / "secret").read_text() != (d / "token").read_text()
    cfgs = [load_config(d / f"n{i}.toml") for i in (1, 2, 3)]
    assert [c.api.bind for c in cfgs] == ["127.0.0.11:7000", "127.0.0.12:7000", "127.0.0.13:7000"]
    assert cfgs[0].read_secret() == (d / "secret").read_text().strip()
    env = (d / "cluster.env").read_text()
    assert "HALB_CLUSTER=127.0.0.11:7000,127.0.0.12:7000,127.0.0.13:7000" in env
    assert f"HALB_TOKEN_FILE={(d / 'token').resolve()}" in env
    # the halb that wrote it goes on PATH, so `. cluster.env && halb ...` works as printed
    assert f'export PATH="{Path(sys.executable).parent}:$PATH"' in env
    # a second init refuses to overwrite, exit 2
    again = subprocess.run([sys.executable, "-m", "halb", "cluster", "init", str(d)], capture_output=True,
                           text=True, timeout=30)
    assert again.returncode == 2 and "already holds node configs" in again.stderr


def test_committed_local_3node_configs_match_the_generator(tmp_path):
    import shutil

    from halb.demo.launcher import ensure_local_tls

    spec = ClusterSpec.default()
    for node in spec.nodes:
        path = REPO / "cluster_configs" / "local-3node" / f"{node.id}.toml"
        assert path.read_text() == node_config_text(spec, node)
        shutil.copy(path, tmp_path / path.name)
    # no keys are committed: `cluster up` makes the CA and certificates the configs name
    assert sorted(ensure_local_tls(tmp_path)) == ["n1", "n2", "n3"] and ensure_local_tls(tmp_path) == []
    for node in spec.nodes:
        cfg = load_config(tmp_path / f"{node.id}.toml")
        assert cfg.api.tls_cert == tmp_path / f"{node.id}.crt" and cfg.api.ca_file == tmp_path / "ca.crt"
        assert [b.address for b in cfg.services[0].backends] == ["127.0.0.21:8080", "127.0.0.21:8081",
                                                                  "127.0.0.22:8080", "127.0.0.23:8080"]
        assert [b.server for b in cfg.services[0].backends] == ["A", "A", "B", "C"]


def test_member_config_text_takes_secret_token_and_dataplane_from_like(tmp_path):
    from halb.demo.launcher import init_cluster_dir, member_config_text

    d = tmp_path / "c"
    init_cluster_dir(d, ClusterSpec.default())
    like = load_config(d / "n1.toml")
    out = d / "n4.toml"
    out.write_text(member_config_text("n4", "127.0.0.14:7100", "127.0.0.14:7000",
                                      ["127.0.0.12:7100", "127.0.0.11:7100"], out, like))
    cfg = load_config(out)
    assert cfg.node_id == "n4" and cfg.raft.bind == "127.0.0.14:7100" and cfg.api.bind == "127.0.0.14:7000"
    assert cfg.raft.peers == ["127.0.0.11:7100", "127.0.0.12:7100"]
    assert cfg.read_secret() == like.read_secret() and cfg.read_token() == like.read_token()
    assert cfg.dataplane.listen_host == "127.0.0.14" and cfg.dataplane.shared_hosts == ["127.0.0.10"]
    assert cfg.services == []


def test_member_add_refuses_to_overwrite_a_config_before_asking_the_cluster(tmp_path):
    existing = tmp_path / "n4.toml"
    existing.write_text("# mine\n")
    env = dict(os.environ, HALB_CLUSTER="127.0.0.1:9", HALB_TOKEN="t" * 40)
    res = subprocess.run([sys.executable, "-m", "halb", "member", "add", "n4", "--raft", "127.0.0.14:7100",
                          "--api", "127.0.0.14:7000", "--write-config", str(existing)],
                         capture_output=True, text=True, timeout=30, env=env)
    assert res.returncode == 2 and "not overwriting" in res.stderr, res.stderr
    assert existing.read_text() == "# mine\n"


def test_init_makes_ca_and_node_certs_and_renew_keeps_the_ca(tmp_path):
    from cryptography import x509

    d = tmp_path / "c"
    assert subprocess.run([sys.executable, "-m", "halb", "cluster", "init", str(d)], capture_output=True,
                          timeout=30).returncode == 0
    for name in ("ca.key", "n1.key", "n2.key", "n3.key"):
        assert stat.S_IMODE(os.stat(d / name).st_mode) == 0o600, name
    assert f"HALB_CA_FILE={(d / 'ca.crt').resolve()}" in (d / "cluster.env").read_text()
    ca_before, n1_before = (d / "ca.crt").read_bytes(), (d / "n1.crt").read_bytes()
    proc = subprocess.run([sys.executable, "-m", "halb", "cluster", "init", str(d), "--renew-certs"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and "n1: new certificate" in proc.stdout, proc.stderr
    assert (d / "ca.crt").read_bytes() == ca_before and (d / "n1.crt").read_bytes() != n1_before
    ca = x509.load_pem_x509_certificate(ca_before)
    x509.load_pem_x509_certificate((d / "n1.crt").read_bytes()).verify_directly_issued_by(ca)
    cfg = load_config(d / "n1.toml")  # the renewed cert and key belong together
    assert cfg.api.tls_cert == d / "n1.crt"
    # `--force` rewrites configs and certificates, never the CA, secret or token
    token = (d / "token").read_text()
    assert subprocess.run([sys.executable, "-m", "halb", "cluster", "init", str(d), "--force"], capture_output=True,
                          timeout=30).returncode == 0
    assert (d / "ca.crt").read_bytes() == ca_before and (d / "token").read_text() == token
    # without the CA key there is nothing to renew with: exit 2, saying so
    (d / "ca.key").unlink()
    proc = subprocess.run([sys.executable, "-m", "halb", "cluster", "init", str(d), "--renew-certs"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "ca.key does not exist" in proc.stderr, proc.stderr
    # ... and `--force` does not quietly make a new CA in its place
    proc = subprocess.run([sys.executable, "-m", "halb", "cluster", "init", str(d), "--force"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "ca.key does not" in proc.stderr, proc.stderr
    assert (d / "ca.crt").read_bytes() == ca_before


def test_member_config_text_issues_a_cert_from_the_cluster_ca(tmp_path):
    from halb.demo.launcher import init_cluster_dir, member_config_text

    d = tmp_path / "c"
    init_cluster_dir(d, ClusterSpec.default())
    out = d / "n4.toml"
    out.write_text(member_config_text("n4", "127.0.0.14:7100", "127.0.0.14:7000", [], out, load_config(d / "n1.toml")))
    cfg = load_config(out)
    assert cfg.api.tls_cert == d / "n4.crt" and cfg.api.ca_file == d / "ca.crt"
    assert stat.S_IMODE(os.stat(d / "n4.key").st_mode) == 0o600

"""The namespace lab's node configs (halb/lab/cluster.py) carry the admin API's TLS files,
made by the same code as `halb cluster init` (no namespaces needed to check that)."""
from __future__ import annotations

import stat

from halb.config import load_config
from halb.lab.cluster import LabCluster
from halb.lab.topology import Lab


def test_lab_configs_load_with_certificates_for_each_balancer(tmp_path):
    lab = Lab(state_dir=tmp_path / "state")
    for mode in ("vip", "dns"):
        run = tmp_path / mode
        paths = LabCluster(lab, run, mode=mode).write_configs()
        for p in paths:
            cfg = load_config(p)  # validates that cert and key load and belong together
            assert cfg.api.tls_cert == run / f"{cfg.node_id}.crt" and cfg.api.ca_file == run / "ca.crt"
            assert stat.S_IMODE(cfg.api.tls_key.stat().st_mode) == 0o600
            assert f"IP Address:{cfg.api.bind.rsplit(':', 1)[0]}" in _sans(cfg.api.tls_cert)


def _sans(cert_path) -> str:
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    ips = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.IPAddress)
    return " ".join(f"IP Address:{ip}" for ip in ips)

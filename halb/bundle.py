"""`halb cluster init DIR --node n1=ADDR ...`: one bundle per machine, copied there as is.

Layout (docs/deploy.md)::

    DIR/n1/        node.toml, secret, token, node.crt, node.key, ca.crt  -> machine n1
    DIR/n2/ ...
    DIR/operator/  ca.crt, token, cluster.env                            -> the operator's machine
    DIR/ca/        ca.crt, ca.key                                        -> keep offline (issues certs)
    DIR/secret, DIR/token, DIR/cluster.env                               (the originals; CLI from DIR)

Every path in node.toml is relative to the bundle, except data_dir (state belongs in
/var/lib/halb/ID, the systemd unit's StateDirectory; `--data-dir`). Secrets and private
keys are 0600. Nothing needs editing on the machines: each node.toml lists every peer's
real address, its own Raft/API address, and the announcement settings.
"""
from __future__ import annotations

import ipaddress
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from halb.demo.launcher import CA_CERT, ensure_ca, ensure_secrets, toml_value, write_node_tls, write_private
from halb.model import ModelError, check_name

NODE_CONFIG = "node.toml"
NODE_CERT, NODE_KEY = "node.crt", "node.key"


class BundleError(ValueError):
    """A bad --node value or announce option; the message names it."""


@dataclass(frozen=True)
class BundleNode:
    id: str
    host: str  # an IP address or a DNS name, as given

    def address(self, port: int) -> str:
        return f"[{self.host}]:{port}" if ":" in self.host else f"{self.host}:{port}"


@dataclass
class BundleOptions:
    api_port: int = 7000
    raft_port: int = 7100
    data_dir: str = "/var/lib/halb"  # each node's data_dir is DATA_DIR/ID
    vip: str = ""                    # announce mode "vip" (with interface); one address, or:
    vips: list[str] = field(default_factory=list)  # several, IPv4 and/or IPv6 (after ``vip``)
    interface: str = ""
    dns_names: list[str] = field(default_factory=list)  # announce mode "dns"
    dns_zone: str = "halb"
    dns_port: int = 53


def parse_node(value: str) -> BundleNode:
    """`n1=10.0.0.1` (or `n1=lb1.example.net`, `n1=fd00::1`)."""
    node_id, sep, host = value.partition("=")
    node_id, host = node_id.strip(), host.strip()
    if not sep or not node_id or not host:
        raise BundleError(f"--node {value!r}: expected ID=ADDRESS, e.g. n1=10.0.0.1")
    try:
        check_name(node_id, "node id")
    except ModelError as exc:
        raise BundleError(f"--node {value!r}: {exc}") from None
    from halb.pki import PkiError, subject_alt_name

    try:
        ipaddress.ip_address(host.strip("[]"))
        host = host.strip("[]")
    except ValueError:
        if ":" in host:
            raise BundleError(f"--node {value!r}: give the address without a port "
                              "(ports: --api-port, --raft-port)") from None
        try:
            subject_alt_name(host)
        except PkiError:
            raise BundleError(f"--node {value!r}: {host!r} is neither an IP address nor a host name") from None
    return BundleNode(node_id, host)


def parse_nodes(values: list[str]) -> list[BundleNode]:
    nodes = [parse_node(v) for v in values]
    for kind, key in (("node id", lambda n: n.id), ("address", lambda n: n.host.lower())):
        seen: set[str] = set()
        for n in nodes:
            if key(n) in seen:
                raise BundleError(f"--node: {kind} {key(n)!r} is given twice")
            seen.add(key(n))
    return nodes


def announce_table(opts: BundleOptions, node: BundleNode) -> dict[str, Any]:
    given = ([opts.vip] if opts.vip else []) + list(opts.vips)
    if given and opts.dns_names:
        raise BundleError("--vip and --dns exclude each other: one way to announce the cluster")
    if given:
        if not opts.interface:
            raise BundleError("--vip needs --interface (the machines' interface on the VIP's network)")
        vips: list[str] = []
        for raw in given:
            try:
                vip = str(ipaddress.ip_interface(raw).ip)  # 10.0.0.100/24: the node adds it as /32 (/128)
            except ValueError:
                raise BundleError(f"--vip {raw!r}: not an IPv4 or IPv6 address (ADDRESS or ADDRESS/PREFIX)") from None
            if vip in vips:
                raise BundleError(f"--vip {raw!r}: given twice")
            vips.append(vip)
        if len(vips) == 1:
            return {"mode": "vip", "vip": vips[0], "interface": opts.interface}
        return {"mode": "vip", "vips": vips, "interface": opts.interface}
    if opts.interface:
        raise BundleError("--interface is only used with --vip")
    if opts.dns_names:
        try:
            ipaddress.IPv4Address(node.host)
        except ValueError:
            raise BundleError(f"--dns: node {node.id}'s address {node.host!r} must be an IPv4 address "
                              "(it answers with it)") from None
        return {"mode": "dns", "bind": node.address(opts.dns_port), "zone": opts.dns_zone,
                "names": list(opts.dns_names)}
    return {}


def node_toml(nodes: list[BundleNode], node: BundleNode, opts: BundleOptions) -> str:
    announce = announce_table(opts, node)
    q = toml_value
    lines = [
        f"# halb node {node.id}: generated by `halb cluster init --node`. Copy this directory to the",
        "# machine as is (docs/deploy.md); relative paths are relative to this file.",
        f"node_id = {q(node.id)}",
        f"data_dir = {q(str(Path(opts.data_dir) / node.id))}",
        'secret_file = "secret"',
        'token_file = "token"',
        "",
        "[raft]",
        "# Raft is authenticated and encrypted with the cluster secret; keep it on a trusted network.",
        f"bind = {q(node.address(opts.raft_port))}",
        f"peers = {q([n.address(opts.raft_port) for n in nodes if n.id != node.id])}",
        "",
        "[api]",
        f"bind = {q(node.address(opts.api_port))}",
        f"tls_cert = {q(NODE_CERT)}",
        f"tls_key = {q(NODE_KEY)}",
        f"ca_file = {q(CA_CERT)}",
        "",
        "[dataplane]",
    ]
    if announce.get("mode") == "vip":
        lines.append("# empty: services listen on the address they name (the VIP, bound with IP_FREEBIND)")
    else:
        lines.append(f"listen_host = {q(node.host)}")
    if announce:
        lines += ["", "[announce]", *(f"{k} = {q(v)}" for k, v in announce.items())]
    lines += ["", "# No [[services]]: add them with `halb service add` / `halb backend add` once the cluster runs."]
    return "\n".join(lines) + "\n"


def bundle_config_paths(directory: Path) -> list[Path]:
    return sorted(directory.glob(f"*/{NODE_CONFIG}"))


def write_bundles(directory: Path, nodes: list[BundleNode], opts: BundleOptions) -> list[Path]:
    """Write every bundle; returns the node.toml paths. The CA, secret and token are kept
    when DIR has them (a rerun issues new node certificates from the same CA)."""
    if not nodes:
        raise BundleError("give at least one --node ID=ADDRESS")
    texts = {n.id: node_toml(nodes, n, opts) for n in nodes}  # every option error before any file
    directory.mkdir(parents=True, exist_ok=True)
    ensure_secrets(directory)
    (directory / "ca").mkdir(mode=0o700, exist_ok=True)
    from halb.pki import PkiError

    try:
        ca = ensure_ca(directory / "ca", directory.resolve().name)
    except PkiError as exc:
        raise BundleError(str(exc)) from None
    ca_cert = directory / "ca" / CA_CERT
    paths = []
    for n in nodes:
        d = directory / n.id
        d.mkdir(mode=0o750, exist_ok=True)
        for name in ("secret", "token"):
            write_private(d / name, (directory / name).read_bytes())
        shutil.copyfile(ca_cert, d / CA_CERT)
        write_node_tls(ca, n.id, [n.host], d / NODE_CERT, d / NODE_KEY)
        (d / NODE_CONFIG).write_text(texts[n.id])
        paths.append(d / NODE_CONFIG)
    apis = [n.address(opts.api_port) for n in nodes]
    write_operator(directory / "operator", apis, ca_cert, directory / "token")
    from halb.demo.launcher import write_env

    write_env(directory, apis, ca_cert)
    return paths


def write_operator(d: Path, apis: list[str], ca_cert: Path, token: Path) -> None:
    """What the person running the CLI needs: the CA to verify nodes with, the bootstrap
    (admin) token, and a cluster.env naming them. HALB_OPERATOR_DIR: where this directory
    is now, when it was copied elsewhere."""
    d.mkdir(mode=0o700, exist_ok=True)
    shutil.copyfile(ca_cert, d / CA_CERT)
    write_private(d / "token", token.read_bytes())
    here = str(d.resolve())
    (d / "cluster.env").write_text(
        "# Source me: `. operator/cluster.env`, then `halb cluster status` talks to the cluster over HTTPS,\n"
        "# verifying every node against ca.crt. Moved this directory? HALB_OPERATOR_DIR=/new/place first.\n"
        f"export HALB_CLUSTER={','.join(apis)}\n"
        f'export HALB_CA_FILE="${{HALB_OPERATOR_DIR:-{here}}}/{CA_CERT}"\n'
        f'export HALB_TOKEN_FILE="${{HALB_OPERATOR_DIR:-{here}}}/token"\n'
    )


def renew_certs(directory: Path) -> list[tuple[str, Path, Any]]:
    """New node certificates (and keys) from the cluster's existing CA, for every node
    config in DIRECTORY (bundles DIR/*/node.toml, else the local layout DIR/*.toml), for the
    host of each node's api.bind. Returns (node id, cert path, expiry). Nothing else
    changes: the CA stays, so clients and peers keep trusting the nodes."""
    import tomllib

    from halb.demo.launcher import CA_KEY, config_paths
    from halb.pki import PkiError, expires, load_issued

    bundles = bundle_config_paths(directory)
    configs = bundles or config_paths(directory)
    if not configs:
        raise BundleError(f"{directory} holds no node configs (DIR/ID/node.toml or DIR/ID.toml) to renew")
    ca_dir = directory / "ca" if bundles else directory
    try:
        ca = load_issued((ca_dir / CA_CERT).read_bytes(), (ca_dir / CA_KEY).read_bytes())
    except FileNotFoundError as exc:
        raise BundleError(f"{exc.filename} does not exist: certificates are renewed by the CA that signed them "
                          "(a new CA would need ca.crt replaced on every node and client)") from None
    except PkiError as exc:
        raise BundleError(f"{ca_dir}: {exc}") from None
    plan = []
    for path in configs:  # check every config before writing any certificate
        try:
            raw = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise BundleError(f"{path}: cannot read it: {exc}") from None
        api = raw.get("api") if isinstance(raw.get("api"), dict) else {}
        cert, key, bind, node_id = api.get("tls_cert"), api.get("tls_key"), api.get("bind"), raw.get("node_id")
        if not all(isinstance(v, str) and v for v in (cert, key, bind, node_id)):
            raise BundleError(f"{path}: needs node_id, api.bind, api.tls_cert and api.tls_key to renew")
        ca_file = api.get("ca_file")
        if isinstance(ca_file, str) and (path.parent / ca_file).exists() and \
                (path.parent / ca_file).read_bytes() != ca.cert_pem:
            raise BundleError(f"{path}: its ca_file {ca_file} is not the CA in {ca_dir}; not renewing")
        plan.append((node_id, bind.rsplit(":", 1)[0].strip("[]"), path.parent / cert, path.parent / key))
    done = []
    for node_id, host, cert, key in plan:
        write_node_tls(ca, node_id, [host], cert, key)
        from cryptography import x509

        done.append((node_id, cert, expires(x509.load_pem_x509_certificate(cert.read_bytes()))))
    return done

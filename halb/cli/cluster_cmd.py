"""`halb cluster init|up|status`."""
from __future__ import annotations

import signal
import sys
import time
from pathlib import Path
from typing import Any, Collection

import click

from halb.cli.common import api_command, client_from, emit_json, json_option, table, wants_json
from halb.config import ConfigError, load_config
from halb.tls import AdminTls
from halb.demo.launcher import (
    Child, ClusterSpec, config_paths, ensure_local_tls, ensure_secrets, halb_argv, init_cluster_dir, wait_for_leader, write_env,
)


@click.group()
def cluster() -> None:
    """Create, run and inspect a cluster."""


@cluster.command("init")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--force", is_flag=True, help="Overwrite existing node configs (secret, token and CA are kept).")
@click.option("--node", "nodes", multiple=True, metavar="ID=ADDRESS",
              help="A machine of a real cluster (repeat: --node n1=10.0.0.1 --node n2=10.0.0.2 ...): writes one "
                   "bundle per node, DIR/ID/, plus DIR/operator/. Without it: the local three-node demo layout.")
@click.option("--api-port", default=7000, show_default=True, type=click.IntRange(1, 65535),
              help="With --node: every node's admin API port.")
@click.option("--raft-port", default=7100, show_default=True, type=click.IntRange(1, 65535),
              help="With --node: every node's Raft port.")
@click.option("--data-dir", default="/var/lib/halb", show_default=True,
              help="With --node: each node keeps its state in DATA_DIR/ID (the systemd unit's StateDirectory).")
@click.option("--vip", multiple=True, metavar="ADDRESS[/PREFIX]",
              help="With --node: announce a floating VIP, IPv4 or IPv6 (repeat for several; they move together).")
@click.option("--interface", default="", help="With --vip: the interface the VIP goes on.")
@click.option("--dns", "dns_names", multiple=True, metavar="NAME",
              help="With --node: answer DNS for NAME (repeat) on every node instead of a VIP.")
@click.option("--dns-zone", default="halb", show_default=True, help="With --dns: the zone the names live in.")
@click.option("--dns-port", default=53, show_default=True, type=click.IntRange(1, 65535), help="With --dns.")
@click.option("--renew-certs", is_flag=True,
              help="Only issue new node certificates from DIRECTORY's existing CA (before they expire); "
                   "nothing else changes.")
def init(directory: str, force: bool, nodes: tuple[str, ...], api_port: int, raft_port: int, data_dir: str,
         vip: tuple[str, ...], interface: str, dns_names: tuple[str, ...], dns_zone: str, dns_port: int,
         renew_certs: bool) -> None:
    """Generate a cluster's configs, secret, token, CA and node certificates in DIRECTORY.

    Exit 2 for a bad option (a --node value, an address given twice) or when DIRECTORY
    already holds configs and --force is not given."""
    d = Path(directory)
    if renew_certs:
        from halb.bundle import BundleError, renew_certs as renew

        if nodes or force:
            click.echo("halb: --renew-certs works on an existing DIRECTORY alone (no --node, no --force)", err=True)
            sys.exit(2)
        try:
            done = renew(d)
        except BundleError as exc:
            click.echo(f"halb: {exc}", err=True)
            sys.exit(2)
        for node_id, cert, until in done:
            click.echo(f"{node_id}: new certificate {cert} (and its key), valid until {until:%Y-%m-%d}")
        click.echo("copy each node's new certificate and key to its machine and restart the node, one at a time "
                   "(docs/deploy.md, Certificates)")
        return
    if nodes:
        from halb.bundle import BundleError, BundleOptions, bundle_config_paths, parse_nodes, write_bundles

        if bundle_config_paths(d) and not force:
            click.echo(f"halb: {d} already holds node bundles; use --force to overwrite", err=True)
            sys.exit(2)
        opts = BundleOptions(api_port=api_port, raft_port=raft_port, data_dir=data_dir, vips=list(vip),
                             interface=interface, dns_names=list(dns_names), dns_zone=dns_zone, dns_port=dns_port)
        try:
            if api_port == raft_port:
                raise BundleError("--api-port and --raft-port must differ")
            paths = write_bundles(d, parse_nodes(list(nodes)), opts)
        except BundleError as exc:
            click.echo(f"halb: {exc}", err=True)
            sys.exit(2)
        click.echo(f"wrote {len(paths)} node bundles in {d}: {', '.join(p.parent.name + '/' for p in paths)} "
                   "(node.toml, secret, token, node.crt, node.key, ca.crt; secrets and keys mode 0600)")
        click.echo(f"copy {d}/ID/ to machine ID as is (docs/deploy.md); {d}/operator/ is for the CLI: "
                   f". {d}/operator/cluster.env && halb cluster status")
        click.echo(f"keep {d}/ca/ca.key offline: it issues node certificates")
        return
    if vip or interface or dns_names:
        click.echo("halb: --vip, --interface and --dns need --node (the local layout announces nothing)", err=True)
        sys.exit(2)
    if config_paths(d) and not force:
        click.echo(f"halb: {d} already holds node configs; use --force to overwrite", err=True)
        sys.exit(2)
    from halb.pki import PkiError

    try:
        paths = init_cluster_dir(d)
    except PkiError as exc:
        click.echo(f"halb: {exc}", err=True)
        sys.exit(2)
    click.echo(f"wrote {', '.join(p.name for p in paths)}, secret, token, a cluster CA (ca.crt, ca.key) and a "
               f"certificate per node (keys and secrets mode 0600), cluster.env, and the demo's HTTPS edge "
               f"(demo-edge.json, a demo CA demo-ca.crt/demo-ca.key) in {d}")
    click.echo(f"next: halb cluster up --config-dir {d}   and in another shell:  . {d}/cluster.env")


def health_line(status: dict[str, Any]) -> str:
    """`health: degraded (n1 down; tolerates no further balancer loss)`."""
    health = status.get("health", "unknown")
    d = status.get("health_detail") or {}
    if health == "ok":
        n = d.get("tolerates", 0)
        why = f"all {d.get('voters', '?')} voters connected; tolerates {n} balancer loss{'es' if n != 1 else ''}"
    elif health == "degraded":
        n = d.get("tolerates", 0)
        why = (f"{', '.join(d.get('down', [])) or '?'} down; "
               + ("tolerates no further balancer loss" if n == 0 else f"tolerates {n} more balancer loss(es)"))
    elif health == "no_quorum":
        why = (f"{status.get('node')} sees {d.get('voters_connected', '?')} of {d.get('voters', '?')} voters, "
               f"needs {d.get('quorum', '?')}: no changes can be committed")
    else:
        why = "the answering node did not report health"
    label = {"ok": "ok", "degraded": "DEGRADED", "no_quorum": "NO QUORUM"}.get(health, health)
    return f"health: {label} ({why})"


def print_status(status: dict[str, Any]) -> None:
    click.echo(f"leader: {status.get('leader') or '(none)'}   term: {status.get('term')}   "
               f"answered by: {status.get('node')} ({status.get('raft_state')})")
    click.echo(health_line(status))
    dp = {True: "ok", False: "FAILING", None: "-"}
    rows = [(m.get("id"), m.get("raft_state"), m.get("raft"), m.get("api"),
             "yes" if m.get("in_raft_config") else "no", dp.get(m.get("dataplane_ok"), "-"))
            for m in status["members"]]
    click.echo(table(rows, ["MEMBER", "RAFT STATE", "RAFT", "API", "VOTER", "DATA PLANE"]))
    if any("announcements" in m for m in status["members"]):  # bgp mode
        click.echo("")
        rows = []
        for m in status["members"]:
            anns = m.get("announcements")
            if anns is None:
                rows.append((m.get("id"), "-", "unknown (no answer yet)"))
            for a in anns or []:
                rows.append((m.get("id"), a.get("address"), "announced" if a.get("announced")
                             else f"withdrawn: {a.get('reason')}"))
        click.echo(table(rows, ["MEMBER", "SERVICE ADDRESS", "BGP"]))
    for m in status["members"]:
        if m.get("dataplane_ok") is False:
            click.echo(f"WARNING: {m.get('id')} data plane self-check fails: {m.get('dataplane_reason')}")
    for w in status.get("local_warnings", []):  # frontends / certificates this node cannot serve
        click.echo(f"WARNING: {w}")
    if status.get("services"):
        click.echo("")
        risk = {"ok": "ok", "at_risk": "AT RISK", "down": "DOWN"}
        rows = [(s["name"], s["mode"], s.get("algorithm"), s.get("backends"), s.get("servers_healthy", "-"),
                 risk.get(s.get("resilience", ""), s.get("resilience", "-")), s.get("address") or "-",
                 ", ".join(s.get("listen", [])))
                for s in status["services"]]  # the node sorts services at risk first
        click.echo(table(rows, ["SERVICE", "MODE", "ALGORITHM", "BACKENDS", "SERVERS", "RESILIENCE", "ADDRESS",
                                "PER-NODE LISTEN"]))
        for s in status["services"]:
            if s.get("resilience") in ("at_risk", "down") or s.get("routing") == "error":
                for w in s.get("warnings", []):
                    click.echo(f"WARNING: {w}")


@cluster.command("status")
@json_option
@click.pass_context
@api_command
def status(ctx: click.Context, as_json: bool) -> None:
    """Leader, members with their Raft state, services and where they listen."""
    st = client_from(ctx).cluster_status()
    if wants_json(ctx, as_json):
        emit_json(st)
    else:
        print_status(st)


@cluster.command("up")
@click.option("--config-dir", default=".halb/local", show_default=True, type=click.Path(file_okay=False),
              help="Directory with node configs; `cluster init` runs first when it has none.")
@click.option("--backends/--no-backends", default=True, show_default=True,
              help="Also start the checkout demo backends the config seeds.")
@click.option("--restart/--no-restart", default=True, show_default=True,
              help="Restart a node or backend that dies (back-off 1 s doubling to 30 s).")
@click.option("--insecure-dev", is_flag=True, help="Pass --insecure-dev to every node.")
def up(config_dir: str, backends: bool, restart: bool, insecure_dev: bool) -> None:
    """Run the local cluster in the foreground; Ctrl-C stops every process it started.

    Refuses to start (exit 2) when any of its addresses is already in use, naming the PIDs."""
    from halb.demo.supervise import Supervisor, cmdline, taken_addresses

    d = Path(config_dir)
    from halb.bundle import bundle_config_paths

    if bundle_config_paths(d) and not config_paths(d):
        click.echo(f"halb: {d} holds `cluster init --node` bundles for separate machines: copy each to its machine "
                   "and run `halb node run --config ID/node.toml` there (docs/deploy.md)", err=True)
        sys.exit(2)
    if not config_paths(d):
        init_cluster_dir(d)
        click.echo(f"initialised a new three-node cluster in {d}")
    ensure_secrets(d)
    from halb.demo.edge import EdgeError, read_edge

    try:
        made = ensure_local_tls(d)
        if made:
            click.echo(f"made the cluster CA and TLS certificates for {', '.join(made)} in {d}")
        cfgs = [load_config(p) for p in config_paths(d)]
        edge = read_edge(d) if backends else None  # the catalog service runs in the demo backends
        if backends and edge is None and (d / "n1.toml").exists():
            click.echo(f"note: {d} has no demo-edge.json (made by an older halb): no HTTPS frontend is seeded; "
                       f"`halb cluster init --force {d}` adds it (keeps secret, token and CA)")
    except (ConfigError, EdgeError) as exc:
        click.echo(f"halb: config error: {exc}", err=True)
        sys.exit(2)
    no_tls = [c.node_id for c in cfgs if c.api.tls_cert is None]
    if no_tls and not insecure_dev:
        click.echo(f"halb: {', '.join(no_tls)} in {d} have no [api] tls_cert (made by an older halb?): "
                   f"run `halb cluster init --force {d}` (keeps secret and token), or pass --insecure-dev", err=True)
        sys.exit(2)
    taken = taken_addresses(wanted_addresses(cfgs, backends, edge))
    if taken:
        click.echo(f"halb: cannot start the cluster in {d}: {len(taken)} of its addresses are already in use "
                   "(is a cluster already running, e.g. another `make demo`?)", err=True)
        held: dict[int, list[str]] = {}
        for t in taken:
            for pid in t.pids:
                held.setdefault(pid, []).append(f"{t.what} {t.address}")
            if not t.pids:
                click.echo(f"  {t.what} {t.address}: held by a process of another user", err=True)
        for pid, what in sorted(held.items()):
            click.echo(f"  pid {pid} holds {', '.join(what)}: {cmdline(pid)}", err=True)
        pids = set(held)
        if pids:
            click.echo(f"stop it with Ctrl-C where it runs, or: kill {' '.join(map(str, sorted(pids)))}", err=True)
        sys.exit(2)
    tls = AdminTls(ca_file=str(cfgs[0].api.ca_file) if cfgs[0].api.ca_file else None,
                   plain=cfgs[0].api.tls_cert is None)  # no cert: only runs with --insecure-dev, over http
    write_env(d, [c.api.bind for c in cfgs], None if tls.plain else cfgs[0].api.ca_file)
    logs = d / "logs"
    sup = Supervisor(say=click.echo, pid_dir=d / "run", restart=restart)
    stopping = False

    def stop(*_: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        if backends:
            for child in demo_backend_children(cfgs, d, logs, edge):
                sup.start(child)
                click.echo(f"started backend {child.name.removeprefix('backend-')} (pid {child.pid}) on "
                           f"{child.argv[child.argv.index('--listen') + 1]}")
        for cfg in cfgs:
            argv = halb_argv("node", "run", "--config", str(cfg.path)) + (["--insecure-dev"] if insecure_dev else [])
            child = sup.start(Child(cfg.node_id, argv, logs / f"{cfg.node_id}.log"))
            click.echo(f"started node {cfg.node_id} (pid {child.pid}): api {tls.url(cfg.api.bind, '')}, "
                       f"log {child.log_path}")
        token = cfgs[0].read_token()
        try:
            st = wait_for_leader([c.api.bind for c in cfgs], token, timeout=30, tls=tls)
        except TimeoutError as exc:
            click.echo(f"halb: {exc}; see the logs in {logs}", err=True)
            sys.exit(1)
        from halb.api.client import ApiError, Client, Unreachable

        client = Client([c.api.bind for c in cfgs], token, tls=tls)
        edge_commands = seed_demo_edge(client, d, edge) if edge is not None else []
        try:
            st = client.cluster_status()
        except (ApiError, Unreachable):
            pass  # keep the status wait_for_leader saw
        click.echo("")
        print_status(st)
        click.echo("")
        print_next_steps(d, st, skip=[edge.catalog_service] if edge is not None else [])
        print_edge_commands(d, edge_commands)
        click.echo("press Ctrl-C to stop every process started here"
                   + (" (a process that dies is restarted)" if restart else ""))
        while not stopping:
            sup.poll()
            time.sleep(0.2)
    finally:
        click.echo("stopping every process started here ...")
        sup.stop_all()
        click.echo("stopped")


def seed_demo_edge(client: Any, d: Path, edge: Any) -> list[tuple[str, str]]:
    """Make the demo's HTTPS edge (halb/demo/edge.py) and wait until every node serves it;
    returns the commands to print. A failure is a warning: the cluster itself is up."""
    from halb.api.client import ApiError, Unreachable
    from halb.demo.edge import edge_commands, seed_edge
    from halb.demo.edge_check import wait_served
    from halb.pki import PkiError

    try:
        fe = seed_edge(client, d, edge, click.echo)
    except (ApiError, Unreachable, PkiError) as exc:
        click.echo(f"WARNING: could not seed the demo HTTPS edge: {exc}", err=True)
        return []
    missing = wait_served(edge, fe, d, timeout=10.0)
    if missing:
        click.echo(f"WARNING: frontend {fe['name']} not served yet at {', '.join(missing)} (see the node logs)")
    return edge_commands(d, edge, fe)


def print_edge_commands(d: Path, commands: list[tuple[str, str]]) -> None:
    if not commands:
        return
    click.echo(f"HTTPS with Host routing, verified against the demo CA {d.resolve()}/demo-ca.crt:")
    for what, command in commands:
        click.echo(f"  {what}:")
        click.echo(f"    {command}")


def wanted_addresses(cfgs: list[Any], backends: bool, edge: Any = None) -> list[tuple[str, str]]:
    """Every address `cluster up` will listen on: each node's API, Raft and services (own
    and shared host), the demo edge's frontend ports, and the demo backends."""
    from halb.model import parse_hostport

    out: list[tuple[str, str]] = []
    for cfg in cfgs:
        out += [(f"{cfg.node_id} api", cfg.api.bind), (f"{cfg.node_id} raft", cfg.raft.bind)]
        for svc in cfg.services:
            host, port = parse_hostport(svc.listen)
            out.append((f"{cfg.node_id} service {svc.name}", f"{cfg.dataplane.listen_host or host}:{port}"))
            out += [(f"shared address of {svc.name}", f"{h}:{port}") for h in cfg.dataplane.shared_hosts]
        if edge is not None:
            host = cfg.dataplane.listen_host or "0.0.0.0"
            out += [(f"{cfg.node_id} frontend {edge.frontend}", f"{host}:{p}") for p in (edge.port, edge.http_port) if p]
            out += [(f"{cfg.node_id} service {edge.catalog_service}", f"{host}:{edge.catalog_port}")]
            out += [(f"shared address of {edge.catalog_service}", f"{h}:{edge.catalog_port}")
                    for h in cfg.dataplane.shared_hosts]
    if backends and cfgs:
        out += [(f"backend {be.name}", be.address) for svc in cfgs[0].services for be in svc.backends]
    if backends and edge is not None:
        out += [(f"catalog backend {name}", addr) for name, addr in edge.catalog_backends]
    seen: set[str] = set()
    return [(w, a) for w, a in out if not (a in seen or seen.add(a))]


def print_next_steps(d: Path, st: dict[str, Any], skip: Collection[str] = ()) -> None:
    """Commands that work as printed: cluster.env also puts this halb on PATH. `skip`:
    services the checkout commands do not fit (the demo edge's catalog, printed with it)."""
    click.echo(f"control the cluster from another shell:  . {d}/cluster.env && halb cluster status")
    for svc in st.get("services", []):
        if svc["mode"] != "http" or not svc.get("listen") or svc["name"] in skip:
            continue
        addr = svc.get("address") or svc["listen"][0]
        if svc.get("address"):
            click.echo(f"the service address every balancer serves (survives any one of them): http://{addr}")
            click.echo(f"  curl loop:  for i in $(seq 600); do curl -s -o /dev/null -w '%{{http_code}}\\n' "
                       f"--max-time 2 http://{addr}/products; sleep 0.02; done | sort | uniq -c")
            click.echo(f"  and meanwhile kill a balancer:  kill -9 $(cat {d}/run/n1.pid)")
        click.echo(f"through one balancer only:  curl -s http://{svc['listen'][0]}/products")
        click.echo(f"place an order:  curl -s -X POST -H 'Idempotency-Key: order-1' "
                   f"-H 'Content-Type: application/json' -d '{{\"items\":[{{\"sku\":\"sku-1\",\"qty\":1}}]}}' "
                   f"http://{addr}/checkout")


def demo_backend_children(cfgs: list[Any], d: Path, logs: Path, edge: Any = None) -> list[Child]:
    """One checkout backend per distinct seeded backend address (the shop's servers); the
    demo edge's catalog app runs in the backend process of the same name (--catalog-listen)."""
    catalog = dict(edge.catalog_backends) if edge is not None else {}
    children: list[Child] = []
    seen: set[str] = set()
    db = (d / "shop.db").resolve()
    for svc in cfgs[0].services:
        for be in svc.backends:
            if be.address in seen:
                continue
            seen.add(be.address)
            argv = halb_argv("demo", "backend", "--name", be.name, "--listen", be.address, "--db", str(db))
            if be.server:
                argv += ["--server", be.server]
            if be.name in catalog:
                argv += ["--catalog-listen", catalog.pop(be.name)]
            children.append(Child(f"backend-{be.name}", argv, logs / f"backend-{be.name}.log"))
    return children

"""`halb cluster init|up|status`."""
from __future__ import annotations

import signal
import sys
import time
from pathlib import Path
from typing import Any

import click

from halb.cli.common import api_command, client_from, emit_json, json_option, table, wants_json
from halb.config import ConfigError, load_config
from halb.demo.launcher import (
    Child, ClusterSpec, config_paths, ensure_secrets, halb_argv, init_cluster_dir, wait_for_leader, write_env,
)


@click.group()
def cluster() -> None:
    """Create, run and inspect a cluster."""


@cluster.command("init")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--force", is_flag=True, help="Overwrite existing node configs (secret and token are kept).")
def init(directory: str, force: bool) -> None:
    """Generate a three-node local config set with a fresh secret and token in DIRECTORY."""
    d = Path(directory)
    if config_paths(d) and not force:
        click.echo(f"halb: {d} already holds node configs; use --force to overwrite", err=True)
        sys.exit(2)
    paths = init_cluster_dir(d)
    click.echo(f"wrote {', '.join(p.name for p in paths)}, secret, token (mode 0600) and cluster.env in {d}")
    click.echo(f"next: halb cluster up --config-dir {d}   and in another shell:  . {d}/cluster.env")


def print_status(status: dict[str, Any]) -> None:
    click.echo(f"leader: {status.get('leader') or '(none)'}   term: {status.get('term')}   "
               f"answered by: {status.get('node')} ({status.get('raft_state')})")
    rows = [(m.get("id"), m.get("raft_state"), m.get("raft"), m.get("api"),
             "yes" if m.get("in_raft_config") else "no") for m in status["members"]]
    click.echo(table(rows, ["MEMBER", "RAFT STATE", "RAFT", "API", "VOTER"]))
    if status.get("services"):
        click.echo("")
        risk = {"ok": "ok", "at_risk": "AT RISK", "down": "DOWN"}
        rows = [(s["name"], s["mode"], s.get("algorithm"), s.get("backends"), s.get("servers_healthy", "-"),
                 risk.get(s.get("resilience", ""), s.get("resilience", "-")), ", ".join(s.get("listen", [])))
                for s in status["services"]]  # the node sorts services at risk first
        click.echo(table(rows, ["SERVICE", "MODE", "ALGORITHM", "BACKENDS", "SERVERS", "RESILIENCE", "LISTEN"]))
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
@click.option("--insecure-dev", is_flag=True, help="Pass --insecure-dev to every node.")
def up(config_dir: str, backends: bool, insecure_dev: bool) -> None:
    """Run the local cluster in the foreground; Ctrl-C stops every process it started."""
    d = Path(config_dir)
    if not config_paths(d):
        init_cluster_dir(d)
        click.echo(f"initialised a new three-node cluster in {d}")
    ensure_secrets(d)
    try:
        cfgs = [load_config(p) for p in config_paths(d)]
    except ConfigError as exc:
        click.echo(f"halb: config error: {exc}", err=True)
        sys.exit(2)
    write_env(d, [c.api.bind for c in cfgs])
    logs = d / "logs"
    children: list[Child] = []
    stopping = False

    def stop(*_: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        if backends:
            children += start_demo_backends(cfgs, d, logs)
        for cfg in cfgs:
            argv = halb_argv("node", "run", "--config", str(cfg.path)) + (["--insecure-dev"] if insecure_dev else [])
            child = Child(cfg.node_id, argv, logs / f"{cfg.node_id}.log")
            child.start()
            children.append(child)
            click.echo(f"started node {cfg.node_id} (pid {child.pid}): api http://{cfg.api.bind}, "
                       f"log {child.log_path}")
        token = cfgs[0].read_token()
        try:
            st = wait_for_leader([c.api.bind for c in cfgs], token, timeout=30)
        except TimeoutError as exc:
            click.echo(f"halb: {exc}; see the logs in {logs}", err=True)
            sys.exit(1)
        from halb.api.client import ApiError, Client

        try:
            st = Client([c.api.bind for c in cfgs], token).cluster_status()
        except ApiError:
            pass  # keep the status wait_for_leader saw
        click.echo("")
        print_status(st)
        click.echo("")
        click.echo(f"control the cluster from another shell:  . {d}/cluster.env && halb cluster status")
        for svc in st.get("services", []):
            if svc.get("listen") and svc["mode"] == "http":
                click.echo(f"send traffic through a balancer:  curl -s http://{svc['listen'][0]}/products")
                click.echo(f"  place an order:  curl -s -X POST -H 'Idempotency-Key: order-1' "
                           f"-H 'Content-Type: application/json' -d '{{\"items\":[{{\"sku\":\"sku-1\",\"qty\":1}}]}}' "
                           f"http://{svc['listen'][0]}/checkout")
        click.echo("press Ctrl-C to stop every process started here")
        reported: set[str] = set()
        while not stopping:
            for child in children:
                if not child.alive() and child.name not in reported:
                    reported.add(child.name)
                    click.echo(f"{child.name} (pid {child.pid}) exited with {child.proc.returncode}; "
                               f"see {child.log_path}")
            time.sleep(0.2)
    finally:
        click.echo("stopping every process started here ...")
        for child in reversed(children):
            child.stop()
        click.echo("stopped")


def start_demo_backends(cfgs: list[Any], d: Path, logs: Path) -> list[Child]:
    """Start one checkout backend per distinct seeded backend address (the shop's servers)."""
    started: list[Child] = []
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
            child = Child(f"backend-{be.name}", argv, logs / f"backend-{be.name}.log")
            child.start()
            started.append(child)
            click.echo(f"started backend {be.name} (pid {child.pid}) on {be.address}")
    return started

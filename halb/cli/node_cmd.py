"""`halb node run|reload|systemd-unit|drain`: one balancer node: run it, hot-restart it, install it, drain it."""
from __future__ import annotations

import sys

import click

from halb.api.client import ApiError
from halb.cli.common import api_command, client_from, emit_json, json_option, wants_json
from halb.config import ConfigError, load_config


@click.group()
def node() -> None:
    """Run a balancer node."""


@node.command("run")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False),
              help="Node TOML config file.")
@click.option("--insecure-dev", is_flag=True, default=False,
              help="Allow running without a cluster secret (unauthenticated Raft port: remote code "
                   "execution for anyone who reaches it) and without [api] tls_cert (plain HTTP admin API: "
                   "tokens in clear text). Never in production.")
@click.option("--takeover", is_flag=True, default=False,
              help="Replace the node process running on this config's data_dir without dropping a "
                   "connection: take its listening sockets and Raft identity over (docs/deploy.md).")
@click.option("--ready-fd", type=int, default=None, hidden=True,
              help="Write 'READY <pid>' or 'FAIL <why>' to this fd (used by `halb node reload`).")
def run(config_path: str, insecure_dev: bool, takeover: bool, ready_fd: int | None) -> None:
    """Start one balancer node from FILE and run until SIGTERM/SIGINT (SIGHUP re-reads FILE)."""
    from halb.node import InsecureConfig, Node, NodeLocked, setup_logging
    from halb.node_restart import ReadyReport
    from halb.takeover import TakeoverError

    try:
        cfg = load_config(config_path)
        setup_logging(cfg.node_id, cfg.log_level)
        from halb.dataplane.fdlimit import raise_nofile

        raise_nofile(f"node {cfg.node_id}")  # before any socket: every proxied connection needs two fds
        node_obj = Node(cfg, insecure_dev=insecure_dev, takeover=takeover, ready_fd=ready_fd)
    except (ConfigError, InsecureConfig) as exc:  # includes health-check tables
        ReadyReport(ready_fd).fail(f"config error: {exc}")
        click.echo(f"halb: config error: {exc}", err=True)
        sys.exit(2)
    from halb.aio import run as run_loop

    try:
        run_loop(node_obj.run())
    except TakeoverError as exc:
        click.echo(f"halb: takeover of node {cfg.node_id} failed: {exc}", err=True)
        sys.exit(1)
    except NodeLocked as exc:
        click.echo(f"halb: node {cfg.node_id}: {exc}", err=True)
        sys.exit(1)
    except OSError as exc:
        click.echo(f"halb: node {cfg.node_id} failed to start: {exc}", err=True)
        sys.exit(1)
    sys.exit(node_obj.exit_code)


@node.command("reload")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False),
              help="Node TOML config file (the same the running node was started with).")
@click.option("--timeout", default=90.0, show_default=True, type=float,
              help="Give up waiting for the new process after this many seconds.")
def reload(config_path: str, timeout: float) -> None:
    """Hot restart: start `halb node run --config FILE --takeover` in the background and wait
    until it serves (exit 0) or failed (exit 1, the old process still serves). systemd's
    ExecReload runs this (docs/deploy.md)."""
    from halb.node_reload import reload_node

    code, message = reload_node(config_path, timeout)
    click.echo(message, err=code != 0)
    sys.exit(code)


@node.command("systemd-unit")
@click.option("--venv", default="/opt/halb/venv", show_default=True,
              help="The venv halb is installed in (ExecStart runs VENV/bin/halb).")
@click.option("--config-dir", default="/etc/halb", show_default=True,
              help="Where the node bundles are: instance n1 runs CONFIG_DIR/n1/node.toml.")
@click.option("--user", default="halb", show_default=True, help="The system user the node runs as.")
@click.option("--watchdog-sec", default=10, show_default=True, type=int,
              help="systemd kills and restarts a node whose event loop did not ping for this long.")
def systemd_unit(venv: str, config_dir: str, user: str, watchdog_sec: int) -> None:
    """Print the systemd unit halb-node@.service (Type=notify with a watchdog; docs/deploy.md)."""
    from halb.systemd_unit import UnitOptions, render_unit

    try:
        click.echo(render_unit(UnitOptions(venv=venv.rstrip("/") or "/", config_dir=config_dir.rstrip("/") or "/",
                                           user=user, watchdog_sec=watchdog_sec)), nl=False)
    except ValueError as exc:
        click.echo(f"halb: {exc}", err=True)
        sys.exit(2)


@node.command("drain")
@click.argument("node_id")
@click.option("--undo", is_flag=True, help="Announce again (end the drain).")
@json_option
@click.pass_context
@api_command
def drain(ctx: click.Context, node_id: str, undo: bool, as_json: bool) -> None:
    """BGP mode: take NODE_ID out of service for planned work. Its client connections end
    first (keep-alive closed, new SYNs silently dropped: clients retry on another balancer),
    at most `drain_grace_s`, then its service addresses are withdrawn from the routers
    (docs/failover.md, "BGP mode"). `--undo` reverses every step and announces again."""
    client = client_from(ctx)
    members = {m["id"]: m for m in client.get("/v1/members")["members"]}
    member = members.get(node_id)
    if member is None or not member.get("api"):
        raise ApiError(404, "not_found", f"no member {node_id!r} with an admin API address "
                                         f"(members: {', '.join(sorted(members)) or 'none'})")
    res = client.post("/v1/announce/drain", {"drain": not undo}, node=member["api"])
    if wants_json(ctx, as_json):
        emit_json(res)
        return
    if undo:
        click.echo(f"{node_id}: accepting clients and announcing again")
        return
    d = res.get("drain") or {}
    left = d.get("connections_left", 0)
    click.echo(f"{node_id}: drained: its service addresses are withdrawn"
               + (f" after {d['waited_s']:.3f}s" if "waited_s" in d else "")
               + (f"; {left} client connection(s) were still open at drain_grace_s {d.get('grace_s')}s "
                  f"(the routers moved them)" if left else "; every client connection had ended"))

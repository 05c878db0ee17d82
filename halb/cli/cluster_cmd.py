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
    if not config_paths(d):
        init_cluster_dir(d)
        click.echo(f"initialised a new three-node cluster in {d}")
    ensure_secrets(d)
    try:
        cfgs = [load_config(p) for p in config_paths(d)]
    except ConfigError as exc:
        click.echo(f"halb: config error: {exc}", err=True)
        sys.exit(2)
    taken = taken_addresses(wanted_addresses(cfgs, backends))
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
    write_env(d, [c.api.bind for c in cfgs])
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
            for child in demo_backend_children(cfgs, d, logs):
                sup.start(child)
                click.echo(f"started backend {child.name.removeprefix('backend-')} (pid {child.pid}) on "
                           f"{child.argv[child.argv.index('--listen') + 1]}")
        for cfg in cfgs:
            argv = halb_argv("node", "run", "--config", str(cfg.path)) + (["--insecure-dev"] if insecure_dev else [])
            child = sup.start(Child(cfg.node_id, argv, logs / f"{cfg.node_id}.log"))
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
        print_next_steps(d, st)
        click.echo("press Ctrl-C to stop every process started here"
                   + (" (a process that dies is restarted)" if restart else ""))
        while not stopping:
            sup.poll()
            time.sleep(0.2)
    finally:
        click.echo("stopping every process started here ...")
        sup.stop_all()
        click.echo("stopped")


def wanted_addresses(cfgs: list[Any], backends: bool) -> list[tuple[str, str]]:
    """Every address `cluster up` will listen on: each node's API, Raft and services (own
    and shared host), and the demo backends."""
    from halb.model import parse_hostport

    out: list[tuple[str, str]] = []
    for cfg in cfgs:
        out += [(f"{cfg.node_id} api", cfg.api.bind), (f"{cfg.node_id} raft", cfg.raft.bind)]
        for svc in cfg.services:
            host, port = parse_hostport(svc.listen)
            out.append((f"{cfg.node_id} service {svc.name}", f"{cfg.dataplane.listen_host or host}:{port}"))
            out += [(f"shared address of {svc.name}", f"{h}:{port}") for h in cfg.dataplane.shared_hosts]
    if backends and cfgs:
        out += [(f"backend {be.name}", be.address) for svc in cfgs[0].services for be in svc.backends]
    seen: set[str] = set()
    return [(w, a) for w, a in out if not (a in seen or seen.add(a))]


def print_next_steps(d: Path, st: dict[str, Any]) -> None:
    """Commands that work as printed: cluster.env also puts this halb on PATH."""
    click.echo(f"control the cluster from another shell:  . {d}/cluster.env && halb cluster status")
    for svc in st.get("services", []):
        if svc["mode"] != "http" or not svc.get("listen"):
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


def demo_backend_children(cfgs: list[Any], d: Path, logs: Path) -> list[Child]:
    """One checkout backend per distinct seeded backend address (the shop's servers)."""
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
            children.append(Child(f"backend-{be.name}", argv, logs / f"backend-{be.name}.log"))
    return children

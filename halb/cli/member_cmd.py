"""`halb member list|add|remove`: the balancer nodes in the Raft configuration."""
from __future__ import annotations

import click

from halb.cli.common import api_command, client_from, emit_json, json_option, table, wants_json


@click.group()
def member() -> None:
    """Manage the balancer nodes (one Raft membership change at a time)."""


@member.command("list")
@json_option
@click.pass_context
@api_command
def list_(ctx: click.Context, as_json: bool) -> None:
    """Members with their Raft and API addresses and state."""
    st = client_from(ctx).cluster_status()
    if wants_json(ctx, as_json):
        emit_json(st["members"])
        return
    click.echo(table([(m.get("id"), m.get("raft_state"), m.get("raft"), m.get("api"),
                       "yes" if m.get("in_raft_config") else "no") for m in st["members"]],
                     ["MEMBER", "RAFT STATE", "RAFT", "API", "VOTER"]))


@member.command("add")
@click.argument("node_id")
@click.option("--raft", "raft", required=True, help="The new node's Raft address HOST:PORT.")
@click.option("--api", "api", required=True, help="The new node's admin API address HOST:PORT.")
@click.option("--write-config", "write_config", type=click.Path(dir_okay=False), default=None,
              help="Also write the new node's config file here (peers = the current members).")
@click.option("--like", "like", type=click.Path(dir_okay=False, exists=True), default=None,
              help="With --write-config: an existing node's config to take secret, token and data plane settings from.")
@json_option
@click.pass_context
@api_command
def add(ctx: click.Context, node_id: str, raft: str, api: str, write_config: str | None, like: str | None,
        as_json: bool) -> None:
    """Add NODE_ID to the Raft configuration; then start it with the printed peers.

    With --write-config FILE (and --like an existing node's config) the new node's config
    is written for you: `halb node run --config FILE` then starts it."""
    import sys
    from pathlib import Path

    from halb.config import ConfigError, load_config
    from halb.demo.launcher import member_config_text

    out = Path(write_config) if write_config else None
    if out is not None and out.exists():
        click.echo(f"halb: {out} exists; not overwriting it (nothing was changed)", err=True)
        sys.exit(2)
    try:
        template = load_config(like) if like else None
    except ConfigError as exc:
        click.echo(f"halb: --like: {exc}", err=True)
        sys.exit(2)
    res = client_from(ctx).post("/v1/members", {"id": node_id, "raft": raft, "api": api})
    if out is not None:
        out.write_text(member_config_text(node_id, raft, api, res.get("start_with_peers") or [], out, template))
        res["config_written"] = str(out)
    if wants_json(ctx, as_json):
        emit_json(res)
        return
    click.echo(f"added member {node_id} (raft {raft}, api {api})")
    if out is not None:
        click.echo(f"wrote its config to {out}; start it with:  halb node run --config {out}")
    else:
        click.echo(f"now start it with [raft] peers = {res.get('start_with_peers')} "
                   "(or add again with --write-config FILE --like EXISTING.toml to have the config written)")


@member.command("remove")
@click.argument("node_id")
@json_option
@click.pass_context
@api_command
def remove(ctx: click.Context, node_id: str, as_json: bool) -> None:
    """Remove NODE_ID (leadership moves away first if it leads); the node is told to stop."""
    res = client_from(ctx).delete(f"/v1/members/{node_id}")
    if wants_json(ctx, as_json):
        emit_json(res)
        return
    moved = res.get("leadership_transferred")
    if moved:
        click.echo(f"leadership moved {moved.get('from')} -> {moved.get('to')} first")
    click.echo(f"removed member {node_id}; told to stop: {'yes' if res.get('told_to_stop') else 'no (stop it yourself)'}")

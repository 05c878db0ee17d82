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
@json_option
@click.pass_context
@api_command
def add(ctx: click.Context, node_id: str, raft: str, api: str, as_json: bool) -> None:
    """Add NODE_ID to the Raft configuration; then start it with the printed peers."""
    res = client_from(ctx).post("/v1/members", {"id": node_id, "raft": raft, "api": api})
    if wants_json(ctx, as_json):
        emit_json(res)
        return
    click.echo(f"added member {node_id} (raft {raft}, api {api})")
    click.echo(f"now start it with [raft] peers = {res.get('start_with_peers')}")


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

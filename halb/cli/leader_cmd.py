"""`halb leader transfer [--to NODE]`."""
from __future__ import annotations

import click

from halb.cli.common import api_command, client_from, emit_json, json_option, wants_json


@click.group()
def leader() -> None:
    """Leadership operations."""


@leader.command("transfer")
@click.option("--to", "target", default=None, help="Node id to hand leadership to (default: best follower).")
@json_option
@click.pass_context
@api_command
def transfer(ctx: click.Context, target: str | None, as_json: bool) -> None:
    """Hand leadership over to another node (planned maintenance)."""
    res = client_from(ctx).post("/v1/leader/transfer", {"to": target})
    if wants_json(ctx, as_json):
        emit_json(res)
    elif res.get("changed"):
        click.echo(f"leadership moved {res.get('from')} -> {res.get('to')} in {res.get('took_ms')} ms")
    else:
        click.echo(f"{res.get('to')} already leads")

"""`halb token add|list|revoke`: named API tokens with a role (read, operator, admin).

`add` prints the new token once on stdout (and only the token, so `> file` keeps it); the
cluster stores only its hash, so a lost token cannot be shown again: revoke and add.
"""
from __future__ import annotations

import datetime
from urllib.parse import quote

import click

from halb.cli.common import api_command, client_from, emit_json, json_option, table, wants_json
from halb.tokens import ROLES


@click.group()
def token() -> None:
    """Manage named API tokens and their roles (admin only)."""


@token.command("add")
@click.argument("name")
@click.option("--role", type=click.Choice(ROLES), required=True,
              help="read: look only; operator: also drain/maint/enable/weight/limits; admin: everything.")
@json_option
@click.pass_context
@api_command
def add(ctx: click.Context, name: str, role: str, as_json: bool) -> None:
    """Create token NAME with ROLE and print it once."""
    res = client_from(ctx).post("/v1/tokens", {"name": name, "role": role})
    if wants_json(ctx, as_json):
        emit_json({"name": name, "role": role, "token": res["secret"]})
        return
    click.echo(res["secret"])
    click.echo(f"token {name!r} ({role}) added; this is the only time it is shown: store it now "
               f"(e.g. in a file for HALB_TOKEN_FILE, mode 0600)", err=True)


@token.command("list")
@json_option
@click.pass_context
@api_command
def list_(ctx: click.Context, as_json: bool) -> None:
    """Token names, roles and who added them (never the tokens)."""
    rows = client_from(ctx).get("/v1/tokens")["tokens"]
    if wants_json(ctx, as_json):
        emit_json(rows)
        return

    def when(at: float | None) -> str | None:
        return datetime.datetime.fromtimestamp(at).strftime("%Y-%m-%d %H:%M:%S") if at else None

    click.echo(table([(r["name"], r["role"], r["source"], when(r.get("at")), r.get("by")) for r in rows],
                     ["NAME", "ROLE", "SOURCE", "ADDED", "BY"]))


@token.command("revoke")
@click.argument("name")
@json_option
@click.pass_context
@api_command
def revoke(ctx: click.Context, name: str, as_json: bool) -> None:
    """Revoke token NAME: every node refuses it once the revoke has applied there."""
    res = client_from(ctx).delete(f"/v1/tokens/{quote(name, safe='')}")
    if wants_json(ctx, as_json):
        emit_json(res)
        return
    click.echo(f"revoked token {name}")

"""`halb cert add|list|remove`: TLS certificates kept in the cluster's replicated state.

`add` reads the chain and key files here and sends them once over the admin API; the node
checks the pair, encrypts the key with the cluster secret and stores only that. Nothing
this command prints contains key material.
"""
from __future__ import annotations

import datetime
from pathlib import Path
from urllib.parse import quote

import click

from halb.cli.common import EXIT_USAGE, api_command, client_from, emit_json, json_option, table, wants_json


def _read(path: str, what: str) -> str:
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        click.echo(f"halb: cannot read the {what} file {path}: {exc}", err=True)
        raise SystemExit(EXIT_USAGE) from None


def _date(ts: float | None) -> str | None:
    if not ts:
        return None
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


@click.group()
def cert() -> None:
    """TLS certificates every node loads from the cluster state."""


@cert.command("add")
@click.argument("name")
@click.option("--cert", "cert_file", required=True, type=click.Path(dir_okay=False),
              help="PEM file with the certificate and its chain (leaf first or anywhere).")
@click.option("--key", "key_file", required=True, type=click.Path(dir_okay=False),
              help="PEM file with the unencrypted private key (RSA >= 2048 or ECDSA P-256/P-384).")
@click.option("--replace", is_flag=True, help="Replace an existing certificate of this name.")
@json_option
@click.pass_context
@api_command
def add(ctx: click.Context, name: str, cert_file: str, key_file: str, replace: bool, as_json: bool) -> None:
    """Store certificate NAME: checked, key encrypted, served by every node."""
    body = {"name": name, "cert": _read(cert_file, "certificate"), "key": _read(key_file, "key"), "replace": replace}
    res = client_from(ctx).post("/v1/certs", body)
    if wants_json(ctx, as_json):
        emit_json(res["cert"])
        return
    c = res["cert"]
    click.echo(f"certificate {name} stored: {', '.join(c['sans'])}; valid until {_date(c['not_after'])}")


@cert.command("list")
@json_option
@click.pass_context
@api_command
def list_(ctx: click.Context, as_json: bool) -> None:
    """Certificates with their names (SANs), expiry and source (file or acme)."""
    rows = client_from(ctx).get("/v1/certs")["certs"]
    if wants_json(ctx, as_json):
        emit_json(rows)
        return
    click.echo(table([(r["name"], ", ".join(r["sans"]), _date(r["not_after"]), r["source"], r.get("key_type"))
                      for r in rows], ["NAME", "SANS", "NOT AFTER", "SOURCE", "KEY"]))


@cert.command("remove")
@click.argument("name")
@json_option
@click.pass_context
@api_command
def remove(ctx: click.Context, name: str, as_json: bool) -> None:
    """Remove certificate NAME from the cluster."""
    res = client_from(ctx).delete(f"/v1/certs/{quote(name, safe='')}")
    if wants_json(ctx, as_json):
        emit_json(res["cert"])
        return
    click.echo(f"removed certificate {name}")

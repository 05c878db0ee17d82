"""`halb cert add|list|remove`: TLS certificates kept in the cluster's replicated state.

`add` reads the chain and key files here and sends them once over the admin API; the node
checks the pair, encrypts the key with the cluster secret and stores only that. Nothing
this command prints contains key material.
"""
from __future__ import annotations

import datetime
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import click

from halb.api.client import Client
from halb.cli.common import EXIT_REFUSED, EXIT_UNAVAILABLE, EXIT_USAGE, api_command, client_from, emit_json, \
    json_option, table, wants_json


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
    def acme_state(r: dict[str, Any]) -> str | None:
        a = r.get("acme")
        if not a:
            return None
        nxt = f"next {_date(a['next_run'])}" if a["next_run"] > time.time() else "due now"
        return f"{a['status']}, {nxt}" + (f": {a['last_error'][:60]}" if a.get("last_error") else "")

    click.echo(table([(r["name"], ", ".join(r["sans"]), _date(r["not_after"]), r["source"], r.get("key_type"),
                       acme_state(r)) for r in rows], ["NAME", "SANS", "NOT AFTER", "SOURCE", "KEY", "ACME"]))


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


def _row(client: Client, name: str) -> dict[str, Any] | None:
    return next((r for r in client.get("/v1/certs")["certs"] if r["name"] == name), None)


def _wait_issued(client: Client, name: str, before: dict[str, Any] | None, timeout: float, quiet: bool) -> dict[str, Any]:
    """Poll until NAME has a new ACME certificate (exit 0), its order failed once more
    (exit 1 with the CA's reason; the old certificate keeps serving) or `timeout` (exit 4)."""
    old_fp = (before or {}).get("fingerprint")
    old_failures = ((before or {}).get("acme") or {}).get("failures", 0)
    started = time.monotonic()
    said = 0.0
    while True:
        row = _row(client, name)
        acme = (row or {}).get("acme") or {}
        if row is not None and row.get("fingerprint") and row["fingerprint"] != old_fp and row["source"] == "acme":
            return row
        if acme.get("failures", 0) > old_failures:
            click.echo(f"halb: the ACME order for {name} failed: {acme.get('last_error')}", err=True)
            raise SystemExit(EXIT_REFUSED)
        waited = time.monotonic() - started
        if waited > timeout:
            click.echo(f"halb: no certificate for {name} after {timeout:g}s; the leader keeps trying "
                       "(`halb cert list`, `halb events`)", err=True)
            raise SystemExit(EXIT_UNAVAILABLE)
        if not quiet and waited - said >= 5:
            said = waited
            click.echo(f"waiting for the leader's ACME order for {name} ({waited:.0f}s) ...", err=True)
        time.sleep(0.5)


@cert.command("acme")
@click.argument("name")
@click.option("--domain", "domains", multiple=True, required=True, help="DNS name to certify (repeat for more).")
@click.option("--directory", required=True, help="The ACME directory URL (https://...).")
@click.option("--ca-bundle", type=click.Path(dir_okay=False), help="PEM CA bundle to trust for the directory.")
@click.option("--email", default="", help="Contact address for the ACME account.")
@click.option("--wait/--no-wait", default=True, show_default=True, help="Wait until the certificate is issued.")
@click.option("--timeout", default=300.0, show_default=True, help="Seconds to wait with --wait.")
@json_option
@click.pass_context
@api_command
def acme(ctx: click.Context, name: str, domains: tuple[str, ...], directory: str, ca_bundle: str | None, email: str,
         wait: bool, timeout: float, as_json: bool) -> None:
    """Have the cluster order certificate NAME over ACME (HTTP-01) and renew it.

    The leader orders it; every node answers the CA's HTTP-01 validation on its HTTP
    listeners, so DOMAIN may point at any balancer (or the VIP). Renewed at two thirds of
    its lifetime; a failed order or renewal is an event and the old certificate keeps serving.
    """
    client = client_from(ctx)
    body: dict[str, Any] = {"name": name, "domains": list(domains), "directory": directory, "email": email}
    if ca_bundle:
        body["ca_bundle"] = _read(ca_bundle, "CA bundle")
    _order_and_report(ctx, client, name, "/v1/certs/acme", body, wait, timeout, as_json,
                      f"ACME order for {name} requested; the leader orders it now (`halb cert list`)",
                      lambda row: f"certificate {name} issued: {', '.join(row['sans'])}; "
                                  f"valid until {_date(row['not_after'])}")


@cert.command("renew")
@click.argument("name")
@click.option("--wait/--no-wait", default=True, show_default=True, help="Wait until the new certificate is stored.")
@click.option("--timeout", default=300.0, show_default=True, help="Seconds to wait with --wait.")
@json_option
@click.pass_context
@api_command
def renew(ctx: click.Context, name: str, wait: bool, timeout: float, as_json: bool) -> None:
    """Renew ACME certificate NAME now (instead of at two thirds of its lifetime)."""
    client = client_from(ctx)
    _order_and_report(ctx, client, name, f"/v1/certs/{quote(name, safe='')}/renew", {}, wait, timeout, as_json,
                      f"renewal of {name} requested",
                      lambda row: f"certificate {name} renewed; valid until {_date(row['not_after'])}")


def _order_and_report(ctx: click.Context, client: Client, name: str, path: str, body: dict[str, Any], wait: bool,
                      timeout: float, as_json: bool, requested: str, done: Any) -> None:
    """POST the order or renewal, then (with --wait) wait for its certificate and report."""
    before = _row(client, name)
    res = client.post(path, body)
    if not wait:
        if wants_json(ctx, as_json):
            emit_json(res["order"])
        else:
            click.echo(requested)
        return
    row = _wait_issued(client, name, before, timeout, wants_json(ctx, as_json))
    if wants_json(ctx, as_json):
        emit_json(row)
    else:
        click.echo(done(row))

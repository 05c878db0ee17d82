"""`halb backend list|add|remove|drain|maint|enable|weight|set`."""
from __future__ import annotations

import time

import click

from halb.cli.common import api_command, client_from, emit_json, json_option, resolve_service, table, wants_json
from halb.model import ModelError, parse_hostport

service_option = click.option("--service", "-s", default=None,
                              help="Service name (may be left out when the cluster has one service).")


@click.group()
def backend() -> None:
    """Manage a service's backends (the servers behind it)."""


def _path(svc: str, name: str = "") -> str:
    return f"/v1/services/{svc}/backends" + (f"/{name}" if name else "")


@backend.command("list")
@service_option
@json_option
@click.pass_context
@api_command
def list_(ctx: click.Context, service: str | None, as_json: bool) -> None:
    """List backends with their admin state, weight and health."""
    client = client_from(ctx)
    rows = client.get(_path(service) if service else "/v1/backends")["backends"]
    if wants_json(ctx, as_json):
        emit_json(rows)
        return
    click.echo(table(
        [(r["service"], r["name"], r["address"], r.get("server"), r.get("zone") or "-", r["weight"], r["admin_state"],
          _verdict(r), ",".join(f"{n}={o}" for n, o in sorted(r.get("observations", {}).items())) or "-",
          r.get("in_flight", "-"), _local_error(r)) for r in rows],
        ["SERVICE", "NAME", "ADDRESS", "SERVER", "ZONE", "WEIGHT", "ADMIN", "VERDICT", "OBSERVATIONS", "IN-FLIGHT",
         "LAST CHECK ERROR (this node)"],
    ))


def _verdict(r: dict) -> str:
    if r.get("verdict") == "pending":  # no majority has reported a check yet: no age to show
        return "pending"
    since = r.get("verdict_since")
    ago = f" {max(0, time.time() - since):.0f}s" if since else ""
    if r.get("verdict") == "held" and r.get("hold_until"):
        return f"held (until +{max(0, r['hold_until'] - time.time()):.0f}s)"
    return f"{r.get('verdict', '-')}{ago}"


def _local_error(r: dict) -> str:
    local = r.get("local") or {}
    return local.get("last_error") or "-"


@backend.command("add")
@service_option
@click.argument("name")
@click.argument("address")
@click.option("--weight", default=100, show_default=True, type=click.IntRange(0, 10000))
@click.option("--server", default="", help="Failure domain (host) the instance runs on; default: its address.")
@click.option("--zone", default="", help="Zone (larger failure domain) the server is in; optional.")
@click.option("--max-rps", type=click.FloatRange(min=0), default=0.0,
              help="Requests per second this instance can take (0: no limit); enforced, and read by the N+1 check.")
@click.option("--max-conns", type=click.IntRange(min=0), default=0,
              help="Concurrent requests/connections this instance can take (0: no limit); enforced.")
@json_option
@click.pass_context
@api_command
def add(ctx: click.Context, service: str | None, name: str, address: str, weight: int, server: str,
        zone: str, max_rps: float, max_conns: int, as_json: bool) -> None:
    """Add backend NAME at HOST:PORT."""
    try:
        parse_hostport(address)
    except ModelError as exc:
        raise click.BadParameter(str(exc), param_hint="ADDRESS") from None
    client = client_from(ctx)
    svc = resolve_service(client, service)
    body = {"name": name, "address": address, "weight": weight, "server": server, "zone": zone}
    if max_rps:
        body["max_rps"] = max_rps
    if max_conns:
        body["max_conns"] = max_conns
    res = client.post(_path(svc), body)
    if wants_json(ctx, as_json):
        emit_json(res)
    else:
        be = res.get("backend", {})
        click.echo(f"added backend {svc}/{name} at {address} (weight {weight}, server {be.get('server', server)})")


@backend.command("remove")
@service_option
@click.argument("name")
@json_option
@click.pass_context
@api_command
def remove(ctx: click.Context, service: str | None, name: str, as_json: bool) -> None:
    """Remove backend NAME (drain it first to let in-flight requests finish)."""
    client = client_from(ctx)
    svc = resolve_service(client, service)
    res = client.delete(_path(svc, name))
    emit_json(res) if wants_json(ctx, as_json) else click.echo(f"removed backend {svc}/{name}")


def _state_command(action: str, help_text: str) -> click.Command:
    @click.command(action, help=help_text)
    @service_option
    @click.argument("name")
    @json_option
    @click.pass_context
    @api_command
    def cmd(ctx: click.Context, service: str | None, name: str, as_json: bool) -> None:
        client = client_from(ctx)
        svc = resolve_service(client, service)
        res = client.post(f"{_path(svc, name)}/{action}")
        if wants_json(ctx, as_json):
            emit_json(res)
        else:
            click.echo(f"backend {svc}/{name}: {res['backend']['admin_state']}")

    return cmd


backend.add_command(_state_command("drain", "Stop new requests to NAME; in-flight ones finish."))
backend.add_command(_state_command("maint", "Take NAME out of rotation (maintenance)."))
backend.add_command(_state_command("enable", "Put NAME back into rotation."))


@backend.command("weight")
@service_option
@click.argument("name")
@click.argument("weight", type=click.IntRange(0, 10000))
@json_option
@click.pass_context
@api_command
def weight(ctx: click.Context, service: str | None, name: str, weight: int, as_json: bool) -> None:
    """Set NAME's weight (0-10000; 0 takes it out of new selections)."""
    client = client_from(ctx)
    svc = resolve_service(client, service)
    res = client.put(f"{_path(svc, name)}/weight", {"weight": weight})
    emit_json(res) if wants_json(ctx, as_json) else click.echo(f"backend {svc}/{name}: weight {weight}")


@backend.command("set")
@service_option
@click.argument("name")
@click.option("--max-conns", type=click.IntRange(min=0), default=None,
              help="At most this many requests (HTTP) / connections (TCP) in flight to NAME; 0: no limit.")
@click.option("--max-rps", type=click.FloatRange(min=0), default=None,
              help="At most this many new requests/connections per second to NAME; 0: no limit.")
@json_option
@click.pass_context
@api_command
def set_(ctx: click.Context, service: str | None, name: str, max_conns: int | None, max_rps: float | None,
         as_json: bool) -> None:
    """Change NAME's capacity limits live (the data plane enforces them at once)."""
    if max_conns is None and max_rps is None:
        raise click.UsageError("give --max-conns, --max-rps or both")
    body: dict[str, int | float] = {}
    if max_conns is not None:
        body["max_conns"] = max_conns
    if max_rps is not None:
        body["max_rps"] = max_rps
    client = client_from(ctx)
    svc = resolve_service(client, service)
    res = client.put(f"{_path(svc, name)}/limits", body)
    if wants_json(ctx, as_json):
        emit_json(res)
        return
    be = res.get("backend", {})
    click.echo(f"backend {svc}/{name}: max_conns {be.get('max_conns') or 'unlimited'}, "
               f"max_rps {be.get('max_rps') or 'unlimited'}")

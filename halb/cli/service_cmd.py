"""`halb service list|status`: services and whether they survive losing a server.

The report itself is computed by the node (`halb/resilience.py`, load summed over the
members); the CLI only asks and prints, so every client sees the same answer.
"""
from __future__ import annotations

import sys
from typing import Any

import click

from halb.cli.common import api_command, client_from, emit_json, json_option, resolve_service, table, wants_json

STATUS_TEXT = {"ok": "ok", "at_risk": "AT RISK", "down": "DOWN"}


@click.group()
def service() -> None:
    """Services: listeners, algorithms and resilience to losing a server or zone."""


def _yes_no(value: bool | None) -> str:
    return "unknown" if value is None else ("yes" if value else "NO")


@service.command("list")
@json_option
@click.pass_context
@api_command
def list_(ctx: click.Context, as_json: bool) -> None:
    """Services with their resilience status; services at risk first."""
    client = client_from(ctx)
    services = {s["name"]: s for s in client.get("/v1/services")["services"]}
    reports = client.get("/v1/resilience")["resilience"]
    rank = {"down": 0, "at_risk": 1}
    reports.sort(key=lambda r: (rank.get(r["status"], 2), r["service"]))
    if wants_json(ctx, as_json):
        emit_json([{**services.get(r["service"], {}), "resilience": r} for r in reports])
        return
    rows = []
    for r in reports:
        s = services.get(r["service"], {})
        rows.append((r["service"], s.get("mode"), s.get("algorithm"), f"{r['healthy_instances']}/{r['instances']}",
                     len(r["servers_healthy"]), _yes_no(r["survives_server_loss"]), _yes_no(r["n_plus_one"]),
                     STATUS_TEXT.get(r["status"], r["status"])))
    click.echo(table(rows, ["SERVICE", "MODE", "ALGORITHM", "HEALTHY", "SERVERS", "SURVIVES SERVER LOSS", "N+1",
                            "STATUS"]))
    for r in reports:
        for w in r["warnings"]:
            if r["status"] != "ok":
                click.echo(f"WARNING: {w}")


def print_report(r: dict[str, Any], backends: list[dict[str, Any]], queue: dict[str, Any] | None = None) -> None:
    click.echo(f"service {r['service']}: {STATUS_TEXT.get(r['status'], r['status'])}")
    click.echo(f"  healthy instances: {r['healthy_instances']} of {r['instances']}")
    per = r["instances_per_server"]
    spans = ", ".join(f"{s} ({per[s]})" for s in r["servers_healthy"]) or "none"
    click.echo(f"  servers with healthy instances: {len(r['servers_healthy'])} of {len(r['servers'])}: {spans}")
    if r["servers_down"]:
        click.echo(f"  servers taking no new requests (down, drained or in maintenance): {', '.join(r['servers_down'])}")
    if r["zones_healthy"] is not None:
        click.echo(f"  zones with healthy instances: {len(r['zones_healthy'])}: {', '.join(r['zones_healthy'])}")
    click.echo(f"  survives losing any one server: {_yes_no(r['survives_server_loss'])}")
    click.echo(f"  survives losing any one zone:   {_yes_no(r['survives_zone_loss'])}"
               + ("" if r["zones_healthy"] is not None else " (zones not declared for every healthy instance)"))
    if r["capacity"]:
        for c in r["capacity"]:
            unit = "rps" if c["dimension"] == "rps" else "connections"
            click.echo(f"  N+1 ({unit}): {'yes' if c['ok'] else 'NO'}: load {c['load']:g}, capacity {c['capacity']:g}, "
                       f"{c['remaining']:g} left if server {c['worst_server']} dies")
    else:
        click.echo("  N+1: unknown (declare max_rps or max_conns on every instance)")
    if r.get("server_loss"):
        click.echo("  if one server fails (its load on the others, against their capacity):")
        for x in r["server_loss"]:
            click.echo(f"    server {x['server']}: {x['answer']}: {x['detail']}")
    src = r.get("load") or {}
    if src:
        extra = f"; unreachable: {', '.join(src['unreachable'])}" if src.get("unreachable") else ""
        window = f"{src['window_s']:g} s window, " if src.get("window_s") is not None else ""
        click.echo(f"  load: {r.get('rps', 0):g} rps, {r.get('conns', 0)} in flight; summed over "
                   f"{', '.join(src.get('nodes', [])) or 'no node'} ({window}{src.get('age_s')} s old{extra})")
    if queue is not None:
        print_queue(queue)
    if backends:
        click.echo("")
        click.echo(table(
            [(b["server"], b.get("zone") or "-", b["name"], b["address"], b["admin_state"], b["verdict"],
              b.get("max_rps") or "-", b.get("max_conns") or "-") for b in sorted(backends, key=lambda b: (b["server"], b["name"]))],
            ["SERVER", "ZONE", "INSTANCE", "ADDRESS", "ADMIN", "VERDICT", "MAX RPS", "MAX CONNS"]))
    for w in r["warnings"]:
        click.echo(f"WARNING: {w}")


def _queue_of(client: Any, svc: str) -> dict[str, Any] | None:
    """The answering node's admission queue for `svc` (None when it does not serve it)."""
    stats = client.get(f"/v1/dataplane?service={svc}")
    one = (stats.get("services") or {}).get(svc)
    if not one or "queue" not in one:
        return None
    return {"node": stats.get("node"), "priority": one.get("priority", "normal"),
            "saturated": one.get("saturated", 0), **one["queue"]}


def print_queue(q: dict[str, Any]) -> None:
    prio = q.get("by_priority") or {}
    avg = q["wait_s_sum"] / q["admitted"] * 1000 if q.get("admitted") else 0.0
    click.echo(f"  queue (node {q['node']}, priority {q['priority']}): {q['length']} waiting "
               f"({', '.join(f'{p} {n}' for p, n in prio.items())}), max_queue {q['max_queue']}, "
               f"queue_timeout {q['timeout_s']:g}s")
    click.echo(f"    since start: {q['admitted']} admitted after waiting (avg {avg:.0f} ms, max "
               f"{q['wait_s_max'] * 1000:.0f} ms); {q['full']} refused (queue full), {q['timed_out']} timed out, "
               f"{q['shed']} shed for higher priority")


@service.command("status")
@click.argument("name", required=False)
@json_option
@click.pass_context
@api_command
def status(ctx: click.Context, name: str | None, as_json: bool) -> None:
    """Resilience report of service NAME (may be left out when there is one service).

    Per server it says whether the others could carry the service if that server
    failed: survives, degraded (sheds low priority) or overloaded.

    Exit code 0 when it survives losing any one server (and capacity suffices, when
    declared); 5 when it is at risk or down (losing some server would overload it); 6
    when it survives every server loss only by shedding a lower-priority service on the
    same servers, so scripts and CI can gate on it.
    """
    client = client_from(ctx)
    svc = resolve_service(client, name)
    r = client.get(f"/v1/services/{svc}/resilience")["resilience"]
    queue = _queue_of(client, svc)
    if wants_json(ctx, as_json):
        emit_json({**r, "queue": queue} if queue is not None else r)
    else:
        backends = client.get(f"/v1/services/{svc}/backends")["backends"]
        print_report(r, backends, queue)
    if r["status"] != "ok":
        sys.exit(5)
    if r.get("server_loss_verdict") == "degraded":
        sys.exit(6)

"""`halb frontend add|list|remove` and `halb route add|remove`: one port, several services.

A frontend is a port every node listens on (at its own listen host), plain or TLS; its
routes pick a service per request by Host (exact or *.suffix) and path prefix, longest
match first, else the frontend's default service (docs/dataplane.md "Frontends and routes").
"""
from __future__ import annotations

from urllib.parse import quote, urlencode

import click

from halb.cli.common import api_command, client_from, emit_json, json_option, table, wants_json


@click.group()
def frontend() -> None:
    """Ports that route requests to services by Host and path (TLS by SNI)."""


@frontend.command("add")
@click.argument("name")
@click.option("--port", type=int, required=True, help="Port every node listens on (at its listen host).")
@click.option("--tls", is_flag=True, help="Terminate TLS with the cluster's certificates (chosen by SNI).")
@click.option("--http-port", type=int, default=0, help="Also serve plain HTTP on this port (TLS frontends).")
@click.option("--redirect-https", is_flag=True, help="--http-port answers 308 to the https:// URL instead.")
@click.option("--accept-proxy", is_flag=True, help="Every connection must start with a PROXY header (v1 or v2): "
              "for a frontend behind another load balancer only; its source address is the client's.")
@click.option("--default-service", default="", help="Service for requests no route matches (else 404).")
@click.option("--default-cert", default="", help="Certificate for clients whose SNI matches none "
              "(default: the oldest certificate).")
@json_option
@click.pass_context
@api_command
def add(ctx: click.Context, name: str, port: int, tls: bool, http_port: int, redirect_https: bool,
        accept_proxy: bool, default_service: str, default_cert: str, as_json: bool) -> None:
    """Add frontend NAME."""
    body = {"name": name, "port": port, "tls": tls, "redirect_https": redirect_https}
    if accept_proxy:
        body["accept_proxy"] = True
    for key, value in (("http_port", http_port), ("default_service", default_service),
                       ("default_cert", default_cert)):
        if value:
            body[key] = value
    res = client_from(ctx).post("/v1/frontends", body)
    if wants_json(ctx, as_json):
        emit_json(res["frontend"])
        return
    extra = f", plain HTTP on {http_port}" + (" (redirects to HTTPS)" if redirect_https else "") if http_port else ""
    extra += ", PROXY header required" if accept_proxy else ""
    click.echo(f"frontend {name} added: {'TLS' if tls else 'HTTP'} on port {port}{extra}")


@frontend.command("list")
@json_option
@click.pass_context
@api_command
def list_(ctx: click.Context, as_json: bool) -> None:
    """Frontends, where each node listens, and their routes."""
    rows = client_from(ctx).get("/v1/frontends")["frontends"]
    if wants_json(ctx, as_json):
        emit_json(rows)
        return
    out = []
    for fe in rows:
        kind = "https" if fe["tls"] else "http"
        out.append((fe["name"], f"{kind}:{fe['port']}" + (f" http:{fe['http_port']}" if fe.get("http_port") else ""),
                    "*", "", fe.get("default_service") or "(404)"))
        for r in fe["routes"]:
            out.append(("", "", r["host"], r["path_prefix"], r["service"]))
    click.echo(table(out, ["FRONTEND", "PORTS", "HOST", "PATH", "SERVICE"]))


@frontend.command("remove")
@click.argument("name")
@json_option
@click.pass_context
@api_command
def remove(ctx: click.Context, name: str, as_json: bool) -> None:
    """Remove frontend NAME and its routes."""
    res = client_from(ctx).delete(f"/v1/frontends/{quote(name, safe='')}")
    if wants_json(ctx, as_json):
        emit_json(res["frontend"])
        return
    click.echo(f"removed frontend {name}")


@click.group()
def route() -> None:
    """Routes of a frontend: Host (exact or *.suffix) and path prefix -> service."""


@route.command("add")
@click.argument("frontend_name", metavar="FRONTEND")
@click.option("--host", required=True, help="shop.example, or *.shop.example for every name under it.")
@click.option("--path-prefix", default="/", show_default=True, help="Raw path prefix (longest match wins).")
@click.option("--service", required=True, help="HTTP service the matching requests go to.")
@json_option
@click.pass_context
@api_command
def route_add(ctx: click.Context, frontend_name: str, host: str, path_prefix: str, service: str,
              as_json: bool) -> None:
    """Send FRONTEND's requests for HOST and PATH_PREFIX to SERVICE."""
    res = client_from(ctx).post(f"/v1/frontends/{quote(frontend_name, safe='')}/routes",
                                {"host": host, "path_prefix": path_prefix, "service": service})
    if wants_json(ctx, as_json):
        emit_json(res["route"])
        return
    r = res["route"]
    click.echo(f"route added: {frontend_name} {r['host']}{r['path_prefix']} -> {r['service']}")


@route.command("remove")
@click.argument("frontend_name", metavar="FRONTEND")
@click.option("--host", required=True)
@click.option("--path-prefix", default="/", show_default=True)
@json_option
@click.pass_context
@api_command
def route_remove(ctx: click.Context, frontend_name: str, host: str, path_prefix: str, as_json: bool) -> None:
    """Remove the route of FRONTEND for HOST and PATH_PREFIX."""
    query = urlencode({"host": host, "path_prefix": path_prefix})
    res = client_from(ctx).delete(f"/v1/frontends/{quote(frontend_name, safe='')}/routes?{query}")
    if wants_json(ctx, as_json):
        emit_json(res["route"])
        return
    click.echo(f"route removed: {frontend_name} {res['route']['host']}{res['route']['path_prefix']}")

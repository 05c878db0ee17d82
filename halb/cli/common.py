"""Shared CLI plumbing: the API client from global options, output, exit codes.

Exit codes scripts can rely on:
  0 success; 1 the cluster refused the request (4xx: invalid, not found, conflict,
  401 unknown token, 403 the token's role does not allow it);
  2 usage or local configuration error (also `halb cluster up` when its addresses are
  taken); 3 no node reachable; 4 no quorum / timeout (5xx);
  5 (`halb service status` only) the service is at risk or down.
"""
from __future__ import annotations

import functools
import json
import sys
from typing import Any, Callable, Sequence

import click

from halb.api.client import ApiError, Client, Unreachable

EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_UNAVAILABLE = 1, 2, 3, 4


def client_from(ctx: click.Context) -> Client:
    o = ctx.find_root().obj
    return Client.from_options(o.get("cluster"), o.get("token_file"), o.get("timeout", 5.0), o.get("ca_file"))


def wants_json(ctx: click.Context, local_flag: bool = False) -> bool:
    return local_flag or bool(ctx.find_root().obj.get("json"))


def api_command(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn ApiError into a one-line message on stderr and a meaningful exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Unreachable as exc:
            click.echo(f"halb: {exc.message}", err=True)
            sys.exit(EXIT_UNREACHABLE)
        except ApiError as exc:
            where = f" (from {exc.node})" if exc.node else ""
            click.echo(f"halb: {exc.code}: {exc.message}{where}", err=True)
            if exc.status == 0:
                sys.exit(EXIT_USAGE)
            sys.exit(EXIT_UNAVAILABLE if exc.status >= 500 else EXIT_REFUSED)

    return wrapper


json_option = click.option("--json", "as_json", is_flag=True, default=False, help="Print JSON for scripts.")


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


def table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    cells = [[("-" if v is None else str(v)) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*headers).rstrip(), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*r).rstrip() for r in cells]
    return "\n".join(lines)


def resolve_service(client: Client, service: str | None) -> str:
    """`--service` may be left out when the cluster has exactly one service."""
    if service:
        return service
    names = [s["name"] for s in client.get("/v1/services")["services"]]
    if len(names) == 1:
        return names[0]
    if not names:
        raise ApiError(404, "not_found", "the cluster has no services")
    raise ApiError(0, "usage", f"several services exist ({', '.join(names)}): pass --service")

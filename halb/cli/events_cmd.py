"""`halb events [--follow]`: the cluster's audit log."""
from __future__ import annotations

import datetime
import time

import click

from halb.cli.common import api_command, client_from, emit_json, json_option, wants_json


def format_event(e: dict) -> str:
    at = datetime.datetime.fromtimestamp(e["at"]).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    return f"{e['seq']:>6}  {at}  {e['kind']:<18} {e['message']}  (by {e['by']} via {e['node']})"


@click.command("events")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new events until Ctrl-C.")
@click.option("--since", default=0, show_default=True, help="Only events after this sequence number.")
@click.option("--limit", default=100, show_default=True)
@json_option
@click.pass_context
@api_command
def events(ctx: click.Context, follow: bool, since: int, limit: int, as_json: bool) -> None:
    """Show the audit log: who changed what, when, through which node."""
    client = client_from(ctx)
    as_json = wants_json(ctx, as_json)
    batch_seen = False
    while True:
        query = f"since={since}&limit={limit}" if since or follow and batch_seen else f"last={limit}"
        batch = client.get(f"/v1/events?{query}")["events"]
        batch_seen = True
        if as_json and not follow:
            emit_json(batch)
            return
        for e in batch:
            click.echo(format_event(e) if not as_json else __import__("json").dumps(e))
            since = max(since, e["seq"])
        if not follow:
            return
        try:
            time.sleep(0.5)
        except KeyboardInterrupt:
            return

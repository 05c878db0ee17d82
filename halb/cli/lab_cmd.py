"""`halb lab up|down|status|exec|partition|heal`: the namespace lab for VIP drills (root)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from halb.lab.topology import DEFAULT_PREFIX, DEFAULT_STATE_DIR, DEFAULT_SUBNET, Lab, LabError


def _lab(ctx: click.Context) -> Lab:
    return ctx.obj["lab"]


def _fail(exc: Exception) -> None:
    click.echo(f"error: {exc}", err=True)
    sys.exit(1)


@click.group()
@click.option("--prefix", default=DEFAULT_PREFIX, show_default=True, envvar="HALB_LAB_PREFIX",
              help="Namespace name prefix (env HALB_LAB_PREFIX).")
@click.option("--subnet", default=DEFAULT_SUBNET, show_default=True,
              help="Private subnet used only inside the namespaces.")
@click.option("--state-dir", default=str(DEFAULT_STATE_DIR), show_default=True,
              type=click.Path(file_okay=False), help="Where the state file is written.")
@click.pass_context
def lab(ctx: click.Context, prefix: str, subnet: str, state_dir: str) -> None:
    """Network-namespace lab: a bridge, 3 balancers, 3 backends, a client (root only)."""
    ctx.ensure_object(dict)
    try:
        ctx.obj["lab"] = Lab(prefix=prefix, subnet=subnet, state_dir=Path(state_dir))
    except LabError as exc:
        _fail(exc)


@lab.command()
@click.pass_context
def up(ctx: click.Context) -> None:
    """Create the namespaces (removing leftovers of an earlier run first)."""
    try:
        state = _lab(ctx).up()
    except LabError as exc:
        _fail(exc)
        return
    if ctx.obj.get("json"):
        click.echo(json.dumps(state, indent=2))
        return
    lab_ = _lab(ctx)
    click.echo(f"lab up: {len(state['namespaces'])} namespaces, VIP {lab_.vip}, "
               f"state {lab_.state_file}")
    for h in lab_.hosts.values():
        click.echo(f"  {h.ns:<20} {h.ip:<15} {h.mac}")


@lab.command()
@click.option("--all", "all_with_prefix", is_flag=True,
              help="Also remove any other namespace starting with the prefix.")
@click.pass_context
def down(ctx: click.Context, all_with_prefix: bool) -> None:
    """Remove the lab's namespaces (idempotent; works after a crash, without state)."""
    try:
        removed = _lab(ctx).down(all_with_prefix=all_with_prefix)
    except LabError as exc:
        _fail(exc)
        return
    if ctx.obj.get("json"):
        click.echo(json.dumps({"removed": removed}))
    else:
        click.echo(f"lab down: removed {len(removed)} namespaces"
                   + (f" ({', '.join(sorted(removed))})" if removed else ""))


@lab.command()
@click.pass_context
def status(ctx: click.Context) -> None:
    """Show which lab namespaces exist and their addresses (exit 3 if not fully up)."""
    st = _lab(ctx).status()
    if ctx.obj.get("json"):
        click.echo(json.dumps(st, indent=2))
    else:
        click.echo(f"lab {st['prefix']!r} subnet {st['subnet']} VIP {st['vip']}: "
                   + ("up" if st["up"] else "not (fully) up"))
        sw = st["switch"]
        click.echo(f"  {sw['ns']:<20} {'present' if sw['exists'] else 'missing'}  (bridge)")
        for h in st["hosts"]:
            addrs = ",".join(h.get("addrs", [])) or "-"
            click.echo(f"  {h['ns']:<20} {'present' if h['exists'] else 'missing':<8} {addrs}")
        if st["other_namespaces_with_prefix"]:
            click.echo("  other namespaces with this prefix: "
                       + ", ".join(st["other_namespaces_with_prefix"]))
    if not st["up"]:
        sys.exit(3)


@lab.command(name="exec", context_settings={"ignore_unknown_options": True})
@click.argument("host")
@click.argument("argv", nargs=-1, required=True, type=click.UNPROCESSED)
@click.pass_context
def exec_(ctx: click.Context, host: str, argv: tuple[str, ...]) -> None:
    """Run a command inside a lab host: `halb lab exec lb1 -- ip addr`."""
    try:
        cmd = _lab(ctx).argv(host, list(argv))
    except LabError as exc:
        _fail(exc)
        return
    os.execvp(cmd[0], cmd)


@lab.command()
@click.argument("host")
@click.argument("peers", nargs=-1, required=True)
@click.pass_context
def partition(ctx: click.Context, host: str, peers: tuple[str, ...]) -> None:
    """Cut HOST off from PEERS (names or IPs) with blackhole routes, both ways."""
    try:
        _lab(ctx).partition(host, peers)
    except LabError as exc:
        _fail(exc)


@lab.command()
@click.argument("host")
@click.argument("peers", nargs=-1)
@click.pass_context
def heal(ctx: click.Context, host: str, peers: tuple[str, ...]) -> None:
    """Remove blackhole routes of HOST (to PEERS, or all of them)."""
    try:
        _lab(ctx).heal(host, list(peers) or None)
    except LabError as exc:
        _fail(exc)

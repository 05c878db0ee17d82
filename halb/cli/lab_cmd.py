"""`halb lab up|down|status|exec|partition|heal`: the namespace lab for VIP drills (root)."""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, ContextManager

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
        ctx.obj["lab"] = Lab.load(prefix=prefix, subnet=subnet, state_dir=Path(state_dir))  # topology from state
    except LabError as exc:
        _fail(exc)


def _run_dir(lab_: Lab) -> Path:
    return lab_.state_dir / f"{lab_.prefix}run"


def _run_drill(lab_: Lab, cluster_kw: dict[str, Any], open_run: Callable[[Any], ContextManager[Any]],
               drive: Callable[[Any, Any], dict[str, Any]]) -> dict[str, Any] | None:
    """Build the lab, start a cluster on it, open the drill (``open_run(cluster)``) and let
    ``drive(run, cluster)`` measure; the cluster is stopped and the namespaces removed
    afterwards, also on failure or SIGTERM. None after a LabError (already reported)."""
    import signal

    from halb.lab.cluster import LabCluster

    def _term(*_: object) -> None:
        raise SystemExit(143)  # run the finally blocks: stop the nodes, remove the namespaces

    signal.signal(signal.SIGTERM, _term)
    run_dir = _run_dir(lab_)
    try:
        lab_.up()
        if run_dir.exists():
            shutil.rmtree(run_dir)
        cluster = LabCluster(lab_, run_dir, **cluster_kw)
        try:
            cluster.start()
            with open_run(cluster) as run:
                return drive(run, cluster)
        finally:
            cluster.stop()
    except LabError as exc:
        _fail(exc)
        return None
    finally:
        lab_.down()


@lab.command()
@click.option("--start", is_flag=True, help="Also start the checkout backends and three halb balancers inside.")
@click.option("--mode", type=click.Choice(["vip", "dns", "bgp"]), default=None,
              help="Announcement mode of the started balancers [default: vip; bgp with --topology bgp].")
@click.option("--topology", type=click.Choice(["flat", "bgp"]), default="flat", show_default=True,
              help="flat: one bridge for all (VIP drills); bgp: a BIRD 2 router (ECMP, BFD) between the "
                   "client and the balancers, which announce the service address.")
@click.option("--ipv6", is_flag=True, help="With --start --mode vip: also announce the IPv6 VIP (service on :8081).")
@click.pass_context
def up(ctx: click.Context, start: bool, mode: str | None, topology: str, ipv6: bool) -> None:
    """Create the namespaces (removing leftovers of an earlier run first)."""
    old = _lab(ctx)
    mode = mode or ("bgp" if topology == "bgp" else "vip")
    try:
        if (mode == "bgp") != (topology == "bgp"):
            raise LabError("--mode bgp and --topology bgp go together")
        old.down()  # whatever topology the last run had
        ctx.obj["lab"] = Lab(prefix=old.prefix, subnet=old.subnet, state_dir=old.state_dir, topology=topology)
        state = _lab(ctx).up()
        if start:
            from halb.lab.cluster import LabCluster

            run_dir = _run_dir(_lab(ctx))
            if run_dir.exists():
                shutil.rmtree(run_dir)
            cluster = LabCluster(_lab(ctx), run_dir, mode=mode, ipv6=ipv6)
            cluster.start()
            state["cluster"] = {"run_dir": str(run_dir), "pids": {k: p.pid for k, p in cluster.procs.items()},
                                "apis": {lb: cluster.api_addr(lb) for lb in cluster.lbs}}
    except LabError as exc:
        _fail(exc)
        return
    if ctx.obj.get("json"):
        click.echo(json.dumps(state, indent=2))
        return
    lab_ = _lab(ctx)
    click.echo(f"lab up ({lab_.topology}): {len(state['namespaces'])} namespaces, "
               + (f"service address {', '.join(lab_.service_addresses)} via router {lab_.hosts['router'].ip}"
                  if lab_.topology == "bgp" else f"VIP {lab_.vip} (IPv6 {lab_.vip6})") + f", state {lab_.state_file}")
    for h in lab_.hosts.values():
        click.echo(f"  {h.ns:<20} {h.ip:<15} {h.ip6:<16} {h.mac}")
    if "cluster" in state:
        cl = state["cluster"]
        click.echo(f"cluster started ({mode}): configs, logs and token in {cl['run_dir']}")
        for k, pid in cl["pids"].items():
            click.echo(f"  {k:<4} pid {pid}")
        target = lab_.service_addresses[0] if lab_.topology == "bgp" else lab_.vip
        click.echo(f"  try: halb lab exec client -- curl -s http://{target}:8080/health   "
                   "(halb lab down stops everything)")
        if ipv6 and mode == "vip":
            click.echo(f"       halb lab exec client -- curl -s 'http://[{lab_.vip6}]:8081/health'")


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
        click.echo(f"lab {st['prefix']!r} ({st['topology']}) subnet {st['subnet']} "
                   + (f"service addresses {', '.join(st['service_addresses'])}: " if st["service_addresses"]
                      else f"VIP {st['vip']}: ")
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


@lab.command()
@click.option("--trials", default=5, show_default=True, type=click.IntRange(1, 1000), help="Trials per fault.")
@click.option("--fault", "faults", multiple=True, default=["kill"], show_default=True,
              type=click.Choice(["kill", "freeze", "partition", "transfer", "dataplane", "drain"]),
              help="Fault to inject into the VIP holder, or in bgp mode into one balancer (repeat for several; "
                   "transfer and dataplane are VIP-only, drain bgp-only). dataplane: the holder's data-plane "
                   "worker processes crash-loop (the balancers then run with 2 data-plane processes).")
@click.option("--mode", type=click.Choice(["vip", "bgp"]), default="vip", show_default=True,
              help="vip: flat lab, one VIP holder; bgp: bgp topology, three balancers announce via BGP/ECMP.")
@click.option("--router-hash", type=click.Choice(["ecmp", "resilient"]), default="ecmp", show_default=True,
              help="bgp mode: the router's multipath: BIRD's classic ECMP route, or mirrored into a Linux "
                   "resilient nexthop group (survivors' flows stay put).")
@click.option("--freeze-s", default=None, type=float,
              help="How long `freeze` keeps the target stopped [default: 5 s vip, 3 s bgp].")
@click.option("--wait-from", type=click.Choice(["last_renewal_seen", "election"]), default=None,
              help="Override the successor-wait rule (docs/failover.md).")
@click.option("--ipv6", is_flag=True, help="Announce an IPv6 VIP too and measure what an IPv6 client sees.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def failover(ctx: click.Context, trials: int, faults: tuple[str, ...], mode: str, router_hash: str,
             freeze_s: float | None, wait_from: str | None, ipv6: bool, as_json: bool) -> None:
    """Measure failover: build the lab, start the cluster, fault the holder (vip) or each balancer
    in turn (bgp) N times, tear down."""
    if mode == "bgp":
        return _failover_bgp(ctx, trials, faults, 3.0 if freeze_s is None else freeze_s, as_json, router_hash)
    if "drain" in faults:
        _fail(LabError("--fault drain needs --mode bgp (VIP mode's planned work is transfer)"))
        return
    freeze_s = 5.0 if freeze_s is None else freeze_s
    from halb.lab.failover import FailoverRun, summary

    lab_ = _lab(ctx)
    as_json = as_json or bool(ctx.obj.get("json"))
    say = (lambda m: click.echo(m, err=True)) if as_json else click.echo
    extra = {"wait_from": wait_from} if wait_from else {}

    def drive(run: FailoverRun, cluster: Any) -> dict[str, Any]:
        for _ in range(trials):
            for fault in faults:
                run.trial(fault)
        return summary(run.trials, run.max_holders_overall())

    # dataplane kills the holder's worker processes: every node runs one besides itself
    result = _run_drill(lab_, dict(announce_extra=extra, ipv6=ipv6, workers=2 if "dataplane" in faults else 1),
                        lambda cluster: FailoverRun(cluster, freeze_s=freeze_s, log=say, ipv6=ipv6), drive)
    if result is None:
        return
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    for f, s in result["by_fault"].items():
        click.echo(f"{f:9s} n={s['n']:3d}  gap p50 {s['p50_gap_s']:.3f}s  p99 {s['p99_gap_s']:.3f}s  "
                   f"max {s['max_gap_s']:.3f}s  VIP moved p50 {s['p50_garp_s']}s")
    click.echo(f"max simultaneous VIP holders: {result['max_holders']}")


def _failover_bgp(ctx: click.Context, trials: int, faults: tuple[str, ...], freeze_s: float, as_json: bool,
                  router_hash: str = "ecmp") -> None:
    from halb.lab.bgp_failover import BgpFailoverRun, bgp_summary

    if "transfer" in faults:
        _fail(LabError("--fault transfer is VIP-only (in bgp mode leadership does not decide who announces)"))
        return
    if "dataplane" in faults:
        _fail(LabError("--fault dataplane is VIP-only (it measures the VIP hand-over; in bgp mode a failing "
                       "self-check withdraws the node's routes, no leadership moves)"))
        return

    old = _lab(ctx)
    old.down()
    lab_ = Lab(prefix=old.prefix, subnet=old.subnet, state_dir=old.state_dir, topology="bgp",
               router_hash=router_hash)
    as_json = as_json or bool(ctx.obj.get("json"))
    say = (lambda m: click.echo(m, err=True)) if as_json else click.echo

    def drive(run: BgpFailoverRun, cluster: Any) -> dict[str, Any]:
        k = 0
        for _ in range(trials):
            for fault in faults:
                run.trial(fault, cluster.lbs[k % len(cluster.lbs)])
                k += 1
        return bgp_summary(run.trials, router_hash)

    result = _run_drill(lab_, dict(mode="bgp"), lambda cluster: BgpFailoverRun(cluster, freeze_s=freeze_s, log=say),
                        drive)
    if result is None:
        return
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    for f, s in result["by_fault"].items():
        click.echo(f"{f:9s} n={s['n']:3d}  gap p50 {s['p50_gap_s']:.3f}s  p99 {s['p99_gap_s']:.3f}s  "
                   f"max {s['max_gap_s']:.3f}s  withdrawn p50 {s['p50_withdrawn_s']}s  "
                   f"failed requests {s['failed_requests']}  "
                   f"survivor resets {s['survivor_resets']}/{s['survivor_flows']}")
    click.echo(f"router hash {router_hash}; spread of new flows before the faults: {result['spread']}")

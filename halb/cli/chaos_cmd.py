"""`halb chaos run DRILL...`: run chaos drills under load and report whether service continued.

Exit codes: 0 every drill's hypothesis held; 1 at least one drill failed; 2 a drill file
or an option is invalid (nothing was run).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click


@click.group()
def chaos() -> None:
    """Chaos drills: kill balancers and servers under load and prove that service continues."""


def _parse_pids(text: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, pid = part.partition("=")
        if not name or not pid.isdigit():
            raise click.BadParameter(f"{part!r}: expected NODE=PID", param_hint="--pids")
        out[name] = int(pid)
    return out


@chaos.command("validate")
@click.argument("drills", nargs=-1, required=True, type=click.Path(dir_okay=False))
def validate(drills: tuple[str, ...]) -> None:
    """Check drill files without running them."""
    from halb.chaos.drill import DrillError, load_drill

    bad = 0
    for path in drills:
        try:
            d = load_drill(path)
            click.echo(f"ok  {path}: {d.title} ({len(d.method)} steps, {len(d.rollbacks)} rollbacks)")
        except DrillError as exc:
            bad += 1
            click.echo(f"halb: invalid drill: {exc}", err=True)
    sys.exit(2 if bad else 0)


@chaos.command("run")
@click.argument("drills", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--cluster", "cluster", default="local", show_default=True,
              help="'local' starts a throwaway three-node cluster per drill; otherwise comma-separated admin "
                   "API addresses of an existing cluster.")
@click.option("--report", "report_dir", default=".halb/chaos-report", show_default=True,
              type=click.Path(file_okay=False), help="Directory for the JSON and HTML reports.")
@click.option("--duration", type=click.FloatRange(1, 3600), default=None,
              help="Seconds of load per drill (at least; default: the drill's `duration`).")
@click.option("--rate", type=click.FloatRange(0.1, 2000), default=None,
              help="Requests per second (default: the drill's load.rate).")
@click.option("--pids", default="", help="Existing cluster only: NODE=PID,... for kill/freeze/resume on this machine.")
@click.option("--db", "db_path", default=None, type=click.Path(dir_okay=False),
              help="Existing cluster only: the shop's SQLite file, for the ledger check.")
@click.option("--keep", is_flag=True, help="Keep the local cluster's directory (configs, logs) after the run.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress line on stderr.")
@click.pass_context
def run(ctx: click.Context, drills: tuple[str, ...], cluster: str, report_dir: str, duration: float | None,
        rate: float | None, pids: str, db_path: str | None, keep: bool, progress: bool) -> None:
    """Run DRILL files (TOML) one after the other and write a report for each."""
    from halb.chaos.drill import DrillError, load_drill

    loaded = []
    errors = []
    for path in drills:
        try:
            loaded.append(load_drill(path))
        except DrillError as exc:
            errors.append(str(exc))
    if errors:
        for e in errors:
            click.echo(f"halb: invalid drill: {e}", err=True)
        sys.exit(2)
    pid_map = _parse_pids(pids)
    token_file = (ctx.find_root().obj or {}).get("token_file")
    out_dir = Path(report_dir)
    try:
        results = asyncio.run(_run_all(loaded, cluster, out_dir, duration, rate, pid_map, db_path, token_file, keep,
                                       progress))
    except (KeyboardInterrupt, asyncio.CancelledError):
        click.echo("\nhalb: interrupted; every process started by this run was stopped", err=True)
        sys.exit(130)
    except _UsageError as exc:
        click.echo(f"halb: {exc}", err=True)
        sys.exit(2)
    failed = [r for r in results if r["result"] != "passed"]
    click.echo(f"\nreport: {out_dir / 'index.html'}")
    for r in results:
        t = r["load"]["total"]
        ledger = r.get("ledger") or {}
        click.echo(f"{r['result'].upper():6}  {r['drill']['slug']:<22} requests {t['requests']:5d}  "
                   f"client-visible errors {t['errors']:3d}  client retries {t['client_retries']:3d}  "
                   f"p99 {t['p99_ms']:7.1f} ms  ledger {'intact' if ledger.get('intact') else ('n/a' if not ledger else 'BROKEN')}")
        for f in r["failures"]:
            click.echo(f"        - {f}")
    sys.exit(1 if failed or len(results) < len(loaded) else 0)


class _UsageError(Exception):
    pass


async def _run_all(drills: list[Any], cluster: str, out_dir: Path, duration: float | None, rate: float | None,
                   pids: dict[str, int], db_path: str | None, token_file: str | None, keep: bool,
                   progress: bool) -> list[dict[str, Any]]:
    from halb.chaos.report import write_index, write_report

    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    if main is not None:  # Ctrl-C and SIGTERM cancel the run; clean-up runs in finally blocks
        loop.add_signal_handler(signal.SIGTERM, main.cancel)
        loop.add_signal_handler(signal.SIGINT, main.cancel)
    results: list[dict[str, Any]] = []
    try:
        for drill in drills:
            data = await _run_one(drill, cluster, duration, rate, pids, db_path, token_file, keep, progress)
            paths = write_report(data, out_dir)
            results.append(data)
            write_index(results, out_dir)
            click.echo(f"{data['result'].upper()}: {drill.slug} -> {paths['html']}", err=True)
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
        loop.remove_signal_handler(signal.SIGINT)
    return results


async def _run_one(drill: Any, cluster: str, duration: float | None, rate: float | None, pids: dict[str, int],
                   db_path: str | None, token_file: str | None, keep: bool, progress: bool) -> dict[str, Any]:
    from halb.api.client import ApiError, read_token
    from halb.chaos.engine import DrillRun, RunOptions
    from halb.chaos.target import LocalOptions, LocalTarget, RemoteTarget, Target, TargetError

    opts = RunOptions(rate=rate, duration=duration, progress=progress)
    target: Target
    start_future: concurrent.futures.Future[None] | None = None
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    if cluster == "local":
        directory = Path(tempfile.mkdtemp(prefix=f"halb-chaos-{drill.slug}-"))
        target = LocalTarget(directory, LocalOptions(service_options=drill.cluster.service_options,
                                                     health=drill.cluster.health, keep_dir=keep,
                                                     backend_options=drill.cluster.backends,
                                                     backend_process=drill.cluster.backend_process,
                                                     browse=drill.cluster.browse, balancers=drill.load.balancers))
    else:
        urls = [u.strip() for u in cluster.split(",") if u.strip()]  # HOST:PORT (https) or http(s)://HOST:PORT
        try:
            target = RemoteTarget.connect(urls, read_token(token_file), db_path, pids)
        except (ApiError, TargetError) as exc:
            raise _UsageError(f"cannot use cluster {cluster}: {getattr(exc, 'message', None) or exc}") from None
        if (drill.cluster.service_options or drill.cluster.health or drill.cluster.backends
                or drill.cluster.backend_process or drill.cluster.browse):
            click.echo(f"halb: {drill.slug}: [cluster] settings apply only to --cluster local; ignored", err=True)
    started = time.time()
    try:
        if isinstance(target, LocalTarget):
            click.echo(f"{drill.slug}: starting a local cluster in {target.directory}", err=True)
            start_future = executor.submit(target.start)
            try:
                await asyncio.wrap_future(start_future)
            except (TargetError, RuntimeError, OSError) as exc:
                return _aborted(drill, target, f"local cluster did not start: {exc}", started)
        outcome = await DrillRun(drill, target, opts).run()
        return outcome.data
    finally:
        if start_future is not None and not start_future.done():
            try:
                start_future.result(timeout=60)  # let a start in progress finish, then stop all it started
            except Exception:
                pass
        await asyncio.shield(asyncio.to_thread(_close, target))
        executor.shutdown(wait=False)
        if keep and isinstance(target, LocalTarget):
            click.echo(f"{drill.slug}: kept {target.directory}", err=True)


def _close(target: Any) -> None:
    try:
        target.heal_everything()
    finally:
        target.close()


def _aborted(drill: Any, target: Any, reason: str, started: float) -> dict[str, Any]:
    empty = {"requests": 0, "ok": 0, "errors": 0, "error_rate": 0.0, "client_retries": 0, "p50_ms": 0.0,
             "p99_ms": 0.0, "max_ms": 0.0, "by_status": {}, "error_kinds": {}, "served_by": {}}
    return {"drill": {"title": drill.title, "file": str(drill.path), "slug": drill.slug,
                      "description": drill.description},
            "result": "failed", "failures": [reason], "started_at": started, "duration_s": time.time() - started,
            "target": target.describe(), "load": {"total": empty, "client_mode": "", "client_addresses": []},
            "client_visible_errors": 0, "hypothesis": {}, "steps": [], "faults": [], "phases": [], "events": [],
            "timeline": {"buckets": [], "samples": []}, "ledger": None, "requests": []}




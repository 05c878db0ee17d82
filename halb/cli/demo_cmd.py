"""`halb demo ...`: the demo's moving parts (for now the checkout backend)."""
from __future__ import annotations

import click


@click.group()
def demo() -> None:
    """Demo pieces: the checkout backend servers halb balances."""


@demo.command()
@click.option("--name", required=True, help="Instance name (A, B, C ...): X-Served-By header, JSON 'server', logs.")
@click.option("--listen", required=True, metavar="HOST:PORT", help="Address to serve on, e.g. 127.0.0.21:8080.")
@click.option("--db", "db_path", required=True, type=click.Path(dir_okay=False),
              help="Shared SQLite database file (created and seeded when missing).")
@click.option("--server", default="", metavar="NAME",
              help="Failure domain / physical server label shown in /health (default: --name).")
@click.option("--delay-ms", default=0.0, show_default=True, type=click.FloatRange(min=0),
              help="Extra latency per request (chaos knob; /health excluded unless --affect-health).")
@click.option("--fail-rate", default=0.0, show_default=True, type=click.FloatRange(0, 1),
              help="Probability of answering 500 instead of handling the request (chaos knob).")
@click.option("--affect-health/--no-affect-health", default=False, show_default=True,
              help="Apply --delay-ms and --fail-rate to /health too.")
@click.option("--synchronous", type=click.Choice(["FULL", "NORMAL"], case_sensitive=False), default="FULL",
              show_default=True, help="SQLite synchronous mode: FULL survives power loss, NORMAL only process crashes.")
@click.option("--max-body", default=64 * 1024, show_default=True, type=click.IntRange(min=1),
              help="Largest accepted request body in bytes (413 above).")
@click.option("--db-threads", default=4, show_default=True, type=click.IntRange(1, 64),
              help="Threads doing database work off the event loop.")
@click.option("--access-log/--no-access-log", default=False, show_default=True, help="Log every request.")
@click.option("--capacity", default=0, show_default=True, type=click.IntRange(0, 100000),
              help="Requests worked on at once (a worker pool); more wait in arrival order. 0: unlimited.")
@click.option("--work-ms", default=0.0, show_default=True, type=click.FloatRange(0, 60000),
              help="Time each request holds a worker (simulated service time).")
def backend(name: str, listen: str, db_path: str, server: str, delay_ms: float, fail_rate: float,
            affect_health: bool, synchronous: str, max_body: int, db_threads: int, access_log: bool,
            capacity: int, work_ms: float) -> None:
    """Run one checkout backend instance (stops cleanly on SIGTERM/SIGINT)."""
    # Imports here keep `halb --help` fast and free of aiohttp/sqlite setup.
    from halb.demo.backend import BackendConfig, run
    from halb.model import ModelError, check_name, parse_hostport

    try:
        check_name(name, "--name")
        host, port = parse_hostport(listen, "--listen")
    except ModelError as exc:
        raise click.BadParameter(str(exc)) from None
    cfg = BackendConfig(name=name, host=host, port=port, db_path=db_path, server=server, delay_ms=delay_ms,
                        fail_rate=fail_rate, affect_health=affect_health, max_body=max_body,
                        synchronous=synchronous.upper(), db_threads=db_threads, access_log=access_log,
                        capacity=capacity, work_ms=work_ms)
    run(cfg)

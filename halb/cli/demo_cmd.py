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
@click.option("--catalog-listen", default="", metavar="HOST:PORT",
              help="Also serve the demo's second service, catalog (GET /catalog/items), on this address.")
def backend(name: str, listen: str, db_path: str, server: str, delay_ms: float, fail_rate: float,
            affect_health: bool, synchronous: str, max_body: int, db_threads: int, access_log: bool,
            capacity: int, work_ms: float, catalog_listen: str) -> None:
    """Run one checkout backend instance (stops cleanly on SIGTERM/SIGINT)."""
    # Imports here keep `halb --help` fast and free of aiohttp/sqlite setup.
    from halb.demo.backend import BackendConfig, run
    from halb.model import ModelError, check_name, parse_hostport

    try:
        check_name(name, "--name")
        host, port = parse_hostport(listen, "--listen")
        catalog_host, catalog_port = parse_hostport(catalog_listen, "--catalog-listen") if catalog_listen else ("", 0)
    except ModelError as exc:
        raise click.BadParameter(str(exc)) from None
    cfg = BackendConfig(name=name, host=host, port=port, db_path=db_path, server=server, delay_ms=delay_ms,
                        fail_rate=fail_rate, affect_health=affect_health, max_body=max_body,
                        synchronous=synchronous.upper(), db_threads=db_threads, access_log=access_log,
                        capacity=capacity, work_ms=work_ms, catalog_host=catalog_host, catalog_port=catalog_port)
    run(cfg)


@demo.command("ws")
@click.argument("url")
@click.option("--cacert", type=click.Path(dir_okay=False, exists=True), help="CA file to verify wss:// against.")
@click.option("--resolve", default="", metavar="HOST:PORT:ADDR[,ADDR...]",
              help="Connect to these addresses for HOST:PORT (tried in order), like curl's --resolve.")
@click.option("--send", "messages", multiple=True, metavar="TEXT",
              help="Message to send (repeat); default: each line read from stdin.")
@click.option("--timeout", default=5.0, show_default=True, type=click.FloatRange(0.1, 300))
def ws(url: str, cacert: str | None, resolve: str, messages: tuple[str, ...], timeout: float) -> None:
    """Talk to the demo backend's echo WebSocket (GET /ws) through halb.

    Prints the first message (the instance that answered), then each message sent and its
    echo. Exit 1 when the connection fails, 2 for a bad URL or --resolve."""
    import sys

    from halb.demo.ws_client import WsClientError, echo, parse_target

    try:
        target = parse_target(url, resolve)
    except WsClientError as exc:
        raise click.BadParameter(str(exc)) from None
    lines = messages or (line.rstrip("\n") for line in sys.stdin)
    try:
        echo(target, lines, click.echo, cacert=cacert, timeout=timeout)
    except WsClientError as exc:
        click.echo(f"halb: {exc}", err=True)
        sys.exit(1)

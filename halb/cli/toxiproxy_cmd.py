"""`halb toxiproxy serve`: run the Toxiproxy-compatible fault proxy.

Kept separate from the cluster commands because it needs no cluster: drills run it
next to the balancers and drive it through the Toxiproxy HTTP API.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

import click


@click.group()
def toxiproxy() -> None:
    """Toxiproxy-compatible fault proxy (HTTP API on port 8474 by default)."""


@toxiproxy.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address for the HTTP API.")
@click.option("--port", default=8474, show_default=True, type=click.IntRange(0, 65535),
              help="Port for the HTTP API (0 = any free port).")
@click.option("--config", "config", default=None, type=click.Path(dir_okay=False, exists=True),
              help="JSON array of proxies to create at start (same shape as the /populate body).")
@click.option("--port-file", default=None, type=click.Path(dir_okay=False),
              help="Write the bound API port to this file once listening (for supervisors).")
@click.option("--log-level", default=lambda: os.environ.get("LOG_LEVEL", "info"), show_default="info or $LOG_LEVEL",
              type=click.Choice(["debug", "info", "warning", "warn", "error"], case_sensitive=False))
def serve(host: str, port: int, config: str | None, port_file: str | None, log_level: str) -> None:
    """Serve the Toxiproxy API until SIGINT or SIGTERM."""
    level = "warning" if log_level.lower() == "warn" else log_level.lower()
    logging.basicConfig(stream=sys.stderr, level=level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from halb.aio import loop_factory

    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        try:
            runner.run(_serve(host, port, config, port_file))
        except (OSError, ValueError) as exc:
            raise click.ClickException(str(exc)) from exc


async def _serve(host: str, port: int, config: str | None, port_file: str | None) -> None:
    from halb.chaos.toxiproxy import start_server

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    handle = await start_server(host, port, config=config)
    try:
        if port_file:
            tmp = f"{port_file}.tmp"
            with open(tmp, "w") as fh:
                fh.write(f"{handle.port}\n")
            os.replace(tmp, port_file)
        await stop.wait()
        logging.getLogger("halb.chaos.toxiproxy").info("shutting down")
    finally:
        await handle.stop()

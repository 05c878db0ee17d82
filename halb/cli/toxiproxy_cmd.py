"""`halb toxiproxy serve`: run the Toxiproxy-compatible fault proxy.

Kept separate from the cluster commands because it needs no cluster: drills run it
next to the balancers and drive it through the Toxiproxy HTTP API.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import signal
import sys

import click


def exposure_warning(host: str) -> str | None:
    """The warning for an API address other hosts may reach, None for a loopback one.

    The API has no authentication (neither has Toxiproxy's): whoever reaches it can create
    a proxy from any port of this machine to any address, i.e. an open relay. Names other
    than "localhost" are not resolved here, so they are warned about too.
    """
    h = host.strip().strip("[]")
    if h.lower() == "localhost":
        return None
    try:
        if ipaddress.ip_address(h).is_loopback:
            return None
    except ValueError:
        pass
    where = "every interface" if h in ("", "0.0.0.0", "::") else host
    return (f"WARNING: the fault proxy API listens on {where}. It has no authentication: anyone who "
            f"reaches {host or '*'}:PORT can create proxies from this machine to any address (an open "
            f"relay) and cut or slow every link it proxies. Use --host 127.0.0.1 unless this network "
            f"is isolated.")


@click.group()
def toxiproxy() -> None:
    """Toxiproxy-compatible fault proxy (HTTP API on port 8474 by default)."""


@toxiproxy.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address for the HTTP API. It has no authentication: keep it on loopback.")
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
    warning = exposure_warning(host)
    if warning:  # loudly, before binding, and whatever the log level
        click.secho(warning, err=True, fg="red", bold=True)
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

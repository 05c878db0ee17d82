"""The `halb` command line: one click group, sub-commands loaded lazily from their modules.

Lazy loading keeps `halb --help` and simple API calls fast (no pysyncobj or uvloop
import unless the sub-command needs it), and lets each command family live in its own
module.
"""
from __future__ import annotations

import importlib

import click

# command name -> "module:attribute"; a module that is missing is simply not offered
COMMANDS: dict[str, str] = {
    "node": "halb.cli.node_cmd:node",
    "cluster": "halb.cli.cluster_cmd:cluster",
    "backend": "halb.cli.backend_cmd:backend",
    "service": "halb.cli.service_cmd:service",
    "member": "halb.cli.member_cmd:member",
    "leader": "halb.cli.leader_cmd:leader",
    "events": "halb.cli.events_cmd:events",
    "token": "halb.cli.token_cmd:token",
    "cert": "halb.cli.cert_cmd:cert",
    "frontend": "halb.cli.frontend_cmd:frontend",
    "route": "halb.cli.frontend_cmd:route",
    "demo": "halb.cli.demo_cmd:demo",
    "toxiproxy": "halb.cli.toxiproxy_cmd:toxiproxy",
    "chaos": "halb.cli.chaos_cmd:chaos",
    "lab": "halb.cli.lab_cmd:lab",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(name for name in COMMANDS if self._load(name) is not None)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        return self._load(name)

    @staticmethod
    def _load(name: str) -> click.Command | None:
        target = COMMANDS.get(name)
        if target is None:
            return None
        module_name, attr = target.split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                return None
            raise
        return getattr(module, attr)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--cluster", "cluster", envvar="HALB_CLUSTER", default=None,
              help="Comma-separated admin API addresses HOST:PORT, spoken to over HTTPS; prefix one with "
                   "http:// only for an --insecure-dev node (env HALB_CLUSTER).")
@click.option("--ca-file", envvar="HALB_CA_FILE", default=None, type=click.Path(dir_okay=False),
              help="The cluster CA certificate the nodes' certificates are verified against (env HALB_CA_FILE; "
                   "default: the system's trust store).")
@click.option("--token-file", envvar="HALB_TOKEN_FILE", default=None, type=click.Path(dir_okay=False),
              help="File holding the admin API token (env HALB_TOKEN_FILE; or set HALB_TOKEN).")
@click.option("--json", "as_json", is_flag=True, default=False, help="Machine-readable JSON output.")
@click.option("--timeout", default=5.0, show_default=True, help="Seconds to wait for each node.")
@click.version_option(package_name="halb")
@click.pass_context
def cli(ctx: click.Context, cluster: str | None, ca_file: str | None, token_file: str | None, as_json: bool,
        timeout: float) -> None:
    """halb: a highly available load-balancer cluster."""
    ctx.ensure_object(dict)
    ctx.obj.update(cluster=cluster, ca_file=ca_file, token_file=token_file, json=as_json, timeout=timeout)


def main() -> None:
    cli(obj={})

"""Full validation of a command before the API proposes it.

The control layer's `validate_command` checks every field it can judge; the nested
`options.health` table is only shape-checked there, because its schema (CheckConfig) lives
in the health layer, above control. The API sits above both, so it plugs the full health
check in: an invalid health check is a 400 at write time instead of a log line and a
silent TCP fallback on every node later.
"""
from __future__ import annotations

from typing import Any, Mapping

from halb.control.commands import validate_command
from halb.health.checks import CheckConfig


def check_health(table: Mapping[str, Any]) -> None:
    """Raises CheckConfigError (a ValueError) naming the bad key."""
    CheckConfig.from_dict(table, where="health")


def validate_full(op: str, args: Any) -> dict[str, Any]:
    """validate_command with the nested health check; raises CommandError("invalid")."""
    return validate_command(op, args, health=check_health)

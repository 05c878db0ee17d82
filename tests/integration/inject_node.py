"""A real `halb node run` process whose state machine also knows `test.inject_service`:
it stores a service *as given*, without any validation (as an older, laxer halb version
would have let it in). Used to show that one unbuildable service in the replicated state
does not freeze routing for the others (issue 11 item 1b), independent of how strict the
API and the state machine's own validation are.

Usage: python inject_node.py INJECT.json node run --config N.toml
INJECT.json lists raw service maps; once this node is leader it submits one
`test.inject_service` command per service through ReplicatedState.submit (the real Raft
path: journal, commit, apply) and renames the file to *.done, so a restarted node replays
the command from its journal instead of submitting it again.
"""
from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Any

from halb.control import state as state_mod
from halb.model import Backend, Service


def _inject(self: state_mod.ClusterState, args: dict[str, Any], cmd: dict[str, Any]) -> dict[str, Any]:
    svc = Service.__new__(Service)  # no __post_init__: nothing is checked
    svc.__dict__.update(name=args["name"], mode=args.get("mode", "http"), listen=args.get("listen", ""),
                        algorithm=args.get("algorithm", "round_robin"), hash_key=args.get("hash_key", "source"),
                        options=args.get("options", {}), backends={})
    for b in args.get("backends", []):
        be = Backend.__new__(Backend)
        be.__dict__.update({"weight": 100, "admin_state": "active", "server": "", "zone": "", "max_rps": 0.0,
                            "max_conns": 0, **b})
        svc.backends[be.name] = be
    self.services[svc.name] = svc
    return state_mod.ok()


_handlers = state_mod.ClusterState._handlers


def _with_inject(self: state_mod.ClusterState) -> dict[str, Any]:
    handlers = _handlers(self)
    handlers["test.inject_service"] = lambda args, cmd: _inject(self, args, cmd)
    return handlers


state_mod.ClusterState._handlers = _with_inject  # type: ignore[method-assign]

_validate = state_mod.validate_command


def _validate_except_inject(op: str, args: Any) -> Any:
    """apply validates every op's args first; the injected op must pass unchecked."""
    return args if op == "test.inject_service" else _validate(op, args)


state_mod.validate_command = _validate_except_inject  # type: ignore[assignment]


def _patch_node(path: str) -> None:
    from halb.node import Node

    start = Node.start_components

    async def start_components(self: Node) -> None:
        await start(self)
        if os.path.exists(path):
            self._tasks.append(asyncio.create_task(_submit(self, path)))

    Node.start_components = start_components  # type: ignore[method-assign]


async def _submit(node: Any, path: str) -> None:
    with open(path) as f:
        services = json.load(f)
    while True:  # after the config seed (a cluster with services is never seeded)
        with node.raft.read() as cs:
            if cs.seeded and cs.services:
                break
        await asyncio.sleep(0.05)
    for svc in services:
        done = asyncio.get_running_loop().create_future()
        loop = asyncio.get_running_loop()
        node.raft.submit("test.inject_service", svc, by="test",
                         callback=lambda r, e, d=done: loop.call_soon_threadsafe(lambda: d.done() or d.set_result(e)))
        assert await done == 0
    os.rename(path, path + ".done")


if __name__ == "__main__":
    _patch_node(sys.argv[1])
    sys.argv = ["halb", *sys.argv[2:]]
    from halb.cli import main

    main()

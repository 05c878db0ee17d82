"""Shared service addresses: every node also listens on the same address and port.

With `[dataplane] shared_hosts = ["127.0.0.10"]` each node binds every service a second
time on 127.0.0.10, next to its own listen host. All nodes set SO_REUSEPORT, so on one
host the kernel keeps one reuseport group for that address and hashes each new
connection to one live listener; when a node dies its socket leaves the group at once
and no new connection is handed to it. That is the local analogue of anycast/ECMP and
gives a demo one service address that survives any one balancer without root.

The extra listeners share the ServiceRuntime of the service's primary listener (same
backends, counters, ejections), so stats and routing stay per service. They follow the
primary: opened after it, re-opened when it is replaced, closed with it.
"""
from __future__ import annotations

import logging
from typing import Any

from halb.dataplane.listeners import Listener, listen_socket

log = logging.getLogger(__name__)


class SharedListeners:
    """The (service, shared host) listeners of one DataPlane."""

    def __init__(self, engine: Any, hosts: list[str] | tuple[str, ...]) -> None:
        self.engine = engine
        self.hosts = tuple(hosts)
        self.listeners: dict[tuple[str, str], Listener] = {}
        self.errors: dict[str, str] = {}  # "service@host" -> bind error

    def sync(self, initial: bool) -> None:
        """Match the primary listeners: one per (service, host), same runtime and port."""
        engine = self.engine
        wanted: set[tuple[str, str]] = set()
        for name, primary in list(engine.listeners.items()):
            for host in self.hosts:
                wanted.add((name, host))
                key = (primary.key[0], host, primary.port)
                lst = self.listeners.get((name, host))
                if lst is not None and lst.rt is primary.rt and lst.key == key:
                    continue
                if lst is not None:
                    engine._retire(self.listeners.pop((name, host)))
                self._open(name, host, primary, key, initial)
        for k in [k for k in self.listeners if k not in wanted]:
            engine._retire(self.listeners.pop(k))

    def _open(self, name: str, host: str, primary: Listener, key: tuple[str, str, int], initial: bool) -> None:
        where = f"{name}@{host}"
        try:
            sock = listen_socket(host, primary.port)
        except OSError as e:
            log.error("service %s: cannot listen on shared address %s:%s: %s", name, host, primary.port, e)
            self.errors[where] = str(e)
            return
        self.errors.pop(where, None)
        lst = Listener(engine=self.engine, rt=primary.rt, key=key, sock=sock, port=primary.port)
        self.listeners[(name, host)] = lst
        if not initial and self.engine.loop is not None:
            self.engine.loop.create_task(lst.serve(self.engine._factory(lst)))

    async def serve_pending(self) -> None:
        for lst in list(self.listeners.values()):
            if lst.server is None and not lst.closed:
                await lst.serve(self.engine._factory(lst))

    def close(self) -> None:
        for lst in self.listeners.values():
            lst.close()
        self.listeners.clear()

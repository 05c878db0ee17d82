"""systemd's notify protocol (sd_notify(3)) without libsystemd: one datagram per message to
the unix socket named by ``NOTIFY_SOCKET``, so a ``Type=notify`` unit knows when the node is
ready, what it is doing (``STATUS=``), that it is stopping, and that its event loop still
turns (``WATCHDOG=1``).

Why the watchdog pings come from the asyncio loop and not a thread: a thread would keep
pinging while the loop that serves the admin API, routing and the VIP lease is stuck, which
is exactly the failure systemd's watchdog should catch (Patroni keeps a watchdog for the same
reason). The decisions (when is the node ready, when did the status line change, which
watchdog interval applies) are pure functions here, tested without sockets; the node wires
them to its parts (halb/node.py).
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
from dataclasses import dataclass
from typing import Callable, Mapping

log = logging.getLogger(__name__)

STATUS_POLL_S = 0.5  # how often the node compares its status facts (a message only on change)


def socket_address(value: str) -> str | bytes:
    """``NOTIFY_SOCKET`` as an address for sendto: ``@name`` is Linux's abstract namespace
    (a leading NUL byte), anything else a filesystem path."""
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    return value


def watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """Seconds between WATCHDOG=1 pings (a third of ``WATCHDOG_USEC``, as systemd advises),
    or None when the watchdog is off or meant for another process (``WATCHDOG_PID``)."""
    raw = environ.get("WATCHDOG_USEC")
    if not raw:
        return None
    owner = environ.get("WATCHDOG_PID")
    if owner:
        try:
            if int(owner) != pid:
                return None
        except ValueError:
            log.warning("ignoring WATCHDOG_PID=%r: not a process id", owner[:40])
            return None
    try:
        usec = int(raw)
    except ValueError:
        log.warning("ignoring WATCHDOG_USEC=%r: not an integer", raw[:40])
        return None
    if usec <= 0:
        return None
    return usec / 3 / 1_000_000


@dataclass(frozen=True)
class StatusFacts:
    """What the STATUS= line says. A new line is sent only when one of these changes."""

    raft_state: str
    leader: str | None
    vip_holder: str | None
    services: int

    def line(self) -> str:
        holder = self.vip_holder or "none"
        return (f"{self.raft_state}; leader {self.leader or 'none (waiting for a Raft majority)'}; "
                f"VIP holder {holder}; {self.services} service{'s' if self.services != 1 else ''}")


class StatusChanges:
    """Remembers the last facts sent: ``changed(facts)`` is the STATUS= line to send, or None."""

    def __init__(self) -> None:
        self._last: StatusFacts | None = None

    def changed(self, facts: StatusFacts) -> str | None:
        if facts == self._last:
            return None
        self._last = facts
        return facts.line()


def is_ready(listeners_bound: bool, leader: str | None, raft_synced: bool) -> bool:
    """READY=1 means: the admin API and the data plane listen, and Raft has a leader (which
    exists only with a majority of the configuration) and this node is synced with it. The
    same rule as ``GET /readyz``, so systemd and a load balancer in front agree."""
    return listeners_bound and leader is not None and raft_synced


class Notifier:
    """Sends sd_notify messages; every send is best effort (a missing or full socket is
    logged once, never raised: the node must not stop because systemd went away)."""

    def __init__(self, address: str | bytes) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.setblocking(False)
        self._warned = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Notifier | None":
        value = (os.environ if environ is None else environ).get("NOTIFY_SOCKET", "")
        if not value:
            return None
        if not (value.startswith("@") or value.startswith("/")):
            log.warning("ignoring NOTIFY_SOCKET=%r: neither an absolute path nor @abstract", value[:80])
            return None
        return cls(socket_address(value))

    def send(self, message: str) -> bool:
        try:
            self.sock.sendto(message.encode("utf-8", "replace"), self.address)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning("sd_notify %s failed: %s (further failures are not logged)", message.split("=")[0], exc)
            return False
        return True

    def close(self) -> None:
        self.sock.close()


class SystemdNotify:
    """The node's side of the protocol: READY=1 once, STATUS= on change, WATCHDOG=1 from the
    loop, STOPPING=1 on shutdown. ``facts()`` and ``ready()`` are read in the loop."""

    def __init__(self, notifier: Notifier, facts: Callable[[], StatusFacts], ready: Callable[[], bool],
                 watchdog_s: float | None) -> None:
        self.notifier = notifier
        self.facts = facts
        self.ready = ready
        self.watchdog_s = watchdog_s
        self.changes = StatusChanges()
        self.readied = False
        self._tasks: list[asyncio.Task[None]] = []

    @classmethod
    def from_env(cls, facts: Callable[[], StatusFacts], ready: Callable[[], bool]) -> "SystemdNotify | None":
        notifier = Notifier.from_env()
        if notifier is None:
            return None
        return cls(notifier, facts, ready, watchdog_interval(os.environ, os.getpid()))

    def replaces(self, old_pid: int, watchdog_usec: int | None = None) -> None:
        """Hot restart (halb/takeover.py): the watchdog systemd set up for the process this
        one replaces becomes ours once we are MAINPID. systemd gives ``WATCHDOG_USEC`` only
        to the main process, not to ``ExecReload``'s, so the old process tells us its
        interval in the handshake; ``WATCHDOG_PID`` = the old pid also counts."""
        if self.watchdog_s is None:
            self.watchdog_s = watchdog_interval(os.environ, old_pid)
        if self.watchdog_s is None and watchdog_usec:
            self.watchdog_s = watchdog_interval({"WATCHDOG_USEC": str(watchdog_usec)}, os.getpid())

    def handover_info(self) -> dict[str, object]:
        """What a takeover process needs to speak for the unit after us."""
        usec = round(self.watchdog_s * 3 * 1_000_000) if self.watchdog_s else None
        return {"notify_socket": os.environ.get("NOTIFY_SOCKET", ""), "watchdog_usec": usec}

    def took_over(self) -> None:
        """Hot restart done: tell systemd to follow this process (``MAINPID=``, which needs
        ``NotifyAccess=all``: the message comes from a process that is not the main one yet)
        and that it is ready, in one datagram."""
        self.notifier.send(f"MAINPID={os.getpid()}\nREADY=1")
        self.readied = True
        log.info("told systemd MAINPID=%d READY=1 (took over)", os.getpid())

    def start(self) -> None:
        if self.watchdog_s is not None:
            log.info("systemd watchdog: WATCHDOG=1 every %.2fs from the event loop", self.watchdog_s)
            self._tasks.append(asyncio.create_task(self._watchdog(), name="sd-watchdog"))
        self._tasks.append(asyncio.create_task(self._status(), name="sd-status"))

    async def _watchdog(self) -> None:
        assert self.watchdog_s is not None
        while True:
            self.notifier.send("WATCHDOG=1")
            await asyncio.sleep(self.watchdog_s)

    async def _status(self) -> None:
        while True:
            try:
                line = self.changes.changed(self.facts())
                if line is not None:
                    self.notifier.send(f"STATUS={line}")
                if not self.readied and self.ready():
                    self.readied = True
                    self.notifier.send("READY=1")
                    log.info("told systemd READY=1")
            except Exception:  # a view that cannot be read now must not end the notifications
                log.exception("sd_notify status")
            await asyncio.sleep(STATUS_POLL_S)

    def quiet(self) -> None:
        """Handed over to a new process (hot restart): it is systemd's MAINPID and speaks for
        the unit now; this one sends no more STATUS= (and never STOPPING=1, which would stop
        the unit)."""
        for task in self._tasks:
            if task.get_name() == "sd-status":
                task.cancel()

    def stopping(self, reason: str) -> None:
        """STOPPING=1 at once; status updates end, the watchdog keeps pinging until ``stop``."""
        for task in self._tasks:
            if task.get_name() == "sd-status":
                task.cancel()
        self.notifier.send("STOPPING=1")
        self.notifier.send(f"STATUS=stopping: {reason or 'requested'}")

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.notifier.close()

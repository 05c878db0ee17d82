"""`halb cluster up` as a small supervisor: refuse to start over a running cluster, restart
children that die (with back-off, said on stdout), and stop exactly what it started.

Why: a second `make demo` used to start duplicates that died with "address already in
use" (only in their logs) and then printed the first cluster's status as its own; and a
node killed in the demo stayed dead until someone restarted it by hand, outside the
supervisor, where Ctrl-C could not reach it.
"""
from __future__ import annotations

import errno
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from halb.demo.launcher import Child
from halb.model import parse_hostport

BACKOFF_FIRST = 1.0  # seconds before the first restart of a child that died
BACKOFF_MAX = 30.0
STABLE_AFTER = 60.0  # a child that ran this long starts again from BACKOFF_FIRST


# --- preflight: is something already listening where we want to? -------------------------

def port_taken(address: str) -> bool:
    """True when another socket listens on address (SO_REUSEPORT ones included: a plain
    bind, without SO_REUSEPORT, fails against them)."""
    host, port = parse_hostport(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT leftovers are fine
        try:
            s.bind((host, port))
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


def _listening_inodes(host: str, port: int) -> set[str]:
    """Inodes of LISTEN sockets on host:port (or the wildcard) from /proc/net/tcp{,6}."""
    import ipaddress

    want = ipaddress.ip_address(host)
    inodes = set()
    for name in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/net/{name}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if len(cols) < 10 or cols[3] != "0A":  # 0A = LISTEN
                continue
            addr_hex, port_hex = cols[1].split(":")
            if int(port_hex, 16) != port:
                continue
            raw = bytes.fromhex(addr_hex)
            if name == "tcp":
                addr = ipaddress.ip_address(raw[::-1])
            else:  # four little-endian 32-bit words
                addr = ipaddress.ip_address(b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))
            if addr == want or addr.is_unspecified:
                inodes.add(cols[9])
    return inodes


def listening_pids(address: str) -> list[int]:
    """PIDs (of this user; others' /proc/PID/fd are not readable) listening on address."""
    host, port = parse_hostport(address)
    try:
        inodes = {f"socket:[{i}]" for i in _listening_inodes(host, port)}
    except ValueError:  # not an IP literal
        return []
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if any(os.readlink(fd) in inodes for fd in (entry / "fd").iterdir()):
                pids.append(int(entry.name))
        except OSError:
            continue
    return sorted(pids)


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


@dataclass
class Taken:
    what: str  # "n1 api", "backend A" ...
    address: str
    pids: list[int]


def taken_addresses(wanted: list[tuple[str, str]]) -> list[Taken]:
    """(label, host:port) pairs that another process already listens on."""
    return [Taken(label, addr, listening_pids(addr)) for label, addr in wanted if port_taken(addr)]


# --- supervision -----------------------------------------------------------------------

@dataclass
class Supervised:
    child: Child
    started_at: float = 0.0
    restarts: int = 0
    backoff: float = BACKOFF_FIRST
    restart_at: float | None = None  # monotonic time of the pending restart
    reported: bool = False


@dataclass
class Supervisor:
    """Restarts dead children with exponential back-off; say() reports every step."""

    say: Callable[[str], None]
    pid_dir: Path | None = None  # NAME.pid for each running child (for `kill -9 $(cat ...)`)
    restart: bool = True
    items: list[Supervised] = field(default_factory=list)

    def start(self, child: Child) -> Child:
        child.start()
        self.items.append(Supervised(child, started_at=time.monotonic()))
        self._write_pid(child)
        return child

    def _write_pid(self, child: Child) -> None:
        if self.pid_dir is not None and child.pid is not None:
            self.pid_dir.mkdir(parents=True, exist_ok=True)
            (self.pid_dir / f"{child.name}.pid").write_text(f"{child.pid}\n")

    def poll(self, now: float | None = None) -> None:
        """One supervision step: notice deaths, run due restarts."""
        now = time.monotonic() if now is None else now
        for it in self.items:
            c = it.child
            if c.alive():
                continue
            if it.restart_at is None and not it.reported:
                code = c.proc.returncode if c.proc is not None else None
                it.reported = True
                if not self.restart:
                    self.say(f"{c.name} (pid {c.pid}) exited with {code}; see {c.log_path} "
                             f"(not restarted: --no-restart)")
                    continue
                if now - it.started_at >= STABLE_AFTER:
                    it.backoff = BACKOFF_FIRST
                it.restart_at = now + it.backoff
                self.say(f"{c.name} (pid {c.pid}) exited with {code}; restarting in {it.backoff:g}s "
                         f"(see {c.log_path})")
            elif it.restart_at is not None and now >= it.restart_at:
                if c.proc is not None:
                    c.proc.wait()  # reaped already by poll(); keeps the zombie count at zero
                c.start()
                it.restarts += 1
                it.started_at = now
                it.restart_at = None
                it.reported = False
                it.backoff = min(BACKOFF_MAX, it.backoff * 2)
                self._write_pid(c)
                self.say(f"restarted {c.name} (pid {c.pid}, restart {it.restarts})")

    def stop_all(self) -> None:
        for it in reversed(self.items):
            it.child.stop()
            if self.pid_dir is not None:
                try:
                    (self.pid_dir / f"{it.child.name}.pid").unlink()
                except FileNotFoundError:
                    pass

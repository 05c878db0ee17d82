"""Non-blocking TCP connects watched by one epoll set: the prober's bare TCP checks.

Two implementations with one interface:

- ``halb.health._probe.ConnectSet`` (C, optional, built by setup.py): a check is two calls
  into C, no socket object (about 25 us less interpreter time per check than Python);
- :class:`PyConnectSet` below: the same in Python with socket objects, used where the
  extension is not built or ``HALB_PROBE_ACCEL=0`` (tests run the prober on both).

Interface (every fd is an int the caller only uses as a key and for ``abort``):

- ``fileno()``: the epoll fd; the event loop watches it as one reader;
- ``start(family, host, port) -> (fd, err)``: begin a connect to an IP literal. ``fd >= 0``:
  in flight. ``fd == -1``: finished at once, ``err`` 0 (connected) or the errno. A host
  that is not an address of ``family`` raises ValueError;
- ``collect() -> [(fd, err)]``: every connect that finished since, its socket already
  closed; ``err`` is SO_ERROR (0: connected). Never blocks;
- ``abort(fd)``: give up on one in flight (timeout, target removed);
- ``close()``: the epoll set (abort what is in flight first).

Every socket is closed with SO_LINGER 0 (RST), like tcp_check: no TIME_WAIT per check.
"""
from __future__ import annotations

import errno
import os
import select
import socket
from typing import Any, Protocol

from halb.health.checks import LINGER_RST


class ConnectSetLike(Protocol):
    def fileno(self) -> int: ...
    def start(self, family: int, host: str, port: int) -> tuple[int, int]: ...
    def collect(self) -> list[tuple[int, int]]: ...
    def abort(self, fd: int) -> None: ...
    def close(self) -> None: ...


_EPOLL = getattr(select, "epoll", None)

try:
    from halb.health._probe import ConnectSet as CConnectSet
except ImportError:  # no compiler at install time, or not Linux
    CConnectSet = None


class PyConnectSet:
    """The pure-Python ConnectSet (see the module docstring); needs epoll (Linux)."""

    def __init__(self) -> None:
        if _EPOLL is None:
            raise OSError(errno.ENOSYS, "epoll is not available")
        self._ep: Any = _EPOLL()
        self._socks: dict[int, socket.socket] = {}

    def fileno(self) -> int:
        return self._ep.fileno()

    def start(self, family: int, host: str, port: int) -> tuple[int, int]:
        if family not in (socket.AF_INET, socket.AF_INET6):
            raise ValueError(f"unsupported address family {family}")
        if not isinstance(port, int) or not 0 < port < 65536:
            raise ValueError(f"invalid port {port!r}")
        try:
            socket.inet_pton(family, host)
        except OSError:
            raise ValueError(f"{host} is not an IPv{4 if family == socket.AF_INET else 6} address") from None
        try:
            sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        except OSError as exc:
            return -1, exc.errno or errno.EIO
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
        err = sock.connect_ex((host, port))
        if err != errno.EINPROGRESS:
            sock.close()
            return -1, err
        fd = sock.fileno()
        try:
            self._ep.register(fd, select.EPOLLOUT)
        except OSError as exc:
            sock.close()
            return -1, exc.errno or errno.EIO
        self._socks[fd] = sock
        return fd, 0

    def collect(self) -> list[tuple[int, int]]:
        out = []
        for fd, _events in self._ep.poll(0):
            sock = self._socks.pop(fd, None)
            if sock is None:
                continue
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            sock.close()  # RST; closing also drops it from the epoll set
            out.append((fd, err))
        return out

    def abort(self, fd: int) -> None:
        sock = self._socks.pop(fd, None)
        if sock is not None:
            sock.close()

    def close(self) -> None:
        for sock in self._socks.values():
            sock.close()
        self._socks.clear()
        self._ep.close()


def accelerated() -> bool:
    """True when new ConnectSets are the C one."""
    return CConnectSet is not None and os.environ.get("HALB_PROBE_ACCEL", "1") != "0"


def new_connect_set() -> ConnectSetLike:
    """A C ConnectSet when built and not turned off (HALB_PROBE_ACCEL=0), else the Python one."""
    if accelerated():
        return CConnectSet()  # type: ignore[no-any-return]
    return PyConnectSet()

"""Namespace-aware kernel knobs for VIP announcement.

Why this module exists: ARP behaviour and non-local binds are per network namespace
(`/proc/sys/net/...` resolves to the namespace of the *thread* that opens it). A node
normally runs inside its own namespace (started with `ip netns exec`), so `netns=None`
writes the current namespace. The lab and the tests need to poke a *named* namespace
without forking a helper or shelling out to a `sysctl` binary (absent on fresh machines),
so :func:`run_in_netns` runs a function on a short-lived thread that first `setns(2)`s
into ``/run/netns/NAME``. Only that thread changes namespace; the process does not.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from pathlib import Path
from typing import Callable, TypeVar

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = Path("/run/netns")

_libc: ctypes.CDLL | None = None


def _get_libc() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    return _libc


def enter_netns(netns: str) -> None:
    """Move the *calling thread* into the named network namespace.

    Never creates the namespace (unlike pyroute2's default ``flags=O_CREAT``): a typo
    must fail loudly instead of silently building an empty namespace.
    """
    path = NETNS_RUN_DIR / netns
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _get_libc().setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


def run_in_netns(netns: str | None, fn: Callable[[], T], timeout: float = 10.0) -> T:
    """Run ``fn()`` inside ``netns`` (or right here if None) and return its result.

    A fresh thread is used and then discarded, so the namespace switch can never leak
    into a pooled thread that other code reuses. Sockets created by ``fn`` stay bound to
    that namespace after the thread ends, which is how callers get packet/netlink/TCP
    sockets "inside" a namespace without forking.
    """
    if netns is None:
        return fn()
    box: dict[str, object] = {}

    def target() -> None:
        try:
            enter_netns(netns)
            box["result"] = fn()
        except BaseException as exc:  # re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, name=f"netns-{netns}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"operation in netns {netns} did not finish within {timeout}s")
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["result"]  # type: ignore[return-value]


def _path(key: str) -> Path:
    return Path("/proc/sys") / key.replace(".", "/")


def read_sysctl(key: str, netns: str | None = None) -> str:
    """Read a sysctl such as ``net.ipv4.conf.all.arp_ignore`` (in ``netns`` if given)."""
    return run_in_netns(netns, lambda: _path(key).read_text().strip())


def write_sysctls(values: dict[str, str | int], netns: str | None = None) -> None:
    """Write several sysctls in one namespace switch."""

    def apply() -> None:
        for key, value in values.items():
            _path(key).write_text(f"{value}\n")

    run_in_netns(netns, apply)


def vip_arp_sysctls(ifname: str) -> dict[str, int]:
    """The ARP settings that make only the VIP holder answer and never poison peers.

    * ``arp_ignore=1``: answer an ARP request only if the target IP is configured on the
      interface it arrived on, so a node that has the VIP elsewhere (for example on
      ``lo``) stays silent.
    * ``arp_announce=2``: always use the best local address of the outgoing interface as
      the ARP source, never the VIP, so a non-holder's own ARP traffic cannot move the
      clients' neighbour entry for the VIP.

    The kernel uses max(all, interface) for both, so both are set.
    """
    out: dict[str, int] = {}
    for dev in ("all", ifname):
        out[f"net.ipv4.conf.{dev}.arp_ignore"] = 1
        out[f"net.ipv4.conf.{dev}.arp_announce"] = 2
    return out


def set_vip_arp_sysctls(ifname: str, netns: str | None = None) -> None:
    """Apply :func:`vip_arp_sysctls` for ``ifname`` (every node, holder or not)."""
    write_sysctls(vip_arp_sysctls(ifname), netns)


def enable_nonlocal_bind(netns: str | None = None) -> None:
    """Set ``net.ipv4.ip_nonlocal_bind=1`` so listeners can bind the VIP in advance.

    Why: a standby must already be listening on VIP:port when it acquires the VIP, or
    the first connections after a failover get RST. The per-socket alternative, which
    needs no sysctl, is ``IP_FREEBIND`` (see :func:`halb.announce.vip.freebind_socket`).
    """
    write_sysctls({"net.ipv4.ip_nonlocal_bind": 1}, netns)

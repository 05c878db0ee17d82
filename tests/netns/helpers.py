"""What the netns tests share: polling, the client's view of a VIP, a running lab cluster.

Kept out of conftest.py so tests import them by name (pytest fixtures stay in conftest)."""
from __future__ import annotations

import contextlib
import ipaddress
import socket
import time
from typing import Any, Callable, Iterator

import pytest

from halb.announce.sysctl import run_in_netns
from halb.lab import Lab
from halb.lab.cluster import LabCluster
from halb.lab.failover import FailoverRun

from .conftest import RUN_PREFIX


def wait_for(pred: Callable[[], Any], timeout: float, step: float = 0.005) -> float | None:
    """Seconds until pred() is true, or None after ``timeout``."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred():
            return time.monotonic() - t0
        time.sleep(step)
    return None


def neigh_mac(lab: Lab, host: str, addr: str) -> str | None:
    """The MAC ``host``'s neighbour table has for ``addr`` on eth0 (IPv4 or IPv6), or None."""
    family = ["-6"] if ipaddress.ip_address(addr).version == 6 else []
    out = lab.ip(host, *family, "neigh", "show", addr, "dev", "eth0", check=False).stdout.split()
    return out[out.index("lladdr") + 1] if "lladdr" in out else None


def connect_errno(lab: Lab, src: str, dst_ip: str, port: int = 9) -> int:
    """A TCP connect from ``src``'s namespace: 0 if connected, else the errno (refused =
    reachable but closed). Resolves the neighbour entry on the way."""
    family = socket.AF_INET6 if ipaddress.ip_address(dst_ip).version == 6 else socket.AF_INET

    def go() -> int:
        s = socket.socket(family)
        s.settimeout(1.0)
        try:
            return s.connect_ex((dst_ip, port))
        finally:
            s.close()
    return run_in_netns(lab.ns(src), go)


@contextlib.contextmanager
def lab_failover_run(tmp_path_factory: pytest.TempPathFactory, suffix: str, *, ipv6: bool = False,
                     steady_timeout: float | None = 30, **cluster_kw: Any) -> Iterator[FailoverRun]:
    """A lab (prefix RUN_PREFIX + suffix) with a started 3-node cluster and a FailoverRun on
    it, steady unless ``steady_timeout`` is None; everything torn down on exit, also on failure."""
    lab = Lab(prefix=RUN_PREFIX + suffix, state_dir=tmp_path_factory.mktemp("labstate"))
    cluster = LabCluster(lab, tmp_path_factory.mktemp("cluster"), ipv6=ipv6, **cluster_kw)
    try:
        lab.up()
        cluster.start()
        with FailoverRun(cluster, log=print, ipv6=ipv6) as fr:
            if steady_timeout is not None:
                fr.wait_steady(timeout=steady_timeout)
            yield fr
    finally:
        cluster.stop()
        lab.down(all_with_prefix=True)

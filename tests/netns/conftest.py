"""Root-only tests in real network namespaces; skipped (with the reason) elsewhere.

Every namespace here carries the prefix ``halb-t<pid>-`` so a run never touches another
run's lab (or a developer's ``halb-`` lab), and a session finalizer removes whatever is
left with that prefix even when a test failed half-way.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

RUN_PREFIX = f"halb-t{os.getpid()}-"


def _netns_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "netns tests need root (network namespaces, veth, bridges)"
    if shutil.which("ip") is None:
        return "iproute2 `ip` is not installed"
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"`ip netns` is unavailable: {probe.stderr.strip()}"
    return None


_REASON = _netns_unavailable()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if Path(str(item.fspath)).is_relative_to(here):
            item.add_marker(pytest.mark.netns)
            if _REASON:
                item.add_marker(pytest.mark.skip(reason=_REASON))


def _remove_all_with(prefix: str) -> None:
    from halb.lab import Lab

    Lab(prefix=prefix).down(all_with_prefix=True)


@pytest.fixture(scope="session", autouse=True)
def _netns_safety_net() -> Iterator[None]:
    yield
    if _REASON is None:
        _remove_all_with(RUN_PREFIX)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory):
    """One lab per test module (building it costs ~0.5 s); torn down even on failure."""
    from halb.lab import Lab

    lab = Lab(prefix=RUN_PREFIX + "m-", state_dir=tmp_path_factory.mktemp("labstate"))
    try:
        lab.up()
        yield lab
    finally:
        lab.down(all_with_prefix=True)


@pytest.fixture
def clean_lab(lab):
    """The shared lab with no VIP anywhere and empty neighbour caches, before and after."""
    def scrub() -> None:
        for h in lab.hosts.values():
            for dev in ("eth0", "lo"):
                lab.ip(h.name, "addr", "del", f"{lab.vip}/32", "dev", dev, check=False)
            lab.ip(h.name, "neigh", "flush", "all", check=False)
            lab.ip(h.name, "route", "flush", "type", "blackhole", check=False)
    scrub()
    yield lab
    scrub()

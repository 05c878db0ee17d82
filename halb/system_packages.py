"""Find the Debian tools halb drives (BIRD, pebble, Chromium, HAProxy ...) and install the
missing ones with apt-get when allowed.

Why one module: the benchmark, the lab and the tests all need real components from the
distribution, and a fresh machine has none of them. Each caller names the executables it
needs and the package that ships each; this module looks in PATH and in the sbin
directories (Debian puts daemons there, outside a non-root PATH), installs only when the
caller allows it and we are root, and returns what is still missing so the caller can skip
or fail with a message that names the package.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path

_EXTRA_DIRS = ("/usr/sbin", "/sbin", "/usr/bin", "/usr/lib/chromium")
# apt-get waits this long for another apt/dpkg (a parallel test run) to release its lock.
_LOCK_TIMEOUT_S = 600


def find_tool(name: str) -> str | None:
    """The executable's path, from PATH or Debian's sbin directories; None when absent."""
    found = shutil.which(name)
    if found:
        return found
    for d in _EXTRA_DIRS:
        p = Path(d) / name
        if p.is_file() and os.access(p, os.X_OK):
            return str(p)
    return None


def can_install() -> bool:
    """apt-get is present and we are root (CI runs as root; a developer's laptop may not)."""
    return shutil.which("apt-get") is not None and os.geteuid() == 0


def ensure_tools(tools: Mapping[str, str], install: bool = True,
                 log: Callable[[str], None] = lambda m: print(m, flush=True)) -> list[str]:
    """Make every executable in `tools` ({executable: debian package}) available.

    Installs the packages of the missing ones with apt-get when `install` and `can_install()`
    (one `apt-get update` retry when the package lists are stale). Returns the executables
    still missing, so the caller decides between skipping and failing.
    """
    missing = [t for t in tools if find_tool(t) is None]
    if not missing or not install or not can_install():
        return missing
    pkgs = sorted({tools[t] for t in missing})
    log(f"installing {' '.join(pkgs)} with apt-get ...")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "-o", f"DPkg::Lock::Timeout={_LOCK_TIMEOUT_S}", "install", "-y", "-q",
           "--no-install-recommends", *pkgs]
    if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "-o", f"DPkg::Lock::Timeout={_LOCK_TIMEOUT_S}", "update", "-q"],
                       env=env, capture_output=True)
        subprocess.run(cmd, env=env, capture_output=True)
    return [t for t in tools if find_tool(t) is None]

"""Tests that drive a real Debian component (BIRD, pebble, Chromium) ask for it here.

On a fresh CI machine (root, apt-get) the package is installed on first use; elsewhere the
test is skipped with a message that names the package, never silently passed.
Set HALB_TEST_NO_APT=1 to forbid installing.
"""
from __future__ import annotations

import os

import pytest

from halb.system_packages import ensure_tools, find_tool


def require_tools(tools: dict[str, str]) -> dict[str, str]:
    """{executable: package} -> {executable: path}; installs or skips."""
    missing = ensure_tools(tools, install=not os.environ.get("HALB_TEST_NO_APT"))
    if missing:
        pytest.skip("needs " + ", ".join(f"{t} (Debian package {tools[t]})" for t in missing)
                    + ": not installed and apt-get is not usable here (root needed)")
    return {t: find_tool(t) or t for t in tools}


# Every Debian component some test drives. Installed once at the start of the session
# (tests/conftest.py), outside any test's timeout: a fresh CI machine downloads Chromium
# there, not inside a test limited to 150 s.
SUITE_TOOLS = {"bird": "bird2", "birdc": "bird2", "pebble": "pebble", "pebble-challtestsrv": "pebble",
               "chromium": "chromium", "chromedriver": "chromium-driver"}


def install_suite_tools() -> list[str]:
    """Install what is missing of SUITE_TOOLS when allowed; returns what is still missing
    (those tests then skip, naming the package)."""
    if os.environ.get("HALB_TEST_NO_APT"):
        return [t for t in SUITE_TOOLS if find_tool(t) is None]
    return ensure_tools(SUITE_TOOLS, install=True)

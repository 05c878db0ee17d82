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

"""Debian's headless Chromium, driven through Debian's chromedriver with selenium.

Why selenium and not raw DevTools over a websocket: WebDriver is the standard way to act as
a user (type into a field, click, wait for an element) and its waits are bounded by design;
Debian ships chromium-driver built from the same source as chromium, so the two never
disagree on a protocol version. Selenium Manager (which would download drivers) is never
run: the driver's path is given.

Every process is stopped by PID, also when the test fails: the chromedriver PID from
selenium's Service, every descendant (the browser and its helpers) and the crash handler
(which daemonizes, but names the session's own profile directory on its command line), each
found in /proc with its start time, so a reused PID is never signalled.
"""
from __future__ import annotations

import os
import signal
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.integration.status_page_client import Origin
from tests.system_tools import require_tools

WINDOW = (1280, 900)
# a root container has no user namespaces for the sandbox and a small /dev/shm
CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                  "--no-default-browser-check", "--disable-extensions", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--hide-scrollbars", "--force-device-scale-factor=1",
                  "--disable-crash-reporter")


def _start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22: starttime


def _descendants(root: int) -> list[tuple[int, str]]:
    """(pid, start time) of root and everything below it, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        started = _start_time(pid)
        if started is not None:
            out.append((pid, started))
        todo.extend(children.get(pid, []))
    return out


def _mentioning(marker: str) -> list[tuple[int, str]]:
    """(pid, start time) of processes whose command line contains marker (a unique path)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        started = _start_time(int(entry))
        if marker.encode() in cmdline and started is not None:
            found.append((int(entry), started))
    return found


def _kill(procs: list[tuple[int, str]]) -> None:
    for pid, started in procs:
        if _start_time(pid) == started:  # still the process we saw, not a reused PID
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@contextmanager
def chromium(origin: Origin, log_dir: Path, window: tuple[int, int] = WINDOW) -> Iterator[Any]:
    """A WebDriver session for `origin`. Over HTTPS the browser accepts exactly the key the
    node serves (--ignore-certificate-errors-spki-list), no other certificate error."""
    tools = require_tools({"chromium": "chromium", "chromedriver": "chromium-driver"})
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (the [test] extra)")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = tools["chromium"]
    profile = tempfile.mkdtemp(prefix="halb-chromium-", dir=log_dir)
    for flag in (*CHROMIUM_FLAGS, f"--window-size={window[0]},{window[1]}", f"--user-data-dir={profile}"):
        opts.add_argument(flag)
    if origin.cert_pem:
        opts.add_argument(f"--ignore-certificate-errors-spki-list={origin.spki_sha256()}")
    # HOME in the profile: Chromium's crash handler daemonizes (leaves our process tree) and keeps
    # its database under HOME; there it stays out of ~/.config and its command line names our path
    env = dict(os.environ, HOME=profile, XDG_CONFIG_HOME=profile, XDG_CACHE_HOME=profile)
    service = Service(executable_path=tools["chromedriver"], log_output=str(log_dir / "chromedriver.log"), env=env)
    driver = None
    try:
        driver = webdriver.Chrome(service=service, options=opts)
        driver.set_page_load_timeout(20)
        driver.set_script_timeout(10)
        yield driver
    finally:
        proc = getattr(service, "process", None)
        procs = (_descendants(proc.pid) if proc is not None else []) + _mentioning(profile)
        if driver is not None:  # polite first, bounded: a hung browser must not hang the test
            quitter = threading.Thread(target=driver.quit, daemon=True)
            quitter.start()
            quitter.join(10)
        _kill(procs)
        if proc is not None:
            try:
                proc.wait(5)
            except Exception:
                pass

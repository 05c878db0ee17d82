"""The supervised BIRD of BGP mode as a real process (Debian bird2): it starts from the
generated config and answers on its own control socket, a BIRD that died is restarted,
stop() ends it, and it dies with the process that started it (PR_SET_PDEATHSIG), so a
SIGKILLed node never leaves a BIRD announcing behind it.

No namespace needed: the config names a router on TEST-NET (never reached), no BFD, and
BIRD binds its BGP port only on a loopback address of its own (strict bind).
"""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from halb.announce.bgp import BgpSettings, RouterPeer, ServiceAddress
from halb.announce.bird import BirdProcess
from tests.system_tools import require_tools

pytestmark = pytest.mark.timeout(60)


def settings(tools: dict[str, str], n: int) -> BgpSettings:
    return BgpSettings(local_as=65001, local_address=f"127.0.79.{n}", router_id=f"127.0.79.{n}",
                       routers=(RouterPeer("192.0.2.1", 65000),), addresses=(ServiceAddress("198.51.100.7"),),
                       bfd=False, bird=tools["bird"], birdc=tools["birdc"])


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    with open(f"/proc/{pid}/stat") as f:  # a zombie counts as gone
        return f.read().split(") ", 1)[1].startswith("Z")


def wait(pred, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return False


def test_start_ask_restart_stop(tmp_path):
    tools = require_tools({"bird": "bird2", "birdc": "bird2"})
    bird = BirdProcess(settings(tools, 1), "n1", tmp_path / "bird")
    try:
        bird.write_config()
        assert oct((tmp_path / "bird" / "bird.conf").stat().st_mode & 0o777) == "0o600"
        bird.start()
        asyncio.run(bird.wait_ready())
        protos = {p.name: p for p in asyncio.run(bird.protocols())}
        assert protos["router1"].proto == "BGP" and protos["halb_addresses"].proto == "Direct"
        first = bird.proc.pid
        os.kill(first, signal.SIGKILL)
        assert wait(lambda: not bird.alive(), 5)
        assert bird.restart_if_dead(time.monotonic())
        assert bird.proc.pid != first and bird.starts == 2
        asyncio.run(bird.wait_ready())
        assert not bird.restart_if_dead(time.monotonic())  # alive: nothing to do
        pid = bird.proc.pid
        bird.stop()
        assert gone(pid)
    finally:
        bird.stop()


def test_bird_dies_with_the_process_that_started_it(tmp_path):
    tools = require_tools({"bird": "bird2", "birdc": "bird2"})
    pidfile = tmp_path / "bird.pid"
    code = textwrap.dedent(f"""
        import asyncio, sys, time
        sys.path.insert(0, {str(os.getcwd())!r})
        from halb.announce.bgp import BgpSettings, RouterPeer, ServiceAddress
        from halb.announce.bird import BirdProcess
        s = BgpSettings(local_as=65001, local_address="127.0.79.2", router_id="127.0.79.2",
                        routers=(RouterPeer("192.0.2.1", 65000),), addresses=(ServiceAddress("198.51.100.7"),),
                        bfd=False, bird={tools['bird']!r}, birdc={tools['birdc']!r})
        b = BirdProcess(s, "n2", {str(tmp_path / 'bird')!r})
        b.write_config()
        b.start()
        asyncio.run(b.wait_ready())
        open({str(pidfile)!r}, "w").write(str(b.proc.pid))
        time.sleep(60)
    """)
    node = subprocess.Popen([sys.executable, "-c", code])
    bird_pid = None
    try:
        assert wait(lambda: pidfile.exists() and pidfile.read_text(), 20), "the child never started BIRD"
        bird_pid = int(pidfile.read_text())
        assert not gone(bird_pid)
        node.kill()  # SIGKILL: no cleanup runs in the "node"
        node.wait(5)
        assert wait(lambda: gone(bird_pid), 5), "BIRD outlived the node that started it"
    finally:
        if node.poll() is None:
            node.kill()
            node.wait(5)
        if bird_pid is not None and not gone(bird_pid):
            os.kill(bird_pid, signal.SIGKILL)

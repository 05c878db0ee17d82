"""Hot restart (halb/takeover.py): `halb node reload` / `halb node run --takeover` replaces a
running node process under load without a failed request, and the node keeps its Raft
identity and data; a takeover that cannot happen leaves the old process serving."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from halb.demo.launcher import halb_argv
from halb.takeover import TakeoverClient, socket_path
from tests.conftest import wait_until
from tests.integration.http_load import start_load

pytestmark = pytest.mark.timeout(60)


def _data_dir(c, node_id: str) -> Path:
    return c.directory / "data" / node_id


def _get_ok(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=3) as s:
        s.sendall(f"GET /health HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n".encode())
        return s.recv(100).startswith(b"HTTP/1.1 200")


def _get_status(address: str) -> int:
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=3) as s:
        s.sendall(f"GET /health HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n".encode())
        return int(s.recv(100).split(b" ", 2)[1])


def _kill_pid(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_reload_under_load_drops_nothing_and_keeps_raft_identity(cluster_factory) -> None:
    # two data-plane processes per node: the worker's listener (own accept queue) moves too
    c = cluster_factory(run_backends=True, dataplane_extra={n: {"workers": 2} for n in ("n1", "n2", "n3")})
    c.wait_serving()
    node = c.leader()  # the hardest case: it leads, so leadership moves first
    old = c.nodes[node]
    before = c.status(node)
    from tests.conftest import free_port

    c.cli("backend", "add", "D", f"127.0.0.1:{free_port()}", "--weight", "1")  # journal data to survive
    c.cli("backend", "maint", "D")
    fe_port = free_port(c.spec_of(node).host)  # a frontend's listener is handed over too
    c.cli("frontend", "add", "web", "--port", str(fe_port), "--default-service", "checkout")
    fe_address = f"{c.spec_of(node).host}:{fe_port}"
    wait_until(lambda: _get_ok(fe_address), 10, 0.1, "frontend serving")
    assert _data_dir(c, node).is_dir()

    result, threads = start_load(c.service_address(node), "/health", seconds=9.0)
    time.sleep(1.5)
    new_pid = 0
    try:
        reload_log = c.directory / "logs" / f"{node}-reload.log"  # also the new process's log
        with open(reload_log, "w") as out:  # not a pipe: the new process keeps it open
            proc = subprocess.run([sys.executable, "-m", "halb", "node", "reload", "--config", str(c.config(node))],
                                  stdout=out, stderr=subprocess.STDOUT, timeout=45)
        m = re.search(r"pid (\d+) took over", reload_log.read_text())
        if m:
            new_pid = int(m.group(1))
        assert proc.returncode == 0, reload_log.read_text()
        assert old.proc.wait(20) == 0  # the old process drained and exited 0
        for t in threads:
            t.join(20)
        assert result.failed == 0, (result.errors, c.logs())
        assert result.ok > 300, result.ok  # the load really ran across the takeover

        after = c.status(node)
        assert after["pid"] == new_pid != before["pid"]
        assert after["node"] == before["node"] == node
        mine = [m for m in after["members"] if m.get("self")]
        assert mine and mine[0]["id"] == node and mine[0]["raft"] == c.spec_of(node).raft
        assert after["leader"] != node  # leadership was moved away before Raft stopped
        backends = c.cli_json("backend", "list")
        assert "D" in {b["name"] for b in (backends if isinstance(backends, list) else backends["backends"])}
        c.cli("backend", "maint", "A", node=node)  # writes work through the new process
        later = c.status(node)
        assert later["term"] >= before["term"] and later["commit_index"] > before["commit_index"]
        assert _get_ok(c.service_address(node))
        assert _get_ok(fe_address)
        old_log = (c.directory / "logs" / f"{node}.log").read_text()
        assert "(worker 1)" in old_log and "api " in old_log and str(fe_port) in old_log  # every listener moved
        assert "closed inherited sockets" not in reload_log.read_text()  # ... and taken by the new one
        print(f"takeover under load: ok={result.ok} retried={result.retried} failed={result.failed}")
        for line in (old_log + reload_log.read_text()).splitlines():  # the timeline, for the record
            if "takeover" in line or "taken over" in line or "stopped" in line:
                print(line[11:200])
    finally:
        if new_pid:
            _kill_pid(new_pid)


def test_refused_and_failed_takeovers_leave_the_old_process_serving(cluster_factory, tmp_path: Path) -> None:
    c = cluster_factory(run_backends=True)
    c.wait_serving()
    node = "n2"
    old = c.nodes[node]
    address = c.service_address(node)

    # a second takeover while one is in progress is refused clearly
    held = TakeoverClient(socket_path(_data_dir(c, node)), node, timeout=10)
    socks = held.hello()
    try:
        proc = subprocess.run(halb_argv("node", "run", "--config", str(c.config(node)), "--takeover"),
                              capture_output=True, text=True, timeout=30)
        assert proc.returncode == 1
        assert "already in progress" in proc.stderr, proc.stderr
    finally:
        socks.close_rest()
        held.close()  # abandoned before the Raft hand-over: the old process carries on
    assert old.alive() and _get_ok(address)

    # a plain second start on the same data dir is refused: never two writers of one journal
    proc = subprocess.run(halb_argv("node", "run", "--config", str(c.config(node))),
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1 and "in use by another halb process" in proc.stderr, proc.stderr

    # a broken config: the new process exits nonzero with file/key/reason, nothing changes
    broken = c.config(node).with_name("broken.toml")
    broken.write_text(c.config(node).read_text().replace("[api]", "[api]\nwrite_timeout = -1", 1))
    proc = subprocess.run([sys.executable, "-m", "halb", "node", "reload", "--config", str(broken)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "api: write_timeout" in proc.stderr.replace(".", ": "), proc.stderr
    proc = subprocess.run(halb_argv("node", "run", "--config", str(broken), "--takeover"),
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "config error" in proc.stderr, proc.stderr

    assert old.alive() and _get_ok(address)
    st = c.status(node)
    assert st["pid"] == old.proc.pid
    c.cli("backend", "drain", "A", node=node)  # Raft still works in the old process

    # a successor that dies after the old process gave Raft up: the old one exits 1 (the
    # service manager restarts the node as after a crash); the other two keep the quorum
    doomed = TakeoverClient(socket_path(_data_dir(c, node)), node, timeout=10)
    socks = doomed.hello()
    doomed.release()
    doomed.close()
    socks.close_rest()
    assert old.proc.wait(15) == 1
    assert "failed after taking Raft over" in (c.directory / "logs" / f"{node}.log").read_text()
    assert c.leader(among=["n1", "n3"]) in ("n1", "n3")


def test_sighup_applies_live_settings_and_names_the_rest(cluster_factory) -> None:
    c = cluster_factory()
    node = "n3"
    cfg = c.config(node)
    text = cfg.read_text()
    cfg.write_text('log_level = "WARNING"\n' + text.replace("[api]", "[api]\nwrite_timeout = 4.5", 1)
                   .replace("[raft]", "[raft]\nelection_timeout_max = 0.9", 1))
    c.nodes[node].signal(signal.SIGHUP)

    def event(kind: str) -> dict | None:
        code, body = c.get(node, "/v1/events?limit=50")
        assert code == 200
        for e in body["events"]:
            if e["kind"] == kind and e["message"].startswith(f"{node}:"):
                return e
        return None

    e = wait_until(lambda: event("node.reload"), 10, 0.1, "node.reload event")
    assert e["data"]["applied"] == ["api.write_timeout", "log_level"]
    assert e["data"]["needs_takeover"] == ["raft.election_timeout_max"]

    cfg.write_text(text.replace("[api]", "[api]\nwrite_timeout = \"soon\"", 1))
    c.nodes[node].signal(signal.SIGHUP)
    bad = wait_until(lambda: event("node.reload_failed"), 10, 0.1, "node.reload_failed event")
    assert bad["data"]["key"] == "api.write_timeout" and bad["data"]["file"] == str(cfg)
    assert c.nodes[node].alive()
    log = (c.directory / "logs" / f"{node}.log").read_text()
    assert "SIGHUP: " in log and "nothing changed" in log  # ERROR: shown at WARNING
    assert "SIGHUP: re-read" in log  # logged before the new level applies
    assert "event node.reload:" not in log  # INFO after the switch to WARNING: not shown here ...
    assert "event node.reload:" in (c.directory / "logs" / "n1.log").read_text()  # ... but on n1

    # the access log: turned on by SIGHUP, and reopened by SIGHUP after a rename (logrotate)
    alog = c.directory / f"{node}-access.log"
    cfg.write_text(text.replace("[dataplane]", f"[dataplane]\naccess_log = {str(alog)!r}", 1))
    c.nodes[node].signal(signal.SIGHUP)
    wait_until(lambda: _get_status(c.service_address(node)) and alog.exists() and alog.read_text(), 10, 0.2,
               "an access log line")
    line = json.loads(alog.read_text().splitlines()[0])
    assert line["path"] == "/health" and line["status"] in (502, 503) and line["service"] == "checkout"  # no backend runs
    alog.rename(alog.with_suffix(".log.1"))
    c.nodes[node].signal(signal.SIGHUP)
    wait_until(lambda: _get_status(c.service_address(node)) and alog.exists() and alog.read_text(), 10, 0.2,
               "a line in the reopened access log")


def _dns_answers(address: str, name: str) -> bool:
    from dnslib import DNSRecord

    host, port = address.rsplit(":", 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(1.0)
        s.sendto(DNSRecord.question(name, "A").pack(), (host, int(port)))
        try:
            reply = DNSRecord.parse(s.recv(4096))
        except socket.timeout:
            return False
    return reply.header.rcode == 0


def test_takeover_in_dns_mode_hands_the_udp_socket_over(cluster_factory) -> None:
    """DNS mode binds its UDP port without SO_REUSEPORT: without the hand-over the new
    process could not bind it at all."""
    from tests.conftest import free_port

    c = cluster_factory(start=False)
    dns = {n.id: f"{n.host}:{free_port(n.host)}" for n in c.spec.nodes}
    for n in c.spec.nodes:
        with c.config(n.id).open("a") as f:
            f.write(f'\n[announce]\nmode = "dns"\nbind = "{dns[n.id]}"\nnames = ["checkout"]\n')
    c.start_all()
    c.leader()
    c.wait_registered()
    node = "n3"
    wait_until(lambda: _dns_answers(dns[node], "checkout.halb"), 15, 0.1, "DNS answers")
    old = c.nodes[node]
    c.extra.append(old)  # stopped by the harness if the test fails half-way
    new = c.start(node, "--takeover")
    assert old.proc.wait(30) == 0
    assert new.alive()
    assert _dns_answers(dns[node], "checkout.halb")
    log = (c.directory / "logs" / f"{node}.log").read_text()  # the new process writes it too
    assert f"udp {dns[node]}" in log and "takeover from pid" in log


def test_takeover_speaks_for_the_unit_to_systemd(cluster_factory) -> None:
    """As under `systemctl reload`: the old node is the unit's main process (NOTIFY_SOCKET,
    WATCHDOG_USEC); the takeover process gets NOTIFY_SOCKET but no watchdog variables
    (systemd gives those to the main process only). It must send MAINPID=itself + READY=1,
    keep the watchdog fed after the old one exits, and nobody may send STOPPING=1."""
    from tests.integration.test_sd_notify_node import WATCHDOG_USEC, FakeSystemd

    systemd = FakeSystemd()
    try:
        c = cluster_factory(start=False)
        node = "n3"
        for n in c.spec.nodes:
            c.start(n.id, env=systemd.env() if n.id == node else None)
        c.leader()
        systemd.wait_for("READY=1", 20)
        old = c.nodes[node]
        c.extra.append(old)
        env = {k: v for k, v in systemd.env().items() if not k.startswith("WATCHDOG_")}
        new = c.start(node, "--takeover", env=env)
        systemd.wait_for(f"MAINPID={new.proc.pid}", 30)
        assert old.proc.wait(20) == 0
        after = systemd.collect(WATCHDOG_USEC / 1e6 * 1.5)  # only the new process is left
        lines = [m for _, m in systemd.messages]
        assert lines[lines.index(f"MAINPID={new.proc.pid}") + 1] == "READY=1"
        assert "STOPPING=1" not in lines
        assert sum(1 for _, m in after if m == "WATCHDOG=1") >= 2, after
        assert new.alive() and c.status(node)["pid"] == new.proc.pid
    finally:
        systemd.close()

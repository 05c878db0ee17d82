"""A lease holder whose data plane is broken for real hands the lease over (issue 16,
keepalived's track_script): the service's listen port on the holder's address is taken by
another socket before the holder binds it. Announce mode "dns" (no root): it has the same
quorum lease and holder as mode "vip"."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import time
import urllib.error
import urllib.request

import pytest

from tests.conftest import admin_url, admin_urlopen, free_port, wait_until


def _call(api: str, token: str, method: str, path: str, body: object = None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(admin_url(api, path), data=data, method=method,
                                 headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with admin_urlopen(req, timeout=2) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _holding(c, among: list[str]) -> str | None:
    """The node among ``among`` that holds the lease *and may serve it* (``holds_vip``: the
    replicated ``holder`` already names a new leader during its successor wait)."""
    for n in among:
        with contextlib.suppress(Exception):
            if c.status(n)["announce"]["holds_vip"]:
                return n
    return None


def _port_free_on_all(hosts: list[str]) -> int:
    for _ in range(50):
        port = free_port(hosts[0])
        try:
            for h in hosts[1:]:
                with socket.socket() as s:
                    s.bind((h, port))
            return port
        except OSError:
            continue
    raise AssertionError("no port free on every node address")


@pytest.mark.timeout(90)
def test_holder_with_unbindable_listener_hands_over_within_2s(cluster_factory):
    c = cluster_factory(start=False)
    for n in c.spec.nodes:
        with c.config(n.id).open("a") as f:
            f.write(f'\n[announce]\nmode = "dns"\nbind = "{n.host}:{free_port(n.host)}"\nnames = ["checkout"]\n')
    c.start_all()
    c.leader()
    c.wait_registered()
    token = c.token

    def holder(via: str) -> str | None:
        return c.status(via)["announce"]["holder"]

    h = wait_until(lambda: _holding(c, [n.id for n in c.spec.nodes]), 20, 0.05, "a lease holder")
    others = [n.id for n in c.spec.nodes if n.id != h]
    # every node passes its check before the fault (a node with only the seeded service)
    for n in c.spec.nodes:
        wait_until(lambda n=n: c.get(n.id, "/v1/dataplane-check")[1]["ok"] is True, 10, 0.05, f"{n.id} check ok")

    port = _port_free_on_all([n.host for n in c.spec.nodes])
    blocker = socket.socket()  # no SO_REUSEPORT: the holder's own bind on this address fails
    blocker.bind((c.spec_of(h).host, port))
    blocker.listen(1)
    try:
        code, body = _call(c.api(others[0]), token, "POST", "/v1/services", {
            "name": "web", "listen": f"{c.spec_of(h).host}:{port}",
            "backends": [{"name": "x", "address": f"127.0.0.1:{free_port()}"}]})
        assert code in (200, 201), body
        check = wait_until(lambda: (lambda b: b if b["ok"] is False else None)(c.get(h, "/v1/dataplane-check")[1]),
                           10, 0.02, "holder's check fails")
        assert "web" in check["reason"] and "in use" in check["reason"]
        new = wait_until(lambda: _holding(c, others), 5, 0.01, "another node holds the lease")
        took = time.monotonic() - check["failing_since"]
        print(f"holder {h} -> {new}: {took * 1000:.0f} ms after its data-plane check failed")
        assert took < 2.0, f"hand-over took {took:.3f}s after the check failed"
        assert new in others
        # the failing node does not take the lease back (it keeps failing: the port stays taken)
        end = time.monotonic() + 3.0
        while time.monotonic() < end:
            assert holder(others[1]) == new and not c.status(h)["announce"]["holds_vip"]
            time.sleep(0.1)
        st = c.status(h)
        assert st["dataplane_ok"] is False and "web" in st["dataplane_reason"]
        assert st["announce"]["dataplane_ok"] is False and not st["announce"]["holds_vip"]
        wait_until(lambda: {m["id"]: m["dataplane_ok"] for m in c.status(new)["members"]}[h] is False,
                   5, 0.1, "the new holder's status shows the old holder's failing check")
        members = {m["id"]: m for m in c.cli_json("cluster", "status", node=new)["members"]}
        assert members[h]["dataplane_ok"] is False and "web" in members[h]["dataplane_reason"]
        assert members[new]["dataplane_ok"] is True
        text = c.cli("cluster", "status", node=new).stdout
        assert "FAILING" in text and f"WARNING: {h} data plane self-check fails" in text
        events = c.get(h, "/v1/local-events")[1]["events"]
        kinds = [e["kind"] for e in events]
        assert "local.dataplane_check_failed" in kinds and "local.dataplane_handover" in kinds
        log = (c.directory / "logs" / f"{h}.log").read_text()
        assert "ERROR" in log and "data plane self-check FAILED" in log
        def replicated() -> set[str]:
            return {e["kind"] for e in c.get(new, "/v1/events")[1]["events"]}
        wait_until(lambda: {"dataplane.check_failed", "dataplane.handover"} <= replicated(), 5, 0.1,
                   "the cluster event log records the failed check and the hand-over")

        # the healthy holder dies: the still-failing node may win the election, but it
        # renews no lease and yields to the remaining healthy node (after its hold-down)
        third = next(n for n in others if n != new)
        c.kill(new)
        t_kill = time.monotonic()
        seen: set[str | None] = set()

        def third_holds() -> bool:
            seen.add(holder(third))
            return _holding(c, [third]) == third
        wait_until(third_holds, 15, 0.05, "the remaining healthy node holds the lease")
        print(f"after killing {new}: {third} holds the lease {time.monotonic() - t_kill:.2f}s later "
              f"(holders seen {sorted(map(str, seen))}; {h} handed leadership over "
              f"{c.get(h, '/v1/dataplane-check')[1]['leadership_handed_over']} times)")
        assert h not in seen
    finally:
        blocker.close()


def _worker_pids(node_pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == node_pid and b"halb.dataplane.workers" in cmd:
            out.append(int(d))
    return out


@pytest.mark.timeout(90)
def test_holder_with_crash_looping_workers_hands_over_within_2s(cluster_factory):
    c = cluster_factory(start=False)
    for n in c.spec.nodes:
        with c.config(n.id).open("a") as f:
            f.write(f'\n[announce]\nmode = "dns"\nbind = "{n.host}:{free_port(n.host)}"\nnames = ["checkout"]\n'
                    "dataplane_worker_deaths = 3\ndataplane_worker_window_s = 30.0\n")
        text = c.config(n.id).read_text().replace("[dataplane]\n", "[dataplane]\nworkers = 2\n", 1)
        c.config(n.id).write_text(text)
    c.start_all()
    c.leader()
    c.wait_registered()
    h = wait_until(lambda: _holding(c, [n.id for n in c.spec.nodes]), 20, 0.05, "a lease holder")
    others = [n.id for n in c.spec.nodes if n.id != h]
    pid = c.nodes[h].proc.pid
    wait_until(lambda: _worker_pids(pid), 15, 0.05, "the holder's worker process")
    killed = 0
    deadline = time.monotonic() + 15
    check = None
    while time.monotonic() < deadline:  # SIGKILL every worker the holder (re)spawns
        for w in _worker_pids(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(w, signal.SIGKILL)
                killed += 1
        body = c.get(h, "/v1/dataplane-check")[1]
        if body["ok"] is False:
            check = body
            break
        time.sleep(0.02)
    assert check is not None, f"check did not fail after {killed} worker kills"
    assert "worker process deaths" in check["reason"]
    new = wait_until(lambda: _holding(c, others), 5, 0.01, "another node holds the lease")
    took = time.monotonic() - check["failing_since"]
    print(f"holder {h} -> {new}: {took * 1000:.0f} ms after its data-plane check failed ({killed} kills)")
    assert took < 2.0 and new in others

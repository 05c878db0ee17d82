"""`halb cluster up`, the command behind `make demo`: starts backends and nodes, serves
traffic through every balancer, and stops every process it started on SIGTERM."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import make_cluster, wait_until

pytestmark = pytest.mark.timeout(120)


def children_of(pid: int) -> set[int]:
    kids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid:
            kids.add(int(entry.name))
    return kids


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    return state != "Z"


def test_cluster_up_serves_and_stops_everything(tmp_path):
    c = make_cluster(tmp_path / "demo")
    proc = subprocess.Popen([sys.executable, "-m", "halb", "cluster", "up", "--config-dir", str(c.directory)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    kids: set[int] = set()
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "press Ctrl-C" in line:
                break
        out = "".join(lines)
        assert "leader:" in out and "curl -s http://" in out, out
        assert f"api https://{c.api('n1')}," in out, out  # the admin API is HTTPS, and says so
        assert f". {c.directory}/cluster.env && halb cluster status" in out, out
        assert f"HALB_CA_FILE={c.ca_file.resolve()}" in (c.directory / "cluster.env").read_text()
        kids = children_of(proc.pid)
        assert len(kids) == 6  # three backends, three nodes
        st = c.cli_json("cluster", "status")
        assert st["leader"] and sorted(m["raft_state"] for m in st["members"]) == ["follower", "follower", "leader"]
        assert st["services"][0]["listen"] == sorted(c.service_address(n) for n in ("n1", "n2", "n3"))
        served = set()
        for addr in st["services"][0]["listen"]:
            for _ in range(3):
                with urllib.request.urlopen(f"http://{addr}/products", timeout=5) as resp:
                    assert resp.status == 200
                    served.add(resp.headers["X-Served-By"])
                    assert json.loads(resp.read())["products"]
        assert served == {"A", "B", "C"}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        for pid in kids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert proc.returncode == 0
    assert not [pid for pid in kids if alive(pid)], "cluster up left children running"


class Output:
    """Lines of a child's stdout, read by a thread, waited on with a timeout."""

    def __init__(self, proc: subprocess.Popen) -> None:
        import threading

        self.lines: list[str] = []
        self._t = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._t.start()

    def _read(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            self.lines.append(line)

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def wait_for(self, needle: str, timeout: float = 60) -> str:
        wait_until(lambda: needle in self.text, timeout, 0.05, f"{needle!r} in the output:\n{self.text}")
        return self.text


def test_cluster_up_supervises_refuses_duplicates_and_prints_working_commands(tmp_path):
    """Items 1-3 of issue 12: a second `cluster up` exits 2 naming the PIDs that hold its
    addresses; the printed status command works as printed (no venv on PATH); a node
    killed with SIGKILL is restarted with back-off, and SIGTERM then stops the restarted
    process too. The shared service address is printed."""
    c = make_cluster(tmp_path / "demo", shared=True)
    argv = [sys.executable, "-m", "halb", "cluster", "up", "--config-dir", str(c.directory)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = Output(proc)
    seen: set[int] = set()
    try:
        text = out.wait_for("press Ctrl-C")
        seen |= children_of(proc.pid)
        assert f"survives any one of them): http://{c.spec.shared_address}" in text, text
        assert "health: ok" in text, text

        # 1. a second cluster up over the same addresses refuses, naming the pids
        second = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert second.returncode == 2, second.stdout + second.stderr
        assert "already in use" in second.stderr
        n1_pid = int((c.directory / "run" / "n1.pid").read_text())
        assert f"  pid {n1_pid} holds n1 api {c.api('n1')}, n1 raft" in second.stderr, second.stderr
        assert f"shared address of checkout {c.spec.shared_address}" in second.stderr, second.stderr
        assert "started node" not in second.stdout  # nothing was started
        assert children_of(proc.pid) == seen

        # 2. the printed hint works as printed, with a PATH that has no venv on it
        hint = next(line for line in text.splitlines() if "cluster.env && halb" in line)
        command = hint.split("shell:", 1)[1].strip()
        env = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp")}
        res = subprocess.run(["sh", "-c", command + " --json"], capture_output=True, text=True, env=env, timeout=60)
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout)["services"][0]["address"] == c.spec.shared_address

        # 3. kill -9 a node: it is restarted with back-off, said on stdout
        os.kill(n1_pid, signal.SIGKILL)
        text = out.wait_for("restarted n1 (pid", 30)
        assert f"n1 (pid {n1_pid}) exited with -9; restarting in 1s" in text, text
        new_pid = int((c.directory / "run" / "n1.pid").read_text())
        assert new_pid != n1_pid and alive(new_pid) and new_pid in children_of(proc.pid)
        seen |= children_of(proc.pid)
        wait_until(lambda: c.status("n1")["leader"] is not None, 30, 0.2, "restarted n1 back in the cluster")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        for pid in seen:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert proc.returncode == 0, out.text
    assert not [pid for pid in seen if alive(pid)], "cluster up left children running"
    assert not list((c.directory / "run").glob("*.pid"))


def edge_commands_in(text: str) -> dict[str, str]:
    """The banner's demo-edge block: {what it shows: command}, parsed as a user reads it."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("HTTPS with Host routing"))
    out: dict[str, str] = {}
    i = start + 1
    while i + 1 < len(lines) and lines[i].startswith("  ") and not lines[i].startswith("    "):
        assert lines[i + 1].startswith("    "), lines[i:i + 2]
        out[lines[i].strip().rstrip(":")] = lines[i + 1].strip()
        i += 2
    return out


def curl_like(command: str) -> str:
    """Run a printed curl command: with curl when installed, else the same request (same
    --cacert, --resolve, URL; `-w` prints status and redirect URL) with Python's ssl/http."""
    import shlex
    import shutil
    from urllib.parse import urlsplit

    if shutil.which("curl"):
        res = subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=30)
        assert res.returncode == 0, f"{command}\n{res.stderr}"
        return res.stdout
    import http.client

    from halb.demo.edge_check import https_get

    argv = shlex.split(command)
    opts = {a: argv[i + 1] for i, a in enumerate(argv) if a in ("--cacert", "--resolve", "-w")}
    url = urlsplit(argv[-1])
    addr = opts["--resolve"].split(":", 2)[2].split(",")[0]
    if url.scheme == "https":
        status, body = https_get(f"{addr}:{url.port}", url.hostname, url.path, Path(opts["--cacert"]), timeout=10)
        assert status == 200, (command, status, body)
        return body.decode()
    conn = http.client.HTTPConnection(addr, url.port, timeout=10)
    conn.request("GET", url.path, headers={"Host": f"{url.hostname}:{url.port}"})
    resp = conn.getresponse()
    conn.close()
    return f"{resp.status} {resp.getheader('Location')}\n"


def run_printed(commands: dict[str, str]) -> dict[str, str]:
    out = {}
    for what, command in commands.items():
        if command.startswith("curl "):
            out[what] = curl_like(command)
        else:  # the WebSocket client, `halb demo ws ...`
            res = subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=30)
            assert res.returncode == 0, f"{command}\n{res.stderr}"
            out[what] = res.stdout
    return out


@pytest.mark.timeout(240)
def test_cluster_up_seeds_an_https_edge_whose_printed_commands_work(tmp_path):
    """Issue 13 (demo): `cluster up` seeds a demo CA, a certificate, an HTTPS frontend with
    Host and path routes to checkout and catalog; the printed curl / WebSocket commands work
    as printed (verified against the printed demo CA); a second `cluster up` on the same
    directory seeds nothing twice and prints the same working commands."""
    from halb.demo.edge import DemoEdge
    from tests.conftest import free_port

    from halb.demo.launcher import init_cluster_dir

    c = make_cluster(tmp_path / "demo")  # nodes on a random loopback net, free ports, the test CA
    host = c.spec.nodes[0].host
    c.spec.demo_edge = DemoEdge(port=free_port(host), http_port=free_port(host), catalog_port=free_port(host),
                                catalog_backends=[(name, f"127.0.0.1:{free_port()}") for name in ("A", "B", "C")])
    edge = c.spec.demo_edge
    init_cluster_dir(c.directory, c.spec)  # again, now with the demo edge (secrets and CA kept)
    d = c.directory
    assert stat_mode(d / "demo-ca.key") == 0o600 and not list((d / "data").glob("**/demo-ca*"))
    argv = [sys.executable, "-m", "halb", "cluster", "up", "--config-dir", str(d)]
    first: dict[str, str] = {}
    for run in (1, 2):
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        out = Output(proc)
        seen: set[int] = set()
        try:
            text = out.wait_for("press Ctrl-C", 90)
            seen |= children_of(proc.pid)
            assert len(seen) == 6, text  # the catalog runs inside the three checkout backends
            assert ("seeded the demo HTTPS edge" in text) == (run == 1), text
            assert f"verified against the demo CA {d.resolve()}/demo-ca.crt" in text, text
            commands = edge_commands_in(text)
            assert len(commands) == 5, commands
            if run == 1:
                first = commands
            assert commands == first  # the same commands keep working after a restart
            results = run_printed(commands)
            shop = json.loads(results["Host shop.localhost -> checkout"])
            assert shop["products"] and shop["server"] in {"A", "B", "C"}
            for what in ("Host catalog.shop.localhost -> catalog", "path shop.localhost/catalog/ -> catalog"):
                body = json.loads(results[what])
                assert body["service"] == "catalog" and body["items"], body
            assert results["plain HTTP answers 308 to HTTPS"].strip() == \
                f"308 https://shop.localhost:{edge.port}/products"
            ws = next(v for k, v in results.items() if k.startswith("WebSocket"))
            assert '< {"instance": ' in ws and "> hello\n< hello" in ws, ws
            # Host routing is visible: the catalog answers from more than one instance
            catalog = commands["Host catalog.shop.localhost -> catalog"]
            servers = {json.loads(curl_like(catalog))["server"] for _ in range(6)}
            assert len(servers) >= 2, servers
            fes = c.cli_json("frontend", "list")
            assert [(f["name"], len(f["routes"])) for f in fes] == [("web", 3)], fes
            certs = c.cli_json("cert", "list")
            assert [x["name"] for x in certs] == ["shop-demo"], certs
            assert sorted(s["name"] for s in c.cli_json("cluster", "status")["services"]) == ["catalog", "checkout"]
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
            for pid in seen:
                if alive(pid):
                    os.kill(pid, signal.SIGKILL)
        assert proc.returncode == 0, out.text


def stat_mode(path: Path) -> int:
    import stat

    return stat.S_IMODE(path.stat().st_mode)

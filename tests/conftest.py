"""Shared fixtures: free ports, and a harness that runs real halb node processes.

Every process a test starts is registered with the harness and stopped in the fixture's
finalizer, also when the test fails, so a red test never leaves nodes behind.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest

from halb.demo.launcher import Child, ClusterSpec, NodeSpec, api_get, halb_argv, init_cluster_dir
from halb.tls import AdminTls

_used_ports: set[int] = set()
_test_ca: list[Path] = []


def test_ca_dir() -> Path:
    """One cluster CA for the whole test run (made by the same `ensure_ca` as `cluster init`;
    make_cluster puts it into each cluster directory before init, which then keeps it), so a
    test's own request helpers can verify any harness cluster with `admin_urlopen`. It is
    not in the system trust store: a client that forgets the CA still fails."""
    if not _test_ca:
        import atexit
        import shutil
        import tempfile

        from halb.demo.launcher import ensure_ca

        d = Path(tempfile.mkdtemp(prefix="halb-test-ca-"))
        atexit.register(shutil.rmtree, d, True)
        ensure_ca(d)
        _test_ca.append(d)
    return _test_ca[0]


def admin_tls() -> AdminTls:
    return AdminTls(ca_file=str(test_ca_dir() / "ca.crt"))


def admin_url(api: str, path: str) -> str:
    """https://API/PATH for a harness node's HOST:PORT."""
    return admin_tls().url(api, path)


def admin_socket(api: str, timeout: float) -> Any:
    """A TLS connection to a harness node's admin API (raw HTTP tests), verified against the test CA."""
    host, port = api.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=timeout)
    try:
        return admin_tls().context().wrap_socket(sock, server_hostname=host)
    except BaseException:
        sock.close()
        raise


def admin_urlopen(req: Any, timeout: float) -> Any:
    """urllib.request.urlopen for a harness node's admin API, verifying it against the test CA."""
    import urllib.request

    return urllib.request.urlopen(req, timeout=timeout, context=admin_tls().context())


def free_port(host: str = "127.0.0.1") -> int:
    """A port that is free now on host (and not handed out before in this run)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port not in _used_ports:
            _used_ports.add(port)
            return port
    raise RuntimeError("no free port")


def wait_until(predicate: Any, timeout: float, interval: float = 0.05, message: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # the thing we wait for may not exist yet
            last_exc = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {message} (last error: {last_exc})")


@dataclass
class Cluster:
    """Real node processes on 127.0.0.1 with free ports, configs from `halb cluster init`'s generator."""

    directory: Path
    spec: ClusterSpec
    nodes: dict[str, Child] = field(default_factory=dict)
    extra: list[Child] = field(default_factory=list)
    backends: dict[str, Child] = field(default_factory=dict)

    @property
    def token(self) -> str:
        return (self.directory / "token").read_text().strip()

    @property
    def token_file(self) -> Path:
        return self.directory / "token"

    def spec_of(self, node_id: str) -> NodeSpec:
        return next(n for n in self.spec.nodes if n.id == node_id)

    def api(self, node_id: str) -> str:
        """HOST:PORT of the node's admin API (HTTPS: build URLs with `url`, open them with `ssl`)."""
        return self.spec_of(node_id).api

    @property
    def ca_file(self) -> Path:
        return self.directory / "ca.crt"

    @property
    def tls(self) -> AdminTls:
        """How the harness reaches the nodes: HTTPS verified against this cluster's CA."""
        return AdminTls(ca_file=str(self.ca_file))

    @property
    def ssl(self) -> Any:
        """The verifying SSL context for urllib (`urlopen(req, context=c.ssl)`) and aiohttp."""
        return self.tls.context()

    def url(self, node_id: str, path: str) -> str:
        return self.tls.url(self.api(node_id), path)

    @property
    def apis(self) -> list[str]:
        return [n.api for n in self.spec.nodes]

    @property
    def db(self) -> Path:
        return self.directory / "shop.db"

    def backend_address(self, name: str) -> str:
        return dict(self.spec.backends)[name]

    def start_backend(self, name: str, *flags: str) -> Child:
        child = Child(f"backend-{name}", halb_argv("demo", "backend", "--name", name, "--listen",
                                                   self.backend_address(name), "--db", str(self.db), *flags),
                      self.directory / "logs" / f"backend-{name}.log")
        child.start()
        self.backends[name] = child
        wait_until(lambda: _port_open(self.backend_address(name)), 15, 0.05, f"backend {name} listening")
        return child

    def start_backends(self, *flags: str) -> None:
        for name, _ in self.spec.backends:
            self.start_backend(name, *flags)

    def service_address(self, node_id: str) -> str:
        return f"{self.spec_of(node_id).host}:{self.spec.service_port}"

    def wait_serving(self, timeout: float = 15.0) -> None:
        for n in self.nodes:
            wait_until(lambda n=n: _port_open(self.service_address(n)), timeout, 0.05, f"{n} serving")

    def config(self, node_id: str) -> Path:
        return self.directory / f"{node_id}.toml"

    def start(self, node_id: str, *extra_args: str, env: dict[str, str] | None = None) -> Child:
        child = Child(node_id, halb_argv("node", "run", "--config", str(self.config(node_id)), *extra_args),
                      self.directory / "logs" / f"{node_id}.log")
        child.start(env=env)
        self.nodes[node_id] = child
        return child

    def start_all(self) -> None:
        for n in self.spec.nodes:
            self.start(n.id)

    def kill(self, node_id: str, sig: int = signal.SIGKILL) -> None:
        child = self.nodes[node_id]
        child.signal(sig)
        if sig == signal.SIGKILL:
            child.proc.wait(5)

    def stop_all(self) -> None:
        for child in list(self.nodes.values()) + self.extra + list(self.backends.values()):
            child.stop()

    def get(self, node_id: str, path: str, token: str | None = None) -> tuple[int, Any]:
        return api_get(self.api(node_id), path, self.token if token is None else token, timeout=3, tls=self.tls)

    def status(self, node_id: str) -> dict[str, Any]:
        code, body = self.get(node_id, "/v1/status")
        assert code == 200, body
        return body

    def leader(self, among: list[str] | None = None, timeout: float = 15.0) -> str:
        """The leader every listed live node agrees on (never one that is not among them)."""
        ids = among or [n for n, c in self.nodes.items() if c.alive()]

        def agreed() -> str | None:
            leaders = {self.status(n)["leader"] for n in ids}
            return leaders.pop() if len(leaders) == 1 and leaders <= set(ids) else None

        return wait_until(agreed, timeout, 0.1, "an agreed leader")

    def wait_registered(self, timeout: float = 15.0) -> None:
        want = {n.id for n in self.spec.nodes}
        wait_until(lambda: {m["id"] for m in self.status(self.spec.nodes[0].id)["members"]} >= want, timeout,
                   0.1, "all members registered")

    def cli(self, *args: str, node: str | None = None, check: bool = True, timeout: float = 30,
            token_file: Path | None = None) -> subprocess.CompletedProcess[str]:
        """`token_file`: run as another named token (default: the bootstrap token)."""
        env = dict(os.environ, HALB_CLUSTER=self.api(node) if node else ",".join(self.apis),
                   HALB_TOKEN_FILE=str(token_file or self.token_file), HALB_CA_FILE=str(self.ca_file))
        env.pop("HALB_TOKEN", None)
        proc = subprocess.run([sys.executable, "-m", "halb", *args], capture_output=True, text=True, env=env,
                              timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"halb {' '.join(args)} exited {proc.returncode}: {proc.stderr}{proc.stdout}")
        return proc

    def cli_json(self, *args: str, node: str | None = None) -> Any:
        return json.loads(self.cli(*args, "--json", node=node).stdout)

    def logs(self) -> str:
        out = []
        for p in sorted((self.directory / "logs").glob("*.log")):
            out.append(f"==== {p.name}\n" + p.read_text()[-4000:])
        return "\n".join(out)


def _port_open(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=0.5):
            return True
    except OSError:
        return False


def make_cluster(directory: Path, n: int = 3, **spec_kw: Any) -> Cluster:
    """Nodes on their own loopback addresses (127.X.Y.1..n, so each node's service listener
    is its own: nodes share the service port, and SO_REUSEPORT on one address would mix them)
    with free ports; backends A, B, C on 127.0.0.1 free ports (not started)."""
    import random

    net = f"127.{random.randint(1, 254)}.{random.randint(0, 254)}"
    hosts = [f"{net}.{i + 1}" for i in range(n)]
    nodes = [NodeSpec(f"n{i + 1}", hosts[i], raft_port=free_port(hosts[i]), api_port=free_port(hosts[i]))
             for i in range(n)]
    spec_kw.setdefault("service_port", free_port(hosts[0]))
    if spec_kw.pop("shared", False):  # every node also serves on NET.10 ([dataplane] shared_hosts)
        spec_kw["shared_host"] = f"{net}.10"
    if "backends" not in spec_kw:
        spec_kw["backends"] = [(name, f"127.0.0.1:{free_port()}") for name in ("A", "B", "C")]
    spec = ClusterSpec(nodes=nodes, **spec_kw)
    directory.mkdir(parents=True, exist_ok=True)
    import shutil

    for name in ("ca.crt", "ca.key"):  # the run's CA: init keeps an existing one and signs with it
        if not (directory / name).exists():
            shutil.copy2(test_ca_dir() / name, directory / name)
    init_cluster_dir(directory, spec)
    return Cluster(directory, spec)


@pytest.fixture
def cluster_factory(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Any]:
    made: list[Cluster] = []

    def factory(n: int = 3, start: bool = True, run_backends: bool = False, backend_flags: tuple[str, ...] = (),
                **kw: Any) -> Cluster:
        c = make_cluster(tmp_path / f"cluster{len(made)}", n, **kw)
        made.append(c)
        if run_backends:
            c.start_backends(*backend_flags)
        if start:
            c.start_all()
            c.leader()
            c.wait_registered()
        return c

    yield factory
    failed = getattr(request.node, "rep_call", None)
    for c in made:
        c.stop_all()
        if failed is not None and failed.failed:
            print(c.logs())


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


class FaultProxy:
    """halb's Toxiproxy-compatible server, in-process, driven over its HTTP API."""

    def __init__(self) -> None:
        from halb.chaos.toxiproxy.testing import ThreadedServer

        self.server = ThreadedServer()

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        import urllib.request

        req = urllib.request.Request(f"{self.server.url}{path}", method=method,
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            raw = resp.read()
            return json.loads(raw) if raw else None

    def create(self, name: str, upstream: str) -> str:
        listen = f"127.0.0.1:{free_port()}"
        self._call("POST", "/proxies", {"name": name, "listen": listen, "upstream": upstream, "enabled": True})
        return listen

    def set_enabled(self, name: str, enabled: bool) -> None:
        self._call("POST", f"/proxies/{name}", {"enabled": enabled})

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture
def fault_proxy() -> Iterator[FaultProxy]:
    fp = FaultProxy()
    try:
        yield fp
    finally:
        fp.stop()


@pytest.fixture(scope="module")
def echo() -> Iterator[Any]:
    """A threaded TCP echo server on 127.0.0.1 (fault-proxy tests relay through it)."""
    from halb.chaos.toxiproxy.testing import TcpServer, echo_handler

    srv = TcpServer(echo_handler)
    try:
        yield srv
    finally:
        srv.close()


def pytest_sessionstart(session: pytest.Session) -> None:
    """Debian components (BIRD, pebble, Chromium) before any test runs: see tests/system_tools.py."""
    from tests.system_tools import install_suite_tools

    missing = install_suite_tools()
    if missing:
        print(f"\nnot installed (their tests will skip): {', '.join(missing)}", flush=True)

"""What a drill acts on: a local cluster it starts itself, or an existing one.

Chaos acts on the cluster from outside, as an operator would: signals to processes it
knows the PID of, the fault proxy in front of Raft links and backends, and the admin API.
Every method here is synchronous (process and HTTP calls); the engine runs them in a
thread so the load generator's event loop never stalls.

`LocalTarget` starts three balancers on their own loopback addresses (127.X.Y.1-3, free
ports), backends A/B/C (127.X.Y.21-23) sharing one SQLite file, and the fault proxy as a
child process with one proxy per Raft link and one per backend. It remembers the PID of
everything it started and stops exactly those, also on failure or Ctrl-C.

`RemoteTarget` drives an existing cluster through the admin API; process actions need a
``--pids`` mapping and are otherwise skipped with a clear message.
"""
from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from halb.api.client import ApiError, Client
from halb.chaos.faults import FaultProxy
from halb.chaos.load import ClientAddresses
from halb.demo.launcher import (
    CA_CERT, Child, ClusterSpec, NodeSpec, ensure_local_tls, halb_argv, init_cluster_dir, node_config_text,
)
from halb.tls import AdminTls


class Unsupported(Exception):
    """This target cannot do that action (the step is reported as skipped)."""


class TargetError(Exception):
    """An action was attempted and failed."""


def _port_free_on(hosts: list[str], port: int) -> bool:
    for host in hosts:
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                return False
    return True


def free_port(hosts: list[str], taken: set[int]) -> int:
    """A port free on every host in `hosts` (and not handed out before by this target)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind((hosts[0], 0))
            port = s.getsockname()[1]
        if port not in taken and _port_free_on(hosts, port):
            taken.add(port)
            return port
    raise TargetError("no free port")


def _loopback_prefix() -> str:
    """127.X.Y.: a random loopback /24 so concurrent runs (and `make demo`) do not collide."""
    for _ in range(50):
        prefix = f"127.{random.randint(60, 250)}.{random.randint(1, 250)}."
        try:
            with socket.socket() as s:
                s.bind((prefix + "1", 0))
            return prefix
        except OSError:
            continue
    return "127.0.0."


@dataclass
class Target:
    """Common interface; the base implementation supports only admin API actions."""

    kind: str
    apis: dict[str, str]  # node id -> admin API address
    token: str
    client_addresses: ClientAddresses
    db_path: str | None
    service: str = "checkout"
    backend_names: list[str] = field(default_factory=list)
    # where /products traffic goes when it has its own service (overload drills); None: same as checkout
    products_addresses: ClientAddresses | None = None
    tls: AdminTls = field(default_factory=AdminTls)  # how the admin APIs are reached (halb/tls.py)

    # --- admin API --------------------------------------------------------------------
    def client(self, timeout: float = 4.0) -> Client:
        return Client(list(self.apis.values()), self.token, timeout=timeout, tls=self.tls)

    def api_call(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        return self.client().request(method, path, body if body is not None or method == "GET" else {})

    def add_member(self, node_id: str) -> str:
        raise Unsupported("adding a member needs a process to start: only with --cluster local")

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "apis": self.apis, "client_addresses": self.client_addresses.addresses,
                "client_mode": self.client_addresses.mode, "db": self.db_path}

    # --- processes and links (subclasses) ----------------------------------------------
    def balancer(self, node_id: str, what: str) -> str:
        raise Unsupported(f"{what}-balancer needs the node's PID (pass --pids) or --cluster local")

    def backend(self, name: str, what: str) -> str:
        raise Unsupported(f"{what}-backend needs a process this run started: only with --cluster local")

    def server(self, server: str, what: str) -> str:
        raise Unsupported(f"{what}-server needs the backend processes this run started: only with --cluster local")

    def partition(self, node_id: str, cut: bool) -> str:
        raise Unsupported("partitions need the fault proxy on the Raft links: only with --cluster local")

    def add_toxic(self, link: tuple[str, ...], name: str, type_: str, stream: str, toxicity: float,
                  attributes: dict[str, Any]) -> str:
        raise Unsupported("toxics need the fault proxy on the links: only with --cluster local")

    def remove_toxic(self, link: tuple[str, ...], name: str) -> str:
        raise Unsupported("toxics need the fault proxy on the links: only with --cluster local")

    def balancer_alive(self, node_id: str) -> bool | None:
        return None

    def startup_problem(self) -> str | None:
        """Why the cluster cannot become ready (e.g. a process exited at start), if known."""
        return None

    def pids(self) -> dict[str, int]:
        return {}

    def heal_everything(self) -> None:
        """Best-effort: undo every fault this run could have left (used before teardown)."""

    def backend_stats(self) -> dict[str, dict[str, Any]]:
        """Each backend process's own ``GET /stats`` (demo backends), read from the process
        itself, not through a balancer; {"error": ...} for one that does not answer."""
        raise Unsupported("backend /stats need the backend processes this run started: only with --cluster local")

    def close(self) -> None:
        pass


@dataclass
class RemoteTarget(Target):
    """An existing cluster; optional {node id: pid} for kill/freeze/resume on this machine."""

    node_pids: dict[str, int] = field(default_factory=dict)

    @classmethod
    def connect(cls, urls: list[str], token: str, db_path: str | None, pids: dict[str, int]) -> "RemoteTarget":
        tls = AdminTls.from_env().for_addresses(urls)  # the cluster's CA (HALB_CA_FILE), as for the CLI
        client = Client(urls, token, timeout=4.0, tls=tls)
        status = client.get("/v1/status")
        apis = {m["id"]: m["api"] for m in status["members"] if m.get("id") and m.get("api")}
        services = status.get("services") or []
        if not services:
            raise TargetError("the cluster has no service to send traffic to")
        svc = services[0]
        addrs = list(svc.get("listen") or [])
        for a in addrs:
            host = a.rsplit(":", 1)[0]
            if not host.startswith("127."):
                raise TargetError(f"service address {a} is not on 127.0.0.0/8: drills only send traffic to loopback")
        backends = [b["name"] for b in client.get(f"/v1/services/{svc['name']}/backends")["backends"]]
        return cls(kind="remote", apis=apis or {f"api{i}": u for i, u in enumerate(urls)}, token=token,
                   client_addresses=ClientAddresses("balancers", addrs), db_path=db_path, service=svc["name"],
                   backend_names=backends, node_pids=pids, tls=tls)

    def balancer(self, node_id: str, what: str) -> str:
        pid = self.node_pids.get(node_id)
        sig = {"kill": signal.SIGKILL, "freeze": signal.SIGSTOP, "resume": signal.SIGCONT, "stop": signal.SIGTERM}.get(what)
        if pid is None or sig is None:
            return super().balancer(node_id, what)
        os.kill(pid, sig)
        return f"sent {sig.name} to {node_id} (pid {pid})"

    def pids(self) -> dict[str, int]:
        return dict(self.node_pids)


@dataclass
class LocalOptions:
    service_options: dict[str, Any] = field(default_factory=dict)
    health: dict[str, Any] = field(default_factory=dict)
    nodes: int = 3
    backends: tuple[str, ...] = ("A", "B", "C")
    keep_dir: bool = False
    # backend name -> {server, zone, max_rps, max_conns} (a drill's [cluster.backends]); when
    # given it also decides which backends run. Backends of one server share its address.
    backend_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    backend_process: dict[str, Any] = field(default_factory=dict)  # {capacity, work_ms} of every backend
    browse: dict[str, Any] | None = None  # second service on the same backends (drill [cluster.browse])
    balancers: int = 0  # client addresses used: the first N balancers (0: all)

    def __post_init__(self) -> None:
        if self.backend_options:
            self.backends = tuple(self.backend_options)

    def server_of(self, backend: str) -> str:
        return str(self.backend_options.get(backend, {}).get("server") or backend)


class LocalTarget(Target):
    """A throwaway cluster in `directory`: nodes, backends and fault proxy, all children."""

    def __init__(self, directory: Path, opts: LocalOptions | None = None) -> None:
        opts = opts or LocalOptions()
        self.directory = directory
        self.opts = opts
        self.logs = directory / "logs"
        self.prefix = _loopback_prefix()
        self._taken: set[int] = set()
        self.nodes: dict[str, Child] = {}
        self.backend_procs: dict[str, Child] = {}
        self.backend_real: dict[str, str] = {}
        self.links: dict[tuple[str, str], str] = {}  # (dialler id, dialled id) -> proxy name
        self.proxy_proc: Any = None
        self.faults: FaultProxy | None = None
        self.spec: ClusterSpec | None = None
        super().__init__(kind="local", apis={}, token="", client_addresses=ClientAddresses("balancers", []),
                         db_path=str((directory / "shop.db").resolve()), backend_names=list(opts.backends))

    # --- start / stop -------------------------------------------------------------------

    def start(self) -> None:
        from halb.chaos.toxiproxy import ToxiproxyProcess

        self.directory.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(exist_ok=True)
        tp_log = open(self.logs / "faultproxy.log", "ab")
        try:
            self.proxy_proc = ToxiproxyProcess(host="127.0.0.1", port=0, stderr=tp_log).start()
        finally:
            tp_log.close()
        self.faults = FaultProxy(self.proxy_proc.url)
        p = self.prefix
        hosts = [f"{p}{i + 1}" for i in range(self.opts.nodes)]
        nodes = [NodeSpec(f"n{i + 1}", h, raft_port=free_port([h], self._taken), api_port=free_port([h], self._taken))
                 for i, h in enumerate(hosts)]
        service_port = free_port(hosts, self._taken)
        backends: list[tuple[str, str]] = []
        servers: list[str] = []
        for name in self.opts.backends:
            server = self.opts.server_of(name)
            if server not in servers:
                servers.append(server)
            host = f"{p}{21 + servers.index(server)}"  # one loopback address per server
            real = f"{host}:{free_port([host], self._taken)}"
            self.backend_real[name] = real
            backends.append((name, self.faults.create(f"backend-{name}", "127.0.0.1:0", real)))
        options = dict(self.opts.service_options)
        if self.opts.health:
            options["health"] = dict(self.opts.health)
        # the seeded addresses are fault-proxy ports on 127.0.0.1: label each backend's server
        labels = {n: dict(self.opts.backend_options.get(n, {}), server=self.opts.server_of(n)) for n in self.opts.backends}
        extra_services = []
        if self.opts.browse is not None:
            browse = self.opts.browse
            browse_port = free_port(hosts, self._taken)
            limits = {k: browse[k] for k in ("max_conns", "max_rps") if browse.get(k)}
            extra_services.append({"name": browse["name"], "port": browse_port, "options": dict(browse.get("options") or {}),
                                   "backends": list(backends),
                                   "backend_options": {n: {"server": self.opts.server_of(n), **limits}
                                                       for n in self.opts.backends}})
        self.spec = ClusterSpec(nodes=nodes, service_port=service_port, backends=backends, service_options=options,
                                backend_options=labels, extra_services=extra_services)
        init_cluster_dir(self.directory, self.spec)
        self.tls = AdminTls(ca_file=str(self.directory / CA_CERT))
        dial: dict[str, dict[str, str]] = {n.id: {} for n in nodes}
        for x in nodes:
            for y in nodes:
                if x.raft > y.raft:  # pysyncobj: the greater address dials the smaller one
                    name = f"raft-{x.id}-{y.id}"
                    dial[x.id][y.raft] = self.faults.create(name, "127.0.0.1:0", y.raft)
                    self.links[(x.id, y.id)] = name
        for n in nodes:
            extra = {"dial": dict(dial[n.id])} if dial[n.id] else {}
            (self.directory / f"{n.id}.toml").write_text(node_config_text(replace(self.spec, extra_raft=extra), n))
        self.token = (self.directory / "token").read_text().strip()
        self.apis = {n.id: n.api for n in nodes}
        used = nodes[:self.opts.balancers] if self.opts.balancers else nodes
        self.client_addresses = ClientAddresses("balancers", [f"{n.host}:{service_port}" for n in used])
        for svc in extra_services:
            self.products_addresses = ClientAddresses("balancers", [f"{n.host}:{svc['port']}" for n in used])
        for name in self.opts.backends:
            self._start_backend(name)
        for n in nodes:
            self._start_node(n.id)

    def _node_spec(self, node_id: str) -> NodeSpec:
        assert self.spec is not None
        for n in self.spec.nodes:
            if n.id == node_id:
                return n
        raise TargetError(f"no balancer {node_id!r} (known: {', '.join(n.id for n in self.spec.nodes)})")

    def _start_node(self, node_id: str) -> Child:
        self._node_spec(node_id)
        child = Child(node_id, halb_argv("node", "run", "--config", str(self.directory / f"{node_id}.toml")),
                      self.logs / f"{node_id}.log")
        child.start()
        self.nodes[node_id] = child
        return child

    def _start_backend(self, name: str) -> Child:
        real = self.backend_real.get(name)
        if real is None:
            raise TargetError(f"no backend {name!r} (known: {', '.join(self.backend_real)})")
        proc = self.opts.backend_process
        extra = ([f"--capacity={int(proc['capacity'])}"] if proc.get("capacity") else []) + (
            [f"--work-ms={float(proc['work_ms'])}"] if proc.get("work_ms") else [])
        child = Child(f"backend-{name}", halb_argv("demo", "backend", "--name", name, "--listen", real,
                                                   "--db", str(self.db_path), "--synchronous", "NORMAL", *extra),
                      self.logs / f"backend-{name}.log")
        child.start()
        self.backend_procs[name] = child
        deadline = time.monotonic() + 15
        host, port = real.rsplit(":", 1)
        while time.monotonic() < deadline:  # wait until it listens: a start is done when it serves
            if not child.alive():
                raise TargetError(f"backend {name} exited at start; see {child.log_path}")
            try:
                with socket.create_connection((host, int(port)), timeout=0.2):
                    return child
            except OSError:
                time.sleep(0.05)
        raise TargetError(f"backend {name} did not listen within 15 s; see {child.log_path}")

    def close(self) -> None:
        """Stop every process this target started, by PID; idempotent and never raises."""
        for child in list(self.nodes.values()) + list(self.backend_procs.values()):
            try:
                child.stop(timeout=3.0)
            except Exception:
                pass
        if self.proxy_proc is not None:
            try:
                self.proxy_proc.stop(timeout=5.0)
            except Exception:
                pass
        if not self.opts.keep_dir:
            shutil.rmtree(self.directory, ignore_errors=True)

    def backend_stats(self) -> dict[str, dict[str, Any]]:
        import json
        import urllib.request

        out: dict[str, dict[str, Any]] = {}
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never an HTTP proxy
        for name, real in self.backend_real.items():
            try:
                with opener.open(f"http://{real}/stats", timeout=2.0) as r:
                    data = json.loads(r.read())
                out[name] = data if isinstance(data, dict) else {"error": "reply is not a JSON object"}
            except (OSError, ValueError) as exc:
                out[name] = {"error": f"unreachable ({type(exc).__name__})"}
        return out

    def pids(self) -> dict[str, int]:
        out = {k: c.pid for k, c in self.nodes.items() if c.pid}
        out.update({f"backend-{k}": c.pid for k, c in self.backend_procs.items() if c.pid})
        if self.proxy_proc is not None and self.proxy_proc.proc is not None:
            out["faultproxy"] = self.proxy_proc.proc.pid
        return out

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.update(directory=str(self.directory), backends_real=self.backend_real,
                 backends_via_proxy={n: a for n, a in (self.spec.backends if self.spec else [])},
                 raft_links={f"{a}->{b}": name for (a, b), name in self.links.items()},
                 fault_proxy=self.proxy_proc.url if self.proxy_proc else None, pids=self.pids())
        return d

    # --- actions --------------------------------------------------------------------

    def startup_problem(self) -> str | None:
        for child in list(self.nodes.values()) + list(self.backend_procs.values()):
            if child.proc is not None and child.proc.poll() is not None:
                tail = child.log_path.read_text(errors="replace").strip().splitlines()[-3:]
                return f"{child.name} exited with {child.proc.returncode}: {' | '.join(tail)}"
        return None

    def balancer_alive(self, node_id: str) -> bool | None:
        child = self.nodes.get(node_id)
        return child.alive() if child else False

    def balancer(self, node_id: str, what: str) -> str:
        child = self.nodes.get(node_id)
        if what == "start":
            if child is not None and child.alive():
                return f"{node_id} already running (pid {child.pid})"
            child = self._start_node(node_id)
            return f"started {node_id} (pid {child.pid})"
        if child is None or not child.alive():
            if what == "resume":
                return f"{node_id} is not running; nothing to resume"
            raise TargetError(f"balancer {node_id} is not running")
        pid = child.pid
        if what == "kill":
            child.signal(signal.SIGKILL)
            child.proc.wait(5)
            return f"SIGKILL {node_id} (pid {pid})"
        if what == "freeze":
            child.signal(signal.SIGSTOP)
            return f"SIGSTOP {node_id} (pid {pid})"
        if what == "resume":
            child.signal(signal.SIGCONT)
            return f"SIGCONT {node_id} (pid {pid})"
        if what == "stop":
            child.stop(timeout=8.0)
            return f"stopped {node_id} (pid {pid}, SIGTERM)"
        if what in ("restart", "restart-hard"):
            if what == "restart":
                child.stop(timeout=8.0)
            else:
                child.signal(signal.SIGKILL)
                child.proc.wait(5)
            new = self._start_node(node_id)
            return f"restarted {node_id} (pid {pid} -> {new.pid})"
        raise TargetError(f"unknown balancer action {what}")

    def backend(self, name: str, what: str) -> str:
        if name not in self.backend_real:
            raise TargetError(f"no backend {name!r} (known: {', '.join(self.backend_real)})")
        child = self.backend_procs.get(name)
        if what == "kill":
            if child is None or not child.alive():
                raise TargetError(f"backend {name} is not running")
            pid = child.pid
            child.signal(signal.SIGKILL)
            child.proc.wait(5)
            return f"SIGKILL backend {name} (pid {pid})"
        if what == "start":
            if child is not None and child.alive():
                return f"backend {name} already running (pid {child.pid})"
            return f"started backend {name} (pid {self._start_backend(name).pid})"
        if what == "restart":
            old = child.pid if child else None
            if child is not None:
                child.stop(timeout=5.0)
            return f"restarted backend {name} (pid {old} -> {self._start_backend(name).pid})"
        raise TargetError(f"unknown backend action {what}")

    def server(self, server: str, what: str) -> str:
        """kill: SIGKILL every backend on `server` at once; start: start them all again."""
        names = [n for n in self.opts.backends if self.opts.server_of(n) == server]
        if server == "all" and what == "start":
            names = list(self.opts.backends)
        if not names:
            known = sorted({self.opts.server_of(n) for n in self.opts.backends})
            raise TargetError(f"no backend on server {server!r} (servers: {', '.join(known)})")
        if what == "kill":
            running = [(n, self.backend_procs[n]) for n in names if n in self.backend_procs and self.backend_procs[n].alive()]
            if not running:
                raise TargetError(f"no backend of server {server} is running")
            for _, child in running:  # signal all first: the server dies at once, not one by one
                child.signal(signal.SIGKILL)
            for _, child in running:
                child.proc.wait(5)
            return f"SIGKILL server {server}: " + ", ".join(f"{n} (pid {c.pid})" for n, c in running)
        if what == "start":  # all at once, as when the server boots: start every process, then wait
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(len(names)) as pool:
                return "; ".join(pool.map(lambda n: self.backend(n, "start"), names))
        raise TargetError(f"unknown server action {what}")

    def _links_of(self, node_id: str) -> list[str]:
        self._node_spec(node_id)
        return [name for (a, b), name in self.links.items() if node_id in (a, b)]

    def partition(self, node_id: str, cut: bool) -> str:
        assert self.faults is not None
        names = self._links_of(node_id)
        for name in names:
            self.faults.set_enabled(name, not cut)
        return f"{'disabled' if cut else 'enabled'} Raft links {', '.join(sorted(names))}"

    def link_proxy(self, link: tuple[str, ...]) -> str:
        """('backend', 'B') or ('raft', 'n1', 'n2') (ids already resolved) -> proxy name."""
        if link[0] == "backend":
            if link[1] not in self.backend_real:
                raise TargetError(f"no backend {link[1]!r}")
            return f"backend-{link[1]}"
        a, b = link[1], link[2]
        name = self.links.get((a, b)) or self.links.get((b, a))
        if name is None:
            raise TargetError(f"no fault-proxy link between {a} and {b}")
        return name

    def add_toxic(self, link: tuple[str, ...], name: str, type_: str, stream: str, toxicity: float,
                  attributes: dict[str, Any]) -> str:
        assert self.faults is not None
        proxy = self.link_proxy(link)
        streams = ["upstream", "downstream"] if stream == "both" else [stream]
        made = []
        for s in streams:
            tname = f"{name or type_}_{s}"
            self.faults.add_toxic(proxy, tname, type_, s, toxicity, attributes)
            made.append(tname)
        return f"toxic {', '.join(made)} ({type_} {attributes}) on {proxy}"

    def remove_toxic(self, link: tuple[str, ...], name: str) -> str:
        assert self.faults is not None
        proxy = self.link_proxy(link)
        removed = []
        for t in self.faults.toxics(proxy):
            if not name or t["name"] == name or t["name"].startswith(f"{name}_"):
                self.faults.remove_toxic(proxy, t["name"])
                removed.append(t["name"])
        return f"removed {', '.join(removed) or 'no toxics'} from {proxy}"

    def add_member(self, node_id: str) -> str:
        """Start a new balancer and add it through the API (its Raft links are direct, not proxied)."""
        assert self.spec is not None
        if any(n.id == node_id for n in self.spec.nodes):
            raise TargetError(f"balancer {node_id!r} exists already")
        host = f"{self.prefix}{len(self.spec.nodes) + 1}"
        n = NodeSpec(node_id, host, raft_port=free_port([host], self._taken), api_port=free_port([host], self._taken))
        if not _port_free_on([host], self.spec.service_port):
            raise TargetError(f"service port {self.spec.service_port} is taken on {host}")
        out = self.client().post("/v1/members", {"id": node_id, "raft": n.raft, "api": n.api})
        self.spec.nodes.append(n)
        spec = replace(self.spec, nodes=[x for x in self.spec.nodes])
        text = node_config_text(spec, n)
        peers = out.get("start_with_peers")
        if peers:
            text = text.replace(f"peers = {_peers_line(spec, n)}", f"peers = {_peers_toml(peers)}")
        (self.directory / f"{node_id}.toml").write_text(text)
        ensure_local_tls(self.directory)  # its certificate, from this cluster's CA
        self.apis[node_id] = n.api
        self.client_addresses.addresses.append(f"{host}:{self.spec.service_port}")
        child = self._start_node(node_id)
        return f"added member {node_id} (raft {n.raft}, pid {child.pid})"

    def heal_everything(self) -> None:
        for child in self.nodes.values():
            if child.alive():
                child.signal(signal.SIGCONT)
        if self.faults is not None:
            try:
                self.faults.reset()
            except Exception:
                pass


def _peers_toml(peers: list[str]) -> str:
    return "[" + ", ".join(f'"{p}"' for p in peers) + "]"


def _peers_line(spec: ClusterSpec, node: NodeSpec) -> str:
    return _peers_toml([n.raft for n in spec.nodes if n.id != node.id])

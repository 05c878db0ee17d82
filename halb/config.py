"""Node-local TOML configuration -> validated dataclasses.

Every error names the file, the key (as a dotted path) and the reason, because the
operator reading it is usually in the middle of an incident. The static config only
*seeds* an empty cluster; after that the replicated state is the truth.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from halb.tomltable import Table, read_toml
from halb.model import (
    SERVICE_MODES, ModelError, check_hash_key, check_name, listen_conflict, normalise_algorithm, parse_hostport,
    service_from,
)


class ConfigError(Exception):
    """Invalid node configuration: str() is '<file>: <key>: <reason>'."""

    def __init__(self, file: str | os.PathLike[str], key: str, reason: str) -> None:
        self.file, self.key, self.reason = str(file), key, reason
        super().__init__(f"{file}: {key}: {reason}" if key else f"{file}: {reason}")


@dataclass
class RaftConfig:
    bind: str
    peers: list[str] = field(default_factory=list)
    # Tuned for fast failure detection on a LAN (see docs/failover.md); pysyncobj's own
    # defaults (0.4/1.4/0.1, 5 s reconnect) roughly double election time.
    election_timeout_min: float = 0.3
    election_timeout_max: float = 0.6
    # (Written before push_append_entries, which takes writes off the heartbeat path.)
    # 0.02 / 0.02 (were 0.05 / pysyncobj's 0.05): in batch mode a commit waits for the
    # tick after the next heartbeat, and a write on a follower also for the heartbeat that
    # tells it the commit index, so these two set write latency (sequential writes, p50 at
    # the leader 110 -> 29 ms, on a follower 160 -> 60 ms, with the wake-up on submit in
    # control/raft.py). A 0.01 s tick gained 4 ms and cost idle CPU.
    heartbeat_interval: float = 0.02
    tick_interval: float = 0.02  # pysyncobj autoTickPeriod: longest wait of the Raft thread
    # Both of the above apply while the log grows (and for idle_after_s after); an idle
    # node heartbeats and ticks every idle_heartbeat_interval instead. At 0.02 s the
    # heartbeats and ticks were about half of an idle leader's CPU (bench-control at 10,000
    # backends: fixed 0.05 s cut idle CPU by ~2 points per node but doubled write latency,
    # p50 61 -> 123 ms, and halved throughput). Equal to heartbeat_interval: never idle.
    idle_heartbeat_interval: float = 0.05
    idle_after_s: float = 1.0
    connection_retry: float = 0.5
    connection_timeout: float = 1.5
    leader_fallback_timeout: float = 3.0
    # pysyncobj's appendEntriesUseBatch. False would send append-entries per command and
    # right after each commit (faster commits, a VIP successor's wait starts earlier), but in
    # the namespace lab a healed ex-leader then sometimes never caught up (docs/failover.md),
    # so the default stays True.
    append_entries_batch: bool = True
    # The leader sends append-entries as soon as a tick added entries or advanced the commit
    # index, not only on heartbeats (control/raft.py _push_append_entries): sequential writes
    # at the leader p50 24 -> 2.5 ms, at a follower 47 -> 3.4 ms. False: heartbeats only.
    push_append_entries: bool = True
    log_compaction_entries: int = 5000
    log_compaction_seconds: float = 300.0
    # peer raft address -> address to dial instead (a fault proxy on that link; drills)
    dial: dict[str, str] = field(default_factory=dict)
    # Raft-port limits (halb/control/transport.py, docs/architecture.md "threat model").
    # The largest legitimate frame is one append-entries batch (64 KiB of entries plus one
    # entry of at most an API body, 1 MiB, before compression) or a 64 KiB snapshot chunk.
    max_frame_bytes: int = 16 << 20
    auth_timeout: float = 5.0  # an incoming connection must complete the handshake this fast
    max_unauthenticated: int = 64  # handshaking connections at once (a quarter per source host)


@dataclass
class ApiConfig:
    bind: str
    write_timeout: float = 3.0
    # HTTPS (docs/config.md [api]): the node's certificate and key, and the CA its peers'
    # certificates are verified against. No cert: plain HTTP, allowed only with --insecure-dev.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    ca_file: Path | None = None


@dataclass
class DataplaneConfig:
    listen_host: str = ""  # overrides the host part of every service's listen address
    workers: int = 1
    # backend address -> address this node dials instead (a fault proxy on this node's path
    # to that backend); health checks and proxied traffic both use it
    backend_dial: dict[str, str] = field(default_factory=dict)
    # Addresses every node *also* serves each service on (same port, SO_REUSEPORT): on one
    # host the kernel spreads connections over the nodes' listeners and stops handing them
    # to a dead node at once, the local analogue of anycast/ECMP (docs/config.md).
    shared_hosts: list[str] = field(default_factory=list)
    # How a backend's max_conns / max_rps (cluster-wide numbers) become this node's limit:
    # "node": this node enforces all of it (right when one node serves: the VIP holder);
    # "cluster": its share follows the traffic the nodes report (several nodes serving at
    # once: DNS mode, shared_hosts, clients using every node's address); "auto" (default):
    # "cluster" where several nodes serve one address (shared_hosts or DNS), else "node".
    # docs/dataplane.md
    capacity_share: str = "auto"
    # JSON lines, one per HTTP request ("" = off); a path relative to the config file's
    # directory; live: SIGHUP turns it on/off, moves it and reopens it (logrotate).
    # docs/dataplane.md#access-log
    access_log: str = ""
    access_log_buffer: int = 4 * 1024 * 1024  # bytes waiting for the disk before lines are dropped


CAPACITY_SHARES = ("auto", "node", "cluster")


def effective_capacity_share(setting: str, shared_hosts: list[str], announce_mode: str) -> str:
    """What "auto" means for this node. Several nodes serve the same address at once when
    they share a host (SO_REUSEPORT on one machine), are all in a DNS answer or all announce
    the address with BGP (the routers spread flows over them): then each may
    take only its share of a backend's capacity. With one VIP holder, or clients that use
    one node's own address, the serving node's limit is the cluster's: a share learned over
    10 s windows would throttle a new holder right after a handover."""
    if setting != "auto":
        return setting
    return "cluster" if shared_hosts or announce_mode in ("dns", "bgp") else "node"


@dataclass
class BackendSeed:
    name: str
    address: str
    weight: int = 100
    server: str = ""
    zone: str = ""
    max_rps: float = 0.0
    max_conns: int = 0


@dataclass
class ServiceSeed:
    name: str
    mode: str = "http"
    listen: str = ""
    algorithm: str = "round_robin"
    hash_key: str = "source"
    backends: list[BackendSeed] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    health: dict[str, Any] = field(default_factory=dict)


@dataclass
class NodeConfig:
    path: Path
    node_id: str
    data_dir: Path
    secret_file: Path | None
    token_file: Path
    raft: RaftConfig
    api: ApiConfig
    dataplane: DataplaneConfig = field(default_factory=DataplaneConfig)
    services: list[ServiceSeed] = field(default_factory=list)
    announce: dict[str, Any] = field(default_factory=dict)
    log_level: str = "INFO"

    def read_secret(self) -> str | None:
        return _read_secret_file(self.path, "secret_file", self.secret_file) if self.secret_file else None

    def read_token(self) -> str:
        return _read_secret_file(self.path, "token_file", self.token_file)


def _read_secret_file(cfg: Path, key: str, path: Path) -> str:
    try:
        value = path.read_text().strip()
    except FileNotFoundError:
        raise ConfigError(cfg, key, f"file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(cfg, key, f"cannot read {path}: {exc.strerror}") from None
    if len(value) < 16:
        raise ConfigError(cfg, key, f"{path} holds fewer than 16 characters; use `halb cluster init` to make one")
    return value


class _Table(Table):
    """Node-config table: adds HOST:PORT and positive-number checks."""

    def __init__(self, file: Path, prefix: str, data: Any) -> None:
        super().__init__(file, prefix, data, ConfigError)

    def address(self, name: str, default: Any = ..., *, required: bool = False) -> str:
        value = self.take(name, str, default, required=required)
        if value:
            try:
                parse_hostport(value)
            except ModelError as exc:
                raise self.error(name, str(exc)) from None
        return value

    def positive(self, name: str, default: float) -> float:
        return self.number(name, default, low=0.0, low_open=True)


def _shared_hosts(table: _Table, raw: list[Any]) -> list[str]:
    """[dataplane] shared_hosts: distinct literal IP addresses (no names: every node must
    bind exactly the same address for the kernel to treat the listeners as one group)."""
    import ipaddress

    hosts: list[str] = []
    for value in raw:
        try:
            host = str(ipaddress.ip_address(value))
        except (ValueError, TypeError):
            raise table.error("shared_hosts", f"{value!r} is not an IP address") from None
        if host in hosts:
            raise table.error("shared_hosts", f"{host} is listed twice")
        hosts.append(host)
    return hosts


def _api_tls(table: _Table, base: Path, api: ApiConfig) -> None:
    """[api] tls_cert / tls_key / ca_file: both or neither of cert and key; each file must
    load (a cert and key that do not match are refused here, not at the first handshake)."""
    from halb.tls import TlsError, client_context, server_context

    cert, key, ca = (table.take(k, str, "") for k in ("tls_cert", "tls_key", "ca_file"))
    if bool(cert) != bool(key):
        raise table.error("tls_key" if cert else "tls_cert", "tls_cert and tls_key go together: set both or neither")
    if cert:
        api.tls_cert, api.tls_key = base / cert, base / key
        try:
            server_context(api.tls_cert, api.tls_key)
        except TlsError as exc:
            raise table.error("tls_cert", str(exc)) from None
    if ca:
        api.ca_file = base / ca
        try:
            client_context(api.ca_file)
        except TlsError as exc:
            raise table.error("ca_file", str(exc)) from None


def load_config(path: str | os.PathLike[str]) -> NodeConfig:
    """Read and validate a node config; relative paths are relative to the file."""
    file = Path(path)
    raw = read_toml(file, ConfigError)
    return parse_config(file, raw)


def parse_config(file: Path, raw: dict[str, Any]) -> NodeConfig:
    base = file.parent
    top = _Table(file, "", raw)
    node_id = top.take("node_id", str, required=True)
    try:
        check_name(node_id, "node id")
    except ModelError as exc:
        raise top.error("node_id", str(exc)) from None

    data_dir = base / top.take("data_dir", str, f"data/{node_id}")
    secret_name = top.take("secret_file", str, "")
    secret_file = base / secret_name if secret_name else None
    token_file = base / top.take("token_file", str, required=True)
    log_level = top.take("log_level", str, "INFO").upper()
    if log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise top.error("log_level", "must be DEBUG, INFO, WARNING or ERROR")

    raft_t = _Table(file, "raft", top.take("raft", dict, required=True))
    raft = RaftConfig(bind=raft_t.address("bind", required=True))
    peers = raft_t.take("peers", list, [])
    for i, peer in enumerate(peers):
        try:
            parse_hostport(peer, "peer")
        except ModelError as exc:
            raise raft_t.error(f"peers[{i}]", str(exc)) from None
    if raft.bind in peers:
        raise raft_t.error("peers", f"lists this node's own address {raft.bind}")
    if len(set(peers)) != len(peers):
        raise raft_t.error("peers", "lists an address twice")
    raft.peers = list(peers)
    raft.election_timeout_min = raft_t.positive("election_timeout_min", raft.election_timeout_min)
    raft.election_timeout_max = raft_t.positive("election_timeout_max", raft.election_timeout_max)
    if raft.election_timeout_max <= raft.election_timeout_min:
        raise raft_t.error("election_timeout_max", "must be greater than election_timeout_min")
    raft.heartbeat_interval = raft_t.positive("heartbeat_interval", raft.heartbeat_interval)
    if raft.heartbeat_interval * 3 > raft.election_timeout_min:
        raise raft_t.error("heartbeat_interval", "must be at most a third of election_timeout_min")
    raft.tick_interval = raft_t.positive("tick_interval", raft.tick_interval)
    if raft.tick_interval > raft.heartbeat_interval:
        raise raft_t.error("tick_interval", "must be at most heartbeat_interval (a heartbeat is sent on a tick)")
    raft.idle_heartbeat_interval = raft_t.positive("idle_heartbeat_interval", raft.idle_heartbeat_interval)
    if raft.idle_heartbeat_interval < raft.heartbeat_interval:
        raise raft_t.error("idle_heartbeat_interval", "must be at least heartbeat_interval")
    if raft.idle_heartbeat_interval * 3 > raft.election_timeout_min:
        raise raft_t.error("idle_heartbeat_interval", "must be at most a third of election_timeout_min")
    raft.idle_after_s = raft_t.positive("idle_after_s", raft.idle_after_s)
    raft.connection_retry = raft_t.positive("connection_retry", raft.connection_retry)
    raft.connection_timeout = raft_t.positive("connection_timeout", raft.connection_timeout)
    raft.leader_fallback_timeout = raft_t.positive("leader_fallback_timeout", raft.leader_fallback_timeout)
    raft.append_entries_batch = raft_t.take("append_entries_batch", bool, raft.append_entries_batch)
    raft.push_append_entries = raft_t.take("push_append_entries", bool, raft.push_append_entries)
    raft.log_compaction_entries = int(raft_t.positive("log_compaction_entries", raft.log_compaction_entries))
    raft.log_compaction_seconds = raft_t.positive("log_compaction_seconds", raft.log_compaction_seconds)
    raft.max_frame_bytes = raft_t.take("max_frame_bytes", int, raft.max_frame_bytes)
    if not 4 << 20 <= raft.max_frame_bytes <= (1 << 31) - 1:
        raise raft_t.error("max_frame_bytes", "must be within [4194304, 2147483647]: a legitimate batch can reach "
                           "~2 MiB and the length prefix is a signed 32-bit number")
    raft.auth_timeout = raft_t.positive("auth_timeout", raft.auth_timeout)
    raft.max_unauthenticated = raft_t.take("max_unauthenticated", int, raft.max_unauthenticated)
    if raft.max_unauthenticated < 4:
        raise raft_t.error("max_unauthenticated", "must be at least 4 (peers reconnect through it)")
    dial = raft_t.take("dial", dict, {})
    for peer, target in dial.items():
        for value, what in ((peer, f"dial key {peer!r}"), (target, f"dial target {target!r}")):
            try:
                parse_hostport(value, what)
            except (ModelError, TypeError) as exc:
                raise raft_t.error(f"dial.{peer}", str(exc)) from None
    raft.dial = dict(dial)
    raft_t.done()

    api_t = _Table(file, "api", top.take("api", dict, required=True))
    api = ApiConfig(bind=api_t.address("bind", required=True))
    api.write_timeout = api_t.positive("write_timeout", api.write_timeout)
    _api_tls(api_t, base, api)
    api_t.done()
    if api.bind == raft.bind:
        raise ConfigError(file, "api.bind", "must differ from raft.bind")

    dp_t = _Table(file, "dataplane", top.take("dataplane", dict, {}))
    dataplane = DataplaneConfig(listen_host=dp_t.take("listen_host", str, ""))
    dataplane.workers = dp_t.take("workers", int, 1)
    if not 1 <= dataplane.workers <= 64:
        raise dp_t.error("workers", "must be between 1 and 64")
    backend_dial = dp_t.take("backend_dial", dict, {})
    for addr, target in backend_dial.items():
        for value in (addr, target):
            try:
                parse_hostport(value, "backend_dial entry")
            except (ModelError, TypeError) as exc:
                raise dp_t.error(f"backend_dial.{addr}", str(exc)) from None
    dataplane.backend_dial = dict(backend_dial)
    dataplane.shared_hosts = _shared_hosts(dp_t, dp_t.take("shared_hosts", list, []))
    dataplane.capacity_share = dp_t.take("capacity_share", str, "auto")
    if dataplane.capacity_share not in CAPACITY_SHARES:
        raise dp_t.error("capacity_share", f"must be one of {', '.join(CAPACITY_SHARES)}, "
                                           f"got {dataplane.capacity_share!r}")
    access_log = dp_t.take("access_log", str, "")
    if access_log:
        if "\0" in access_log or access_log.endswith("/"):
            raise dp_t.error("access_log", f"must name a file, got {access_log!r}")
        access_log = str(base / access_log)
    dataplane.access_log = access_log
    dataplane.access_log_buffer = dp_t.take("access_log_buffer", int, dataplane.access_log_buffer)
    if not 65536 <= dataplane.access_log_buffer <= 1 << 30:
        raise dp_t.error("access_log_buffer", "must be between 65536 and 1073741824 (bytes)")
    dp_t.done()

    announce = top.take("announce", dict, {})
    from halb.announce.settings import AnnounceConfigError, parse_announce  # announce: validate [announce]
    try:
        parse_announce(announce, base, dataplane.listen_host)
    except AnnounceConfigError as exc:
        raise ConfigError(file, f"announce.{exc.key}" if exc.key else "announce", exc.reason) from None

    services: list[ServiceSeed] = []
    for i, raw_svc in enumerate(top.take("services", list, [])):
        services.append(_parse_service(file, f"services[{i}]", raw_svc))
    names = [s.name for s in services]
    for s in services:
        if names.count(s.name) > 1:
            raise ConfigError(file, "services", f"service name {s.name!r} is used twice")
    seen = []
    for i, s in enumerate(services):  # the same listen rule the state machine applies to `seed`
        svc = service_from(service_seed_to_dict(s))
        clash = listen_conflict(seen, svc.listen, svc.mode)
        if clash:
            raise ConfigError(file, f"services[{i}].listen", clash)
        seen.append(svc)
    top.done()
    return NodeConfig(
        path=file, node_id=node_id, data_dir=data_dir, secret_file=secret_file, token_file=token_file,
        raft=raft, api=api, dataplane=dataplane, services=services, announce=announce, log_level=log_level,
    )


def _parse_service(file: Path, prefix: str, raw: Any) -> ServiceSeed:
    t = _Table(file, prefix, raw)
    name = t.take("name", str, required=True)
    try:
        check_name(name, "service name")
    except ModelError as exc:
        raise t.error("name", str(exc)) from None
    svc = ServiceSeed(name=name)
    svc.mode = t.take("mode", str, "http")
    if svc.mode not in SERVICE_MODES:
        raise t.error("mode", f"must be one of {', '.join(SERVICE_MODES)}, got {svc.mode!r}")
    svc.listen = t.address("listen", required=True)
    try:
        svc.algorithm = normalise_algorithm(t.take("algorithm", str, "round_robin"))
    except ModelError as exc:
        raise t.error("algorithm", str(exc)) from None
    svc.hash_key = t.take("hash_key", str, "source")
    try:
        check_hash_key(svc.hash_key)
    except ModelError as exc:
        raise t.error("hash_key", str(exc)) from None
    svc.options = t.take("options", dict, {})
    svc.health = t.take("health", dict, {})
    for j, raw_be in enumerate(t.take("backends", list, [])):
        bt = _Table(file, f"{prefix}.backends[{j}]", raw_be)
        be = BackendSeed(name=bt.take("name", str, required=True), address=bt.address("address", required=True))
        try:
            check_name(be.name, "backend name")
        except ModelError as exc:
            raise bt.error("name", str(exc)) from None
        be.weight = bt.take("weight", int, 100)
        if not 0 <= be.weight <= 10000:
            raise bt.error("weight", f"must be between 0 and 10000, got {be.weight}")
        be.server = bt.take("server", str, "")
        be.zone = bt.take("zone", str, "")
        be.max_rps = bt.take("max_rps", float, 0.0)
        if be.max_rps < 0:
            raise bt.error("max_rps", f"must be >= 0 (0: not declared), got {be.max_rps:g}")
        be.max_conns = bt.take("max_conns", int, 0)
        if be.max_conns < 0:
            raise bt.error("max_conns", f"must be >= 0 (0: not declared), got {be.max_conns}")
        bt.done()
        if any(b.name == be.name for b in svc.backends):
            raise bt.error("name", f"backend name {be.name!r} is used twice in service {name!r}")
        svc.backends.append(be)
    t.done()
    _validate_seed(file, prefix, svc)
    return svc


def _validate_seed(file: Path, prefix: str, seed: ServiceSeed) -> None:
    """Seeds pass the same strict checks as an API write (options, health check, backends)."""
    from halb.health.checks import CheckConfig  # above config in the layering: import on use

    def check_health(table: Any) -> None:
        CheckConfig.from_dict(table, where="health")

    try:
        service_from(service_seed_to_dict(seed)).validate(health=check_health)
    except ModelError as exc:
        reason = str(exc)
        key = "health" if reason.startswith("option health") else "options" if "option" in reason else ""
        raise ConfigError(file, f"{prefix}.{key}" if key else prefix,
                          reason.removeprefix("option ") if key == "health" else reason) from None


def service_seed_to_dict(seed: ServiceSeed) -> dict[str, Any]:
    """The shape the replicated `service.add` command takes."""
    return {
        "name": seed.name, "mode": seed.mode, "listen": seed.listen, "algorithm": seed.algorithm,
        "hash_key": seed.hash_key, "options": dict(seed.options, health=seed.health) if seed.health else dict(seed.options),
        "backends": {
            b.name: {"name": b.name, "address": b.address, "weight": b.weight, "server": b.server, "zone": b.zone,
                     "max_rps": b.max_rps, "max_conns": b.max_conns, "admin_state": "active"}
            for b in seed.backends
        },
    }

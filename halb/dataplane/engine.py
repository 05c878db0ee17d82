"""The data plane as a library: `DataPlane` binds the services of a RoutingSnapshot and
proxies them, inside the caller's asyncio loop (and, with workers > 1, in extra worker
processes that share the ports through SO_REUSEPORT).

Static stability: the engine only ever reads the last snapshot it was given; it never
talks to the control plane, so it keeps serving unchanged when the cluster has no quorum.
"""
from __future__ import annotations

import asyncio
import logging
import os
import secrets
import threading
import time
from typing import Any, Callable

from halb.certs.tls import tls_direct
from halb.dataplane import http_proxy, tls_stream
from halb.dataplane.access_log import DEFAULT_BUFFER, AccessLog
from halb.dataplane.client_drain import ClientDrain, DrainCounts
from halb.dataplane.http_proxy import HttpClientConn
from halb.dataplane.listeners import Listener, listen_socket, relay_suits
from halb.dataplane.options import ServiceOptions
from halb.dataplane.proxy_protocol import gate_for
from halb.dataplane.routing import ServiceRuntime
from halb.dataplane.snapshot import RoutingSnapshot, ServiceRoute
from halb.dataplane.stats import merge_stats
from halb.dataplane import tcp_relay
from halb.dataplane.tcp_proxy import TcpClientConn

log = logging.getLogger(__name__)

SWEEP_INTERVAL = 0.25  # timeout granularity (s)
# Idle pooled upstream connections are trimmed once a second (every sweep for a service
# whose upstream_keepalive is under 4 s), and never for a service that has not sent a
# request: at 10,000 backends the walk over every backend 4 times a second was the data
# plane's largest idle cost.
POOL_TRIM_INTERVAL = 1.0
EjectionHook = Callable[[str, str, bool, str], None]


class DataPlane:
    """HTTP/TCP proxy for every service of a routing snapshot.

    API for the node:
      - ``await start(snapshot)``: bind every service (SO_REUSEPORT, IP_FREEBIND), serve;
      - ``update(snapshot)``: atomic swap (new services bound, removed ones closed after a
        grace; in-flight requests finish with the state they started with);
      - ``stats()``: per service and backend counters, summed over worker processes;
      - ``await stop()``: stop accepting, let in-flight work finish (stop_grace), close;
      - ``on_ejection``: list of callables ``(service, backend, ejected, reason)``.
    """

    def __init__(self, node_id: str, *, workers: int = 1, loop_uvloop: bool = True,
                 shared_hosts: list[str] | tuple[str, ...] = (), slot: tuple[int, int] | None = None) -> None:
        self.node_id = node_id
        self.workers = max(1, int(workers))
        # this process is slot[0] of slot[1] on the node: it enforces that share of each
        # backend's limits (limits.py); the node process is slot 0, workers 1..W-1
        self.slot = slot or (0, self.workers)
        self.capacity_share: dict[str, float] = {}  # service -> node's share of the cluster limits
        self.capacity_share_default = 1.0
        self.loop_uvloop = loop_uvloop  # used for worker processes (the node owns its loop)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.snapshot = RoutingSnapshot()
        self.acme_answers: dict[bytes, bytes] = {}  # token -> key authorization (acme_answer.py)
        self.listeners: dict[str, Listener] = {}
        self.conns: set[Any] = set()
        self.on_ejection: list[EjectionHook] = []
        self.listen_errors: dict[str, str] = {}
        self.apply_errors: dict[str, str] = {}  # service -> why its last route could not be applied
        self._sweeper: asyncio.Task[None] | None = None
        self._pools_trimmed_at = 0.0
        self._rid_prefix = (f"{node_id[:16]}-{os.getpid():x}{secrets.token_hex(3)}-").encode()
        self._rid_counter = 0
        self._pool_supervisor: Any = None
        # selfcheck_inputs' cache: (snapshot, its service names); one attribute (class size above)
        self._expected: tuple[RoutingSnapshot | None, frozenset[str]] = (None, frozenset())
        self._started = False
        self.draining = False  # stopping: responses say Connection: close, idle connections are closed
        self.client_drain = ClientDrain()  # bgp mode's `halb node drain`: phases in client_drain.py
        self._retired: list[Listener] = []
        self._relay: tcp_relay.TcpRelay | None = None  # TCP mode's C relay, made on first use
        self.now = 0.0  # coarse loop time, refreshed by the sweeper (for idle bookkeeping)
        # the access log (access_log.py): None when off. Keep this class below 30 attributes:
        # at 30 every `self.engine.x` read on the request path got slower (test_http_conn_layout.py)
        self.access_log: AccessLog | None = None
        from halb.dataplane.shared import SharedListeners  # every service also on shared_hosts

        self.shared = SharedListeners(self, shared_hosts)
        from halb.dataplane.frontend import FrontendListeners  # Host/path routed ports, TLS (frontend.py)

        self.frontends = FrontendListeners(self)

    # ------------------------------------------------------------------ public API
    async def start(self, snapshot: RoutingSnapshot) -> None:
        if self._started:
            raise RuntimeError("DataPlane already started")
        self.loop = asyncio.get_running_loop()
        self.now = self.loop.time()
        self._started = True
        if self.loop_uvloop and "uvloop" not in type(self.loop).__module__:
            log.info("data plane running on %s (uvloop is faster; the node chooses the loop)", type(self.loop).__name__)
        log.info("HTTP head fast path: %s", "C (halb.dataplane._fasthttp)" if http_proxy.accelerated()
                 else "off, llhttp only (extension not built, or HALB_HTTP_ACCEL=0)")
        log.info("TCP mode relay: %s", "C (halb.dataplane._tcprelay)" if tcp_relay.available()
                 else "asyncio Protocols (extension not built, or HALB_TCP_RELAY=python)")
        log.info("TLS record calls: %s", "C (halb.certs._tlsdirect)" if tls_direct()
                 else "CPython's ssl methods (extension not built, or HALB_TLS_DIRECT=0)")
        log.info("TLS transport: %s", f"halb's own, {tls_stream.core_in_use()} core" if tls_stream.enabled()
                 else "uvloop's SSL protocol (HALB_TLS_STREAM=0)")
        self._apply(snapshot, initial=True)
        # let the servers start before returning, so callers can connect at once
        for lst in list(self.listeners.values()):
            if lst.server is None and not lst.closed:
                await lst.serve(self._factory(lst))
        await self.shared.serve_pending()
        self._sweeper = self.loop.create_task(self._sweep())
        if self.workers > 1:
            from halb.dataplane.workers import WorkerPool

            self._pool_supervisor = WorkerPool(self, self.workers - 1)
            await self._pool_supervisor.start(self._worker_snapshot())

    def update(self, snapshot: RoutingSnapshot) -> None:
        if not self._started:
            raise RuntimeError("DataPlane.update before start")
        self._apply(snapshot, initial=False)
        if self.client_drain.phase == "refusing":  # a listener bound by this update refuses too
            self.client_drain.apply_filters(self.listening_sockets())
        if self._pool_supervisor is not None:
            self._pool_supervisor.send_snapshot(self._worker_snapshot())

    def set_frontends(self, frontends: tuple[Any, ...], certs: Any = None) -> None:
        """Frontends (frontend_routes.FrontendRoute) this process serves, and the loaded
        certificates (certs.tls.CertSet) TLS frontends pick from; the node process only."""
        if not self._started:
            raise RuntimeError("DataPlane.set_frontends before start")
        if certs is not None:
            self.frontends.set_certs(certs)
        self.frontends.update(tuple(frontends))

    def set_access_log(self, path: str, buffer_bytes: int = DEFAULT_BUFFER) -> None:
        """Turn the access log on (a path), off ("") or move it; with the same path the file
        is reopened (SIGHUP after logrotate renamed it). Forwarded to the worker processes,
        each of which appends to the same file. Callable before start()."""
        al = self.access_log
        if not path:
            if al is not None:
                self.access_log = None
                http_proxy.LOGGING -= 1
                threading.Thread(target=al.close, name="halb-access-log-close", daemon=True).start()
        elif al is None:
            self.access_log = AccessLog(path, buffer_bytes)
            http_proxy.LOGGING += 1
        else:
            al.set_path(path, buffer_bytes)  # reopens
        if self._pool_supervisor is not None:
            self._pool_supervisor.send_access_log(path, buffer_bytes)

    def set_capacity_shares(self, shares: dict[str, float], default: float = 1.0) -> None:
        """This node's share of each service's cluster-wide backend limits (limits.py);
        services not listed get `default`. Forwarded to the worker processes."""
        self.capacity_share = dict(shares)
        self.capacity_share_default = default
        for name, lst in self.listeners.items():
            lst.rt.set_share(shares.get(name, default))
        if self._pool_supervisor is not None:
            self._pool_supervisor.send_shares(shares, default)

    def stats(self, service: str | None = None) -> dict[str, Any]:
        """Counters summed over worker processes; `service`: only that one (cheap to ask
        for often when the node has thousands of backends)."""
        local = self.local_stats(service)
        if self._pool_supervisor is None:
            return local
        merged = merge_stats([local, *self._pool_supervisor.worker_stats()])
        if service is not None:
            merged["services"] = {k: v for k, v in merged["services"].items() if k == service}
        return merged

    def load_counters(self) -> dict[str, Any]:
        """`stats()` cut down to requests / in_flight of backends that have had traffic:
        what the load meter samples every second, cheap with 10,000 idle backends."""
        if self._pool_supervisor is not None:
            return self.stats()
        out: dict[str, Any] = {}
        for name, lst in self.listeners.items():
            if not lst.rt.requests:  # counted before any backend's requests / in_flight: none to report
                continue
            backends = {b.name: {"requests": b.requests, "in_flight": b.in_flight}
                        for b in lst.rt.backends.values() if b.requests or b.in_flight}
            out[name] = {"requests": lst.rt.requests, "backends": backends}  # requests: arrivals (demand)
        return {"services": out}

    def local_stats(self, service: str | None = None) -> dict[str, Any]:
        """This process only (workers report theirs with it)."""
        return {
            "node_id": self.node_id,
            "version": self.snapshot.version,
            "workers": [{"pid": os.getpid(), "requests": sum(lst.rt.requests for lst in self.listeners.values()),
                         "connections": len(self.conns)}],
            "listen_errors": {**self.listen_errors, **self.shared.errors},
            "frontends": self.frontends.stats(),
            "access_log": self.access_log.stats() if self.access_log is not None else None,
            "services": {name: lst.rt.stats() for name, lst in self.listeners.items()
                         if service is None or name == service},
        }

    def selfcheck_inputs(self) -> tuple[frozenset[str], dict[str, str], list[float]]:
        """What the data-plane self-check (selfcheck.py) judges: the services this node
        should serve, those of them without a bound listener (with why), and the
        time.monotonic() of every worker-process death the pool remembers.

        Called every 100 ms, so O(1) when all is well: after ``_apply`` the listeners are a
        subset of the snapshot's services (a failed bind or a retired one is popped), so
        equal counts mean every service is bound; the name set is cached per snapshot."""
        snap = self.snapshot
        if self._expected[0] is not snap:
            self._expected = (snap, frozenset(s.name for s in snap.services))
        expected = self._expected[1]
        unbound: dict[str, str] = {}
        if len(self.listeners) != len(expected):
            for name in expected:
                if name not in self.listeners:
                    unbound[name] = (self.listen_errors.get(name) or self.apply_errors.get(name)
                                     or "no listener")
        pool = self._pool_supervisor
        deaths = list(pool.deaths) if pool is not None else []
        return expected, unbound, deaths

    def bound_port(self, service: str) -> int:
        """The port a service actually listens on (useful with listen_port 0 in tests)."""
        return self.listeners[service].port

    def listening_sockets(self) -> list[Any]:
        """Every listening socket this process accepts on (primary, shared, frontends), for a hot
        restart to hand over (halb/takeover.py). Worker processes have their own."""
        out = [lst.sock for lst in self.listeners.values() if not lst.closed]
        out += [lst.sock for lst in self.shared.listeners.values() if not lst.closed]
        out += [lst.sock for lst in self.frontends.listeners.values() if not lst.closed]
        return out

    async def handover_sockets(self) -> list[tuple[Any, Any]]:
        """(SocketKey, socket) of every listener of this data plane, the worker processes'
        included (their slot in the key; those sockets are copies the caller closes)."""
        from dataclasses import replace

        from halb.takeover import key_of

        out = [(key_of("tcp", s), s) for s in self.listening_sockets()]
        if self._pool_supervisor is not None:
            out += [(replace(k, slot=slot), s) for slot, k, s in await self._pool_supervisor.listening_sockets()]
        return out

    async def stop(self) -> None:
        """Stop accepting, then drain: in-flight requests finish within stop_grace, each
        with ``Connection: close``; idle keep-alive connections are closed at once (a client
        that sends on one at that instant sees the close, as with any server: docs/deploy.md)."""
        if not self._started:
            return
        self._started = False
        self.draining = True
        grace = max([lst.rt.opts.stop_grace for lst in self.listeners.values()] or [0.0])
        for lst in list(self.listeners.values()):
            lst.close()
        self.shared.close()
        pool_stop = None
        if self._pool_supervisor is not None:  # the workers drain at the same time
            pool_stop = asyncio.ensure_future(self._pool_supervisor.stop(timeout=grace + 3.0))
        self.frontends.close()
        deadline = time.monotonic() + grace
        while True:
            self._close_idle()
            if time.monotonic() >= deadline or not any(self._busy(c) for c in list(self.conns)):
                break
            await asyncio.sleep(0.05)
        if pool_stop is not None:
            await pool_stop
            self._pool_supervisor = None
        if self._sweeper is not None:
            self._sweeper.cancel()
            try:
                await self._sweeper
            except asyncio.CancelledError:
                pass
        for c in list(self.conns):
            c.close()
        if self._relay is not None:
            self._relay.close_relay()
            self._relay = None
        for lst in list(self.listeners.values()) + self._retired:
            for b in lst.rt.backends.values():
                b.close_pool()
        self.listeners.clear()
        al, self.access_log = self.access_log, None
        if al is not None:  # the last lines are written before stop() returns (up to 2 s)
            http_proxy.LOGGING -= 1
            await asyncio.to_thread(al.close)
        await asyncio.sleep(0)

    def tcp_relay(self) -> tcp_relay.TcpRelay | None:
        """TCP mode's C relay (one per engine), or None: then TCP runs on asyncio Protocols."""
        if self._relay is None and tcp_relay.available() and self.loop is not None and self._started:
            self._relay = tcp_relay.TcpRelay(self, self.loop)
        return self._relay

    # ------------------------------------------------------------------ internals
    def new_request_id(self) -> bytes:
        self._rid_counter += 1
        return b"%s%x" % (self._rid_prefix, self._rid_counter)

    def _hook(self, service: str, backend: str, ejected: bool, reason: str) -> None:
        for cb in list(self.on_ejection):
            try:
                cb(service, backend, ejected, reason)
            except Exception:
                log.exception("on_ejection subscriber failed")

    def _factory(self, lst: Listener) -> Callable[[], Any]:
        conn = TcpClientConn if lst.key[0] == "tcp" else HttpClientConn

        def make() -> Any:
            opts = lst.rt.opts
            if opts.accept_proxy:  # read the PROXY header first (proxy_protocol.py)
                return gate_for(lst)(conn(lst))
            return conn(lst)

        return make

    def _apply(self, snapshot: RoutingSnapshot, initial: bool) -> None:
        """Per service: unchanged (the same ServiceRoute object) costs nothing, so an update
        of one service among 100 is O(that service); one that cannot be applied is skipped
        and named in `apply_errors`, the others are still applied."""
        seen: set[str] = set()
        for svc in snapshot.services:
            seen.add(svc.name)
            lst = self.listeners.get(svc.name)
            if lst is not None and lst.rt.route is svc:
                continue
            try:
                key = (svc.mode, svc.listen_host, svc.listen_port)
                if lst is not None and lst.key == key and not self._relay_choice_changed(lst, svc):
                    lst.rt.apply(svc)
                else:
                    if lst is not None:
                        self._retire(lst)
                    self._open(svc, key, initial)
            except Exception as exc:  # isolate: one service must not stop the others' updates
                log.exception("service %s: cannot apply its routing; the others are applied", svc.name)
                self.apply_errors[svc.name] = f"cannot apply routing: {type(exc).__name__}: {exc}"
            else:
                self.apply_errors.pop(svc.name, None)
        for name in [n for n in self.apply_errors if n not in seen]:
            del self.apply_errors[name]
        for name in [n for n in self.listeners if n not in seen]:
            self._retire(self.listeners.pop(name))
        self.shared.sync(initial)
        if snapshot.acme_challenges != self.snapshot.acme_challenges:
            self.acme_answers = {t.encode(): k.encode() for t, k in snapshot.acme_challenges}
            # frontends (TLS, plain and redirect ports) ask before routing, only while answers exist
            self.frontends.answer_first = self._answer_acme if self.acme_answers else None
        self.snapshot = snapshot

    def _answer_acme(self, conn: Any, ex: Any) -> bool:
        return http_proxy.acme_answer.answer(conn, ex, self.acme_answers)

    def _relay_choice_changed(self, lst: Listener, svc: ServiceRoute) -> bool:
        """A TCP service whose PROXY options moved it on or off the C relay is re-opened
        (the relay accepts and relays below Python: it cannot add or read a header)."""
        if lst.key[0] != "tcp" or lst.server is None and lst.acceptor is None:
            return False
        return (lst.acceptor is not None) != (self.tcp_relay() is not None and relay_suits(ServiceOptions.from_route(svc)))

    def _open(self, svc: ServiceRoute, key: tuple[str, str, int], initial: bool) -> None:
        rt = ServiceRuntime(svc, hook=self._hook, initial=initial, slot=self.slot)  # before the socket: may raise
        rt.set_share(self.capacity_share.get(svc.name, self.capacity_share_default))
        try:
            sock = listen_socket(svc.listen_host, svc.listen_port)
        except OSError as e:
            log.error("service %s: cannot listen on %s:%s: %s", svc.name, svc.listen_host, svc.listen_port, e)
            self.listen_errors[svc.name] = str(e)
            self.listeners.pop(svc.name, None)
            return
        self.listen_errors.pop(svc.name, None)
        lst = Listener(engine=self, rt=rt, key=key, sock=sock, port=sock.getsockname()[1])
        self.listeners[svc.name] = lst
        if not initial and self.loop is not None:
            self.loop.create_task(lst.serve(self._factory(lst)))

    def _retire(self, lst: Listener) -> None:
        """Stop accepting; connections of the old service finish, then are closed."""
        lst.close()
        self._retired.append(lst)
        if self.loop is not None:
            self.loop.call_later(lst.rt.opts.stop_grace, self._close_retired, lst)

    def _close_retired(self, lst: Listener) -> None:
        for c in [c for c in self.conns if c.listener is lst]:
            c.close()
        for b in lst.rt.backends.values():
            b.close_pool()
        if lst in self._retired:
            self._retired.remove(lst)

    def set_client_drain(self, phase: str) -> None:
        """Drain this node's clients gracefully (client_drain.py: "closing", "refusing") or
        end the drain ("off"); the worker processes follow."""
        self.client_drain.set_phase(phase, self.conns, self.listening_sockets())
        if self._started:
            self.draining = phase != "off"
        if self._pool_supervisor is not None:
            self._pool_supervisor.send_client_drain(phase)

    def client_drain_poll(self) -> DrainCounts:
        """While draining: close idle keep-alive connections (again: they go idle one by one),
        then count the client connections left, the workers' included (their last report
        made in the current phase; a worker that has not reported in it yet counts as busy)."""
        if self.client_drain.phase != "off":
            self.client_drain.close_idle(self.conns, time.monotonic(), self._idle)
        mine = self.client_drain.counts(self.conns)
        if self._pool_supervisor is not None:
            for d in self._pool_supervisor.client_drain_counts():
                if d.phase != mine.phase:
                    d = DrainCounts(mine.phase, max(1, d.connections), max(1, d.from_before))
                mine = DrainCounts(mine.phase, mine.connections + d.connections, mine.from_before + d.from_before)
        return mine

    def _close_idle(self) -> None:
        """HTTP client connections between requests (not mid-head): closed while draining."""
        for c in list(self.conns):
            if self._idle(c):
                c.close()

    @staticmethod
    def _idle(c: Any) -> bool:
        return isinstance(c, HttpClientConn) and not c.closed and c.cur is None and not c.in_headers

    @staticmethod
    def _busy(conn: Any) -> bool:
        return getattr(conn, "cur", None) is not None or getattr(conn, "up", None) is not None

    def _worker_snapshot(self) -> RoutingSnapshot:
        """The snapshot with port 0 replaced by the bound port, so workers share it."""
        services = []
        for svc in self.snapshot.services:
            lst = self.listeners.get(svc.name)
            if svc.listen_port == 0 and lst is not None:
                from dataclasses import replace

                svc = replace(svc, listen_port=lst.port)
            services.append(svc)
        return RoutingSnapshot(version=self.snapshot.version, services=tuple(services),
                               acme_challenges=self.snapshot.acme_challenges)

    async def _sweep(self) -> None:
        """Timeouts, ejection expiry, slow-start ramps and idle pool trimming."""
        loop = self.loop
        assert loop is not None
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            now = self.now = loop.time()
            trim_all = now - self._pools_trimmed_at >= POOL_TRIM_INTERVAL
            if trim_all:
                self._pools_trimmed_at = now
            try:
                for lst in list(self.listeners.values()):
                    lst.rt.tick()
                    keep = lst.rt.opts.upstream_keepalive
                    if not lst.rt.requests or not (trim_all or keep < 4 * POOL_TRIM_INTERVAL):
                        continue  # nothing was ever pooled, or not this sweep's turn
                    for b in lst.rt.backends.values():
                        if b.pool:
                            stale = [u for u in b.pool if now - u.idle_since > keep]
                            for u in stale:
                                b.pool.remove(u)
                                u.close()
                if self._relay is not None:
                    self._relay.expire()
                al = self.access_log
                if al is not None:
                    al.flush(wake=True)  # lines reach the file within a sweep interval
                for c in list(self.conns):
                    if not c.closed:
                        c.check(now)
            except Exception:  # the sweeper must survive anything
                log.exception("data plane sweep failed")

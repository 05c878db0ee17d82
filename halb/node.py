"""One balancer process: wires the replicated state, admin API and (later) data plane,
health checks and announcement together, and owns their lifecycle.

The control loop is deliberately boring (Patroni-style): a handful of asyncio tasks that
each converge one thing (seed the cluster, register this member, rebuild routing) and
keep running when the cluster has no quorum.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from typing import Any, Awaitable, Callable

import aiohttp
from aiohttp import web

from halb.api.server import AdminApi
from halb.api.views import ClusterViews
from halb.certs.acme_manager import AcmeManager
from halb.certs.sealing import KeySealer
from halb.config import NodeConfig, effective_capacity_share, service_seed_to_dict
from halb.control.raft import ReplicatedState, fail_reason_name
from halb.control.state import Applied
from halb.control.writer import CommandWriter, WriteError
from halb.dataplane.selfcheck import SelfCheckParams
from halb.model import parse_hostport, to_primitive
from halb.tls import AdminTls, server_context

log = logging.getLogger("halb.node")


class InsecureConfig(Exception):
    pass


class NodeLocked(Exception):
    """Another process has this node's data dir (and Raft journal) open."""


class NodeLogFilter(logging.Filter):
    """Stamp every record with the node id, so interleaved logs of a cluster stay readable."""

    def __init__(self, node_id: str) -> None:
        super().__init__()
        self.node_id = node_id

    def filter(self, record: logging.LogRecord) -> bool:
        record.node_id = self.node_id
        return True


def setup_logging(node_id: str, level: str) -> None:
    handler = logging.StreamHandler()
    handler.addFilter(NodeLogFilter(node_id))
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s [%(node_id)s] %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def validate_health_checks(cfg: NodeConfig) -> None:
    """Health check tables are parsed by halb.health; report them like every config error."""
    from halb.config import ConfigError
    from halb.health.checks import CheckConfig, CheckConfigError

    for i, svc in enumerate(cfg.services):
        try:
            CheckConfig.from_dict(svc.health or {}, where=f"services[{i}].health")
        except CheckConfigError as exc:
            raise ConfigError(cfg.path, "", str(exc)) from None


class Node:
    def __init__(self, cfg: NodeConfig, *, insecure_dev: bool = False, takeover: bool = False,
                 ready_fd: int | None = None) -> None:
        self.cfg = cfg
        self.node_id = cfg.node_id
        secret = cfg.read_secret()
        if secret is None and not insecure_dev:
            raise InsecureConfig(
                f"{cfg.path}: secret_file is not set. pysyncobj unpickles what peers send, so an "
                "unauthenticated Raft port is remote code execution for anyone who can reach it. "
                "Set secret_file (halb cluster init makes one), or pass --insecure-dev on a throwaway machine."
            )
        if secret is None:
            log.warning("RUNNING WITH AN UNAUTHENTICATED RAFT PORT (--insecure-dev): anyone who can reach "
                        "%s can run code in this process", cfg.raft.bind)
        if cfg.api.tls_cert is None and not insecure_dev:
            raise InsecureConfig(
                f"{cfg.path}: api.tls_cert is not set. Without TLS the admin API's bearer tokens cross the "
                "network in clear text. Set [api] tls_cert, tls_key and ca_file (halb cluster init makes them; "
                "for a directory made by an older halb: halb cluster init --force DIR), or pass --insecure-dev "
                "on a throwaway machine."
            )
        if cfg.api.tls_cert is None:
            log.warning("ADMIN API WITHOUT TLS (--insecure-dev): plain HTTP on %s, tokens travel in clear text "
                        "and peers are not verified", cfg.api.bind)
        # how this node calls its peers' admin APIs (halb/tls.py): a TLS node verifies them
        # against the cluster CA; a plain one (--insecure-dev) speaks http to them
        self.admin_tls = AdminTls(ca_file=str(cfg.api.ca_file) if cfg.api.ca_file else None,
                                  plain=cfg.api.tls_cert is None)
        self.token = cfg.read_token()
        validate_health_checks(cfg)
        self._secret = secret
        # seals TLS certificate keys before they are proposed (halb/certs/sealing.py)
        self.cert_sealer = KeySealer(secret) if secret else None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stop_event = asyncio.Event()
        self.stop_reason = ""
        self.state_changed = asyncio.Event()
        self.raft: ReplicatedState | None = None
        self.writer: CommandWriter | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._runner: web.AppRunner | None = None
        self._http: aiohttp.ClientSession | None = None
        self._listeners: list[Callable[[dict[str, Any], Applied], None]] = []
        self.started_at = time.time()
        from halb.event_log import EventLog

        self._event_log = EventLog(log, self.started_at)
        from halb.gc_pause import GcFreezer

        self.gc_freezer = GcFreezer()  # full collections must not stall Raft as the state grows (gc_pause.py)
        self.health: Any = None  # HealthManager
        self.dataplane: Any = None  # DataPlane
        self.announcer: Any = None  # announce.manager (VIP lease / DNS), when configured
        self._routing_dirty = asyncio.Event()
        from halb.local_issues import LocalIssues
        from halb.routing_cache import RoutingCache
        self.issues = LocalIssues()  # per-service build failures on this node (status, /v1/local-events)
        from halb.frontend_sync import FrontendSync

        self.frontend_sync = FrontendSync(cfg.dataplane.listen_host, self.cert_sealer, self.issues,
                                          wake=lambda: self._routing_dirty.set())
        self.routing = RoutingCache(cfg.dataplane.listen_host, dict(cfg.dataplane.backend_dial or {}), self.issues)
        self.listening = False  # admin API and data plane bound: part of READY=1 (sd_notify)
        self.sd: Any = None  # halb.sd_notify.SystemdNotify when started by systemd (NOTIFY_SOCKET)
        # --- hot restart (halb/node_restart.py, halb/takeover.py) ---
        from halb.node_restart import ReadyReport
        from halb.takeover import NodeLock

        self.takeover = takeover  # this process replaces a running one (--takeover)
        self.ready_report = ReadyReport(ready_fd)  # `halb node reload` waits for its line
        self.lock = NodeLock(cfg.data_dir)  # held while Raft is open here
        self.api_sock: Any = None
        self.api_site: Any = None
        self.takeover_server: Any = None
        self.takeover_client: Any = None
        self.replaces_pid: int | None = None
        self.handed_over_to: int | None = None
        self.raft_stopped = False
        self.stopped_parts: set[str] = set()  # stopped early, when Raft was handed over
        self.exit_code = 0

    # --- lifecycle --------------------------------------------------------------------

    async def run(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.gc_freezer.install()
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, self.request_stop, f"signal {sig.name}")
        from halb import node_restart

        self.loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(node_restart.reload_settings(self)))
        self.sd = self._make_sd()
        if self.sd is not None and not self.takeover:
            self.sd.start()  # the watchdog pings from here on, also while starting
        try:
            if self.takeover:
                await node_restart.take_over(self)
            else:
                await self.start()
            self.takeover_server = node_restart.start_server(self)
        except BaseException as exc:
            self.ready_report.fail(str(exc) or type(exc).__name__)
            await self.shutdown()
            raise
        if self.sd is not None and self.takeover:  # systemd follows this process from now on
            self.sd.took_over()
            self.sd.start()
        self.ready_report.ready()
        try:
            await self.stop_event.wait()
        finally:
            await self.shutdown()

    async def start(self) -> None:
        if not self.lock.try_acquire():
            from halb.takeover import locked_message

            raise NodeLocked(locked_message(self.lock, self.cfg.data_dir))
        self.open_raft()
        await self.start_serving()

    def _make_sd(self) -> Any:
        from halb.sd_notify import SystemdNotify, is_ready

        return SystemdNotify.from_env(self._sd_facts, lambda: is_ready(
            self.listening, self.raft.raft_status().leader if self.raft else None,
            self.raft is not None and self.raft.isReady()))

    def sd_replaces(self, old_pid: int, systemd: dict[str, Any]) -> None:
        """--takeover: the process being replaced told us its NOTIFY_SOCKET and watchdog
        interval; we speak for the unit (MAINPID) once we serve."""
        self.replaces_pid = old_pid
        notify = systemd.get("notify_socket")
        if self.sd is None and isinstance(notify, str) and notify:
            os.environ["NOTIFY_SOCKET"] = notify
            self.sd = self._make_sd()
        if self.sd is not None:
            usec = systemd.get("watchdog_usec")
            self.sd.replaces(old_pid, usec if isinstance(usec, int) else None)

    def open_raft(self) -> None:
        cfg = self.cfg
        log.info("starting node %s: raft %s (peers %s), api %s, data %s", self.node_id, cfg.raft.bind,
                 ", ".join(cfg.raft.peers) or "none", cfg.api.bind, cfg.data_dir)
        self.raft = ReplicatedState(
            self.node_id, cfg.raft.bind, cfg.raft.peers, cfg.data_dir, self._secret, cfg.raft,
            on_applied=self._on_applied_thread, on_state_changed=self._on_raft_state_thread,
        )
        self.writer = CommandWriter(self.raft, cfg.api.write_timeout)
        self.views = ClusterViews(self.node_id, self.raft, self.issues, self.cfg.dataplane.shared_hosts, self.started_at)

    async def start_serving(self) -> None:
        """Admin API, convergence and the components, on top of an open Raft."""
        from halb.node_restart import bind_api_socket

        cfg = self.cfg
        self._http = aiohttp.ClientSession(connector=self.admin_tls.connector(),
                                           timeout=aiohttp.ClientTimeout(total=5))
        api = AdminApi(self)
        self._runner = api.runner(access_log=None, handle_signals=False)
        await self._runner.setup()
        host, port = parse_hostport(cfg.api.bind)
        tls = server_context(cfg.api.tls_cert, cfg.api.tls_key) if cfg.api.tls_cert and cfg.api.tls_key else None
        self.api_sock = bind_api_socket(host, port)  # handed over by a replaced process, or bound here
        self.api_site = web.SockSite(self._runner, self.api_sock, ssl_context=tls)
        await self.api_site.start()
        log.info("admin API listening on %s", self.admin_tls.url(cfg.api.bind, ""))
        self._tasks.append(asyncio.create_task(self._converge_loop(), name="converge"))
        self.acme = AcmeManager(self.node_id, self.raft, self.writer, self.cert_sealer, cfg.data_dir,
                                peers=self._peer_apis, peer_get=self.peer_get)
        self._tasks.append(asyncio.create_task(self.acme.run(), name="acme"))
        await self.start_components()
        self.listening = True

    def request_stop(self, reason: str = "") -> None:
        if not self.stop_event.is_set():
            self.stop_reason = reason
            log.info("stopping: %s", reason or "requested")
            self.stop_event.set()

    async def shutdown(self) -> None:
        if (self.sd is not None and self.handed_over_to is None and self.exit_code == 0
                and (not self.takeover or self.sd.readied)):
            # not after a hand-over: the new process is systemd's MAINPID now, and STOPPING=1
            # from any process of the unit (NotifyAccess=all) would stop the whole unit; nor
            # from a --takeover process that never took over (the old one is MAINPID), nor
            # when exiting 1 after a failed takeover (Restart=on-failure restarts the node)
            self.sd.stopping(self.stop_reason)
        if self.takeover_server is not None:
            await self.takeover_server.stop()
        if self.takeover_client is not None:
            self.takeover_client.close()  # a failed --takeover: the old process carries on
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.stop_components()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._http is not None:
            await self._http.close()
        if self.raft is not None and not self.raft_stopped:
            try:  # journal flushed and closed before the lock goes (halb/takeover.py)
                await asyncio.wait_for(asyncio.to_thread(self.raft.destroy_synchronous), 5.0)
            except asyncio.TimeoutError:
                log.warning("Raft did not stop within 5 s")
            self.raft_stopped = True
        self.lock.release()
        self.gc_freezer.uninstall()
        if self.sd is not None:
            await self.sd.stop()
        log.info("stopped%s", f" (taken over by pid {self.handed_over_to})" if self.handed_over_to else "")

    def _sd_facts(self) -> Any:
        """What systemd's STATUS= line shows (halb/sd_notify.py sends it only when it changes)."""
        from halb.sd_notify import StatusFacts

        if self.raft is None:
            return StatusFacts("starting", None, None, 0)
        st = self.raft.raft_status()
        with self.raft.read() as cs:
            services, holder = len(cs.services), cs.lease.get("holder")
        return StatusFacts(st.state, self.views.leader_id() if st.leader else None, holder, services)

    async def start_components(self) -> None:
        """Health checks, data plane and announcement; each keeps working without quorum."""
        from halb.dataplane.engine import DataPlane
        from halb.health.manager import HealthManager

        from halb.metrics import NodeMetrics

        self.metrics = NodeMetrics(self)
        self.health = HealthManager(self.node_id, self.raft, self.writer, on_local_change=lambda svc: self.mark_routing_dirty({svc}),
                                    issues=self.issues,
                                    on_result=self.metrics.observe_check, dial=self.cfg.dataplane.backend_dial)
        self.health.start()
        self.views.health = self.health
        self.dataplane = DataPlane(self.node_id, workers=self.cfg.dataplane.workers,
                                   shared_hosts=self.cfg.dataplane.shared_hosts)
        self.dataplane.on_ejection.append(self._on_ejection)
        if self.cfg.dataplane.access_log:  # before start: the worker processes get it when spawned
            self.dataplane.set_access_log(self.cfg.dataplane.access_log, self.cfg.dataplane.access_log_buffer)
        self.views.dataplane = self.dataplane
        await self.dataplane.start(self.build_routing())
        try:
            self.frontend_sync.apply(self.raft, self.dataplane)
        except Exception:  # never stops the node: the routing loop retries at the next change
            log.exception("frontends could not be applied at start")
        self._tasks.append(asyncio.create_task(self._routing_loop(), name="routing"))
        from halb.load_meter import LoadMeter  # resilience: load per backend, summed over members
        self.load_meter = LoadMeter(self.node_id, self.dataplane.load_counters, self._peer_apis, self.token,
                                    api_url=self.admin_tls.url)
        share_mode = effective_capacity_share(self.cfg.dataplane.capacity_share, self.cfg.dataplane.shared_hosts,
                                              str(self.cfg.announce.get("mode", "none")))
        log.info("capacity limits: %s share (capacity_share = %r)", share_mode, self.cfg.dataplane.capacity_share)
        if share_mode == "cluster":  # limits split by the traffic each node carries
            self.load_meter.on_cluster = lambda: self.dataplane.set_capacity_shares(*self.load_meter.shares())
        self.load_meter.start(self._http)
        self.views.load_meter = self.load_meter
        self.add_listener(self._after_apply)
        # commands applied since the data plane's first snapshot (starting its worker
        # processes takes ~1 s; a cluster seeded meanwhile left the node serving nothing)
        self.health.sync_targets(None)
        self.mark_routing_dirty()
        # --- announce (VIP quorum lease / DNS; halb/announce/manager.py) ---
        from halb.announce.manager import start_announcement
        self.announcer = await start_announcement(self)
        self.views.announcer = self.announcer
        # --- end announce ---
        from halb.dataplane_guard import DataPlaneGuard  # self-check: a broken data plane gives up the VIP
        acfg = self.announcer.cfg if self.announcer is not None else None
        self.dp_guard = DataPlaneGuard(self, acfg.dataplane if acfg else SelfCheckParams(),
                                       acfg.dataplane_holddown_s if acfg else 3.0)
        self.views.dp_guard = self.dp_guard
        self._tasks.append(asyncio.create_task(self.dp_guard.run(), name="dataplane-check"))

    async def stop_components(self) -> None:
        """Stopped before Raft, in reverse order of start (except those a takeover stopped)."""
        for part in ("dp_guard", "announcer", "load_meter", "dataplane", "health"):
            obj = getattr(self, part, None)
            if obj is not None and part not in self.stopped_parts:
                await obj.stop()

    # --- routing: replicated state + local health -> data plane snapshot -------------

    def mark_routing_dirty(self, services: Any = None) -> None:
        """Rebuild the routing of `services` (None: all) soon (halb/routing_cache.py)."""
        self.routing.mark(services)
        self._routing_dirty.set()

    def _after_apply(self, cmd: dict[str, Any], applied: Applied) -> None:
        from halb.routing_cache import touched_services

        touched = touched_services(cmd, applied.events)  # only what this command can have changed
        if str(cmd.get("op", "")).startswith("acme.challenge"):
            self._routing_dirty.set()  # HTTP-01 answers travel with the routing snapshot, no service changed
        if self.frontend_sync.mark(str(cmd.get("op", "")) if touched is not None else None):
            self._routing_dirty.set()
        if touched is not None and not touched:
            return
        if touched is None or str(cmd.get("op", "")).startswith(("service.", "backend.")):
            self.health.sync_targets(touched)
        self.mark_routing_dirty(touched)

    def build_routing(self) -> Any:
        with self.raft.read() as cs:
            return self.routing.build(cs, self.health.local_up)

    async def _routing_loop(self) -> None:
        while True:
            await self._routing_dirty.wait()
            self._routing_dirty.clear()
            try:
                self.dataplane.update(self.build_routing())
            except Exception:
                log.exception("routing update failed; the data plane keeps its last snapshot")
            if self.frontend_sync.dirty:
                try:
                    self.frontend_sync.apply(self.raft, self.dataplane)
                except Exception:
                    log.exception("frontend update failed; the data plane keeps its last frontends")
            self.issues.sync("dataplane", self.dataplane.apply_errors)
            self.gc_freezer.freeze_if_due()  # after a change: that is when the heap grows
            await asyncio.sleep(0.02)  # coalesce bursts of applied commands

    def _on_ejection(self, service: str, backend: str, ejected: bool, reason: str) -> None:
        log.info("outlier %s: %s/%s (%s)", "ejected" if ejected else "restored", service, backend, reason)

    def extra_routes(self) -> list[tuple[str, Callable[[web.Request], Awaitable[web.StreamResponse]]]]:
        async def metrics(request: web.Request) -> web.StreamResponse:
            body = self.metrics.render()  # in the loop thread: it reads loop-owned health state
            return web.Response(body=body, content_type="text/plain", charset="utf-8",
                                headers={"X-Halb-Format": "prometheus-0.0.4"})

        async def dataplane_stats(request: web.Request) -> web.StreamResponse:
            stats = self.dataplane.stats(request.query.get("service"))  # one service: cheap at 10k backends
            return web.json_response({"node": self.node_id, **stats})

        async def load(request: web.Request) -> web.StreamResponse:
            body = {"node": self.node_id, "load": self.load_meter.local(),
                    "demand": self.load_meter.demand(), "dataplane": self.dp_guard.view()}
            if hasattr(self.announcer, "announcements"):  # bgp mode: peers show it in cluster status
                body["announcements"] = self.announcer.announcements()
            return web.json_response(body)

        async def dataplane_check(request: web.Request) -> web.StreamResponse:
            return web.json_response({"node": self.node_id, **self.dp_guard.view()})

        async def local_events(request: web.Request) -> web.StreamResponse:
            return web.json_response({"node": self.node_id, "events": list(self.issues.events)})

        async def acme_answer_ready(request: web.Request) -> web.StreamResponse:
            # the leader asks every member before it tells the CA to validate (acme_manager.py)
            token = request.match_info["token"].encode()
            return web.json_response({"node": self.node_id, "ready": token in self.dataplane.acme_answers})

        return [("/metrics", metrics), ("/v1/dataplane", dataplane_stats), ("/v1/load", load),
                ("/v1/local-events", local_events), ("/v1/dataplane-check", dataplane_check),
                ("/v1/acme-answers/{token}", acme_answer_ready)]

    def extra_post_routes(self) -> list[tuple[str, Callable[[web.Request], Awaitable[web.StreamResponse]]]]:
        """Admin-only writes that act on this node alone (not replicated)."""
        async def announce_drain(request: web.Request) -> web.StreamResponse:
            # bgp mode: {"drain": true} withdraws this node's service addresses from the
            # routers (flows in flight are still served), {"drain": false} announces again
            drain = getattr(self.announcer, "drain", None)
            if drain is None:
                return web.json_response({"error": "invalid", "message": "drain needs [announce] mode = \"bgp\""},
                                         status=409)
            try:
                body = await request.json()
            except ValueError:
                body = None
            if not isinstance(body, dict) or not isinstance(body.get("drain"), bool) or len(body) != 1:
                return web.json_response({"error": "invalid", "message": 'body must be {"drain": true|false}'},
                                         status=400)
            return web.json_response({"node": self.node_id, **await drain(body["drain"])})

        return [("/v1/announce/drain", announce_drain)]

    # --- events from the tick thread --------------------------------------------------

    def add_listener(self, fn: Callable[[dict[str, Any], Applied], None]) -> None:
        """fn(cmd, applied) runs in the asyncio loop after each applied command."""
        self._listeners.append(fn)

    def _on_applied_thread(self, cmd: dict[str, Any], applied: Applied) -> None:
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._on_applied, cmd, applied)

    def _on_applied(self, cmd: dict[str, Any], applied: Applied) -> None:
        self.state_changed.set()
        self._event_log.applied(applied.events)  # new events only, not the journal replay
        for fn in self._listeners:
            try:
                fn(cmd, applied)
            except Exception:
                log.exception("listener failed")

    def _on_raft_state_thread(self, old: str, new: str) -> None:
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._on_raft_state, old, new)

    def _on_raft_state(self, old: str, new: str) -> None:
        log.info("raft state %s -> %s", old, new)
        if new == "leader":
            asyncio.ensure_future(self._record_leadership())

    async def _record_leadership(self) -> None:
        term = self.raft.raft_status().term if self.raft else 0
        try:
            await self.writer.write("event.record", {
                "kind": "leader.elected", "message": f"{self.node_id} became leader (term {term})",
                "data": {"leader": self.node_id, "term": term}}, by=f"node:{self.node_id}")
        except WriteError as exc:
            log.warning("could not record leadership: %s", exc.message)

    # --- convergence ------------------------------------------------------------------

    async def _converge_loop(self) -> None:
        """Seed an empty cluster from config and keep this member's registration current."""
        seeded = not self.cfg.services
        while True:
            try:
                st = self.raft.raft_status()
                if st.leader is not None:
                    with self.raft.read() as cs:
                        is_seeded = cs.seeded or bool(cs.services)
                        me = cs.members.get(self.node_id)
                    if not seeded and not is_seeded:
                        await self.writer.write("seed", {"services": [service_seed_to_dict(s) for s in self.cfg.services]},
                                                by=f"config-seed:{self.node_id}")
                    seeded = True
                    wanted = {"id": self.node_id, "raft": self.cfg.raft.bind, "api": self.cfg.api.bind,
                              "listen_host": self.cfg.dataplane.listen_host}
                    if me is None or to_primitive(me) != wanted:
                        await self.writer.write("member.register", wanted, by=f"node:{self.node_id}")
                        continue
                await asyncio.sleep(0.5)
            except WriteError as exc:
                log.info("converge: %s", exc.message)
                await asyncio.sleep(1.0)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("converge loop")
                await asyncio.sleep(1.0)

    # --- views for the API: halb/api/views.py ------------------------------------------

    def _peer_apis(self) -> list[tuple[str, str]]:
        with self.raft.read() as cs:
            return [(m.id, m.api) for m in cs.members.values() if m.id != self.node_id and m.api]

    async def peer_get(self, api: str, path: str, timeout: float) -> dict[str, Any]:
        """GET a peer's admin API with this node's token; raises on any failure."""
        assert self._http is not None
        async with self._http.get(self.admin_tls.url(api, path), headers={"Authorization": f"Bearer {self.token}"},
                                  timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            resp.raise_for_status()
            return await resp.json()

    # --- membership and leadership ----------------------------------------------------

    def _member_by_id(self, node_id: str) -> Any:
        with self.raft.read() as cs:
            return cs.members.get(node_id)

    async def _raft_call(self, fn: Callable[..., None], *args: Any, timeout: float = 3.0) -> int:
        """Run a pysyncobj callback-style call and wait for its fail code (0 = success)."""
        fut: asyncio.Future[int] = self.loop.create_future()

        def done(_result: Any, err: int) -> None:
            self.loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(err))

        fn(*args, callback=done)
        try:
            return await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            raise WriteError(503, "no_quorum", f"cluster change not committed within {timeout:g}s") from None

    async def member_add(self, node_id: str, raft: str, api: str, *, by: str) -> dict[str, Any]:
        with self.raft.read() as cs:
            if node_id in cs.members:
                raise WriteError(409, "conflict", f"member {node_id!r} already exists")
            if any(m.raft == raft for m in cs.members.values()):
                raise WriteError(409, "conflict", f"raft address {raft} is already a member")
        if raft in self.views.raft_members():
            raise WriteError(409, "conflict", f"raft address {raft} is already in the Raft configuration")
        err = await self._raft_call(self.raft.addNodeToCluster, raft)
        if err != 0:
            raise WriteError(503, fail_reason_name(err),
                             f"Raft refused to add {raft}: {fail_reason_name(err)} (one change at a time; retry)")
        result = await self.writer.write("member.register", {"id": node_id, "raft": raft, "api": api},
                                         by=by)
        peers = sorted(self.views.raft_members() - {raft})
        return {**result, "start_with_peers": peers}

    async def member_remove(self, node_id: str, *, by: str) -> dict[str, Any]:
        member = self._member_by_id(node_id)
        if member is None:
            raise WriteError(404, "not_found", f"member {node_id!r} does not exist")
        if len(self.views.raft_members()) <= 1:
            raise WriteError(409, "denied", "cannot remove the last member")
        transferred = None
        if self.raft.raft_status().leader == member.raft:
            others = [m for m in self.views.members_view() if m["id"] and m["id"] != node_id and m["in_raft_config"]]
            if not others:
                raise WriteError(409, "denied", "no other member to hand leadership to")
            transferred = await self.transfer_leadership(None, by=by, exclude=member.raft)
        if member.raft in self.views.raft_members():
            for attempt in range(20):
                err = await self._raft_call(self.raft.removeNodeFromCluster, member.raft)
                if err == 0:
                    break
                await asyncio.sleep(0.2)  # e.g. the new leader's no-op is not committed yet
            else:
                raise WriteError(503, fail_reason_name(err), f"Raft refused to remove {member.raft}: "
                                 f"{fail_reason_name(err)}")
        result = await self.writer.write("member.remove", {"id": node_id}, by=by)
        told = await self._tell_to_stop(member)
        return {**result, "leadership_transferred": transferred, "told_to_stop": told}

    async def _tell_to_stop(self, member: Any) -> bool:
        if member.id == self.node_id:
            self.loop.call_later(0.5, self.request_stop, "removed from the cluster")
            return True
        try:
            async with self._http.post(self.admin_tls.url(member.api, "/v1/admin/shutdown"),
                                       headers={"Authorization": f"Bearer {self.token}"},
                                       timeout=aiohttp.ClientTimeout(total=2)) as resp:
                return resp.status == 202
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            log.info("removed member %s did not answer the stop request: %s", member.id, exc)
            return False

    async def transfer_leadership(self, target: str | None, *, by: str, exclude: str | None = None,
                                  timeout: float = 3.0) -> dict[str, Any]:
        st = self.raft.raft_status()
        if st.leader is None:
            raise WriteError(503, "no_leader", "no leader is known; nothing to transfer")
        target_raft = None
        if target is not None:
            member = self._member_by_id(target)
            if member is None:
                raise WriteError(404, "not_found", f"member {target!r} does not exist")
            target_raft = member.raft
            if target_raft == st.leader:
                return {"ok": True, "from": self.views.leader_id(), "to": target, "changed": False}
        if st.leader != st.self_addr:
            return await self._forward_transfer(target, exclude)
        if target_raft is None:
            candidates = sorted(a for a, up in st.partners.items() if up and a != exclude)
            if not candidates:
                raise WriteError(409, "denied", "no connected follower to hand leadership to")
        started = time.monotonic()
        old = self.views.leader_id()
        deadline = started + timeout
        if self.announcer is not None:  # announce: delete the VIP and release the lease first
            await self.announcer.before_transfer()
        while True:
            dest = target_raft or candidates[0]
            err = await self._raft_call(self.raft.transferLeadership, dest)
            if err == 0:
                break
            if time.monotonic() > deadline:
                raise WriteError(409, fail_reason_name(err),
                                 f"transfer to {dest} refused ({fail_reason_name(err)}): target not caught up?")
            await asyncio.sleep(0.05)
        while time.monotonic() < deadline:
            leader = self.raft.raft_status().leader
            if leader is not None and leader != st.self_addr:
                break
            await asyncio.sleep(0.01)
        new = self.views.leader_id()
        if new == old:
            raise WriteError(504, "timeout", f"leadership did not move within {timeout:g}s")
        log.info("leadership transferred %s -> %s by %s", old, new, by)
        return {"ok": True, "from": old, "to": new, "changed": True,
                "took_ms": round((time.monotonic() - started) * 1000, 1)}

    async def _forward_transfer(self, target: str | None, exclude: str | None) -> dict[str, Any]:
        leader_id = self.views.leader_id()
        leader = self._member_by_id(leader_id) if leader_id else None
        if leader is None:
            raise WriteError(503, "no_leader", "the leader's admin API is not known yet; retry")
        body: dict[str, Any] = {"to": target}
        if exclude is not None and target is None:
            others = [m for m in self.views.members_view() if m["id"] and m["raft"] not in (exclude, leader.raft)]
            body["to"] = others[0]["id"] if others else None
        async with self._http.post(self.admin_tls.url(leader.api, "/v1/leader/transfer"), json=body,
                                   headers={"Authorization": f"Bearer {self.token}"}) as resp:
            data = await resp.json()
            if resp.status >= 400:
                raise WriteError(resp.status, data.get("error", "error"), data.get("message", "transfer failed"))
            return {k: v for k, v in data.items() if k not in ("node", "leader", "raft_state")}

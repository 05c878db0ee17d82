"""Turns this node's active checks into replicated observations, and runs the leader's
health duties (liveness of voters, releasing expired flap holds).

Why reconcile instead of "send each transition once": a transition report can be lost
(no quorum at that moment, node restarted). The manager keeps comparing the prober's
settled view with the observation the cluster holds for this node and re-sends until
they agree, so the cluster converges on what every node currently sees.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from halb.control.commands import MAX_OBSERVATIONS
from halb.control.raft import ReplicatedState
from halb.control.writer import CommandWriter, WriteError
from halb.health.checks import CheckConfig, CheckConfigError
from halb.health.prober import BackendHealth, Prober
from halb.model import parse_hostport

log = logging.getLogger("halb.health")

MAX_OBSERVATIONS_PER_COMMAND = MAX_OBSERVATIONS

# a change of one backend re-syncs its whole service: don't re-parse 100 addresses each time
_split = functools.lru_cache(maxsize=65536)(parse_hostport)


@dataclass
class HealthManager:
    node_id: str
    raft: ReplicatedState
    writer: CommandWriter
    on_local_change: Callable[[str], None]  # (service): this node's view of one of its backends changed
    on_result: Callable[[str, str, Any], None] | None = None
    dial: dict[str, str] = field(default_factory=dict)  # backend address -> address to check instead
    # max seconds to hold a report while other instances of its server fail too;
    # None: one check interval of the service (interval x (1 + jitter))
    server_hold: float | None = None
    issues: Any = None  # halb.local_issues.LocalIssues: where per-service failures are reported
    full_scan_s: float = 5.0  # reconcile at least this often without a local transition
    prober: Prober = field(init=False)
    _wake: asyncio.Event = field(init=False, default_factory=asyncio.Event)
    _task: asyncio.Task[None] | None = field(init=False, default=None)
    _check_errors: dict[str, str] = field(init=False, default_factory=dict)
    _held_since: dict[tuple[str, bool], float] = field(init=False, default_factory=dict)
    _first_reported: dict[tuple[str, str], BackendHealth] = field(init=False, default_factory=dict)
    # observation keys the cluster holds DOWN from this node, as of Raft index _down_scan_at
    _held_down: list[str] = field(init=False, default_factory=list)
    _down_scan_at: int | None = field(init=False, default=None)
    # the leader's flap holds (key -> hold_until), as of Raft index _holds_scan_at
    _holds: dict[str, float] = field(init=False, default_factory=dict)
    _holds_scan_at: int | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.prober = Prober(self._transition, on_result=self.on_result)

    def start(self) -> None:
        self.sync_targets()
        self._task = asyncio.create_task(self._loop(), name="health-reconcile")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.prober.stop()

    # --- targets from the replicated state --------------------------------------------

    def sync_targets(self, services: Iterable[str] | None = None) -> None:
        """Bring the prober's targets in line with the replicated state, for `services`
        (None: all of them).

        Everything is read inside one hold of the state lock (a consistent snapshot: the
        tick thread mutates `svc.backends` while it applies commands, so iterating them
        outside the lock raised "dictionary changed size during iteration" under bulk
        writes), and each service is handled on its own: one whose targets cannot be
        built is reported (LocalIssues) and keeps its previous targets, the others go on.
        """
        wanted: dict[str, dict[str, Any] | None] = {}  # service -> backend -> target; None: gone
        failed: dict[str, str] = {}
        with self.raft.read() as cs:
            names = set(cs.services) | set(self.prober.services()) if services is None else set(services)
            for name in names:
                svc = cs.services.get(name)
                if svc is None:
                    wanted[name] = None
                    continue
                try:
                    wanted[name] = self._service_targets(svc)
                except Exception as exc:  # isolate: a bad service must not stop the others
                    failed[name] = f"cannot build health check targets: {type(exc).__name__}: {exc}"
        for name, message in failed.items():
            self._issue(name, message)
        for name, targets in sorted(wanted.items()):
            try:
                self.prober.set_service_targets(name, targets or {})
            except Exception as exc:
                self._issue(name, f"cannot set health check targets: {type(exc).__name__}: {exc}")
                continue
            if targets is None:
                self._check_errors.pop(name, None)
                if self.issues is not None:
                    self.issues.forget_service("health", [name])
            elif self.issues is not None:
                self.issues.clear("health", name)

    def _service_targets(self, svc: Any) -> dict[str, Any]:
        """backend name -> (host, port, check) of one service; runs under the state lock."""
        try:
            check = CheckConfig.from_dict(svc.options.get("health") or {}, where=f"services.{svc.name}.health")
        except CheckConfigError as exc:
            if self._check_errors.get(svc.name) != str(exc):
                log.error("service %s: bad health check config, using TCP defaults: %s", svc.name, exc)
                self._check_errors[svc.name] = str(exc)
            check = CheckConfig(kind="tcp")
        out = {}
        for be in svc.backends.values():
            host, port = _split(self.dial.get(be.address, be.address))
            out[be.name] = (host, port, check)
        return out

    def _issue(self, service: str, message: str) -> None:
        if self.issues is not None:
            self.issues.report("health", service, message)
        else:
            log.error("health: service %s skipped: %s", service, message)

    # --- local view -------------------------------------------------------------------

    def local_up(self, service: str, backend: str) -> bool:
        up = self.prober.is_up(service, backend)
        return True if up is None else up

    def local_state(self, service: str, backend: str) -> BackendHealth | None:
        try:
            return self.prober.state(service, backend)
        except KeyError:
            return None

    def _transition(self, service: str, backend: str, up: bool, detail: str) -> None:
        log.info("local check: %s/%s is %s%s", service, backend, "UP" if up else "DOWN",
                 f" ({detail})" if detail else "")
        self.on_local_change(service)  # local fast path: re-route now, do not wait for the cluster
        self._wake.set()

    # --- reconcile loop ---------------------------------------------------------------

    async def _loop(self) -> None:
        """Reconcile when a local verdict changed, while reports are held or failed, and
        otherwise every `full_scan_s` (a report that settled without a transition, e.g.
        after a restart, waits at most that long). A scan walks every target: at 10,000
        backends scanning twice a second was most of an idle node's CPU."""
        loop = asyncio.get_running_loop()
        last_scan = -1e9
        again = True
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), 0.5)
            except asyncio.TimeoutError:
                pass
            woken = self._wake.is_set()
            self._wake.clear()
            try:
                st = self.raft.raft_status()
                if st.leader is None:
                    continue
                if woken or again or self._held_since or loop.time() - last_scan >= self.full_scan_s:
                    again = True  # stays set if the report fails: try again next round
                    last_scan = loop.time()
                    await self._report_observations()
                    again = False
                if st.state == "leader":
                    await self._leader_duties(st)
            except WriteError as exc:
                log.debug("health write deferred: %s", exc.message)
                await asyncio.sleep(0.5)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("health reconcile")
                await asyncio.sleep(1.0)

    async def _report_observations(self) -> None:
        """Send the settled local view where it differs from what the cluster holds.

        Correlated failure: when an instance's change is pending while *other* instances
        of the same server are moving the same way (failing but not yet DOWN, or passing
        but not yet settled UP), the report is held for at most `server_hold` seconds (about
        one check interval) so that the whole server's instances go out in one
        `health.observe_many` command: their verdicts then flip together and the cluster
        records one `server.down` event instead of N verdicts trickling in.
        """
        states = self.prober.live_states()  # read only, and only before the first await
        targets = self.prober.live_targets()
        me = self.node_id
        # Only two kinds of target can differ from what the cluster holds for this node:
        # one this node sees DOWN, and one the cluster holds DOWN from this node. Both are
        # rare, so this pass is one cheap walk over the local states plus a few lookups,
        # not a lookup of every one of 10,000 observations.
        # A third kind: a confirmed UP this node has never reported (the views show it
        # "pending" until a majority has); `_first_reported` remembers, per prober state
        # object, that the cluster holds a report, so this stays a walk without lookups.
        moving_keys: list[tuple[tuple[str, str], bool]] = []
        candidates: set[tuple[str, str]] = set()
        unreported: list[tuple[str, str]] = []
        for key, h in states.items():
            if h.up:
                if h.consecutive_failures > 0:
                    moving_keys.append((key, False))
                if h.confirmed and self._first_reported.get(key) is not h:
                    unreported.append(key)
            else:
                candidates.add(key)
                if h.consecutive_successes > 0:
                    moving_keys.append((key, True))
        # Which observations the cluster holds DOWN from this node changes only when a
        # command is applied: walk all of them only then (not every 5 s on an idle cluster).
        applied = self.raft.raft_status().last_applied  # refreshed after apply: the state is at least this new
        with self.raft.read() as cs:
            observations = cs.observations  # only .get() below, never iterated outside the lock
            copy = dict(observations) if applied != self._down_scan_at else None  # C-level copy under the lock
        if copy is not None:
            self._held_down = [key for key, obs in copy.items()
                               if (m := obs.get(me)) is not None and not m.get("up", True)]
            self._down_scan_at = applied
        for okey in self._held_down:
            service, _, backend = okey.partition("/")
            candidates.add((service, backend))
        for key in unreported:
            if me in (observations.get(f"{key[0]}/{key[1]}") or {}):
                self._first_reported[key] = states[key]
            else:
                candidates.add(key)
        if len(self._first_reported) > len(states):  # targets removed: forget them
            self._first_reported = {k: h for k, h in self._first_reported.items() if states.get(k) is h}
        wanted = {k for k, _ in moving_keys} | candidates
        with self.raft.read() as cs:
            server_of = {}
            for service, backend in wanted:
                be = cs.services[service].backends.get(backend) if service in cs.services else None
                server_of[(service, backend)] = be.server if be is not None else ""
        moving: dict[tuple[str, bool], int] = {}  # (server, up) -> instances still on their way there
        for key, up in moving_keys:
            group = (server_of.get(key, ""), up)
            moving[group] = moving.get(group, 0) + 1
        pending: list[dict[str, Any]] = []
        for service, backend in sorted(candidates):
            key = (service, backend)
            h = states.get(key)
            if h is None or key not in targets:
                continue
            check = targets[key][2]
            settled = (not h.up) or h.consecutive_successes >= check.rise
            if not settled:
                continue
            mine = (observations.get(f"{service}/{backend}") or {}).get(me)
            if mine is not None and mine["up"] == h.up:
                continue  # no report yet: send the first settled result, UP too (views: "pending" until then)
            hold = self.server_hold if self.server_hold is not None else check.interval * (1 + check.jitter)
            pending.append({"service": service, "backend": backend, "up": h.up,
                            "detail": "" if h.up else h.last_failure, "server": server_of.get(key, ""), "hold": hold})
        now = time.monotonic()
        ready: list[dict[str, Any]] = []
        for item in pending:
            group = (item["server"], item["up"])
            if moving.get(group) and item["hold"] > 0:
                since = self._held_since.setdefault(group, now)
                if now - since < item["hold"]:
                    continue  # other instances of this server are on their way: wait for them
            ready.append(item)
        for group in [g for g in self._held_since if not moving.get(g)
                      and not any((i["server"], i["up"]) == g for i in pending)]:
            del self._held_since[group]
        if not ready:
            return
        for item in ready:
            self._held_since.pop((item["server"], item["up"]), None)
        by = f"node:{self.node_id}"
        items = [{k: v for k, v in i.items() if k not in ("server", "hold")} for i in ready]
        if len(items) == 1:
            await self.writer.write("health.observe", items[0], by=by)
            return
        log.info("reporting %d observations in %s (%s)", len(items),
                 "one command" if len(items) <= MAX_OBSERVATIONS_PER_COMMAND else "commands of at most "
                 f"{MAX_OBSERVATIONS_PER_COMMAND}",
                 ", ".join(f"{i['service']}/{i['backend']} {'UP' if i['up'] else 'DOWN'}" for i in items[:20])
                 + (f", ... {len(items) - 20} more" if len(items) > 20 else ""))
        # first reports at start-up can cover thousands of backends; a command holds at most 1,000
        for start in range(0, len(items), MAX_OBSERVATIONS_PER_COMMAND):
            await self.writer.write("health.observe_many",
                                    {"observations": items[start:start + MAX_OBSERVATIONS_PER_COMMAND]}, by=by)

    async def _leader_duties(self, st: Any) -> None:
        now = time.time()
        with self.raft.read() as cs:
            by_raft = {m.raft: m.id for m in cs.members.values()}
            live = sorted({self.node_id} | {by_raft[a] for a, up in st.partners.items() if up and a in by_raft})
            current = cs.live_members
            # verdicts change only when a command is applied: walk all 10,000 only then,
            # not twice a second on an idle cluster (st is read after apply: state >= st)
            if st.last_applied != self._holds_scan_at:
                self._holds = {key: v["hold_until"] for key, v in cs.verdicts.items() if v["verdict"] == "held"}
                self._holds_scan_at = st.last_applied
        expired = [key for key, until in self._holds.items() if until <= now]
        if live != current and len(by_raft) > 0:
            await self.writer.write("health.liveness", {"live": live}, by=f"node:{self.node_id}")
        for key in expired:
            service, backend = key.split("/", 1)
            await self.writer.write("health.release", {"service": service, "backend": backend},
                                    by=f"node:{self.node_id}")

"""Polls the cluster's view of itself during a drill, for probes and the timeline.

Every ~150 ms it asks each balancer for /v1/status (short timeout: a frozen or dead node
shows as unreachable, which is itself information), every ~200 ms one answering node
(preferably the leader) for backend verdicts, and every ~500 ms for new audit events.
Changes (leader, VIP holder, verdicts, reachability) are recorded as timeline events; the
latest readings answer the engine's wait-until conditions and steady-state probes.

Field names are the real ones of ``GET /v1/status`` (halb/api/views.py ``status_view``, its
``announce`` part from halb/announce/manager.py ``Announcement.status``) and of the
backends view; a reply without them is a polling failure, not a guess. Every polling
failure (no answer, HTTP error, unexpected reply, a bug in a poll) is counted in
:attr:`Monitor.poll_failures` and goes into the drill report: a drill whose monitor could
not see the cluster must say so rather than show a quiet timeline.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Callable

import aiohttp

from halb.tls import AdminTls


@dataclass
class NodeView:
    reachable: bool
    leader: str | None = None
    raft_state: str = "unreachable"
    term: int = 0
    has_quorum: bool = False
    vip_held: bool | None = None  # None: this node reports no VIP (announce mode none)
    members: list[dict[str, Any]] = field(default_factory=list)
    at: float = 0.0


def _vip_held(status: dict[str, Any]) -> bool | None:
    """Whether a node says it holds the VIP; None if it runs no VIP (announce mode none/dns).

    ``announce.holds_vip`` is the node's own "I added the VIP" (``Announcement.holding``),
    not the replicated lease holder: a partitioned old holder still shows the lease in its
    stale state, but it drops the VIP itself, and that is what clients see.
    Raises KeyError/TypeError on a reply without these fields (a polling failure).
    """
    ann = status["announce"]
    if ann["mode"] != "vip":
        return None
    held = ann["holds_vip"]
    if not isinstance(held, bool):
        raise TypeError(f"announce.holds_vip is {held!r}, not a bool")
    return held


class PollError(Exception):
    """One poll got no usable reply (what, for the report)."""


@dataclass
class PollFailure:
    """Failures of one kind (poll, node, error) in a drill, counted rather than listed."""

    poll: str        # status | backends | events
    node: str | None
    error: str
    count: int
    first_t: float
    last_t: float


def _node_view(st: dict[str, Any], now: float) -> NodeView:
    """A node's /v1/status reply as a NodeView (KeyError/TypeError if fields are missing)."""
    leader = st["leader"]
    members = st["members"]
    if leader and ":" in leader:  # not registered yet: leader_id() names its raft address
        leader = next((m["id"] for m in members if m["raft"] == leader and m["id"]), leader)
    return NodeView(True, leader, st["raft_state"], int(st["term"]), bool(st["has_quorum"]), _vip_held(st),
                    members, now)


class Monitor:
    def __init__(self, apis: dict[str, str], token: str, service: str, clock: Callable[[], float],
                 status_interval: float = 0.15, backends_interval: float = 0.2, events_interval: float = 0.5,
                 tls: AdminTls | None = None) -> None:
        self.tls = tls or AdminTls.from_env()  # https verified against the cluster CA (halb/tls.py)
        self.apis = apis  # shared with the target: members added later are polled too
        self.token = token
        self.service = service
        self.clock = clock  # seconds since the drill's t0
        self.status_interval, self.backends_interval, self.events_interval = (
            status_interval, backends_interval, events_interval)
        self.views: dict[str, NodeView] = {}
        self.verdicts: dict[str, str] = {}
        self.backends: list[dict[str, Any]] = []
        self.timeline: list[dict[str, Any]] = []  # {"t", "kind", ...}
        self.samples: list[dict[str, Any]] = []  # {"t", "leader", "vip", "verdicts", "unreachable"}
        self.audit: list[dict[str, Any]] = []
        self._event_seq = 0
        self.poll_failures: dict[tuple[str, str | None, str], PollFailure] = {}
        self._last: dict[str, Any] = {}
        self._session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.on_event: Callable[[dict[str, Any]], None] | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(headers={"Authorization": f"Bearer {self.token}"},
                                              connector=self.tls.connector())
        await self.poll_once()
        await self._poll_events(initial=True)
        self._tasks = [asyncio.create_task(self._loop(self._poll_status, self.status_interval)),
                       asyncio.create_task(self._loop(self._poll_backends, self.backends_interval)),
                       asyncio.create_task(self._loop(self._poll_events, self.events_interval))]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    async def _loop(self, fn: Callable[[], Any], interval: float) -> None:
        poll = fn.__name__.removeprefix("_poll_")
        while True:
            try:
                await fn()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep polling, but the report must show it
                self.record_failure(poll, None, f"poll raised {exc!r}")
            await asyncio.sleep(interval)

    def record_failure(self, poll: str, node: str | None, error: str) -> None:
        now = round(self.clock(), 3)
        key = (poll, node, error)
        f = self.poll_failures.get(key)
        if f is None:
            self.poll_failures[key] = PollFailure(poll, node, error, 1, now, now)
            self._emit({"t": now, "kind": "monitor.poll_failed", "poll": poll, "node": node, "error": error})
        else:
            f.count += 1
            f.last_t = now

    def failures_report(self) -> list[dict[str, Any]]:
        """Polling failures for the drill report, most frequent first."""
        return [vars(f).copy() for f in sorted(self.poll_failures.values(), key=lambda f: (-f.count, f.first_t))]

    async def _get(self, api: str, path: str, timeout: float = 0.5) -> dict[str, Any]:
        """The JSON object at ``path``; PollError (with a short reason) for anything else."""
        assert self._session is not None
        try:
            async with self._session.get(self.tls.url(api, path), timeout=aiohttp.ClientTimeout(total=timeout)) as r:
                if r.status != 200:
                    raise PollError(f"HTTP {r.status}")
                data = await r.json()
        except asyncio.TimeoutError:
            raise PollError(f"no reply within {timeout:g}s") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise PollError(f"unreachable ({type(exc).__name__})") from None
        except ValueError:
            raise PollError("reply is not JSON") from None
        if not isinstance(data, dict):
            raise PollError("reply is not a JSON object")
        return data

    async def _try_get(self, poll: str, node: str | None, api: str, path: str,
                       timeout: float = 0.5) -> dict[str, Any] | None:
        try:
            return await self._get(api, path, timeout)
        except PollError as exc:
            self.record_failure(poll, node, str(exc))
            return None

    async def poll_once(self) -> None:
        await self._poll_status()
        await self._poll_backends()

    async def _poll_status(self) -> None:
        ids = list(self.apis)
        results = await asyncio.gather(*(self._try_get("status", i, self.apis[i], "/v1/status", 0.4) for i in ids))
        now = self.clock()
        for node_id, st in zip(ids, results):
            view = None
            if st is not None:
                try:
                    view = _node_view(st, now)
                except (KeyError, TypeError, ValueError) as exc:
                    self.record_failure("status", node_id, f"unexpected /v1/status reply: {exc!r}")
            self.views[node_id] = view or NodeView(reachable=False, at=now)
        self._sample(now)

    def leader_api(self) -> str | None:
        leader = self.agreed_leader()
        if leader and leader in self.apis and self.views.get(leader, NodeView(False)).reachable:
            return self.apis[leader]
        for node_id, v in self.views.items():
            if v.reachable:
                return self.apis.get(node_id)
        return None

    async def _poll_backends(self) -> None:
        api = self.leader_api()
        if api is None:
            return
        node = next((k for k, a in self.apis.items() if a == api), None)
        data = await self._try_get("backends", node, api, f"/v1/services/{self.service}/backends", 0.5)
        if data is None:
            return
        try:
            backends = data["backends"]
            verdicts = {b["name"]: b["verdict"] for b in backends}
        except (KeyError, TypeError) as exc:
            self.record_failure("backends", node, f"unexpected backends reply: {exc!r}")
            return
        self.backends, self.verdicts = backends, verdicts
        self._sample(self.clock())

    async def _poll_events(self, initial: bool = False) -> None:
        for node_id, api in list(self.apis.items()):
            if not self.views.get(node_id, NodeView(False)).reachable:
                continue
            data = await self._try_get("events", node_id, api, f"/v1/events?since={self._event_seq}&limit=500", 0.5)
            if data is None:
                continue
            try:
                for ev in data["events"]:
                    seq = int(ev["seq"])
                    if not initial:
                        self.audit.append({"t": round(self.clock(), 3), "kind": f"audit:{ev['kind']}",
                                           "message": ev["message"], "seq": seq, "at": ev["at"]})
                    self._event_seq = max(self._event_seq, seq)
            except (KeyError, TypeError, ValueError) as exc:
                self.record_failure("events", node_id, f"unexpected events reply: {exc!r}")
            return

    # --- derived views ------------------------------------------------------------------

    def agreed_leader(self) -> str | None:
        """The node that says it leads and that a majority of all balancers name as leader.

        A majority of *all* configured balancers, not of those answering: a partitioned old
        leader that still believes it leads is named only by itself, and a node that just
        restarted and knows no leader yet does not veto the others.
        """
        votes: dict[str, int] = {}
        for v in self.views.values():
            if v.reachable and v.leader:
                votes[v.leader] = votes.get(v.leader, 0) + 1
        need = len(self.apis) // 2 + 1
        for leader, n in votes.items():
            lv = self.views.get(leader)
            if n >= need and lv is not None and lv.reachable and lv.raft_state == "leader":
                return leader
        return None

    def self_declared_leaders(self) -> list[str]:
        return sorted(k for k, v in self.views.items() if v.reachable and v.raft_state == "leader")

    def vip_holders(self) -> list[str] | None:
        """Nodes that say they hold the VIP; None when no node runs a VIP."""
        known = [(k, v.vip_held) for k, v in self.views.items() if v.reachable and v.vip_held is not None]
        if not known:
            return None
        return sorted(k for k, held in known if held)

    def _sample(self, now: float) -> None:
        leader = self.agreed_leader()
        vip = self.vip_holders()
        unreachable = sorted(k for k, v in self.views.items() if not v.reachable)
        sample = {"t": round(now, 3), "leader": leader, "leaders": self.self_declared_leaders(),
                  "vip": None if vip is None else (",".join(vip) or "-"), "verdicts": dict(self.verdicts),
                  "unreachable": unreachable,
                  "quorum": any(v.has_quorum for v in self.views.values() if v.reachable)}
        self.samples.append(sample)
        last = self._last
        if last.get("leader", "?") != leader:
            self._emit({"t": sample["t"], "kind": "leader.change", "from": last.get("leader"), "to": leader})
        if last.get("vip", "?") != sample["vip"] and sample["vip"] is not None:
            self._emit({"t": sample["t"], "kind": "vip.move", "from": last.get("vip"), "to": sample["vip"]})
        for name, v in self.verdicts.items():
            if last.get("verdicts", {}).get(name) != v:
                self._emit({"t": sample["t"], "kind": "verdict.change", "backend": name,
                            "from": last.get("verdicts", {}).get(name), "to": v})
        if last.get("unreachable") is not None and last["unreachable"] != unreachable:
            self._emit({"t": sample["t"], "kind": "reachability", "unreachable": unreachable})
        self._last = {"leader": leader, "vip": sample["vip"], "verdicts": dict(self.verdicts),
                      "unreachable": unreachable}

    def _emit(self, ev: dict[str, Any]) -> None:
        self.timeline.append(ev)
        if self.on_event is not None:
            self.on_event(ev)

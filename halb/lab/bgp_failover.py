"""Failover measurement in the lab's bgp topology: what clients see when one of three
announcing balancers fails.

Observers, all on one clock (``time.monotonic``):

* new flows: :class:`halb.lab.failover.Client` in the client namespace, a new connection
  to the service address every 10 ms (1 s timeout); the router hashes each on layer 4, so
  about a third land on each balancer. A second, *patient* client does the same with a
  ``PATIENT_TIMEOUT_S`` timeout (curl, browsers and Go wait far longer than 1 s for a
  connect): a SYN the drained balancer dropped on purpose is retransmitted after ~1 s, which
  the 1 s client counts as failed and the patient one as slow (answered after > 1 s);
* established flows: ``PERSISTENT`` keep-alive connections opened before the fault, each
  sending a request every 100 ms; which balancer carries each one is read from ``ss`` in
  the balancers' namespaces. Like any HTTP client, one honours ``Connection: close``, and a
  FIN on an idle connection (the server ended it; checked before reuse as urllib3 and Go's
  net/http do, or seen as EOF before any byte of the answer: RFC 9112 9.3.1) by opening a
  new connection for its next request: counted in ``*_reconnects``, not as a failure. A reset,
  a timeout or an error answer breaks the flow;
* :class:`RouteSampler`: the router's next hops for the service address every 10 ms
  (netlink, inside the router namespace).

Per trial (target balancer rotates lb1, lb2, lb3): ``gap_s`` = first to last *sent* time of
the new-flow requests that failed around the fault (the failed balancer's share of new
flows is failing for that long; 0 when none failed), ``failed_requests``,
``withdrawn_s`` = fault -> the router no longer has the target as a next hop,
``spread`` = share of new flows each balancer served in the ~2 s before the fault (its
data plane's request counters), ``survivor_resets`` = established flows on the *other*
balancers that failed during the trial (with plain ECMP, removing a next hop re-hashes
some of the survivors' flows onto a balancer that has no socket for them: it resets them).
"""
from __future__ import annotations

import asyncio
import signal
import subprocess
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from halb.announce.sysctl import enter_netns
from halb.lab.cluster import SERVICE_PORT, LabCluster
from halb.lab.failover import Client, percentile
from halb.lab.topology import LabError

FAULTS = ("kill", "freeze", "partition", "drain")
PERSISTENT = 30
PATIENT_TIMEOUT_S = 5.0  # covers SYN retransmits at 1 s and 3 s


class RouteSampler:
    """The router's next hops for one address, every ``interval`` s, over netlink."""

    def __init__(self, cluster: LabCluster, interval: float = 0.01, sync: Any = None) -> None:
        from pyroute2 import IPRoute

        self.addr = cluster.lab.service_addresses[0]
        self.interval = interval
        self.sync = sync  # ResilientSync: what it applied to the nexthop group is the forwarding state
        self.samples: list[tuple[float, tuple[str, ...]]] = []
        self._ipr = IPRoute(netns=cluster.lab.ns("router"))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name="bgp-route-sampler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._ipr.close()

    def hops_now(self) -> tuple[str, ...]:
        if self.sync is not None:
            return self.sync.applied
        out: list[str] = []
        for msg in self._ipr.get_routes(family=2):  # a dump: with dst= it would be a lookup (one hop)
            if msg.get_attr("RTA_DST") != self.addr or msg.get("dst_len") != 32:
                continue
            gw = msg.get_attr("RTA_GATEWAY")
            if gw:
                out.append(gw)
            for nh in msg.get_attr("RTA_MULTIPATH") or []:
                g = nh.get_attr("RTA_GATEWAY")
                if g:
                    out.append(g)
        return tuple(sorted(out))

    def _main(self) -> None:
        nxt = time.monotonic()
        while not self._stop.is_set():
            try:
                self.samples.append((time.monotonic(), self.hops_now()))
            except Exception:  # the namespace vanished at teardown
                pass
            nxt += self.interval
            time.sleep(max(0.0, nxt - time.monotonic()))

    def current(self) -> tuple[str, ...]:
        return self.samples[-1][1] if self.samples else ()


class Persistent:
    """``n`` keep-alive connections from the client, each asking every ``interval`` s.

    ``broken[i]`` is the monotonic time flow i first failed (reset, error, or no answer
    within 1 s), else None. ``ports[i]`` is the local port of its first connection (to find
    its balancer). ``reconnects[i]``: how often the server ended its connection gracefully
    (``Connection: close``, or a FIN before any byte of an answer) and it went on on a new
    one, whose connect and answer then took ``slowest[i]`` at most.
    """

    def __init__(self, netns: str, host: str, n: int = PERSISTENT, interval: float = 0.1) -> None:
        self.netns, self.host, self.n, self.interval = netns, host, n, interval
        self.ports: list[int | None] = [None] * n
        self.broken: list[float | None] = [None] * n
        self.reconnects: list[int] = [0] * n
        self.slowest: list[float] = [0.0] * n
        self.why: list[str] = [""] * n  # what broke flow i
        self.ready = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name="bgp-persistent", daemon=True)

    def start(self) -> None:
        self._thread.start()
        if not self.ready.wait(10):
            raise LabError("persistent client connections did not open")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _main(self) -> None:
        enter_netns(self.netns)
        asyncio.run(self._all())

    async def _all(self) -> None:
        opened = 0

        async def one(i: int) -> None:
            nonlocal opened
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(self.host, SERVICE_PORT), 2)
            except (OSError, asyncio.TimeoutError):
                self.broken[i] = time.monotonic()
                opened += 1
                if opened == self.n:
                    self.ready.set()
                return
            self.ports[i] = writer.get_extra_info("sockname")[1]
            opened += 1
            if opened == self.n:
                self.ready.set()
            reopen_at: float | None = None  # the previous connection ended gracefully at
            try:
                while not self._stop.is_set():
                    if reopen_at is None and reader.at_eof():  # the server closed it while idle: a
                        reopen_at = time.monotonic()            # pooled connection is checked before
                        self.reconnects[i] += 1                 # reuse (urllib3, Go's net/http do)
                    if reopen_at is not None:
                        writer.close()
                        reader, writer = await asyncio.wait_for(
                            asyncio.open_connection(self.host, SERVICE_PORT), PATIENT_TIMEOUT_S)
                    writer.write(f"GET /health HTTP/1.1\r\nHost: {self.host}\r\n\r\n".encode())
                    status = await asyncio.wait_for(reader.readline(), 1.0)
                    if not status and reopen_at is None:  # FIN before any answer: the server closed
                        reopen_at = time.monotonic()       # an idle connection; ask on a new one
                        self.reconnects[i] += 1
                        continue
                    if b" 200 " not in status:
                        raise ConnectionError(status)
                    length, close = 0, False
                    while True:
                        line = await asyncio.wait_for(reader.readline(), 1.0)
                        if not line:
                            raise ConnectionError("closed")
                        low = line.lower()
                        if low.startswith(b"content-length:"):
                            length = int(line.split(b":")[1])
                        if low.startswith(b"connection:") and b"close" in low:
                            close = True
                        if line in (b"\r\n", b"\n"):
                            break
                    await asyncio.wait_for(reader.readexactly(length), 1.0)
                    if reopen_at is not None:
                        self.slowest[i] = max(self.slowest[i], time.monotonic() - reopen_at)
                    reopen_at = None
                    await asyncio.sleep(self.interval)
                    if close:  # Connection: close: the next request goes on a new connection
                        reopen_at = time.monotonic()
                        self.reconnects[i] += 1
            except (OSError, asyncio.TimeoutError, ConnectionError, ValueError, asyncio.IncompleteReadError) as exc:
                if not self._stop.is_set():
                    self.broken[i] = time.monotonic()
                    self.why[i] = repr(exc)[:80]
            finally:
                writer.close()

        await asyncio.gather(*(one(i) for i in range(self.n)))


def flows_by_balancer(cluster: LabCluster) -> dict[int, str]:
    """Client local port -> balancer (lb1..) that holds the connection, from ``ss``."""
    client = cluster.lab.hosts["client"].ip
    out: dict[int, str] = {}
    for lb in cluster.lbs:
        proc = subprocess.run(cluster.lab.argv(lb, ["ss", "-Htn", "state", "established"]),
                              capture_output=True, text=True, timeout=10)
        for line in proc.stdout.splitlines():
            parts = line.split()
            if len(parts) >= 4 and parts[-1].startswith(client + ":"):
                out[int(parts[-1].rsplit(":", 1)[1])] = lb
    return out


@dataclass
class BgpTrial:
    fault: str
    target: str
    gap_s: float
    failed_requests: int
    withdrawn_s: float | None
    spread: dict[str, float]
    survivor_flows: int
    survivor_resets: int
    target_flows: int
    target_resets: int
    # the drained balancer's own flows ended gracefully (Connection: close / FIN) and went on
    # on a new connection; survivor_reconnects likewise on the others
    target_reconnects: int = 0
    survivor_reconnects: int = 0
    reconnect_max_s: float = 0.0  # slowest first answer on such a new connection
    # the patient new-flow client (PATIENT_TIMEOUT_S): failed, and answered but after > 1 s
    patient_failed: int = 0
    patient_slow: int = 0
    patient_max_s: float = 0.0
    drain: dict[str, Any] | None = None  # the drain's own report (phase timings, connections left)
    broken_why: list[str] = field(default_factory=list)  # "target|survivor: error" of every broken flow
    next_hops_after: list[str] = field(default_factory=list)
    survivor_reset_at_s: list[float] = field(default_factory=list)  # each reset, seconds after the fault
    thawed_at_s: float | None = None  # freeze: SIGCONT, seconds after the fault

    def row(self) -> dict[str, Any]:
        return asdict(self)


def failed_span(reqs: list[Any], since: float, until: float) -> tuple[float, int]:
    """(last failed send - first failed send, failed count) among requests sent in the window."""
    failed = sorted(r.sent for r in reqs if since <= r.sent <= until and not r.ok)
    if not failed:
        return 0.0, 0
    return failed[-1] - failed[0], len(failed)


@dataclass
class BgpFailoverRun:
    cluster: LabCluster
    freeze_s: float = 3.0
    log: Any = None
    trials: list[BgpTrial] = field(default_factory=list)

    def __post_init__(self) -> None:
        lab = self.cluster.lab
        self.addr = lab.service_addresses[0]
        self.client = Client(lab.ns("client"), self.addr)
        self.patient = Client(lab.ns("client"), self.addr, timeout=PATIENT_TIMEOUT_S)
        self.sync = None
        if lab.router_hash == "resilient":
            from halb.lab.bgp_router import ResilientSync

            self.sync = ResilientSync(lab)
        self.routes = RouteSampler(self.cluster, sync=self.sync)

    def _say(self, msg: str) -> None:
        if self.log is not None:
            self.log(msg)

    def __enter__(self) -> "BgpFailoverRun":
        if self.sync is not None:
            self.sync.start()
        self.routes.start()
        self.client.start()
        self.patient.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.stop()
        self.patient.stop()
        self.routes.stop()
        if self.sync is not None:
            self.sync.stop()

    def ip(self, lb: str) -> str:
        return self.cluster.lab.hosts[lb].ip

    def wait_steady(self, timeout: float = 40.0, settle: float = 1.0) -> None:
        """Three next hops, the client served, every balancer alive, for ``settle`` s."""
        c = self.cluster
        want = tuple(sorted(self.ip(lb) for lb in c.lbs))
        deadline = time.monotonic() + timeout
        since = None
        while time.monotonic() < deadline:
            good = (self.routes.current() == want and self.client.recent_ok(30)
                    and all(c.alive(lb) for lb in c.lbs))
            if good:
                since = since or time.monotonic()
                if time.monotonic() - since >= settle:
                    return
            else:
                since = None
            time.sleep(0.05)
        raise LabError(f"bgp lab not steady within {timeout:g}s (next hops {self.routes.current()}, "
                       f"client ok {self.client.recent_ok(30)})")

    def _requests(self) -> dict[str, int]:
        out = {}
        for lb in self.cluster.lbs:
            code, body = self.cluster.api(lb, "GET", "/v1/dataplane?service=checkout")
            if code != 200 or not isinstance(body, dict):
                raise LabError(f"{lb}: /v1/dataplane answered {code}: {body}")
            out[lb] = int(body["services"]["checkout"]["requests"])
        return out

    def trial(self, fault: str, target: str, max_wait: float = 15.0) -> BgpTrial:
        if fault not in FAULTS:
            raise ValueError(f"fault must be one of {FAULTS}")
        c = self.cluster
        self.wait_steady()
        before = self._requests()
        persistent = Persistent(c.lab.ns("client"), self.addr)
        persistent.start()
        try:
            time.sleep(2.0)  # spread window, and every persistent flow has had a few answers
            after = self._requests()
            owners = flows_by_balancer(c)
            served = {lb: after[lb] - before[lb] for lb in c.lbs}
            total = sum(served.values()) or 1
            spread = {c.node_id(lb): round(v / total, 3) for lb, v in served.items()}
            gone_ip = self.ip(target)
            drain_report = None
            t_fault = time.monotonic()
            if fault == "kill":
                c.kill(target)
            elif fault == "freeze":
                c.signal_group(target, signal.SIGSTOP)
            elif fault == "partition":
                c.lab.partition(target, [lb for lb in c.lbs if lb != target])
            else:  # answers once withdrawn (its clients' flows ended first)
                code, body = c.api(target, "POST", "/v1/announce/drain", {"drain": True}, timeout=15.0)
                if code != 200:
                    raise LabError(f"drain failed: {code} {body}")
                drain_report = body.get("drain") if isinstance(body, dict) else None
            withdrawn = None
            thawed_at: float | None = None
            deadline = t_fault + max_wait
            while time.monotonic() < deadline:
                now = time.monotonic()
                if fault == "freeze" and thawed_at is None and now - t_fault >= self.freeze_s:
                    c.signal_group(target, signal.SIGCONT)
                    thawed_at = now
                if withdrawn is None and gone_ip not in self.routes.current():
                    withdrawn = now
                if withdrawn is not None and now - withdrawn > 1.5 and self.client.recent_ok(30) \
                        and (fault != "freeze" or (thawed_at is not None and now - thawed_at > 1.0)):
                    break
                time.sleep(0.02)
            if fault == "freeze" and thawed_at is None:
                c.signal_group(target, signal.SIGCONT)
            t_end = time.monotonic()
        finally:
            persistent.stop()
        gap, failed = failed_span(self.client.reqs, t_fault - 0.5, t_end)
        flows = [(owners.get(p or -1), b) for p, b in zip(persistent.ports, persistent.broken)]
        surv = [(lb, b) for lb, b in flows if lb is not None and lb != target]
        tgt = [(lb, b) for lb, b in flows if lb == target]
        samples = [h for t, h in self.routes.samples if t_fault <= t <= t_end]
        gone = [t for t, h in self.routes.samples if t_fault <= t <= t_end and gone_ip not in h]
        if gone:  # from the samples: the loop above only starts once a drain's API call answered
            withdrawn = gone[0]
        patient = [r for r in self.patient.reqs if t_fault - 0.5 <= r.sent <= t_end]
        tgt_i = [i for i, p in enumerate(persistent.ports) if owners.get(p or -1) == target]
        surv_i = [i for i, p in enumerate(persistent.ports) if owners.get(p or -1) not in (None, target)]
        trial = BgpTrial(
            fault=fault, target=c.node_id(target), gap_s=round(gap, 3), failed_requests=failed,
            withdrawn_s=None if withdrawn is None else round(withdrawn - t_fault, 3), spread=spread,
            survivor_flows=len(surv), survivor_resets=sum(1 for _, b in surv if b is not None and b >= t_fault),
            target_flows=len(tgt), target_resets=sum(1 for _, b in tgt if b is not None and b >= t_fault),
            next_hops_after=list(samples[-1]) if samples else [],
            survivor_reset_at_s=sorted(round(b - t_fault, 3) for _, b in surv if b is not None and b >= t_fault),
            thawed_at_s=None if thawed_at is None else round(thawed_at - t_fault, 3),
            target_reconnects=sum(1 for i in tgt_i if persistent.reconnects[i]),
            survivor_reconnects=sum(1 for i in surv_i if persistent.reconnects[i]),
            reconnect_max_s=round(max(persistent.slowest, default=0.0), 3),
            patient_failed=sum(1 for r in patient if not r.ok),
            patient_slow=sum(1 for r in patient if r.ok and r.done - r.sent > 1.0),
            patient_max_s=round(max((r.done - r.sent for r in patient if r.ok), default=0.0), 3),
            drain=drain_report,
            broken_why=[("target: " if i in tgt_i else "survivor: ") + persistent.why[i]
                        for i in tgt_i + surv_i if persistent.broken[i] is not None and persistent.broken[i] >= t_fault],
        )
        self.trials.append(trial)
        self._say(f"{fault:9s} {trial.target}: gap {trial.gap_s:.3f}s ({failed} failed), withdrawn "
                  f"{trial.withdrawn_s}s, spread {spread}, survivor resets {trial.survivor_resets}/"
                  f"{trial.survivor_flows}, target's flows reset {trial.target_resets}/{trial.target_flows} "
                  f"(reconnected {trial.target_reconnects}), patient client: {trial.patient_failed} failed, "
                  f"{trial.patient_slow} slow (max {trial.patient_max_s}s)"
                  + (f", drain {trial.drain}" if trial.drain else ""))
        self.restore(fault, target)
        return trial

    def restore(self, fault: str, target: str) -> None:
        c = self.cluster
        if fault == "kill":
            c.start_node(target)
        elif fault == "partition":
            c.lab.heal(target)
        elif fault == "freeze":
            c.signal_group(target, signal.SIGCONT)
        else:
            c.api(target, "POST", "/v1/announce/drain", {"drain": False})
        self.wait_steady(timeout=60.0)


def bgp_summary(trials: list[BgpTrial], router_hash: str = "ecmp") -> dict[str, Any]:
    """The VIP summary's keys (trials, p50/p99 gap, by_fault) plus spread and survivor_resets."""
    gaps = [t.gap_s for t in trials]
    nodes = sorted({n for t in trials for n in t.spread})
    spread = {n: round(sum(t.spread.get(n, 0.0) for t in trials) / max(1, len(trials)), 3) for n in nodes}
    out: dict[str, Any] = {
        "mode": "bgp",
        "router_hash": router_hash,
        "trials": [t.row() for t in trials],
        "p50_gap_s": percentile(gaps, 50),
        "p99_gap_s": percentile(gaps, 99),
        "max_holders": None,  # active-active: every balancer announces
        "spread": spread,
        "survivor_resets": sum(t.survivor_resets for t in trials),
        "survivor_flows": sum(t.survivor_flows for t in trials),
    }
    by_fault: dict[str, Any] = {}
    for f in sorted({t.fault for t in trials}):
        ts = [t for t in trials if t.fault == f]
        g = [t.gap_s for t in ts]
        w = [t.withdrawn_s for t in ts if t.withdrawn_s is not None]
        by_fault[f] = {"n": len(ts), "p50_gap_s": percentile(g, 50), "p99_gap_s": percentile(g, 99),
                       "max_gap_s": max(g), "p50_withdrawn_s": percentile(w, 50) if w else None,
                       "p99_withdrawn_s": percentile(w, 99) if w else None,
                       "failed_requests": sum(t.failed_requests for t in ts),
                       "survivor_resets": sum(t.survivor_resets for t in ts),
                       "survivor_flows": sum(t.survivor_flows for t in ts),
                       "target_resets": sum(t.target_resets for t in ts),
                       "target_flows": sum(t.target_flows for t in ts),
                       "target_reconnects": sum(t.target_reconnects for t in ts),
                       "patient_failed": sum(t.patient_failed for t in ts),
                       "patient_slow": sum(t.patient_slow for t in ts),
                       "patient_max_s": max(t.patient_max_s for t in ts),
                       "never_withdrawn": sum(1 for t in ts if t.withdrawn_s is None)}
    out["by_fault"] = by_fault
    return out

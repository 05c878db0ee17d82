"""Failover measurement in the namespace lab: what a client sees when the VIP holder fails.

Three observers run in this process, all on one clock (``time.monotonic``):

* :class:`Client`: a thread inside the client namespace sends ``GET /health`` to
  ``VIP:8080`` every 10 ms (each on a new connection, 1 s timeout) and records send time,
  completion time and success.
* :class:`Sampler`: a thread reads every balancer's addresses over netlink every 10 ms
  (one pyroute2 socket opened inside each balancer namespace) and records who has the VIP.
* the trial driver injects one fault on the current holder: ``kill`` (SIGKILL),
  ``freeze`` (SIGSTOP for 5 s, then SIGCONT), ``partition`` (blackhole routes to the other
  balancers, both ways; the client can still reach it), ``transfer`` (``POST
  /v1/leader/transfer`` on the holder) or ``dataplane`` (the holder's data-plane worker
  processes crash-loop: :class:`halb.lab.crashloop.CrashLoop` SIGKILLs each as it appears,
  the node itself stays up and in the majority; needs ``workers`` >= 2), then restores the
  node (restart / SIGCONT / heal / stop the crash loop and restart the node).

Per trial: ``gap_s`` = the longest client-visible outage (from the send of the first
failed request of a run of failures to the completion of the first later-sent request that
succeeded); ``garp_s`` = fault -> the VIP appears on another balancer (its GARP follows
within milliseconds); ``max_holders`` = most balancers holding the VIP in one sample;
``old_gone_s`` = fault -> the old holder no longer has it; ``detect_s`` (``dataplane``
only) = fault -> the old holder's self-check failed (its ``GET /v1/dataplane-check``
``failing_since``: CLOCK_MONOTONIC, the same clock on the whole host), so ``garp_s -
detect_s`` is the hand-over.
"""
from __future__ import annotations

import asyncio
import math
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from halb.announce.sysctl import enter_netns, run_in_netns
from halb.lab.cluster import SERVICE_PORT, SERVICE_PORT6, LabCluster
from halb.lab.crashloop import CrashLoop
from halb.lab.topology import LabError

FAULTS = ("kill", "freeze", "partition", "transfer", "dataplane")


@dataclass
class Req:
    sent: float
    done: float
    ok: bool


class Client:
    """Requests to VIP:port every ``interval`` s from inside the client namespace."""

    def __init__(self, netns: str, host: str, port: int = SERVICE_PORT, interval: float = 0.01,
                 timeout: float = 1.0) -> None:
        self.netns, self.host, self.port = netns, host, port
        self.host_header = f"[{host}]" if ":" in host else host  # an IPv6 literal in brackets
        self.interval, self.timeout = interval, timeout
        self.reqs: list[Req] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name="failover-client", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _main(self) -> None:
        enter_netns(self.netns)
        asyncio.run(self._loop())

    async def _loop(self) -> None:
        tasks: set[asyncio.Task[None]] = set()
        nxt = time.monotonic()
        while not self._stop.is_set():
            t = asyncio.create_task(self._one())
            tasks.add(t)
            t.add_done_callback(tasks.discard)
            nxt += self.interval
            await asyncio.sleep(max(0.0, nxt - time.monotonic()))
        for t in list(tasks):
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _one(self) -> None:
        sent = time.monotonic()
        ok = False
        writer = None
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(self.host, self.port), self.timeout)
            writer.write(f"GET /health HTTP/1.1\r\nHost: {self.host_header}\r\nConnection: close\r\n\r\n".encode())
            left = self.timeout - (time.monotonic() - sent)
            line = await asyncio.wait_for(reader.readline(), max(0.01, left))
            ok = line.startswith(b"HTTP/1.1 200") or line.startswith(b"HTTP/1.0 200")
        except (OSError, asyncio.TimeoutError, ValueError):
            ok = False
        finally:
            if writer is not None:
                writer.close()
        self.reqs.append(Req(sent, time.monotonic(), ok))

    def recent_ok(self, n: int = 20) -> bool:
        done = sorted(self.reqs[-3 * n:], key=lambda r: r.sent)[-n:]
        return len(done) >= n and all(r.ok for r in done)


class Sampler:
    """Who holds the VIP, every ``interval`` s, read with netlink in each balancer namespace."""

    def __init__(self, cluster: LabCluster, interval: float = 0.01, vip: str | None = None) -> None:
        self.vip = vip or cluster.lab.vip
        self.interval = interval
        self.samples: list[tuple[float, tuple[str, ...]]] = []
        # One worker thread per balancer namespace: it enters the namespace once and owns its
        # pyroute2 socket (pyroute2 0.9 binds a socket to the thread that uses it: an IPRoute
        # opened in a namespace thread and used from another answered from the user's
        # namespace or not at all; its own netns= gave "eth0 not found" on a loaded machine).
        self._local = threading.local()
        self._pool = {lb: ThreadPoolExecutor(1, thread_name_prefix=f"sampler-{lb}", initializer=enter_netns,
                                             initargs=(cluster.lab.ns(lb),)) for lb in cluster.lbs}
        self._idx = {lb: pool.submit(self._ifindex, lb).result(10) for lb, pool in self._pool.items()}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name="failover-sampler", daemon=True)

    def _ipr(self) -> Any:
        """This worker thread's netlink socket (inside its namespace)."""
        from pyroute2 import IPRoute

        ipr = getattr(self._local, "ipr", None)
        if ipr is None:
            ipr = self._local.ipr = IPRoute()
        return ipr

    def _ifindex(self, lb: str) -> int:
        for _ in range(40):
            found = self._ipr().link_lookup(ifname="eth0")
            if found:
                return int(found[0])
            time.sleep(0.05)
        raise LabError(f"eth0 not found in {lb}'s namespace")

    def _holds(self, lb: str) -> bool:
        return any(msg.get("IFA_ADDRESS") == self.vip  # pyroute2 gives IPv6 in canonical form too
                   for msg in self._ipr().addr("dump", index=self._idx[lb]))

    def _close(self) -> None:
        ipr = getattr(self._local, "ipr", None)
        if ipr is not None:
            ipr.close()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for pool in self._pool.values():
            try:
                pool.submit(self._close).result(2)
            except Exception:
                pass
            pool.shutdown(wait=False)

    def holders_now(self) -> tuple[str, ...]:
        futures = {lb: pool.submit(self._holds, lb) for lb, pool in self._pool.items()}
        return tuple(lb for lb, fut in futures.items() if fut.result(2))

    def _main(self) -> None:
        nxt = time.monotonic()
        while not self._stop.is_set():
            try:
                self.samples.append((time.monotonic(), self.holders_now()))
            except Exception:  # a namespace vanished at teardown
                pass
            nxt += self.interval
            time.sleep(max(0.0, nxt - time.monotonic()))

    def current(self) -> tuple[str, ...]:
        return self.samples[-1][1] if self.samples else ()


@dataclass
class Trial:
    fault: str
    holder: str
    gap_s: float
    garp_s: float | None
    max_holders: int
    old_gone_s: float | None
    new_holder: str | None
    failed_requests: int
    outages_s: list[float] = field(default_factory=list)   # every outage in the window
    detect_s: float | None = None  # dataplane: fault -> the holder's self-check failed

    def row(self) -> dict[str, Any]:
        return asdict(self)


def outages(reqs: list[Req], since: float, until: float) -> list[float]:
    """Every client-visible outage among requests sent in [since, until], in seconds."""
    window = sorted((r for r in reqs if since <= r.sent <= until), key=lambda r: r.sent)
    out: list[float] = []
    start = None
    for r in window:
        if not r.ok:
            if start is None:
                start = r.sent
        elif start is not None:
            out.append(r.done - start)
            start = None
    if start is not None:  # never recovered inside the window
        out.append(until - start)
    return out


def longest_gap(reqs: list[Req], since: float, until: float) -> tuple[float, int]:
    """Longest outage among requests sent in [since, until]: (seconds, failed count)."""
    failed = sum(1 for r in reqs if since <= r.sent <= until and not r.ok)
    return max(outages(reqs, since, until), default=0.0), failed


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100)."""
    if not values:
        return math.nan
    s = sorted(values)
    k = max(0, math.ceil(p / 100 * len(s)) - 1)
    return s[k]


@dataclass
class FailoverRun:
    cluster: LabCluster
    freeze_s: float = 5.0
    log: Any = None
    trials: list[Trial] = field(default_factory=list)
    ipv6: bool = False  # the client and the sampler use the IPv6 VIP (cluster.ipv6 must be on)

    def __post_init__(self) -> None:
        vip = self.cluster.lab.vip6 if self.ipv6 else self.cluster.lab.vip
        self.client = Client(self.cluster.lab.ns("client"), vip, SERVICE_PORT6 if self.ipv6 else SERVICE_PORT)
        self.sampler = Sampler(self.cluster, vip=vip)

    def _say(self, msg: str) -> None:
        if self.log is not None:
            self.log(msg)

    def __enter__(self) -> "FailoverRun":
        self.sampler.start()
        self.client.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.stop()
        self.sampler.stop()

    def wait_steady(self, timeout: float = 30.0, settle: float = 0.5) -> str:
        """One holder, the client served, every balancer alive; returns the holder."""
        deadline = time.monotonic() + timeout
        since = None
        while time.monotonic() < deadline:
            holders = self.sampler.current()
            good = (len(holders) == 1 and self.client.recent_ok()
                    and all(self.cluster.alive(lb) for lb in self.cluster.lbs))
            if good:
                since = since or time.monotonic()
                if time.monotonic() - since >= settle:
                    return holders[0]
            else:
                since = None
            time.sleep(0.05)
        raise LabError(f"cluster not steady within {timeout:g}s (holders {self.sampler.current()}, "
                       f"client ok {self.client.recent_ok()})")

    def trial(self, fault: str, max_wait: float = 15.0) -> Trial:
        if fault not in FAULTS:
            raise ValueError(f"fault must be one of {FAULTS}")
        c = self.cluster
        if fault == "dataplane" and c.workers < 2:
            raise LabError("the dataplane fault kills worker processes: the cluster needs workers >= 2")
        holder = self.wait_steady()
        others = [lb for lb in c.lbs if lb != holder]
        crash = CrashLoop(c.procs[holder].pid) if fault == "dataplane" else None
        try:
            trial = self._run(fault, holder, others, crash, max_wait)
        finally:
            if crash is not None:
                crash.stop()
        self.restore(fault, holder)
        return trial

    def _run(self, fault: str, holder: str, others: list[str], crash: CrashLoop | None,
             max_wait: float) -> Trial:
        c = self.cluster
        t_fault = time.monotonic()
        if crash is not None:
            crash.start()
        elif fault == "kill":
            c.kill(holder)
        elif fault == "freeze":
            c.signal(holder, signal.SIGSTOP)
        elif fault == "partition":
            c.lab.partition(holder, others)
        elif fault == "transfer":
            code, body = c.api(holder, "POST", "/v1/leader/transfer", {"to": None})
            if code != 200:
                raise LabError(f"transfer failed: {code} {body}")
        # wait for: VIP on another node and the client served again for a while
        moved_at = None
        deadline = t_fault + max_wait
        thawed_at: float | None = None
        while time.monotonic() < deadline:
            now = time.monotonic()
            if fault == "freeze" and thawed_at is None and now - t_fault >= self.freeze_s:
                c.signal(holder, signal.SIGCONT)
                thawed_at = now
            holders = self.sampler.current()
            if moved_at is None and any(h != holder for h in holders):
                moved_at = now
            # a resumed node may disturb the cluster (it runs for election): watch 2 s more
            if moved_at is not None and now - moved_at > 1.0 and self.client.recent_ok(30) \
                    and (fault != "freeze" or (thawed_at is not None and now - thawed_at > 2.0)):
                break
            time.sleep(0.02)
        thawed = thawed_at is not None
        t_end = time.monotonic()
        if fault == "freeze" and not thawed:
            c.signal(holder, signal.SIGCONT)
        samples = [(t, h) for t, h in self.sampler.samples if t_fault - 0.5 <= t <= t_end]
        new = next(((t, h) for t, h in samples if t >= t_fault and any(x != holder for x in h)), None)
        gone = next((t for t, h in samples if t >= t_fault and holder not in h), None)
        gap, failed = longest_gap(self.client.reqs, t_fault - 0.5, t_end)
        detect = None
        if crash is not None:
            code, body = c.api(holder, "GET", "/v1/dataplane-check")
            since = body.get("failing_since") if code == 200 and isinstance(body, dict) else None
            detect = None if since is None else round(float(since) - t_fault, 3)
        trial = Trial(
            fault=fault, holder=holder, gap_s=round(gap, 3),
            garp_s=None if new is None else round(new[0] - t_fault, 3),
            max_holders=max((len(h) for _, h in samples), default=0),
            old_gone_s=None if gone is None else round(gone - t_fault, 3),
            new_holder=None if new is None else next(x for x in new[1] if x != holder),
            failed_requests=failed,
            outages_s=[round(x, 3) for x in outages(self.client.reqs, t_fault - 0.5, t_end)],
            detect_s=detect,
        )
        self.trials.append(trial)
        extra = "" if crash is None else (f", self-check failed {detect}s, worker kills at "
                                          f"{[round(k - t_fault, 2) for k in crash.kills]}s")
        self._say(f"{fault:9s} holder {holder} -> {trial.new_holder}: gap {trial.gap_s:.3f}s, "
                  f"VIP moved {trial.garp_s}s, old gone {trial.old_gone_s}s, max holders {trial.max_holders}, "
                  f"outages {trial.outages_s}{extra}")
        return trial

    def restore(self, fault: str, holder: str) -> None:
        c = self.cluster
        if fault == "kill":
            c.start_node(holder)
        elif fault == "partition":
            c.lab.heal(holder)
        elif fault == "freeze":
            c.signal(holder, signal.SIGCONT)
        elif fault == "dataplane":  # the crash loop is over; deaths count for 30 s: restart, as an operator would
            c.stop_node(holder)
            c.start_node(holder)
        # Restored means: every node answers, all agree on one leader, every data-plane
        # self-check passes, and the faulted node has caught up (a healed ex-leader's divergent log is repaired one entry per
        # heartbeat by pysyncobj; killing the leader before that finishes would measure a
        # double fault: the survivors cannot commit until the repair is done).
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            sts = [c.status(lb) for lb in c.lbs]
            if all(sts):
                leaders = {st.get("leader") for st in sts}
                applied = [int(st.get("last_applied") or 0) for st in sts]
                if len(leaders) == 1 and None not in leaders and all(st.get("has_quorum") for st in sts) \
                        and all(dataplane_ok(st) for st in sts) \
                        and max(applied) - min(applied) <= 3:
                    return
            time.sleep(0.1)
        raise LabError(f"{holder} did not rejoin and catch up after {fault}")

    def max_holders_overall(self) -> int:
        return max((len(h) for _, h in self.sampler.samples), default=0)


def dataplane_ok(status: dict[str, Any]) -> bool:
    """The node's data-plane self-check as /v1/status reports it (under ``announce``)."""
    return (status.get("announce") or {}).get("dataplane_ok") is True


def summary(trials: list[Trial], overall_max: int | None = None) -> dict[str, Any]:
    gaps = [t.gap_s for t in trials]
    out: dict[str, Any] = {
        "trials": [{"fault": t.fault, "gap_s": t.gap_s, "garp_s": t.garp_s, "max_holders": t.max_holders,
                    "old_gone_s": t.old_gone_s, "holder": t.holder, "new_holder": t.new_holder,
                    "outages_s": t.outages_s, **({"detect_s": t.detect_s} if t.fault == "dataplane" else {})}
                   for t in trials],
        "p50_gap_s": percentile(gaps, 50),
        "p99_gap_s": percentile(gaps, 99),
        "max_holders": max([t.max_holders for t in trials] + ([overall_max] if overall_max is not None else []),
                           default=0),
    }
    by_fault: dict[str, Any] = {}
    for f in sorted({t.fault for t in trials}):
        g = [t.gap_s for t in trials if t.fault == f]
        m = [t.garp_s for t in trials if t.fault == f and t.garp_s is not None]
        by_fault[f] = {"n": len(g), "p50_gap_s": percentile(g, 50), "p99_gap_s": percentile(g, 99),
                       "max_gap_s": max(g), "p50_garp_s": percentile(m, 50) if m else None}
        if f == "dataplane":  # detection (the self-check) vs. hand-over (VIP moved - detection)
            d = [t.detect_s for t in trials if t.fault == f and t.detect_s is not None]
            h = [t.garp_s - t.detect_s for t in trials
                 if t.fault == f and t.detect_s is not None and t.garp_s is not None]
            by_fault[f].update({"p50_detect_s": percentile(d, 50) if d else None,
                                "p99_detect_s": percentile(d, 99) if d else None,
                                "p50_handover_s": round(percentile(h, 50), 3) if h else None,
                                "p99_handover_s": round(percentile(h, 99), 3) if h else None,
                                "p99_garp_s": percentile(m, 99) if m else None})
    out["by_fault"] = by_fault
    return out

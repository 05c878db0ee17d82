"""Runs one drill against a target: hypothesis, method under load, hypothesis, rollbacks.

Order (as Chaos Toolkit): wait until the cluster is ready, start the open-loop load, warm
up, check the steady state ("before"; if it does not hold the method is not run), run
the method's steps on their schedule, let the load run to the drill's duration, stop the
load and let in-flight requests finish, check the steady state again over the whole
method window ("after", including the ledger), then run the rollbacks (always, also after
a failed step). The run passes only when both checks held and no step failed.

Everything that blocks (signals, process starts, admin API calls, SQLite) runs in a thread
so the load generator and the monitor keep their schedule.
"""
from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from halb.api.client import ApiError
from halb.chaos.drill import FAULT_OPENERS, Drill, Step, method_length
from halb.chaos.ledger import LedgerResult, check_ledger
from halb.chaos.load import LoadConfig, LoadGenerator, buckets, summarize
from halb.chaos.monitor import Monitor
from halb.chaos.target import Target, TargetError, Unsupported


class StepFailed(Exception):
    pass


@dataclass
class ProbeResult:
    name: str
    ok: bool | None  # None: not applicable here (reported "n/a")
    value: Any
    tolerance: Any
    detail: str = ""


@dataclass
class StepResult:
    key: str
    action: str
    description: str
    status: str  # ok | failed | skipped
    t_start: float
    t_end: float
    detail: str = ""


@dataclass
class RunOptions:
    rate: float | None = None
    duration: float | None = None
    ready_timeout: float = 45.0
    progress: bool = True
    progress_stream: Any = None


@dataclass
class DrillOutcome:
    passed: bool
    failures: list[str]
    data: dict[str, Any] = field(default_factory=dict)


class DrillRun:
    def __init__(self, drill: Drill, target: Target, opts: RunOptions | None = None) -> None:
        self.drill, self.target = drill, target
        self.opts = opts or RunOptions()
        self.t0 = time.monotonic()
        self.phase = "starting"
        self.phases: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        self.steps: list[StepResult] = []
        self.faults: list[dict[str, Any]] = []
        self.failures: list[str] = []
        self.monitor = Monitor(target.apis, target.token, target.service, self.now, tls=target.tls)
        self.monitor.on_event = self.events.append
        self.load: LoadGenerator | None = None
        self.load_offset = 0.0
        self.method_start: float | None = None
        self.leader_at_method_start: str | None = None
        self.last_resolved_leader: str | None = None
        self.hypothesis: dict[str, list[ProbeResult]] = {}
        self.ledger: LedgerResult | None = None
        self._partitioned: set[str] = set()
        self._links: dict[str, tuple[str, ...]] = {}  # link as written -> resolved (leader moves)
        self.checkout_p99_before: float | None = None  # baseline of the checkout_p99_ratio probe
        self.backend_stats: dict[str, dict[str, Any]] = {}  # "before" / "end" -> backend -> its /stats

    def now(self) -> float:
        return time.monotonic() - self.t0

    def set_phase(self, phase: str) -> None:
        self.phase = phase
        self.phases.append({"t": round(self.now(), 3), "phase": phase})
        self.events.append({"t": round(self.now(), 3), "kind": "phase", "phase": phase})

    # --- the run ------------------------------------------------------------------------

    async def run(self) -> DrillOutcome:
        drill = self.drill
        duration = self.opts.duration or drill.duration
        rate = self.opts.rate or drill.load.rate
        progress = asyncio.create_task(self._progress()) if self.opts.progress else None
        stop_load = asyncio.Event()
        load_task: asyncio.Task[None] | None = None
        try:
            self.set_phase("ready-wait")
            await self.monitor.start()
            await self._wait_ready()
            ls = drill.load
            cap = ls.warmup + duration + method_length(drill) + sum(
                s.args.get("timeout", 0.0) for s in drill.method if s.action == "wait-until") + 60
            self.load = LoadGenerator(self.target.client_addresses, LoadConfig(
                rate=rate, max_duration=cap, checkout_share=ls.checkout_share, connect_timeout=ls.connect_timeout,
                attempt_timeout=ls.attempt_timeout, request_timeout=ls.request_timeout, client_retry=ls.client_retry),
                products_addresses=self.target.products_addresses)
            load_started = self.now()
            load_task = asyncio.create_task(self.load.run(stop_load))
            await asyncio.sleep(0)
            self.load_offset = load_started
            self.set_phase("warmup")
            await asyncio.sleep(ls.warmup)
            self.set_phase("steady-before")
            before = await self.check_steady_state("before", 0.0, self.load_time())
            self.hypothesis["before"] = before
            method_ok = False
            if not all(p.ok is not False for p in before):
                self.failures.append("steady state did not hold BEFORE the method (method not run): "
                                     + "; ".join(f"{p.name}: {p.detail}" for p in before if p.ok is False))
            else:
                self.set_phase("method")
                method_ok = await self._run_steps(drill.method, "method")
            self.set_phase("quiet")
            while self.load_time() < duration and not load_task.done():
                await asyncio.sleep(0.1)
            self.set_phase("load-drain")
            stop_load.set()
            await load_task
            if method_ok or self.method_start is not None:
                self.set_phase("steady-after")
                start = (self.method_start or 0.0) - self.load_offset
                after = await self.check_steady_state("after", start, float("inf"), final=True)
                self.hypothesis["after"] = after
                bad = [p for p in after if p.ok is False]
                if bad:
                    self.failures.append("steady state did not hold AFTER the method: "
                                         + "; ".join(f"{p.name}: {p.detail}" for p in bad))
        except (TargetError, StepFailed, ApiError) as exc:
            self.failures.append(f"run aborted in phase {self.phase}: {getattr(exc, 'message', None) or exc}")
        except Exception as exc:  # an engine bug still ends with rollbacks, teardown and a report
            import traceback

            self.failures.append(f"run aborted in phase {self.phase} by an internal error: {exc!r}")
            self.events.append({"t": round(self.now(), 3), "kind": "engine.error", "traceback": traceback.format_exc()})
        finally:
            stop_load.set()
            if load_task is not None and not load_task.done():
                try:
                    await asyncio.wait_for(load_task, 15)
                except (asyncio.TimeoutError, asyncio.CancelledError, Exception):
                    load_task.cancel()
            if drill.rollbacks and self.method_start is not None:
                self.set_phase("rollbacks")
                try:
                    await asyncio.shield(self._run_steps(drill.rollbacks, "rollbacks"))
                except asyncio.CancelledError:
                    pass
            self.set_phase("done")
            await self.monitor.stop()
            if progress is not None:
                progress.cancel()
                await asyncio.gather(progress, return_exceptions=True)
                self._print_progress(final=True)
        for f in self.faults:
            if f["end"] is None:
                f["end"] = round(self.now(), 3)
        passed = not self.failures
        return DrillOutcome(passed, list(self.failures), self.report_data(passed))

    def load_time(self) -> float:
        """Seconds since the load started (the generator's clock)."""
        return self.load.now() if self.load is not None and self.load.t0 else 0.0

    async def _wait_ready(self) -> None:
        """Leader elected, every backend verdict up, and every client address serves."""
        deadline = self.now() + self.opts.ready_timeout
        last = "no status yet"
        import aiohttp

        async with aiohttp.ClientSession() as session:
            while self.now() < deadline:
                problem = self.target.startup_problem()
                if problem:
                    raise TargetError(f"cluster cannot become ready: {problem}")
                await self.monitor.poll_once()
                leader = self.monitor.agreed_leader()
                lv = self.monitor.views.get(leader) if leader else None
                members = lv.members if lv is not None else []
                registered = {m.get("id") for m in members if m.get("id")}
                verdicts = self.monitor.verdicts
                if leader is None:
                    last = "no agreed leader"
                elif not set(self.target.apis) <= registered:
                    last = f"members registered: {sorted(registered)}"
                elif set(verdicts) != set(self.target.backend_names) or any(v != "up" for v in verdicts.values()):
                    last = f"verdicts {verdicts}"
                else:
                    bad = []
                    extra = self.target.products_addresses.addresses if self.target.products_addresses else []
                    for addr in self.target.client_addresses.addresses + extra:
                        try:
                            async with session.get(f"http://{addr}/products",
                                                   timeout=aiohttp.ClientTimeout(total=2)) as r:
                                await r.read()
                                if r.status != 200:
                                    bad.append(f"{addr}: {r.status}")
                        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                            bad.append(f"{addr}: {type(exc).__name__}")
                    if not bad:
                        self.events.append({"t": round(self.now(), 3), "kind": "ready", "leader": leader})
                        return
                    last = f"service not answering: {bad}"
                await asyncio.sleep(0.2)
        raise TargetError(f"cluster not ready within {self.opts.ready_timeout:g}s: {last}")

    # --- steady state -----------------------------------------------------------------

    async def check_steady_state(self, when: str, start: float, end: float, final: bool = False) -> list[ProbeResult]:
        ss = self.drill.steady_state
        assert self.load is not None
        out: list[ProbeResult] = []
        s = summarize(self.load.outcomes, start, end)
        if ss.error_rate is not None:
            ok = s["requests"] > 0 and s["error_rate"] <= ss.error_rate.max
            detail = (f"{s['errors']} errors in {s['requests']} requests ({s['error_rate']:.2%}; "
                      f"{s['client_retries']} needed a client retry)" if s["requests"] else "no request completed")
            if s["error_kinds"]:
                detail += " kinds: " + ", ".join(f"{k} x{v}" for k, v in sorted(s["error_kinds"].items()))
            out.append(ProbeResult("error_rate", ok, round(s["error_rate"], 5), f"<= {ss.error_rate.max:g}", detail))
        if ss.p99_latency_ms is not None:
            ok = s["p99_ms"] <= ss.p99_latency_ms.max
            out.append(ProbeResult("p99_latency_ms", ok, s["p99_ms"], f"<= {ss.p99_latency_ms.max:g}",
                                   f"p99 {s['p99_ms']:.0f} ms (p50 {s['p50_ms']:.0f}, max {s['max_ms']:.0f})"))
        if ss.one_leader:
            leader, leaders = None, []
            for _ in range(8):  # a stable answer over up to ~2 s (status replies can straddle a change)
                await self.monitor.poll_once()
                leader, leaders = self.monitor.agreed_leader(), self.monitor.self_declared_leaders()
                if leader is not None and leaders == [leader]:
                    break
                await asyncio.sleep(0.25)
            ok = leader is not None and leaders == [leader]
            out.append(ProbeResult("one_leader", ok, leader, "exactly 1",
                                   f"agreed leader {leader}; nodes calling themselves leader: {leaders or 'none'}"))
        if ss.vip_holders is not None:
            holders = self.monitor.vip_holders()
            if holders is None:
                out.append(ProbeResult("vip_holders", None, None, f"<= {ss.vip_holders.max:g}",
                                       "n/a: no node runs a VIP (announce mode none)"))
            else:
                out.append(ProbeResult("vip_holders", len(holders) <= ss.vip_holders.max, holders,
                                       f"<= {ss.vip_holders.max:g}", f"holders: {holders or 'none'}"))
        out += await self._overload_probes(when, start, end, final)
        expected = ss.verdicts or {b: "up" for b in self.target.backend_names}
        got = dict(self.monitor.verdicts)
        wrong = {b: got.get(b) for b, v in expected.items() if got.get(b) != v}
        out.append(ProbeResult("verdicts", not wrong, got, expected,
                               "as expected" if not wrong else f"unexpected: {wrong}"))
        if ss.ledger:
            outcomes = list(self.load.outcomes)
            res = await asyncio.to_thread(check_ledger, outcomes, self.target.db_path, self.load.key_prefix)
            if final:
                self.ledger = res
            out.append(ProbeResult("ledger", None if not res.checked else res.intact, res.to_dict(), "every acknowledged order exactly once", res.summary()))
        self.events.append({"t": round(self.now(), 3), "kind": f"hypothesis.{when}",
                            "ok": all(p.ok is not False for p in out)})
        return out

    async def _overload_probes(self, when: str, start: float, end: float, final: bool) -> list[ProbeResult]:
        """The overload drill's hypothesis (docs/chaos.md "Overload"): checkout never fails and
        keeps its latency, browse is shed only with 503 + Retry-After, no backend is pushed
        past its own capacity (its /stats, read from the process)."""
        ss = self.drill.steady_state
        assert self.load is not None
        out: list[ProbeResult] = []
        outcomes = list(self.load.outcomes)
        checkout = summarize([o for o in outcomes if o.kind == "checkout"], start, end)
        if ss.checkout_errors is not None:
            ok = checkout["requests"] > 0 and checkout["errors"] <= ss.checkout_errors.max
            detail = f"{checkout['errors']} failed of {checkout['requests']} checkout requests"
            if checkout["error_kinds"]:
                detail += " kinds: " + ", ".join(f"{k} x{v}" for k, v in sorted(checkout["error_kinds"].items()))
            out.append(ProbeResult("checkout_errors", ok, checkout["errors"], f"<= {ss.checkout_errors.max:g}", detail))
        if ss.checkout_p99_ratio is not None:
            p99 = checkout["p99_ms"]
            if when == "before":
                self.checkout_p99_before = p99 if checkout["requests"] else None
                out.append(ProbeResult("checkout_p99_ratio", None if not checkout["requests"] else True, p99,
                                       f"<= {ss.checkout_p99_ratio.max:g} x this",
                                       f"baseline: checkout p99 {p99:.0f} ms over {checkout['requests']} requests"))
            else:
                base = self.checkout_p99_before
                if not base or not checkout["requests"]:
                    out.append(ProbeResult("checkout_p99_ratio", False, None, f"<= {ss.checkout_p99_ratio.max:g}",
                                           "no baseline or no checkout request to compare"))
                else:
                    ratio = p99 / base
                    out.append(ProbeResult("checkout_p99_ratio", ratio <= ss.checkout_p99_ratio.max, round(ratio, 3),
                                           f"<= {ss.checkout_p99_ratio.max:g}",
                                           f"checkout p99 {p99:.0f} ms vs {base:.0f} ms before the method "
                                           f"({ratio:.2f}x)"))
        if ss.shed_retry_after:
            sel = [o for o in outcomes if o.kind == "products" and start <= o.scheduled < end and o.finished]
            failed = [o for o in sel if not o.ok]
            bad = [o for o in failed if o.status != 503 or not o.retry_after]
            kinds: dict[str, int] = {}
            for o in bad:
                kinds[o.error] = kinds.get(o.error, 0) + 1
            detail = (f"{len(failed) - len(bad)} of {len(sel)} /products requests shed with 503 + Retry-After, "
                      f"{len(bad)} failed otherwise")
            if kinds:
                detail += ": " + ", ".join(f"{k} x{v}" for k, v in sorted(kinds.items()))
            out.append(ProbeResult("shed_retry_after", bool(sel) and not bad,
                                   {"requests": len(sel), "shed": len(failed) - len(bad), "other_failures": len(bad)},
                                   "every failed /products request is a 503 with Retry-After", detail))
        if ss.backend_capacity:
            key = "end" if final else when
            try:
                stats = await asyncio.to_thread(self.target.backend_stats)
            except Unsupported as exc:
                out.append(ProbeResult("backend_capacity", None, None, "max_in_flight <= capacity", f"n/a: {exc}"))
                return out
            self.backend_stats[key] = stats
            over = {n: f"{st['max_in_flight']} > {st['capacity']}" for n, st in stats.items()
                    if st.get("capacity") and st.get("max_in_flight", 0) > st["capacity"]}
            checked = [n for n, st in stats.items() if st.get("capacity")]
            unread = sorted(n for n, st in stats.items() if "error" in st)
            detail = ", ".join(f"{n} {st.get('max_in_flight')}/{st.get('capacity')}" for n, st in sorted(stats.items())
                               if st.get("capacity"))
            if unread:
                detail += f"; not read: {', '.join(unread)}"
            out.append(ProbeResult("backend_capacity", (not over) if checked else None,
                                   {n: st.get("max_in_flight") for n, st in stats.items()}, "max_in_flight <= capacity",
                                   ("over capacity: " + ", ".join(f"{n} {v}" for n, v in over.items()) + "; ")
                                   * bool(over) + f"max_in_flight/capacity: {detail or 'no backend declares one'}"))
        return out

    # --- method -------------------------------------------------------------------------

    async def _run_steps(self, steps: list[Step], which: str) -> bool:
        start = self.now()
        if which == "method":
            self.method_start = start
            await self.monitor.poll_once()
            self.leader_at_method_start = self.monitor.agreed_leader()
        ok = True
        for step in steps:
            if step.at is not None and which == "method":
                delay = start + step.at - self.now()
                if delay > 0:
                    await asyncio.sleep(delay)
            if step.pause_before:
                await asyncio.sleep(step.pause_before)
            t_start = self.now()
            status, detail = "ok", ""
            try:
                detail = await self._exec(step)
            except Unsupported as exc:
                status, detail = "skipped", str(exc)
            except (StepFailed, TargetError, ApiError) as exc:
                status, detail = "failed", getattr(exc, "message", None) or str(exc)
            except Exception as exc:  # an engine bug must still end in rollbacks and teardown
                status, detail = "failed", f"{type(exc).__name__}: {exc}"
            res = StepResult(step.key, step.action, step.describe(), status, round(t_start, 3), round(self.now(), 3),
                             detail)
            self.steps.append(res)
            self.events.append({"t": res.t_start, "kind": f"step.{status}", "step": step.key,
                                "action": step.action, "description": res.description, "detail": detail})
            if status == "failed":
                if which == "method":
                    self.failures.append(f"{step.key} ({res.description}) failed: {detail}")
                    return False
                ok = False
                continue
            if step.pause_after:
                await asyncio.sleep(step.pause_after)
        return ok

    async def _resolve(self, target: str, purpose: str = "") -> str:
        if target not in ("leader", "follower"):
            if target not in self.target.apis:
                raise StepFailed(f"no balancer {target!r} (known: {', '.join(self.target.apis)})")
            return target
        deadline = self.now() + 10
        while self.now() < deadline:
            await self.monitor.poll_once()
            leader = self.monitor.agreed_leader()
            if leader is not None:
                if target == "leader":
                    self.last_resolved_leader = leader
                    return leader
                followers = sorted(k for k, v in self.monitor.views.items()
                                   if v.reachable and v.raft_state == "follower" and k != leader)
                if followers:
                    return followers[0]
            await asyncio.sleep(0.1)
        raise StepFailed(f"cannot resolve {target!r}: no agreed leader within 10 s")

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.to_thread(fn, *args)

    def _open_fault(self, key: str, label: str) -> None:
        self.faults.append({"key": key, "label": label, "start": round(self.now(), 3), "end": None})
        self.events.append({"t": round(self.now(), 3), "kind": "fault.injected", "fault": label})

    def _close_fault(self, prefix: str) -> None:
        for f in self.faults:
            if f["end"] is None and (f["key"] == prefix or f["key"].startswith(prefix + "|") or prefix.endswith("*")
                                     and f["key"].startswith(prefix[:-1])):
                f["end"] = round(self.now(), 3)
                self.events.append({"t": f["end"], "kind": "fault.healed", "fault": f["label"]})

    async def _exec(self, step: Step) -> str:
        a, act = step.args, step.action
        tg = self.target
        if act == "pause":
            await asyncio.sleep(a["seconds"])
            return f"paused {a['seconds']:g}s"
        if act == "wait-until":
            return await self._wait_until(a)
        if act in ("kill-balancer", "freeze-balancer", "resume-balancer", "stop-balancer", "start-balancer",
                   "restart-balancer"):
            what = act.split("-")[0]
            if what == "restart" and not a.get("graceful", True):
                what = "restart-hard"
            if a["target"] == "all" and what in ("start", "resume"):
                msgs = [await self._call(tg.balancer, n, what) for n in list(tg.apis)]
                self._close_fault(f"balancer:*")
                return "; ".join(msgs)
            node = await self._resolve(a["target"])
            msg = await self._call(tg.balancer, node, what)
            if what in ("kill", "freeze", "stop"):
                self._open_fault(f"balancer:{node}", f"{what} {node}")
            elif what in ("start", "resume"):
                self._close_fault(f"balancer:{node}")
            else:
                self._open_fault(f"restart:{node}", f"restart {node}")
                self._close_fault(f"restart:{node}")
            return msg
        if act in ("kill-backend", "start-backend", "restart-backend"):
            what = act.split("-")[0]
            name = a["target"]
            names = list(tg.backend_names) if name == "all" and what == "start" else [name]
            msgs = [await self._call(tg.backend, n, what) for n in names]
            for n in names:
                if what == "kill":
                    self._open_fault(f"backend:{n}", f"kill backend {n}")
                else:
                    self._close_fault(f"backend:{n}")
            return "; ".join(msgs)
        if act in ("kill-server", "start-server"):  # every backend of a failure domain at once
            what = act.split("-")[0]
            msg = await self._call(tg.server, a["target"], what)
            if what == "kill":
                self._open_fault(f"server:{a['target']}", f"kill server {a['target']}")
            else:
                self._close_fault("server:*" if a["target"] == "all" else f"server:{a['target']}")
            return msg
        if act in ("partition-balancer", "heal-balancer"):
            cut = act == "partition-balancer"
            if not cut and a["target"] == "all":
                # every node, not just those in self._partitioned: a cut from an earlier,
                # aborted run must be healed too
                msgs = [await self._call(tg.partition, n, False) for n in list(tg.apis)]
                self._partitioned.clear()
                self._close_fault("partition:*")
                return "; ".join(msgs)
            node = await self._resolve(a["target"])
            msg = await self._call(tg.partition, node, cut)
            if cut:
                self._partitioned.add(node)
                self._open_fault(f"partition:{node}", f"partition {node}")
            else:
                self._partitioned.discard(node)
                self._close_fault(f"partition:{node}")
            return msg
        if act in ("add-toxic", "remove-toxic"):
            parts = a["link"].split(":")
            if parts[0] == "raft" and act == "remove-toxic" and a["link"] in self._links:
                link: tuple[str, ...] = self._links[a["link"]]  # the link the toxic was put on
            elif parts[0] == "raft":
                first = await self._resolve(parts[1])
                second = await self._resolve(parts[2])
                if first == second:
                    raise StepFailed(f"link {a['link']} resolves to one node ({first})")
                link = ("raft", first, second)
                self._links[a["link"]] = link
            else:
                link = ("backend", parts[1])
            label = ":".join(link)
            if act == "add-toxic":
                msg = await self._call(tg.add_toxic, link, a["name"], a["type"], a["stream"], a["toxicity"],
                                       a["attributes"])
                self._open_fault(f"toxic:{label}|{a['name'] or a['type']}",
                                 f"{a['type']} {a['attributes']} on {label}")
            else:
                msg = await self._call(tg.remove_toxic, link, a["name"])
                self._close_fault(f"toxic:{label}" + (f"|{a['name']}" if a["name"] else ""))
            return msg
        if act in ("drain-backend", "enable-backend", "add-member", "remove-member", "transfer-leader"):
            return await self._admin(act, a)
        raise StepFailed(f"action {act} not implemented")

    async def _admin(self, act: str, a: dict[str, Any]) -> str:
        tg = self.target
        svc = tg.service

        def call() -> Any:
            if act == "drain-backend":
                return tg.api_call("POST", f"/v1/services/{svc}/backends/{a['target']}/drain")
            if act == "enable-backend":
                return tg.api_call("POST", f"/v1/services/{svc}/backends/{a['target']}/enable")
            if act == "add-member":
                return tg.add_member(a["id"])
            if act == "remove-member":
                return tg.api_call("DELETE", f"/v1/members/{a['target']}")
            return tg.api_call("POST", "/v1/leader/transfer", {"to": a["to"] or None})

        if act == "remove-member" and a["target"] in ("leader", "follower"):
            a = dict(a, target=await self._resolve(a["target"]))
        expect = a.get("expect_error", 0)
        started = self.now()
        try:
            result = await self._call(call)
        except ApiError as exc:
            took = self.now() - started
            if expect and exc.status == expect:
                return f"failed as expected after {took:.1f}s: {exc.status} {exc.code}: {exc.message}"
            raise StepFailed(f"{exc.status or ''} {exc.code}: {exc.message}".strip()) from None
        if expect:
            raise StepFailed(f"expected HTTP {expect}, but the write succeeded: {result}")
        if act == "drain-backend":
            self._open_fault(f"drain:{a['target']}", f"drain {a['target']}")
        elif act == "enable-backend":
            self._close_fault(f"drain:{a['target']}")
        elif act == "remove-member":
            self.events.append({"t": round(self.now(), 3), "kind": "member.removed", "member": a["target"]})
            tg.apis.pop(a["target"], None)
        if isinstance(result, dict):
            short = {k: v for k, v in result.items() if k in ("ok", "from", "to", "took_ms", "told_to_stop")}
            return f"ok {short}" if short else "ok"
        return str(result)

    async def _wait_until(self, a: dict[str, Any]) -> str:
        cond, timeout = a["condition"], a["timeout"]
        started = self.now()
        deadline = started + timeout
        m = self.monitor
        node = None
        if cond == "balancer-ready":
            node = a["target"] if a["target"] not in ("leader", "follower") else await self._resolve(a["target"])
        last = ""
        while True:
            leader = m.agreed_leader()
            lv = m.views.get(leader) if leader else None
            if cond == "leader-elected":
                ok = leader is not None and lv is not None and lv.has_quorum and m.self_declared_leaders() == [leader]
                last = f"leader {leader}, self-declared {m.self_declared_leaders()}"
            elif cond == "leader-changed":
                old = self.last_resolved_leader or self.leader_at_method_start
                ok = (leader is not None and leader != old and lv is not None and lv.has_quorum
                      and m.self_declared_leaders() == [leader])
                last = f"leader {leader} (was {old})"
            elif cond == "no-quorum":
                reach = [v for v in m.views.values() if v.reachable]
                ok = bool(reach) and not any(v.has_quorum for v in reach)
                last = f"quorum on {[k for k, v in m.views.items() if v.reachable and v.has_quorum]}"
            elif cond == "verdict":
                got = m.verdicts.get(a["backend"])
                ok = got == a["is"]
                last = f"verdict of {a['backend']} is {got}"
            elif cond == "balancer-ready":
                v = m.views.get(node or "")
                ok = v is not None and v.reachable and v.leader is not None and v.has_quorum
                last = f"{node}: {'unreachable' if v is None or not v.reachable else v.raft_state}"
            elif cond == "all-ready":
                views = {k: m.views.get(k) for k in self.target.apis}
                not_ready = sorted(k for k, v in views.items()
                                   if v is None or not v.reachable or v.leader != leader or not v.has_quorum)
                ok = leader is not None and not not_ready
                last = f"leader {leader}; not ready: {not_ready}"
            elif cond == "members":
                members = [x for x in (lv.members if lv else []) if x.get("in_raft_config") and x.get("id")]
                ok = len(members) == a["count"]
                last = f"{len(members)} members in the Raft configuration"
            elif cond == "drained":
                be = next((b for b in m.backends if b.get("name") == a["backend"]), None)
                ok = be is not None and be.get("admin_state") == "drain" and be.get("in_flight", 0) == 0
                last = f"backend {a['backend']}: {None if be is None else (be.get('admin_state'), be.get('in_flight'))}"
            elif cond == "event":  # an audit event of that kind since the method started
                seen = [e for e in m.audit if e["kind"] == f"audit:{a['kind']}" and e["t"] >= (self.method_start or 0)]
                ok = bool(seen)
                last = seen[-1]["message"] if seen else f"no {a['kind']} event yet"
            elif cond == "resilience":
                svc = a["service"] or self.target.service
                try:
                    r = (await self._call(self.target.api_call, "GET", f"/v1/services/{svc}/resilience"))["resilience"]
                    survives = bool(r.get("survives_another_server_loss"))
                    ok = survives == (a["is"] == "survives")
                    last = f"{svc}: {r.get('status')}; " + ("; ".join(r.get("warnings", [])) or "no warnings")
                except ApiError as exc:
                    ok, last = False, f"resilience report: {exc.code}: {exc.message}"
            elif cond == "server-loss":  # the report's per-server capacity answer (issue 14)
                svc = a["service"] or self.target.service
                try:
                    r = (await self._call(self.target.api_call, "GET", f"/v1/services/{svc}/resilience"))["resilience"]
                    x = next((x for x in r.get("server_loss", []) if x["server"] == a["target"]), None)
                    ok = x is not None and x["verdict"] == a["is"]
                    last = (f"{svc}: if server {a['target']} fails: {x['answer']}: {x['detail']}" if x is not None
                            else f"{svc}: no answer for server {a['target']}")
                except ApiError as exc:
                    ok, last = False, f"resilience report: {exc.code}: {exc.message}"
            else:  # validated at parse time
                raise StepFailed(f"unknown condition {cond}")
            if ok:
                return f"{cond} after {self.now() - started:.2f}s ({last})"
            if self.now() >= deadline:
                raise StepFailed(f"{cond} not reached within {timeout:g}s (last: {last})")
            await asyncio.sleep(0.1)

    # --- progress and report data ---------------------------------------------------------

    async def _progress(self) -> None:
        while True:
            self._print_progress()
            await asyncio.sleep(0.5)

    def _print_progress(self, final: bool = False) -> None:
        stream = self.opts.progress_stream or sys.stderr
        outs = self.load.outcomes if self.load else []
        done = [o for o in outs if o.finished]
        errors = sum(1 for o in done if not o.ok)
        retried = sum(1 for o in outs if o.retried)
        verdicts = " ".join(f"{k}:{v}" for k, v in sorted(self.monitor.verdicts.items()))
        line = (f"[{self.drill.slug}] {self.phase:<13} {self.now():6.1f}s  req {len(outs):5d}  ok {len(done) - errors:5d}  "
                f"err {errors:3d}  retried {retried:3d}  leader {self.monitor.agreed_leader() or '-':<4} {verdicts}")
        tty = hasattr(stream, "isatty") and stream.isatty()
        if tty:
            stream.write("\r\033[K" + line + ("\n" if final else ""))
            stream.flush()
        elif final or int(self.now() * 2) % 10 == 0:  # not a terminal: a line every ~5 s
            stream.write(line + "\n")
            stream.flush()

    def report_data(self, passed: bool) -> dict[str, Any]:
        outs = self.load.outcomes if self.load else []
        off = self.load_offset
        shifted = []
        for o in outs:
            d = o.to_dict()
            d["t"] = round(d["t"] + off, 4)
            shifted.append(d)
        bks = buckets(outs, 0.1)
        for b in bks:
            b["t"] = round(b["t"] + off, 3)
        total = summarize(outs)
        method_window = summarize(outs, (self.method_start or 0.0) - off) if self.method_start is not None else None
        return {
            "drill": {"title": self.drill.title, "file": str(self.drill.path), "slug": self.drill.slug,
                      "description": self.drill.description},
            "result": "passed" if passed else "failed",
            "failures": list(self.failures),
            "started_at": time.time() - self.now(),
            "duration_s": round(self.now(), 3),
            "target": self.target.describe(),
            "load": {"config": asdict(self.load.cfg) if self.load else None,
                     "key_prefix": self.load.key_prefix if self.load else None,
                     "client_mode": self.target.client_addresses.mode,
                     "client_addresses": list(self.target.client_addresses.addresses),
                     "started_at_t": round(off, 3), "total": total, "method_window": method_window},
            "client_visible_errors": total["errors"],
            "hypothesis": {k: [asdict(p) for p in v] for k, v in self.hypothesis.items()},
            "steps": [asdict(s) for s in self.steps],
            "faults": self.faults,
            "phases": self.phases,
            "events": sorted(self.events + self.monitor.audit, key=lambda e: e["t"]),
            "timeline": {"buckets": bks, "samples": self.monitor.samples},
            "monitor": {"poll_failures": self.monitor.failures_report()},
            "ledger": self.ledger.to_dict() if self.ledger else None,
            "backend_stats": self.backend_stats,
            "requests": shifted,
        }

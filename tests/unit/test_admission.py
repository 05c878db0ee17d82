"""The admission queue without sockets or a loop (time passed in): timeouts, max length,
FIFO within a priority, critical overtaking low, low shed first, cancelled entries."""
from __future__ import annotations

from halb.dataplane.admission import (
    ADMITTED, CANCELLED, RANK, SHED, TIMED_OUT, AdmissionQueue,
)
from halb.dataplane.stats import _merge_queue

CRIT, NORM, LOW = RANK["critical"], RANK["normal"], RANK["low"]


def drain(q: AdmissionQueue, now: float = 0.0) -> list[str]:
    out = []
    while (w := q.pop(now)) is not None:
        out.append(w.item)
    return out


def test_fifo_within_a_priority() -> None:
    q = AdmissionQueue(max_queue=10, timeout=2.0)
    for i in range(5):
        q.push(f"n{i}", NORM, float(i))
    assert drain(q) == ["n0", "n1", "n2", "n3", "n4"]
    assert q.length == 0 and q.admitted == 5


def test_critical_overtakes_normal_and_low_whatever_the_arrival_order() -> None:
    q = AdmissionQueue(max_queue=10, timeout=2.0)
    q.push("low1", LOW, 0.0)
    q.push("norm1", NORM, 0.1)
    q.push("low2", LOW, 0.2)
    q.push("crit1", CRIT, 0.3)
    q.push("norm2", NORM, 0.4)
    q.push("crit2", CRIT, 0.5)
    assert drain(q, 1.0) == ["crit1", "crit2", "norm1", "norm2", "low1", "low2"]


def test_timeout_expires_only_the_overdue_in_order() -> None:
    q = AdmissionQueue(max_queue=10, timeout=2.0)
    a, _ = q.push("a", NORM, 0.0)
    b, _ = q.push("b", NORM, 1.0)
    c, _ = q.push("c", LOW, 0.5)
    assert q.expire(1.99) == []
    assert [w.item for w in q.expire(2.0)] == ["a"]  # deadline reached: out
    assert a.state == TIMED_OUT and q.length == 2 and q.timed_out == 1
    assert [w.item for w in q.expire(3.0)] == ["b", "c"]
    assert b.state == c.state == TIMED_OUT and q.length == 0
    assert q.next_deadline() is None


def test_max_length_refuses_when_nothing_worse_waits() -> None:
    q = AdmissionQueue(max_queue=2, timeout=2.0)
    q.push("n1", NORM, 0.0)
    q.push("n2", NORM, 0.0)
    w, evicted = q.push("n3", NORM, 0.0)
    assert w is None and evicted is None and q.full == 1 and q.length == 2
    w, evicted = q.push("l1", LOW, 0.0)  # low never evicts normal
    assert w is None and evicted is None and q.full == 2


def test_full_queue_sheds_the_newest_low_first_and_critical_last() -> None:
    q = AdmissionQueue(max_queue=3, timeout=2.0)
    q.push("l1", LOW, 0.0)
    q.push("l2", LOW, 0.1)
    q.push("n1", NORM, 0.2)
    w, evicted = q.push("c1", CRIT, 0.3)
    assert w is not None and evicted is not None and evicted.item == "l2" and evicted.state == SHED
    w, evicted = q.push("n2", NORM, 0.4)
    assert evicted is not None and evicted.item == "l1"
    w, evicted = q.push("c2", CRIT, 0.5)  # no low left: a normal goes
    assert evicted is not None and evicted.item == "n2"
    w, evicted = q.push("c3", CRIT, 0.6)
    assert evicted is not None and evicted.item == "n1"
    w, evicted = q.push("c4", CRIT, 0.7)  # only critical left: refused, nobody evicted
    assert w is None and evicted is None
    assert q.shed == 4 and q.full == 1 and drain(q, 1.0) == ["c1", "c2", "c3"]


def test_cancelled_waiters_free_their_place_and_are_skipped() -> None:
    q = AdmissionQueue(max_queue=2, timeout=2.0)
    a, _ = q.push("a", NORM, 0.0)
    q.push("b", NORM, 0.0)
    q.cancel(a)  # the client went away
    assert a.state == CANCELLED and q.length == 1 and q.cancelled == 1
    w, _ = q.push("c", NORM, 0.0)  # its place is free again
    assert w is not None
    assert drain(q) == ["b", "c"]
    q.cancel(w)  # cancelling an admitted waiter changes nothing
    assert w.state == ADMITTED and q.length == 0


def test_wait_time_counted_for_admitted_requests() -> None:
    q = AdmissionQueue(max_queue=5, timeout=10.0)
    q.push("a", NORM, 0.0)
    q.push("b", CRIT, 1.0)
    assert q.stats(2.5)["oldest_wait_s"] == 2.5
    q.pop(3.0)  # b waited 2 s
    q.pop(4.0)  # a waited 4 s
    st = q.stats(4.0)
    assert st["wait_s_sum"] == 6.0 and st["wait_s_max"] == 4.0 and st["admitted"] == 2
    assert st["by_priority"] == {"critical": 0, "normal": 0, "low": 0} and st["length"] == 0


def test_disabled_and_stats_merge() -> None:
    assert not AdmissionQueue(max_queue=0, timeout=2.0).enabled
    assert not AdmissionQueue(max_queue=5, timeout=0.0).enabled
    q1, q2 = AdmissionQueue(max_queue=5, timeout=2.0), AdmissionQueue(max_queue=5, timeout=2.0)
    q1.push("a", LOW, 0.0)
    q2.push("b", CRIT, 0.0)
    q2.push("c", CRIT, 0.0)
    m = _merge_queue(q1.stats(1.0), q2.stats(3.0))
    assert m["length"] == 3 and m["by_priority"] == {"critical": 2, "normal": 0, "low": 1}
    assert m["oldest_wait_s"] == 3.0 and m["max_queue"] == 5


# --- the loop glue (Admission) with a real event loop, connections stood in by recorders ----

class Conn:
    """Records what the queue asks of a client connection (no socket needed for the rules)."""

    def __init__(self, name: str, log: list[tuple[str, str]]) -> None:
        self.name, self.log, self.alive = name, log, True

    def queue_alive(self, ex: object) -> bool:
        return self.alive

    def dispatch(self, ex: object, b: object) -> None:
        b.in_flight += 1  # type: ignore[attr-defined]  # what attach does
        self.log.append(("sent", self.name))

    def queue_refused(self, ex: object, reason: str, retry_after: int) -> None:
        self.log.append((reason, self.name))


class Ex:
    key = None
    tried = None  # a first attempt (a waiting retry names the backends that failed it)
    failed_servers = None


def test_admission_dispatches_by_priority_when_a_slot_frees_and_times_out_the_rest() -> None:
    import asyncio

    from halb.dataplane.admission import Admission
    from halb.dataplane.routing import ServiceRuntime
    from halb.dataplane.snapshot import BackendRoute, ServiceRoute

    async def main() -> list[tuple[str, str]]:
        route = ServiceRoute(name="web", mode="http", listen_host="127.0.0.1", listen_port=0, backends=(
            BackendRoute(name="a", host="127.0.0.1", port=9, weight=1, max_conns=1),),
            options=(("max_queue", 3), ("queue_timeout", 0.3)))
        rt = ServiceRuntime(route)
        a = rt.backends["a"]
        a.in_flight = 1  # the backend is full
        adm = rt.admission = Admission(rt, asyncio.get_running_loop())
        log: list[tuple[str, str]] = []
        conns = {n: Conn(n, log) for n in ("low1", "low2", "norm", "crit", "gone")}
        adm.enqueue(conns["low1"], Ex(), RANK["low"])
        adm.enqueue(conns["low2"], Ex(), RANK["low"])
        adm.enqueue(conns["norm"], Ex(), RANK["normal"])
        adm.enqueue(conns["crit"], Ex(), RANK["critical"])  # full: sheds low2, the newest low
        await asyncio.sleep(0.01)
        assert rt.queued == 3 and log == [("shed", "low2")]
        a.in_flight = 0  # a response ended
        adm.wake()
        await asyncio.sleep(0.01)
        assert log[-1] == ("sent", "crit") and rt.queued == 2  # one slot: the critical one
        a.in_flight = 0
        conns["norm"].alive = False  # its client left meanwhile: skipped, not sent
        adm.wake()
        await asyncio.sleep(0.01)
        assert log[-1] == ("sent", "low1") and rt.queued == 0
        adm.enqueue(conns["gone"], Ex(), RANK["normal"])  # a is full again (low1): waits, then times out
        await asyncio.sleep(0.5)
        assert rt.queued == 0 and adm.q.timed_out == 1 and adm.q.cancelled == 1
        return log

    log = asyncio.run(main())
    assert log == [("shed", "low2"), ("sent", "crit"), ("sent", "low1"), ("queue_timeout", "gone")]

"""HTTP mode over real sockets on 127.0.0.1: the DataPlane and small origins share the
test's event loop (uvloop); failure cases that need a process to die are in
test_dataplane_failover.py."""
from __future__ import annotations

import asyncio
import contextlib
import json
import re
from typing import Any, AsyncIterator

import pytest

from halb.dataplane.engine import DataPlane
from halb.dataplane.origin import Origin
from halb.dataplane.snapshot import BackendRoute, RoutingSnapshot
from halb.dataplane.testing import free_port, raw_request, run, service, snapshot

from tests.integration.head_paths import head_path  # noqa: F401  (autouse: both head paths)

pytestmark = pytest.mark.timeout(60)


@contextlib.asynccontextmanager
async def origins(*names: str) -> AsyncIterator[list[tuple[Origin, int]]]:
    out: list[tuple[Origin, int]] = []
    try:
        for n in names:
            o = Origin(n)
            out.append((o, await o.start()))
        yield out
    finally:
        for o, _ in out:
            o.close()


@contextlib.asynccontextmanager
async def dataplane(snap: RoutingSnapshot, **kw: Any) -> AsyncIterator[DataPlane]:
    dp = DataPlane("test", **kw)
    try:
        await dp.start(snap)
        yield dp
    finally:
        await dp.stop()


def get(path: str, *headers: str, method: str = "GET") -> bytes:
    extra = "".join(h + "\r\n" for h in headers)
    return f"{method} {path} HTTP/1.1\r\nHost: shop.test\r\n{extra}\r\n".encode()


async def fetch(port: int, path: str = "/", *headers: str, method: str = "GET", timeout: float = 10.0):
    return await raw_request(port, get(path, *headers, method=method), timeout=timeout,
                             head_only=method == "HEAD")


async def until(pred: Any, what: str, timeout: float = 10.0) -> None:
    """Wait for a condition (never a fixed sleep as synchronisation)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(0.01)


async def connects(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    return True


async def until_async(pred: Any, what: str, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await pred():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(0.01)


def backends_of(ports: list[tuple[Origin, int]], **states: str) -> list[BackendRoute]:
    return [BackendRoute(name=o.name.decode(), host="127.0.0.1", port=p, weight=1,
                         admin_state=states.get(o.name.decode(), "active"), server=f"srv-{o.name.decode()}")
            for o, p in ports]


def test_proxies_round_robin_with_forwarding_headers() -> None:
    async def main() -> None:
        async with origins("A", "B") as os_, dataplane(snapshot(service("web", backends_of(os_)))) as dp:
            port = dp.bound_port("web")
            seen = []
            for _ in range(4):
                r = await fetch(port)
                assert r.status == 200
                seen.append(r.headers["x-backend"])
            assert seen in (["A", "B", "A", "B"], ["B", "A", "B", "A"])
            r = await fetch(port, "/headers", "X-Forwarded-For: 203.0.113.9", "X-Request-Id: abc-123",
                            "Connection: keep-alive, X-Secret", "X-Secret: s", "Keep-Alive: timeout=5",
                            "Proxy-Authorization: Basic eA==", "TE: trailers", "Upgrade: h2c")
            got = {k.lower(): v for k, v in json.loads(r.body)}
            assert got["x-forwarded-for"] == "203.0.113.9, 127.0.0.1"
            assert got["x-forwarded-proto"] == "http" and got["x-forwarded-host"] == "shop.test"
            assert got["x-request-id"] == "abc-123"
            for hop in ("connection", "x-secret", "keep-alive", "proxy-authorization", "te", "upgrade"):
                assert hop not in got, hop
            r = await fetch(port, "/headers")
            rid = {k.lower(): v for k, v in json.loads(r.body)}["x-request-id"]
            assert rid.startswith("test-") and len(rid) > 8  # generated when the client sent none
            r = await fetch(port, "/", method="HEAD")
            assert r.status == 200 and r.headers["content-length"] == "5"
            s = dp.stats()["services"]["web"]
            assert s["requests"] == 7 and s["errors"] == 0
            assert s["backends"]["A"]["requests"] + s["backends"]["B"]["requests"] == 7

    run(main())


def test_keep_alive_and_chunked_reframing_both_ways() -> None:
    async def main() -> None:
        async with origins("A") as os_, dataplane(snapshot(service("web", backends_of(os_)))) as dp:
            port = dp.bound_port("web")
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                body = b"hello world" * 1000
                chunks = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 3000]), body[i:i + 3000])
                                  for i in range(0, len(body), 3000)) + b"0\r\n\r\n"
                for _ in range(3):  # three requests on one client connection
                    writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks)
                    head = await reader.readuntil(b"\r\n\r\n")
                    assert b"Transfer-Encoding: chunked" in head
                    data = b""
                    while not data.endswith(b"0\r\n\r\n"):
                        data += await asyncio.wait_for(reader.read(65536), 10)
                    decoded, rest = b"", data
                    while True:
                        size_line, rest = rest.split(b"\r\n", 1)
                        n = int(size_line, 16)
                        if n == 0:
                            break
                        decoded += rest[:n]
                        rest = rest[n + 2:]
                    assert decoded == body
                writer.write(b"POST /sink HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nabcde")
                head = await reader.readuntil(b"\r\n\r\n")
                n = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
                assert json.loads(await reader.readexactly(n))["received"] == 5
            finally:
                writer.close()
            b = dp.stats()["services"]["web"]["backends"]["A"]
            assert b["requests"] == 4 and b["idle_pool"] == 1  # one upstream connection reused

    run(main())


def test_header_limit_431_and_framing_attacks_400_and_proxy_survives() -> None:
    async def main() -> None:
        async with origins("A") as os_, dataplane(snapshot(service("web", backends_of(os_), max_header_bytes=4096))) as dp:
            port = dp.bound_port("web")
            r = await fetch(port, "/", "X-Big: " + "a" * 8000)
            assert r.status == 431 and json.loads(r.body)["error"] == "headers_too_large"
            many = [f"X-H{i}: {'v' * 50}" for i in range(200)]
            assert (await fetch(port, "/", *many)).status == 431
            cl_te = b"POST /sink HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
            r = await raw_request(port, cl_te)
            assert r.status == 400 and "request_id" in json.loads(r.body)
            dup = b"POST /sink HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd"
            assert (await raw_request(port, dup)).status == 400
            dup_list = b"POST /sink HTTP/1.1\r\nHost: x\r\nContent-Length: 3, 4\r\n\r\nabcd"
            assert (await raw_request(port, dup_list)).status == 400
            assert os_[0][0].counts.get("POST /sink", 0) == 0  # nothing ambiguous reached the backend
            bad_chunk = b"POST /sink HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n"
            assert (await raw_request(port, bad_chunk)).status == 400
            te_not_chunked = b"POST /sink HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\nabc"
            assert (await raw_request(port, te_not_chunked)).status == 400
            assert (await raw_request(port, b"\x16\x03\x01\x02\x00garbage\r\n\r\n")).status == 400
            assert (await raw_request(port, b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n")).status == 405
            assert (await fetch(port)).status == 200  # still serving

    run(main())


def test_body_limit_413_for_length_and_chunked() -> None:
    async def main() -> None:
        async with origins("A") as os_, dataplane(snapshot(service("web", backends_of(os_), max_body_bytes=1000))) as dp:
            port = dp.bound_port("web")
            r = await raw_request(port, b"POST /sink HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n" + b"x" * 5000)
            assert r.status == 413
            chunked = b"POST /sink HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + b"400\r\n" + b"x" * 1024 + b"\r\n" + b"400\r\n" + b"x" * 1024 + b"\r\n0\r\n\r\n"
            assert (await raw_request(port, chunked)).status == 413
            ok = await raw_request(port, b"POST /sink HTTP/1.1\r\nHost: x\r\nContent-Length: 999\r\n\r\n" + b"x" * 999)
            assert ok.status == 200 and json.loads(ok.body)["received"] == 999

    run(main())


@pytest.mark.timeout(60)
def test_slow_client_headers_timeout_and_proxy_stays_up() -> None:
    async def main() -> None:
        async with origins("A") as os_, dataplane(snapshot(service("web", backends_of(os_), header_timeout=0.5))) as dp:
            port = dp.bound_port("web")
            loop = asyncio.get_running_loop()
            pieces = [b"GET / HTTP/1.1\r\n"] + [b"X-Slow-%d: 1\r\n" % i for i in range(40)]

            async def slow_client() -> tuple[Any, float]:
                t0 = loop.time()
                r = await raw_request(port, pieces, delay=0.1, timeout=20)
                return r, loop.time() - t0

            slow = asyncio.create_task(slow_client())
            await until(lambda: dp.stats()["services"]["web"]["connections"] >= 1, "the slow client connected")
            assert (await fetch(port)).status == 200  # others are served meanwhile
            r, took = await slow
            assert r is not None and r.status == 408
            # cut off by header_timeout, not by the end of the headers: sending all 40 pieces
            # takes the client at least 39 x 0.1 s (raw_request stops sending once answered)
            assert 0.5 <= took < 3.9, took
            assert (await fetch(port)).status == 200

    run(main())


def test_upstream_never_answers_504_and_resets_502() -> None:
    async def main() -> None:
        async with origins("A") as os_, dataplane(snapshot(service(
                "web", backends_of(os_), request_timeout=1.0, outlier_consecutive_failures=100))) as dp:
            port = dp.bound_port("web")
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            r = await fetch(port, "/never", timeout=15)
            took = loop.time() - t0
            assert r.status == 504 and json.loads(r.body)["error"] == "gateway_timeout"
            assert 0.9 <= took < 10
            r = await fetch(port, "/reset-mid")
            assert r.status == 502 and json.loads(r.body)["error"] == "bad_gateway"
            r = await fetch(port, "/close-mid")
            assert r.status == 502
            # reset after the head was forwarded: the client sees a truncated response
            r = await fetch(port, "/reset-body")
            assert r is None or not r.complete
            assert (await fetch(port)).status == 200
            s = dp.stats()["services"]["web"]
            assert s["backends"]["A"]["errors"] >= 4 and s["backends"]["A"]["in_flight"] == 0

    run(main())


def test_all_backends_refuse_503_json_retry_after_and_ejection_hook() -> None:
    async def main() -> None:
        dead = [("127.0.0.1", free_port()), ("127.0.0.1", free_port())]
        events: list[tuple[str, str, bool, str]] = []
        async with dataplane(snapshot(service("web", dead))) as dp:
            dp.on_ejection.append(lambda *a: events.append(a))
            r = await fetch(dp.bound_port("web"))
            assert r.status == 503
            body = json.loads(r.body)
            assert body["error"] == "service_unavailable" and body["request_id"]
            assert int(r.headers["retry-after"]) >= 1
            assert any(e[2] for e in events) and events[0][0] == "web"
            s = dp.stats()["services"]["web"]
            assert s["retries"] >= 1 and sum(b["ejected"] for b in s["backends"].values()) == 1  # 50 % cap

    run(main())


def test_drain_inflight_completes_new_requests_elsewhere() -> None:
    async def main() -> None:
        async with origins("A", "B") as os_:
            snap = snapshot(service("web", backends_of(os_)))
            async with dataplane(snap) as dp:
                port = dp.bound_port("web")
                # find a request that lands on A and keep it in flight
                first = await fetch(port)
                slow_backend = "B" if first.headers["x-backend"] == "A" else "A"
                slow = asyncio.create_task(fetch(port, "/sleep/1.5"))
                await until(lambda: dp.stats()["services"]["web"]["backends"][slow_backend]["in_flight"] == 1,
                            f"the slow request in flight on {slow_backend}", 1.2)  # it lasts 1.5 s
                dp.update(snapshot(service("web", backends_of(os_, **{slow_backend: "drain"})), version=2))
                for _ in range(10):
                    r = await fetch(port)
                    assert r.headers["x-backend"] != slow_backend
                assert dp.stats()["services"]["web"]["backends"][slow_backend]["in_flight"] == 1  # observable
                r = await slow
                assert r.status == 200 and r.headers["x-backend"] == slow_backend
                assert dp.stats()["services"]["web"]["backends"][slow_backend]["in_flight"] == 0
                dp.update(snapshot(service("web", backends_of(os_, **{slow_backend: "maint"})), version=3))
                assert all([(await fetch(port)).headers["x-backend"] != slow_backend for _ in range(4)])

    run(main())


def test_panic_versus_fail_closed() -> None:
    async def main() -> None:
        async with origins("A", "B", "C") as os_:
            def snap(policy: str) -> RoutingSnapshot:
                bs = [BackendRoute(name=o.name.decode(), host="127.0.0.1", port=p, weight=1,
                                   healthy=o.name == b"A") for o, p in os_]
                bs_all_down = [BackendRoute(name=b.name, host=b.host, port=b.port, weight=1, healthy=False) for b in bs]
                return snapshot(service("web", bs, fail_policy=policy, panic_threshold=0.5),
                                service("down", bs_all_down, fail_policy=policy, panic_threshold=0.5))

            async with dataplane(snap("panic")) as dp:
                web, down = dp.bound_port("web"), dp.bound_port("down")
                seen = {(await fetch(web)).headers["x-backend"] for _ in range(9)}
                assert seen == {"A", "B", "C"}  # 1/3 healthy < 0.5: spread over all
                assert (await fetch(down)).status == 200  # all "down" by checks, but they answer
                assert dp.stats()["services"]["web"]["panic"] is True
                dp.update(snap("closed"))
                seen = {(await fetch(web)).headers["x-backend"] for _ in range(6)}
                assert seen == {"A"}
                r = await fetch(down)
                assert r.status == 503 and "retry-after" in r.headers
                assert json.loads(r.body)["error"] == "service_unavailable"

    run(main())


def test_update_adds_and_removes_listeners_and_maglev_by_header() -> None:
    async def main() -> None:
        async with origins("A", "B", "C") as os_:
            p2 = free_port()
            async with dataplane(snapshot(service("web", backends_of(os_)))) as dp:
                web = dp.bound_port("web")
                dp.update(snapshot(service("web", backends_of(os_)),
                                   service("sticky", backends_of(os_), port=p2, algorithm="maglev",
                                           hash_key="header:X-User"), version=2))
                await until_async(lambda: connects(p2), "the new listener accepts")
                for user in ("alice", "bob", "carol", "dave"):
                    got = {(await fetch(p2, "/", f"X-User: {user}")).headers["x-backend"] for _ in range(5)}
                    assert len(got) == 1, (user, got)
                dp.update(snapshot(service("sticky", backends_of(os_), port=p2, algorithm="maglev",
                                           hash_key="header:X-User"), version=3))

                async def web_closed() -> bool:
                    return not await connects(web)

                await until_async(web_closed, "the removed listener refuses connections")
                with pytest.raises(OSError):
                    await fetch(web)
                assert (await fetch(p2)).status == 200
                assert set(dp.stats()["services"]) == {"sticky"}

    run(main())


def test_retry_on_503_status_and_idempotency_rules() -> None:
    async def main() -> None:
        async with origins("A", "B") as os_, dataplane(snapshot(service(
                "web", backends_of(os_), outlier_consecutive_failures=100))) as dp:
            port = dp.bound_port("web")
            # every backend answers 503: after trying both, the last 503 is passed through
            r = await fetch(port, "/status/503")
            assert r.status == 503 and r.body.startswith(b"status 503")
            assert dp.stats()["services"]["web"]["retries"] == 1
            # a POST that got a 503 is not replayed (the backend may have acted)
            r = await raw_request(port, b"POST /status/503 HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi")
            assert r.status == 503
            assert sum(o.counts.get("POST /status/503", 0) for o, _ in os_) == 1
            # with an Idempotency-Key it is
            r = await raw_request(port, b"POST /status/503 HTTP/1.1\r\nHost: x\r\nIdempotency-Key: k1\r\n"
                                        b"Content-Length: 2\r\n\r\nhi")
            assert sum(o.counts.get("POST /status/503", 0) for o, _ in os_) == 3

    run(main())


def test_pipelining_head_reuse_http10_and_expect_continue() -> None:
    async def main() -> None:
        async with origins("A") as os_, dataplane(snapshot(service("web", backends_of(os_)))) as dp:
            port = dp.bound_port("web")
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                # three pipelined requests in one segment, incl. HEAD: answered in order
                writer.write(b"GET /status/201 HTTP/1.1\r\nHost: x\r\n\r\nHEAD / HTTP/1.1\r\nHost: x\r\n\r\n"
                             b"GET /status/202 HTTP/1.1\r\nHost: x\r\n\r\n")
                data = b""
                while data.count(b"HTTP/1.1 ") < 3 or not data.endswith(b"from A\n"):
                    chunk = await asyncio.wait_for(reader.read(65536), 10)
                    assert chunk
                    data += chunk
                statuses = [int(m) for m in re.findall(rb"HTTP/1\.1 (\d{3}) ", data)]
                assert statuses == [201, 200, 202]
            finally:
                writer.close()
            # HTTP/1.0 client without keep-alive: close-delimited is fine, connection closes
            r = await raw_request(port, b"GET /bytes/1000 HTTP/1.0\r\n\r\n")
            assert r.status == 200 and len(r.body) == 1000
            # Expect: 100-continue is passed through: the client sees the interim 100 first
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(b"POST /sink HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
                await asyncio.sleep(0.1)  # client behaviour (a pause before the body), not a synchronisation
                writer.write(b"abcd")
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
                if head.startswith(b"HTTP/1.1 100"):
                    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
                assert head.startswith(b"HTTP/1.1 200")
            finally:
                writer.close()

    run(main())


def test_garbage_and_truncated_requests_never_break_the_proxy() -> None:
    import random

    rng = random.Random(42)
    valid = (b"POST /sink HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nX-Request-Id: a b\r\n"
             b"Connection: close, x\r\n\r\n5\r\nhello\r\n0\r\n\r\n")

    async def main() -> None:
        async with origins("A") as os_, dataplane(snapshot(service("web", backends_of(os_), header_timeout=0.5,
                                                                    request_timeout=1.0, idle_timeout=1.0))) as dp:
            port = dp.bound_port("web")

            async def poke(data: bytes) -> None:
                try:
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                except OSError:
                    return
                try:
                    writer.write(data)
                    if rng.random() < 0.5:
                        writer.write_eof()
                    await asyncio.wait_for(reader.read(65536), 4)
                except (OSError, asyncio.TimeoutError):
                    pass
                finally:
                    writer.close()

            cases = []
            for _ in range(150):
                kind = rng.random()
                if kind < 0.3:
                    cases.append(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300))))
                elif kind < 0.7:  # valid request cut or mutated at a random place
                    data = bytearray(valid[:rng.randrange(1, len(valid))])
                    if data and rng.random() < 0.5:
                        data[rng.randrange(len(data))] = rng.randrange(256)
                    cases.append(bytes(data))
                else:
                    cases.append(valid.replace(b"5\r\n", b"%x\r\n" % rng.randrange(1 << 20), 1))
            for i in range(0, len(cases), 75):
                await asyncio.gather(*(poke(c) for c in cases[i:i + 75]))
            r = await fetch(port)
            assert r.status == 200

            def settled() -> bool:  # the timeouts (0.5 s head, 1 s request/idle) closed the half-open ones
                s = dp.stats()["services"]["web"]
                return s["in_flight"] == 0 and s["connections"] == 0

            await until(settled, "every poked connection closed", 10)
            assert (await fetch(port)).status == 200

    run(main(), timeout=50)


def test_idle_upstream_pool_is_trimmed_after_keepalive_and_load_counters_skip_unused_services() -> None:
    """The sweep trims idle pooled upstream connections after upstream_keepalive (every
    sweep below 4 s, once a second above), and the load meter's counters list only
    services that have sent requests."""
    async def main() -> None:
        async with origins("A", "B") as os_:
            (_, pa), (_, pb) = os_
            snap = snapshot(service("quick", [BackendRoute(name="A", host="127.0.0.1", port=pa, weight=1)],
                                    upstream_keepalive=0.5),
                            service("slow", [BackendRoute(name="B", host="127.0.0.1", port=pb, weight=1)],
                                    upstream_keepalive=4.0),
                            service("unused", [BackendRoute(name="C", host="127.0.0.1", port=pb, weight=1)]))
            async with dataplane(snap) as dp:
                assert dp.load_counters() == {"services": {}}
                for name in ("quick", "slow"):
                    assert (await fetch(dp.bound_port(name))).status == 200

                def pool(svc: str, be: str) -> int:
                    return dp.stats()["services"][svc]["backends"][be]["idle_pool"]

                assert pool("quick", "A") == 1 and pool("slow", "B") == 1
                counters = dp.load_counters()["services"]
                assert set(counters) == {"quick", "slow"}
                assert counters["quick"]["backends"]["A"]["requests"] == 1
                t0 = asyncio.get_running_loop().time()
                await until(lambda: pool("quick", "A") == 0, "the 0.5 s keepalive pool trimmed", 3.0)
                assert pool("slow", "B") == 1  # its 4 s have not passed
                await until(lambda: pool("slow", "B") == 0, "the 4 s keepalive pool trimmed", 8.0)
                assert asyncio.get_running_loop().time() - t0 >= 3.5

    run(main())

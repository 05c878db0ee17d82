"""The access log on a real data plane (docs/dataplane.md#access-log): one JSON line per
request with the right fields for proxied answers, local errors, a frontend with TLS, a
redirect and a WebSocket; the bytes logged are the bytes the client got; a logrotate-style
rename + reopen writes to the new file; a writer that cannot write (a FIFO nobody reads)
drops lines, counted, and never stalls requests; with workers = 2 both processes log and
SIGHUP reopens both."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from halb.certs.sealing import KeySealer
from halb.certs.tls import CertSet
from halb.dataplane.engine import DataPlane
from halb.dataplane.frontend_routes import FrontendRoute, RouteEntry
from halb.dataplane.origin import Origin
from halb.dataplane.testing import free_port, processes, run, service, snapshot, spawn_origin
from tests.certs_util import make_ca, make_leaf

pytestmark = pytest.mark.timeout(120)
SEALER = KeySealer("access-log-test-secret")


def read_lines(path: Path) -> list[dict]:
    """Complete lines only: a reader can see a batch the writer is still writing."""
    if not path.exists():
        return []
    text = path.read_text()
    return [json.loads(line) for line in text[:text.rfind("\n") + 1].splitlines()]


async def wait_lines(path: Path, n: int, timeout: float = 5.0) -> list[dict]:
    """The log's lines once there are at least n (the writer is asynchronous)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = read_lines(path)
        if len(lines) >= n or time.monotonic() > deadline:
            return lines
        await asyncio.sleep(0.05)


async def http(port: int, request: bytes, **kw) -> tuple[int, int]:
    """(status, bytes received) of one request on its own connection."""
    r, w = await asyncio.open_connection("127.0.0.1", port, **kw)
    w.write(request)
    data = await asyncio.wait_for(r.read(), 10)
    w.close()
    return int(data.split(b" ", 2)[1]), len(data)


def test_fields_of_proxied_and_local_answers(tmp_path: Path) -> None:
    log_path = tmp_path / "access.log"

    async def main() -> None:
        origin = Origin("o1")
        dp = DataPlane("n1")
        dp.set_access_log(str(log_path))
        try:
            port_o = await origin.start()
            dead = [("127.0.0.1", free_port()), ("127.0.0.1", free_port())]
            await dp.start(snapshot(service("web", [("127.0.0.1", port_o)]), service("down", dead, retries=1)))
            web, down = dp.bound_port("web"), dp.bound_port("down")
            got = {}
            got["ok"] = await http(web, b"GET /?token=secret HTTP/1.1\r\nHost: shop.example\r\n"
                                        b"X-Request-Id: abc\"\\1\r\nConnection: close\r\n\r\n")
            got["chunked"] = await http(web, b"GET /bytes/70000 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            got["404"] = await http(web, b"GET /status/404 HTTP/1.0\r\nHost: a\r\n\r\n")
            got["503"] = await http(down, b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            got["400"] = await http(web, b"GET /\x01 HTTP/1.1\r\n\r\n")
            # the client gives up before the backend answers: 499
            r, w = await asyncio.open_connection("127.0.0.1", web)
            w.write(b"GET /sleep/3 HTTP/1.1\r\nHost: \xff\"evil\r\n\r\n")
            await asyncio.sleep(0.3)
            w.close()
            lines = await wait_lines(log_path, 6)
            by_path = {ln["path"]: ln for ln in lines}
            assert len(lines) == 6, lines

            ok = by_path["/"]  # the query string is not logged
            assert ok["status"] == 200 and ok["bytes"] == got["ok"][1] and ok["backend"] == "b0"
            assert ok["attempts"] == 1 and ok["service"] == "web" and ok["frontend"] is None
            assert ok["host"] == "shop.example" and ok["method"] == "GET" and ok["client"] == "127.0.0.1"
            assert ok["tls"] is None and ok["duration_ms"] >= 0 and ok["time"].endswith("Z")
            assert ok["request_id"] == 'abc"\\1'  # escaped in the file, intact once parsed
            assert "secret" not in log_path.read_text()
            assert by_path["/bytes/70000"]["bytes"] == got["chunked"][1] and by_path["/bytes/70000"]["status"] == 200
            assert by_path["/status/404"]["status"] == 404 and by_path["/status/404"]["bytes"] == got["404"][1]
            local = by_path["/x"]  # no backend reachable: the balancer answered, after 2 attempts
            assert local["status"] == 503 and local["backend"] is None and local["attempts"] == 2
            assert local["bytes"] == got["503"][1] and local["service"] == "down"
            bad = [ln for ln in lines if ln["status"] == 400][0]
            assert bad["bytes"] == got["400"][1] and bad["service"] == "web" and bad["backend"] is None
            gone = by_path["/sleep/3"]
            assert gone["status"] == 499 and gone["bytes"] == 0 and gone["host"] == '\xff"evil'  # each byte as its Latin-1 character
            st = dp.stats()["access_log"]
            assert st["lines"] == 6 and st["written"] == 6 and st["dropped"] == 0 and st["error"] == ""
        finally:
            await dp.stop()
            origin.close()

    run(main())


def record(ca, leaf, name: str, sans: list[str]) -> dict:
    return {"name": name, "chain": leaf.cert_pem + ca.cert_pem, "key_sealed": SEALER.seal(leaf.key_pem().encode(), name),
            "sans": sans, "not_after": 1e10, "at": 1.0}


HANDSHAKE = (b"GET /ws HTTP/1.1\r\nHost: shop.example\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
             b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")


async def ws_origin(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    await r.readuntil(b"\r\n\r\n")
    w.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
    while data := await r.read(65536):
        w.write(data)
    w.close()


def test_frontend_tls_redirect_and_websocket_lines(tmp_path: Path) -> None:
    log_path = tmp_path / "access.log"
    ca = make_ca()
    leaf = make_leaf(ca, ["shop.example"])

    async def main() -> None:
        origin = Origin("a")
        ws = await asyncio.start_server(ws_origin, "127.0.0.1", 0)
        dp = DataPlane("n1")
        try:
            pa = await origin.start()
            pw = ws.sockets[0].getsockname()[1]
            await dp.start(snapshot(service("sa", [("127.0.0.1", pa)]), service("chat", [("127.0.0.1", pw)])))
            dp.set_access_log(str(log_path))  # turned on while running
            redirect_port = free_port()
            fe = FrontendRoute("web", "127.0.0.1", 0, tls=True, http_port=redirect_port, redirect_https=True,
                               routes=(RouteEntry("shop.example", "/ws", "chat"), RouteEntry("shop.example", "/", "sa")))
            dp.set_frontends((fe,), CertSet.build({"shop": record(ca, leaf, "shop", ["shop.example"])}, SEALER))
            await asyncio.sleep(0.05)
            port = dp.frontends.bound_port("web")
            client = ssl.create_default_context(cadata=ca.cert_pem)
            tls = {"ssl": client, "server_hostname": "shop.example"}
            ok = await http(port, b"GET /a HTTP/1.1\r\nHost: shop.example\r\nConnection: close\r\n\r\n", **tls)
            nf = await http(port, b"GET /b HTTP/1.1\r\nHost: nobody.example\r\nConnection: close\r\n\r\n", **tls)
            moved = await http(redirect_port, b"GET /c HTTP/1.1\r\nHost: shop.example\r\nConnection: close\r\n\r\n")
            r, w = await asyncio.open_connection("127.0.0.1", port, **tls)
            w.write(HANDSHAKE)
            head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5)
            w.write(b"x" * 1000)
            echoed = await asyncio.wait_for(r.readexactly(1000), 5)
            assert head.startswith(b"HTTP/1.1 101") and echoed == b"x" * 1000
            assert read_lines(log_path) == [] or all(ln["status"] != 101 for ln in read_lines(log_path))
            w.close()  # the tunnel's line is written when it ends
            lines = await wait_lines(log_path, 4)
            by_path = {ln["path"]: ln for ln in lines}
            a = by_path["/a"]
            assert a["status"] == 200 and a["frontend"] == "web" and a["service"] == "sa" and a["backend"] == "b0"
            assert a["tls"] in ("TLSv1.2", "TLSv1.3") and a["bytes"] == ok[1]
            b = by_path["/b"]  # no route: the frontend answered itself
            assert b["status"] == 404 and b["frontend"] == "web" and b["service"] is None and b["backend"] is None
            assert b["bytes"] == nf[1] and b["tls"] is not None
            c = by_path["/c"]
            assert c["status"] == 308 and c["frontend"] == "web" and c["tls"] is None and c["bytes"] == moved[1]
            t = by_path["/ws"]
            assert t["status"] == 101 and t["service"] == "chat" and t["backend"] == "b0"
            assert t["bytes"] == len(head) + 1000 and t["tls"] is not None
        finally:
            await dp.stop()
            origin.close()
            ws.close()

    run(main())


def test_reopen_after_rename_and_off(tmp_path: Path) -> None:
    log_path = tmp_path / "access.log"

    async def main() -> None:
        origin = Origin("o1")
        dp = DataPlane("n1")
        try:
            port_o = await origin.start()
            await dp.start(snapshot(service("web", [("127.0.0.1", port_o)])))
            web = dp.bound_port("web")
            await http(web, b"GET /before HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")  # off: nothing
            dp.set_access_log(str(log_path))
            await http(web, b"GET /one HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            assert [ln["path"] for ln in await wait_lines(log_path, 1)] == ["/one"]
            log_path.rename(tmp_path / "access.log.1")  # logrotate, then SIGHUP: reopen
            dp.set_access_log(str(log_path))
            await http(web, b"GET /two HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            assert [ln["path"] for ln in await wait_lines(log_path, 1)] == ["/two"]
            assert [ln["path"] for ln in read_lines(tmp_path / "access.log.1")] == ["/one"]
            dp.set_access_log("")  # off again
            assert dp.access_log is None and dp.stats()["access_log"] is None
            await http(web, b"GET /three HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            await asyncio.sleep(0.5)
            assert [ln["path"] for ln in read_lines(log_path)] == ["/two"]
        finally:
            await dp.stop()
            origin.close()

    run(main())


def test_a_writer_that_cannot_write_drops_counted_and_never_stalls(tmp_path: Path) -> None:
    """A FIFO whose reader never reads: the writer thread blocks in write(2) once the pipe is
    full; the bounded hand-over fills and batches are dropped, while every request is
    answered. The drops show in /v1/dataplane's stats and as halb_access_log_dropped_total."""
    fifo = tmp_path / "access.fifo"
    os.mkfifo(fifo)
    reader_fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # held open, never read

    async def main() -> None:
        origin = Origin("o1")
        dp = DataPlane("n1")
        dp.set_access_log(str(fifo), 65536)
        try:
            port_o = await origin.start()
            await dp.start(snapshot(service("web", [("127.0.0.1", port_o)])))
            web = dp.bound_port("web")

            async def client() -> int:
                r, w = await asyncio.open_connection("127.0.0.1", web)
                ok = 0
                for _ in range(200):
                    w.write(b"GET /" + b"p" * 200 + b" HTTP/1.1\r\nHost: a\r\n\r\n")
                    head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)
                    n = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                    await r.readexactly(n)
                    ok += head.startswith(b"HTTP/1.1 200")
                w.close()
                return ok

            done = await asyncio.gather(*(client() for _ in range(10)))
            assert sum(done) == 2000
            await asyncio.sleep(0.5)  # the last hand-over
            st = dp.stats()["access_log"]
            assert st["dropped"] > 0 and st["queued_bytes"] <= 65536
            assert st["written"] + st["dropped"] + (st["lines"] - st["written"]) >= 2000 - 256
            from prometheus_client import generate_latest
            from prometheus_client.registry import CollectorRegistry

            from halb.metrics import NodeCollector

            class DataPlaneMetrics:  # the node's data-plane metrics over this real data plane
                def collect(self):  # type: ignore[no-untyped-def]
                    return NodeCollector(SimpleNamespace(node_id="n1", dataplane=dp)).capacity()

            registry = CollectorRegistry()
            registry.register(DataPlaneMetrics())
            text = generate_latest(registry).decode()
            assert f'halb_access_log_dropped_total{{node="n1"}} {float(st["dropped"])}' in text
        finally:
            os.close(reader_fd)  # the blocked write fails (EPIPE): the writer thread ends
            await dp.stop()
            origin.close()

    run(main())


def test_two_workers_both_log_and_sighup_reopens_both(tmp_path: Path) -> None:
    log_path = tmp_path / "access.log"
    with processes() as procs:
        origin = spawn_origin("o1")
        procs.append(origin)
        port = free_port()
        p = subprocess.Popen([sys.executable, "-m", "halb.dataplane.run", "--listen", f"127.0.0.1:{port}",
                              "--workers", "2", "--backend", f"o1=127.0.0.1:{origin.port}",
                              "--access-log", str(log_path)], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        try:
            assert p.stdout.readline().startswith(b"READY")  # type: ignore[union-attr]

            async def burst(tag: str) -> None:
                # new connections: SO_REUSEPORT spreads them over both processes
                await asyncio.gather(*(http(port, f"GET /{tag}/{i} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
                                                  .encode()) for i in range(60)))

            run(burst("a"))
            lines = run(wait_lines(log_path, 60))
            pids = {ln["request_id"].split("-")[1][:-6] for ln in lines}  # the rid names the process
            assert len(lines) == 60 and len(pids) == 2, pids
            log_path.rename(tmp_path / "access.log.1")
            p.send_signal(signal.SIGHUP)
            time.sleep(0.5)  # the workers get it over their pipe
            run(burst("b"))
            lines = run(wait_lines(log_path, 60))
            assert len(lines) == 60 and all(ln["path"].startswith("/b/") for ln in lines)
            assert len({ln["request_id"].split("-")[1][:-6] for ln in lines}) == 2
            assert len(read_lines(tmp_path / "access.log.1")) == 60
        finally:
            p.terminate()
            p.wait(15)

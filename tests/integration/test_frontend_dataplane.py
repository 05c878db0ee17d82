"""A frontend inside one DataPlane (no cluster): requests of one keep-alive connection go
to different services by Host, each counted in its service's stats; the routed service's
options apply; a route to a service this node does not run is a 503; the plain port of a TLS frontend
redirects or serves the same routes; a TLS frontend takes
a deep accept queue through the burst path with TLS; a certificate swap serves new
handshakes while an open TLS connection keeps working."""
from __future__ import annotations

import asyncio
import json
import socket
import ssl
import threading

import pytest

from halb.certs.sealing import KeySealer
from halb.certs.tls import CertSet
from halb.dataplane.engine import DataPlane
from halb.dataplane.frontend_routes import FrontendRoute, RouteEntry
from halb.dataplane.origin import Origin
from halb.dataplane.testing import free_port, run, service, snapshot
from tests.certs_util import make_ca, make_leaf

pytestmark = pytest.mark.timeout(90)
SEALER = KeySealer("frontend-dataplane-test-secret")


def record(ca, leaf, name: str, sans: list[str], at: float = 1.0) -> dict:
    return {"name": name, "chain": leaf.cert_pem + ca.cert_pem, "key_sealed": SEALER.seal(leaf.key_pem().encode(), name),
            "sans": sans, "not_after": 1e10, "at": at}


async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str,
                   path: str = "/", body: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    if body is None:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    else:
        writer.write(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return int(lines[0].split()[1]), headers, body


def test_one_connection_reaches_services_by_host_with_their_own_options() -> None:
    async def main() -> None:
        a, b = Origin("a"), Origin("b")
        dp = DataPlane("t")
        try:
            pa, pb = await a.start(), await b.start()
            await dp.start(snapshot(service("sa", [("127.0.0.1", pa)]),
                                    service("sb", [("127.0.0.1", pb)], max_body_bytes=10)))
            fe = FrontendRoute("web", "127.0.0.1", 0, routes=(RouteEntry("a.example", "/", "sa"),
                                                              RouteEntry("b.example", "/", "sb"),
                                                              RouteEntry("c.example", "/", "gone")))
            redirect_port = free_port()
            tls_port = free_port()
            secure = FrontendRoute("secure", "127.0.0.1", tls_port, tls=True, http_port=redirect_port,
                                   redirect_https=True)
            plain_port = free_port()
            both = FrontendRoute("both", "127.0.0.1", free_port(), tls=True, http_port=plain_port,
                                 routes=(RouteEntry("b.example", "/", "sb"),))
            dp.set_frontends((fe, secure, both))
            await asyncio.sleep(0.05)
            port = dp.frontends.bound_port("web")
            pr, pw = await asyncio.open_connection("127.0.0.1", plain_port)  # without redirect: the same routes
            assert (await exchange(pr, pw, "b.example"))[1]["x-backend"] == "b"
            pw.close()
            rr, rw = await asyncio.open_connection("127.0.0.1", redirect_port)
            status, headers, _ = await exchange(rr, rw, "Shop.Example:80", "/a/b?c=d")
            assert status == 308 and headers["location"] == f"https://shop.example:{tls_port}/a/b?c=d"
            # the hook for requests a node answers before routing or redirecting (ACME HTTP-01)
            dp.frontends.answer_first = lambda conn, ex: ex.url.startswith(b"/.well-known/acme-challenge/") and (
                conn.send_error(ex, 503, "challenge hook") or True)
            status, _, body = await exchange(rr, rw, "shop.example", "/.well-known/acme-challenge/t")
            assert status == 503 and b"challenge hook" in body
            assert (await exchange(rr, rw, "shop.example", "/x"))[0] == 308
            dp.frontends.answer_first = None
            status, _, body = await exchange(rr, rw, "<script>", "/")
            assert status == 400 and b"needs the request's Host" in body
            rw.close()
            r, w = await asyncio.open_connection("127.0.0.1", port)
            got = [(await exchange(r, w, h))[1]["x-backend"] for h in ("a.example", "b.example", "a.example")]
            assert got == ["a", "b", "a"]  # one keep-alive connection, two services
            status, _, body = await exchange(r, w, "c.example")
            assert status == 503 and b"not served on this node" in body
            status, _, body = await exchange(r, w, "nobody.example")
            assert status == 404 and json.loads(body)["error"] == "not_found"
            # sb's max_body_bytes applies to requests routed to it, not to sa's
            assert (await exchange(r, w, "a.example", "/", b"x" * 20))[0] == 200
            assert (await exchange(r, w, "b.example", "/", b"x" * 20))[0] == 413
            w.close()
            stats = dp.stats()
            assert stats["services"]["sa"]["requests"] == 3 and stats["services"]["sb"]["requests"] == 3
            assert stats["frontends"]["web/main"]["errors"] == 2  # the 404 and the 503 (no backend touched)
        finally:
            await dp.stop()
            a.close()
            b.close()

    run(main())


def test_frontend_without_routes_still_asks_the_hook_and_takes_routes_in_place() -> None:
    """A frontend with only a default service skips the route lookup (FrontendListener.only):
    the answer_first hook (ACME) still sees every request while set, and routes added by an
    update apply to the next request of an open connection, by Host and by path prefix."""
    async def main() -> None:
        a, b = Origin("a"), Origin("b")
        dp = DataPlane("t")
        try:
            pa, pb = await a.start(), await b.start()
            await dp.start(snapshot(service("sa", [("127.0.0.1", pa)]), service("sb", [("127.0.0.1", pb)])))
            fe = FrontendRoute("solo", "127.0.0.1", free_port(), default_service="sa")
            dp.set_frontends((fe,))
            await asyncio.sleep(0.05)
            r, w = await asyncio.open_connection("127.0.0.1", dp.frontends.bound_port("solo"))
            assert (await exchange(r, w, "b.example"))[1]["x-backend"] == "a"
            dp.frontends.answer_first = lambda conn, ex: ex.url.startswith(b"/.well-known/acme-challenge/") and (
                conn.send_error(ex, 503, "challenge hook") or True)
            status, _, body = await exchange(r, w, "b.example", "/.well-known/acme-challenge/t")
            assert status == 503 and b"challenge hook" in body
            assert (await exchange(r, w, "b.example", "/x"))[1]["x-backend"] == "a"
            dp.frontends.answer_first = None
            status, headers, _ = await exchange(r, w, "b.example", "/.well-known/acme-challenge/t")
            assert status == 200 and headers["x-backend"] == "a"
            routed = FrontendRoute("solo", "127.0.0.1", fe.port, default_service="sa",
                                   routes=(RouteEntry("b.example", "/api/", "sb"),))
            dp.set_frontends((routed,))
            got = [(await exchange(r, w, h, p))[1]["x-backend"]
                   for h, p in (("b.example", "/api/x"), ("b.example", "/api"), ("c.example", "/api/x"),
                                ("b.example", "/api/y"))]
            assert got == ["b", "a", "a", "b"]
            w.close()
        finally:
            await dp.stop()
            a.close()
            b.close()

    run(main())


def test_tls_burst_and_certificate_swap_without_dropping_connections() -> None:
    ca = make_ca()
    old, new = make_leaf(ca, ["shop.example"]), make_leaf(ca, ["shop.example"])

    async def main() -> None:
        a = Origin("a")
        dp = DataPlane("t")
        try:
            pa = await a.start()
            await dp.start(snapshot(service("sa", [("127.0.0.1", pa)])))
            certs = CertSet.build({"shop": record(ca, old, "shop", ["shop.example"])}, SEALER)
            fe = FrontendRoute("web", "127.0.0.1", 0, tls=True, default_service="sa")
            dp.set_frontends((fe,), certs)
            await asyncio.sleep(0.05)
            port = dp.frontends.bound_port("web")
            lst = dp.frontends.listeners[("web", "main")]
            client = ssl.create_default_context(cadata=ca.cert_pem)
            r, w = await asyncio.open_connection("127.0.0.1", port, ssl=client, server_hostname="shop.example")
            status, headers, body = await exchange(r, w, "shop.example", "/headers")
            assert status == 200 and ["X-Forwarded-Proto", "https"] in json.loads(body)

            # many handshakes queued while the loop is blocked: the burst acceptor takes them with TLS
            socks: list[socket.socket] = []
            t = threading.Thread(target=lambda: socks.extend(socket.create_connection(("127.0.0.1", port), 10)
                                                             for _ in range(60)))
            t.start()
            t.join()
            loop = asyncio.get_running_loop()

            async def one(s: socket.socket) -> int:
                rr, ww = await asyncio.open_connection(sock=s, ssl=client, server_hostname="shop.example")
                st = (await exchange(rr, ww, "shop.example"))[0]
                ww.close()
                return st

            assert await asyncio.gather(*(one(s) for s in socks)) == [200] * 60
            assert lst.burst is not None and lst.burst.accepted > 0

            # swap: the open connection keeps working, a new handshake gets the new certificate
            dp.set_frontends((fe,), CertSet.build({"shop": record(ca, new, "shop", ["shop.example"])}, SEALER))
            assert (await exchange(r, w, "shop.example"))[0] == 200
            r2, w2 = await asyncio.open_connection("127.0.0.1", port, ssl=client, server_hostname="shop.example")
            peer = w2.get_extra_info("ssl_object").getpeercert(binary_form=True)
            from cryptography.hazmat.primitives.serialization import Encoding

            assert peer == new.cert.public_bytes(Encoding.DER)
            assert (await exchange(r2, w2, "shop.example"))[0] == 200
            w.close()
            w2.close()
            del loop
        finally:
            await dp.stop()
            a.close()

    run(main())

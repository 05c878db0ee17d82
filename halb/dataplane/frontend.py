"""Frontends: one port, plain or TLS, whose requests pick their service by Host and path.

A frontend listener is an ordinary HTTP listener (listeners.Listener, the same
HttpClientConn parsing, limits and proxying) with two differences, both outside the
per-service hot path:

- `FrontendConn.start` first picks the service (frontend_routes.RouteTable.pick, inlined;
  a frontend without routes takes its default with one attribute read) and then runs
  the unchanged `HttpClientConn.start` with that service's runtime: the service's own
  timeouts, retries, body limit, capacity limits and algorithm apply per request.
  `HttpClientConn.start` reads `self.listener.rt` once, at its entry, so the frontend
  points its (shared) listener's `rt` at the routed service for exactly that synchronous
  call and puts it back after (asyncio runs one callback at a time). Per-service
  listeners never run this code: their lookup costs nothing. (Passing the runtime as an
  argument instead saved the frontend ~120 instructions but cost every per-service
  request ~40: not done.)
- The connection itself belongs to the frontend's own runtime (`frontend:NAME`, a service
  without backends, default options): max_connections, header limits and header_timeout
  while a head is parsed, idle_timeout between requests; connections and 404s are counted
  there.

No route and no default service: a JSON 404 like the data plane's other local errors. A
route to a service this node does not run (not built here, see local issues): 503.

TLS: the listener's ssl.SSLContext comes from halb/certs/tls.server_context; its SNI
callback reads `FrontendListeners.certs`, which the node swaps when the replicated
certificates change (new handshakes use the new set, open connections keep theirs).
`http_port` serves the same routes in plain HTTP, or with `redirect_https` answers 308 to
https://HOST[:port]/path.

Frontends run in the node process only (not in `workers` > 1 processes: those would need
the decrypted keys); decided for simplicity, see docs/dataplane.md.
"""
from __future__ import annotations

import logging
import re
from typing import Any, Callable

from halb.certs.tls import CertSet, server_context
from halb.dataplane.frontend_routes import FrontendRoute, RouteTable
from halb.dataplane.http_proxy import XFF, Exchange, HttpClientConn
from halb.dataplane.listeners import Listener, listen_socket
from halb.dataplane.proxy_protocol import gate_for
from halb.dataplane.routing import ServiceRuntime
from halb.dataplane.snapshot import ServiceRoute
from halb.frontend_rules import HOST_RE, request_host

log = logging.getLogger(__name__)

XFF_TAIL_HTTPS = b"\r\nX-Forwarded-Proto: https\r\nX-Request-Id: "
IPV6_HOST = re.compile(rb"\[[0-9a-f:.]+\]")
# A request a node answers itself before routing (or redirecting), e.g. an ACME HTTP-01
# challenge: called with (connection, exchange); True means it answered (conn.send_error /
# conn._w + conn.finish). None (the default) costs nothing on a frontend without routes
# (FrontendListener.only) and one attribute read per request on one with routes.
AnswerFirst = Callable[[HttpClientConn, Exchange], bool]
_service_start = HttpClientConn.start  # the per-service start, run once a frontend request is routed


class FrontendListener(Listener):
    """A frontend's bound port: the Listener plus its route table and role."""

    table: RouteTable
    fe: FrontendRoute
    redirect: bool
    own: ServiceRuntime  # the frontend's runtime (`rt` points at a routed service during start)
    services: dict[str, Listener]  # the engine's per-service listeners (their runtimes), by name
    answer_first: "AnswerFirst | None"  # FrontendListeners.answer_first, copied here
    only: str | None  # read first per request: table.only while answer_first is None, else None

    def setup(self, fe: FrontendRoute, table: RouteTable, redirect: bool) -> "FrontendListener":
        self.fe, self.table, self.redirect = fe, table, redirect
        self.frontend = fe.name
        if not hasattr(self, "own"):
            self.own, self.services = self.rt, self.engine.listeners
        self.set_answer_first(self.engine.frontends.answer_first)
        return self

    def set_answer_first(self, hook: "AnswerFirst | None") -> None:
        """The hook, and `only`: a frontend without routes answers every request from its
        default service with one attribute read, unless a hook must see the request first."""
        self.answer_first = hook
        self.only = self.table.only if hook is None else None


def _header(hdrs: bytes, name: bytes) -> bytes | None:
    """The value of header `name` (lowercase) in forwarded header lines, or None."""
    for line in hdrs.split(b"\r\n"):
        k, sep, v = line.partition(b":")
        if sep and k.strip().lower() == name:
            return v.strip()
    return None


class FrontendConn(HttpClientConn):
    """A client connection of a frontend: route each request, then proxy it as usual."""

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        if self.listener.ssl is not None:  # type: ignore[attr-defined]
            self.xff_head = XFF + self.peer + XFF_TAIL_HTTPS

    def start(self, ex: Exchange) -> None:
        """Route, then the per-service start with the routed runtime. RouteTable.pick
        inlined (one call less per request): the memo of this Host holds its service, or
        the candidates whose first matching prefix decides; a frontend without routes skips
        even that (`only`). Subscripts, not dict.get (a method call each):
        docs/benchmarks.md, "Frontends"."""
        lst: FrontendListener = self.listener  # type: ignore[assignment]
        name = lst.only  # None also while answer_first is set: it runs first
        if name is None:
            if lst.answer_first is not None and lst.answer_first(self, ex):
                return
            table = lst.table
            try:
                name, cands = table.cache[ex.host]
            except KeyError:
                name, cands = table.remember(ex.host)
            if name is None:  # the path decides
                url = ex.url
                for prefix, service in cands:
                    if prefix is None or url.startswith(prefix):
                        name = service
                        break
        try:
            rt: ServiceRuntime = lst.services[name].rt  # type: ignore[index]
        except KeyError:  # no route and no default (None), or a service not run here
            self.local_answer(ex, lst.own, name)
            return
        if rt.hash_header is not None and ex.hash_value is None:  # parsed with the frontend's (no) hash header
            ex.hash_value = _header(ex.hdrs, rt.hash_header)
        if self.parsing is ex:  # its body is still to come (llhttp path): the service's body limit
            h: Any = self.head
            h.max_body = rt.opts.max_body_bytes
            h.opts = None  # the next request re-reads the frontend's limits
        lst.rt = rt  # HttpClientConn.start reads self.listener.rt once, at its entry
        try:
            _service_start(self, ex)
        finally:
            lst.rt = lst.own

    def local_answer(self, ex: Exchange, own: ServiceRuntime, name: str | None) -> None:
        ex.rt, ex.opts = own, own.opts
        self.cur = ex
        if name is None:
            host = (request_host(ex.host) or b"").decode("latin-1")
            self.send_error(ex, 404, f"no route of frontend {self.listener.fe.name} matches host "  # type: ignore[attr-defined]
                                     f"{host!r} path {ex.url.split(b'?')[0].decode('latin-1')[:200]!r} "
                                     "and it has no default service")
        else:
            self.send_error(ex, 503, f"service {name} is not served on this node", retry_after=own.retry_after())


class RedirectConn(HttpClientConn):
    """The plain http_port of a TLS frontend with redirect_https: 308 to the TLS port."""

    def start(self, ex: Exchange) -> None:
        lst: FrontendListener = self.listener  # type: ignore[assignment]
        own = lst.own
        own.requests += 1
        if lst.answer_first is not None and lst.answer_first(self, ex):
            return
        ex.rt, ex.opts = own, own.opts
        self.cur = ex
        host = request_host(ex.host)
        if host is None or not (HOST_RE.fullmatch(host.decode("latin-1")) or IPV6_HOST.fullmatch(host)):
            self.send_error(ex, 400, "a redirect to HTTPS needs the request's Host (a host name or address)")
            return
        port = lst.fe.port
        location = b"https://" + host + (b":%d" % port if port != 443 else b"") + ex.url
        rid = ex.rid or self.engine.new_request_id()
        close = not ex.keep_alive or not ex.body_done
        head = [b"HTTP/1.1 308 Permanent Redirect\r\nLocation: ", location, b"\r\nContent-Length: 0\r\n"
                b"X-Request-Id: ", rid, b"\r\n"]
        if close:
            head.append(b"Connection: close\r\n")
        head.append(b"\r\n")
        ex.response_started = True
        ex.close_after = close
        out = b"".join(head)
        ex.status, ex.head_out = 308, out
        self._w(out)
        self.finish(ex)


def frontend_runtime(fe: FrontendRoute, engine: Any) -> ServiceRuntime:
    """The frontend's own runtime: connection limits and counters, no backends."""
    route = ServiceRoute(name=f"frontend:{fe.name}", mode="http", listen_host=fe.listen_host, listen_port=fe.port)
    return ServiceRuntime(route, hook=engine._hook, initial=True, slot=engine.slot)


class FrontendListeners:
    """Every frontend of one DataPlane: bind, re-route in place, swap certificates, retire."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.routes: dict[str, FrontendRoute] = {}
        self.listeners: dict[tuple[str, str], FrontendListener] = {}  # (frontend, "main"|"http") -> listener
        self.errors: dict[str, str] = {}  # frontend name -> why it is not (fully) bound
        self.certs = CertSet()
        self.contexts: dict[str, Any] = {}  # frontend name -> its listening ssl.SSLContext
        self._answer_first: AnswerFirst | None = None  # hook for requests answered before routing

    @property
    def answer_first(self) -> AnswerFirst | None:
        return self._answer_first

    @answer_first.setter
    def answer_first(self, hook: AnswerFirst | None) -> None:
        self._answer_first = hook
        for lst in self.listeners.values():
            lst.set_answer_first(hook)

    def set_certs(self, certs: CertSet) -> None:
        self.certs = certs  # read by every TLS frontend's SNI callback at the next handshake

    def update(self, frontends: tuple[FrontendRoute, ...]) -> None:
        """Make the bound frontends match `frontends`; each one isolated from the others."""
        wanted: set[tuple[str, str]] = set()
        new_routes: dict[str, FrontendRoute] = {}
        self.errors = {}  # a port that did not bind is tried again at every update
        for fe in frontends:
            new_routes[fe.name] = fe
            try:
                table = RouteTable.build(fe.routes, fe.default_service)
                self._sync(fe, "main", fe.port, fe.tls, table, False, wanted)
                if fe.http_port:
                    self._sync(fe, "http", fe.http_port, False, table, fe.redirect_https, wanted)
            except Exception as exc:  # isolate: one frontend must not stop the others
                log.exception("frontend %s: cannot apply it; the others are applied", fe.name)
                self.errors[fe.name] = f"cannot apply frontend: {type(exc).__name__}: {exc}"
        for key in [k for k in self.listeners if k not in wanted]:
            self.engine._retire(self.listeners.pop(key))
        for name in [n for n in self.contexts if n not in new_routes]:
            del self.contexts[name]
        self.routes = new_routes

    def _sync(self, fe: FrontendRoute, role: str, port: int, tls: bool, table: RouteTable, redirect: bool,
              wanted: set[tuple[str, str]]) -> None:
        key = (fe.name, role)
        wanted.add(key)
        lkey = ("https" if tls else "http", fe.listen_host, port)
        lst = self.listeners.get(key)
        if lst is not None and lst.key == lkey and lst.redirect == redirect and lst.fe.accept_proxy == fe.accept_proxy:
            lst.setup(fe, table, redirect)  # routes and default change in place: next request sees them
            return
        if lst is not None:
            self.engine._retire(self.listeners.pop(key))
        try:
            sock = listen_socket(fe.listen_host, port)  # handed over by a replaced process, or new
        except OSError as e:
            log.error("frontend %s: cannot listen on %s:%s: %s", fe.name, fe.listen_host, port, e)
            where = f"{fe.listen_host}:{port}"
            self.errors[fe.name] = "; ".join(filter(None, (self.errors.get(fe.name), f"cannot listen on {where}: {e}")))
            return
        lst = FrontendListener(engine=self.engine, rt=frontend_runtime(fe, self.engine), key=lkey, sock=sock,
                               port=sock.getsockname()[1]).setup(fe, table, redirect)
        if tls:
            lst.ssl = self._context(fe.name)
        if fe.accept_proxy:  # the gate reads the header before anything else (TLS included)
            lst.proxy_gate = gate_for(lst)
        self.listeners[key] = lst
        conn = RedirectConn if redirect else FrontendConn
        if self.engine.loop is not None:
            self.engine.loop.create_task(lst.serve(lambda: conn(lst)))

    def _context(self, name: str) -> Any:
        ctx = self.contexts.get(name)
        if ctx is None:
            def default_cert() -> str:
                fe = self.routes.get(name)
                return fe.default_cert if fe is not None else ""

            ctx = self.contexts[name] = server_context(lambda: self.certs, default_cert)
        return ctx

    def bound_port(self, name: str, role: str = "main") -> int:
        return self.listeners[(name, role)].port

    def stats(self) -> dict[str, Any]:
        return {f"{name}/{role}": {"connections": lst.own.connections, "errors": lst.own.errors,
                                   "rejected": lst.own.rejected, "redirects": lst.own.requests}
                for (name, role), lst in sorted(self.listeners.items())}

    def close(self) -> None:
        for lst in self.listeners.values():
            lst.close()
        self.listeners.clear()


__all__ = ["FrontendConn", "FrontendListeners", "RedirectConn"]

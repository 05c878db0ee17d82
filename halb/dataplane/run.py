"""Run a DataPlane alone, without a node: for benchmarks, tests that need the proxy in its
own process (RSS, SIGKILL), and operators trying the data plane.

  python -m halb.dataplane.run --listen 127.0.0.1:8080 --mode http \
      --backend a=127.0.0.1:9001 --backend b=127.0.0.1:9002 --option retries=2 --workers 1

or ``--snapshot FILE.json`` with ``{"version": 1, "services": [...]}`` in the shape of
RoutingSnapshot.to_wire. ``--tls-cert CHAIN.pem --tls-key KEY.pem`` (HTTP mode) serves
HTTPS instead: ``--listen`` becomes a TLS frontend whose default service is the (first)
service, with the context halb/certs/tls.py builds for every frontend (TLS 1.2+, the same
ciphers, ALPN http/1.1; ``--route-host H`` adds a Host route to it, as routed frontends do); the service itself then listens on an ephemeral port of the same
host. ``--frontend`` does the same in plain HTTP (a frontend without TLS: what routing
costs per request, measured without TLS). For `make bench` and tests: the node serves TLS
through the replicated certificate store instead. Prints ``READY <port>`` when serving; SIGTERM/SIGINT stop it
gracefully; ``--stats-interval S`` prints stats JSON lines to stderr.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import ssl
import sys
from typing import TYPE_CHECKING

import msgpack

from halb.aio import run
from halb.dataplane.engine import DataPlane
from halb.dataplane.fdlimit import raise_nofile
from halb.dataplane.snapshot import BackendRoute, RoutingSnapshot, ServiceRoute

if TYPE_CHECKING:
    from halb.certs.tls import CertSet

TLS_FRONTEND = "tls"  # the frontend --tls-cert makes


def tune_process() -> None:
    """Long-lived startup objects leave the collector's view; young collections get rarer.

    The proxy's per-request objects form no reference cycles, but every allocation still
    counts towards collections that scan all tracked objects: ~10 % of request CPU.
    """
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(20000, 20, 50)
    tune_malloc()


def tune_malloc() -> None:
    """Keep freed read buffers in the heap instead of returning them to the kernel.

    uvloop hands each read (up to 256 KiB) over as a new bytes object; with glibc's
    defaults every other one grew and trimmed the heap (brk) and touched fresh, zeroed
    pages: measurable on bulk transfers. A 4 MiB mmap threshold and 64 MiB trim threshold
    keep those pages in use; peak RSS is unchanged, it is just not given back at once.
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.mallopt(-1, 64 * 1024 * 1024)  # M_TRIM_THRESHOLD
        libc.mallopt(-3, 4 * 1024 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc
        pass


def _parse_value(v: str) -> object:
    for conv in (int, float):
        try:
            return conv(v)
        except ValueError:
            pass
    return v


def build_snapshot(args: argparse.Namespace) -> RoutingSnapshot:
    if args.snapshot:
        with open(args.snapshot, "rb") as f:
            return RoutingSnapshot.from_wire(msgpack.packb(json.load(f)))
    host, _, port = args.listen.rpartition(":")
    if args.tls_cert or args.frontend:  # --listen is the frontend's port; the service takes any free one
        port = "0"
    backends = []
    for i, spec in enumerate(args.backend):
        name, _, addr = spec.rpartition("=")
        bh, _, bp = addr.rpartition(":")
        backends.append(BackendRoute(name=name or f"b{i}", host=bh, port=int(bp), weight=1, server=name or f"s{i}"))
    opts = tuple(sorted((k, _parse_value(v)) for k, _, v in (o.partition("=") for o in args.option)))
    svc = ServiceRoute(name=args.name, mode=args.mode, listen_host=host, listen_port=int(port),
                       algorithm=args.algorithm, hash_key=args.hash_key, backends=tuple(backends), options=opts)
    return RoutingSnapshot(version=1, services=(svc,))


def load_tls(cert_file: str, key_file: str) -> "CertSet":
    """One certificate, loaded as the node loads a replicated one (certs/tls.load_context);
    a file that cannot be read or a key that does not fit exits with the reason."""
    from cryptography import x509

    from halb.certs.tls import CertSet, SniIndex, load_context

    try:
        chain = open(cert_file).read()
        key = open(key_file, "rb").read()
        ctx = load_context(chain, key)
        leaf = x509.load_pem_x509_certificate(chain.encode())
    except (OSError, ValueError, ssl.SSLError) as exc:
        raise SystemExit(f"--tls-cert/--tls-key: cannot load {cert_file} with {key_file}: {exc}") from None
    try:
        sans = [str(n) for n in leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                .get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        sans = []
    # one certificate: it is also the default, so every SNI name (or none) gets it
    return CertSet({TLS_FRONTEND: ctx}, SniIndex.build({TLS_FRONTEND: {"sans": sans, "at": 0}}))


async def start_frontend(dp: DataPlane, args: argparse.Namespace, service: str) -> int:
    """The frontend on --listen (TLS with --tls-cert, else plain), routing everything to
    `service`; its bound port."""
    from halb.certs.tls import CertSet
    from halb.dataplane.frontend_routes import FrontendRoute, RouteEntry

    host, _, port = args.listen.rpartition(":")
    tls = bool(args.tls_cert)
    routes = tuple(RouteEntry(host=h, path_prefix="/", service=service) for h in args.route_host)
    fe = FrontendRoute(name=TLS_FRONTEND, listen_host=host, port=int(port), tls=tls, default_service=service,
                       routes=routes)
    dp.set_frontends((fe,), load_tls(args.tls_cert, args.tls_key) if tls else CertSet())
    if TLS_FRONTEND in dp.frontends.errors:
        raise SystemExit(dp.frontends.errors[TLS_FRONTEND])
    lst = dp.frontends.listeners[(TLS_FRONTEND, "main")]
    for _ in range(200):  # the frontend's server starts in a task: READY only once it accepts
        if lst.server is not None:
            break
        await asyncio.sleep(0.01)
    return lst.port


async def _main(args: argparse.Namespace) -> None:
    raise_nofile("data plane")
    dp = DataPlane("run", workers=args.workers)
    if args.access_log:
        dp.set_access_log(args.access_log)
    snap = build_snapshot(args)
    await dp.start(snap)
    if args.tls_cert or args.frontend:
        ports = [await start_frontend(dp, args, snap.services[0].name)]
    else:
        ports = [dp.bound_port(s.name) for s in snap.services if s.name in dp.listeners]
    tune_process()
    print("READY " + " ".join(str(p) for p in ports), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if args.access_log:  # logrotate: reopen
        loop.add_signal_handler(signal.SIGHUP, lambda: dp.set_access_log(args.access_log))
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), args.stats_interval or 3600)
        except asyncio.TimeoutError:
            if args.stats_interval:
                stats = dp.stats()
                if args.tls_cert:  # TLS handshakes and session resumptions (OpenSSL's counters)
                    stats["tls"] = dp.frontends.contexts[TLS_FRONTEND].session_stats()
                print(json.dumps(stats), file=sys.stderr, flush=True)
    await dp.stop()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--snapshot")
    ap.add_argument("--name", default="svc")
    ap.add_argument("--listen", default="127.0.0.1:0")
    ap.add_argument("--mode", default="http", choices=["http", "tcp"])
    ap.add_argument("--algorithm", default="round_robin")
    ap.add_argument("--hash-key", default="source")
    ap.add_argument("--backend", action="append", default=[])
    ap.add_argument("--option", action="append", default=[])
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--no-uvloop", action="store_true")
    ap.add_argument("--stats-interval", type=float, default=0.0)
    ap.add_argument("--tls-cert", default="", help="PEM chain: serve --listen as a TLS frontend (needs --tls-key)")
    ap.add_argument("--tls-key", default="", help="PEM private key of --tls-cert")
    ap.add_argument("--frontend", action="store_true",
                    help="serve --listen as a plain HTTP frontend routing to the service (like --tls-cert, no TLS)")
    ap.add_argument("--route-host", action="append", default=[],
                    help="with --frontend/--tls-cert: a Host route to the service (the lookup a routed frontend makes)")
    ap.add_argument("--access-log", default="", help="JSON lines access log file (SIGHUP reopens it)")
    args = ap.parse_args(argv)
    if bool(args.tls_cert) != bool(args.tls_key):
        ap.error("--tls-cert and --tls-key go together")
    if (args.tls_cert or args.frontend) and (args.mode != "http" or args.workers != 1):
        ap.error("--tls-cert/--frontend serve an HTTP frontend in this process: --mode http and --workers 1 only")
    logging.basicConfig(level=os.environ.get("HALB_LOG", "WARNING"), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run(_main(args), use_uvloop=not args.no_uvloop)


if __name__ == "__main__":
    main(sys.argv[1:])

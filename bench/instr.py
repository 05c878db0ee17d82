"""Instructions per request of halb's HTTP path, counted by valgrind (callgrind).

Wall-clock req/s and CPU time on a shared 2-core machine move by 10-20 % from run to run;
user-space instructions per request move by ~1-2 %, so this is the number to compare when
changing the hot path (kernel time is not counted: both proxies make the same syscalls).

    .venv/bin/python bench/instr.py [--requests-seconds 10] [--path /] [--origin-port P]
        [--mode tcp] [--close] [--tls] [--frontend] [--route-host H] [--tree DIR] [--access-log]

`--close` sends `Connection: close` (a new connection per request: with `--mode tcp` this
counts what TCP mode spends per proxied connection); `--tls` serves HTTPS (bench/tls.py's
certificate, `--tls-cert`: a TLS frontend) and drives it with `https://`; `--frontend`
serves the same frontend in plain HTTP (`--frontend` of halb.dataplane.run: what a frontend
costs over the service's own listener, without TLS); `--route-host 127.0.0.1` gives either
frontend a Host route that wrk's requests match (else they take the default service); `--tree` runs the halb found in DIR
(e.g. a `git archive` of an older commit) for before/after comparisons; `--access-log` runs
it with the access log on (docs/dataplane.md#access-log).

Starts an nginx origin (or uses --origin-port), runs `python -m halb.dataplane.run` under
callgrind with instrumentation off during start-up, warms up, zeroes the counters, drives
it with wrk (10 connections) and divides the instructions by wrk's request count. Prints
the callgrind file for `callgrind_annotate`. Needs valgrind, wrk and nginx.
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from run import NGINX_CONF, free_port, tool, wait_port  # noqa: E402
from tls import halb_tls_args, make_cert  # noqa: E402


def handshake_instructions(dump: str) -> int:
    """Inclusive instructions of the TLS handshakes (OpenSSL handshake, SNI callback): uvloop's
    handshake step, or CPython's do_handshake (halb's own TLS stream, tls_stream.py)."""
    out = subprocess.run(["callgrind_annotate", "--inclusive=yes", dump], capture_output=True, text=True).stdout
    for marker in ("SSLProtocol__do_handshake", "_ssl__SSLSocket_do_handshake"):
        for line in out.splitlines():
            if marker in line:
                return int(line.split()[0].replace(",", ""))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests-seconds", type=int, default=10)
    ap.add_argument("--path", default="/")
    ap.add_argument("--origin-port", type=int, default=0)
    ap.add_argument("--keep", action="store_true", help="keep the callgrind output file")
    ap.add_argument("--mode", choices=["http", "tcp"], default="http")
    ap.add_argument("--close", action="store_true", help="wrk -H 'Connection: close'")
    ap.add_argument("--tls", action="store_true", help="HTTPS: halb terminates TLS (a TLS frontend)")
    ap.add_argument("--frontend", action="store_true", help="plain HTTP through a frontend (no TLS)")
    ap.add_argument("--route-host", action="append", default=[], help="a Host route on the frontend")
    ap.add_argument("--tree", default=str(ROOT), help="directory whose halb package runs")
    ap.add_argument("--access-log", action="store_true", help="with the access log on (a file in a temp dir)")
    args = ap.parse_args()
    for b in ("valgrind", "callgrind_control", "wrk"):
        if shutil.which(b) is None:
            print(f"SKIP: {b} not installed")
            return 0
    tmp = Path(tempfile.mkdtemp(prefix="halb-instr-"))
    tmp.chmod(0o755)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        origin = args.origin_port
        if not origin:
            origin = free_port()
            (tmp / "big.bin").write_bytes(os.urandom(1 << 20))
            (tmp / "big.bin").chmod(0o644)
            (tmp / "nginx.conf").write_text(NGINX_CONF.format(dir=tmp, port=origin))
            procs.append(subprocess.Popen([tool("nginx"), "-c", str(tmp / "nginx.conf")],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_port(origin)
        port = free_port()
        out = str(tmp / "cg.%p")
        p = subprocess.Popen(["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
                              sys.executable, "-m", "halb.dataplane.run", "--listen", f"127.0.0.1:{port}",
                              "--mode", args.mode, "--backend", f"origin=127.0.0.1:{origin}",
                              *halb_tls_args(make_cert(tmp) if args.tls else None),
                              *(["--frontend"] if args.frontend and not args.tls else []),
                              *[a for h in args.route_host for a in ("--route-host", h)],
                              *(["--access-log", str(tmp / "access.log")] if args.access_log else [])],
                             cwd=args.tree, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        procs.append(p)
        assert p.stdout is not None
        p.stdout.readline()  # READY

        def ctl(*a: str) -> None:
            subprocess.run(["callgrind_control", *a, str(p.pid)], capture_output=True)

        url = f"{'https' if args.tls else 'http'}://127.0.0.1:{port}{args.path}"
        hdr = ["-H", "Connection: close"] if args.close else []
        ctl("-i", "on")
        subprocess.run([tool("wrk"), "-t1", "-c10", "-d3s", *hdr, url], capture_output=True)
        ctl("-z")
        res = subprocess.run([tool("wrk"), "-t1", "-c10", f"-d{args.requests_seconds}s", *hdr, url],
                             capture_output=True, text=True).stdout
        n = int(re.search(r"(\d+) requests in", res).group(1))  # type: ignore[union-attr]
        ctl("-d")
        time.sleep(1)
        p.send_signal(signal.SIGTERM)
        p.wait(30)
        dumps = sorted(glob.glob(str(tmp / "cg.*.*")), key=os.path.getmtime)
        total = 0
        for line in open(dumps[0]):
            if line.startswith(("summary:", "totals:")):
                total = int(line.split()[1])
        print(f"requests {n}  instructions {total:,}  per request {total / max(n, 1):,.0f}")
        if args.tls and not args.close:  # wrk's connections handshake inside the window too
            hs = handshake_instructions(dumps[0])
            print(f"  TLS handshakes {hs:,} instructions; per request without them {(total - hs) / max(n, 1):,.0f}")
        if args.keep:
            keep = ROOT / "bench" / "callgrind.out"
            shutil.copy(dumps[0], keep)
            print(f"callgrind_annotate --inclusive=yes {keep}")
    finally:
        for q in reversed(procs):
            if q.poll() is None:
                q.terminate()
                try:
                    q.wait(10)
                except subprocess.TimeoutExpired:
                    q.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

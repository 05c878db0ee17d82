"""Benchmark halb's data plane against HAProxy on this machine; writes docs/benchmarks.md.

Setup (loopback only): each proxy is pinned to one core (taskset), wrk and the origin
(nginx from apt, or halb's built-in origin) share the other. Cases: small HTTP responses,
TCP mode (keep-alive, and a new connection per request), 1,000 keep-alive HTTP connections
(judged on errors), 1 MiB response bodies, and HTTPS (keep-alive, and a new TLS connection
per request) with both proxies serving the same ECDSA P-256 certificate (bench/tls.py). HAProxy is tuned as an operator would for each case
(keep-alive; for bulk: 64 KiB buffers and splice). halb runs `python -m halb.dataplane.run`
with every feature on as shipped (retries, outlier detection, budgets, request ids, ...).
Runs are interleaved (HAProxy, halb, HAProxy, ...) so background load hits both alike;
CPU time per request (utime+stime of the proxy process) is reported because on a shared
2-core machine req/s is partly bound by the load side.

    .venv/bin/python bench/run.py [--duration 8] [--runs 5] [--profile] [--no-install]
        [--only TEXT] [--no-strace] [--out FILE]
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TypeVar

from halb.system_packages import ensure_tools, find_tool

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tls import TLS_NOTE, TlsFiles, haproxy_tls, halb_tls_args, make_cert  # noqa: E402  (bench/tls.py)

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
BIG = 1024 * 1024
LLHTTP_ONLY = "halb, llhttp only"  # HALB_HTTP_ACCEL=0: the pure-Python head path
ACCESS_LOG_ON = "halb, access log on"  # the same build with [dataplane] access_log set (a file in the temp dir)
ASYNCIO_TCP = "halb, asyncio TCP"  # HALB_TCP_RELAY=python: TCP mode without the C relay
NOTES = ROOT / "bench" / "NOTES.md"  # the hand-written analysis appended to the report


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


def ensure_bench_tools(install: bool) -> list[str]:
    """Install haproxy, wrk, nginx with apt-get when missing; return what is still missing."""
    return ensure_tools({"haproxy": "haproxy", "wrk": "wrk", "nginx": "nginx-light"}, install)


def tool(name: str) -> str:
    return find_tool(name) or name


class Procs:
    """Every process the bench starts; all are stopped on exit, whatever happens."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, args: list[str], core: int | str | None, **kw: object) -> subprocess.Popen[bytes]:
        if core is not None and shutil.which("taskset"):
            args = ["taskset", "-c", str(core), *args]
        p = subprocess.Popen(args, stdin=subprocess.DEVNULL, **kw)  # type: ignore[call-overload]
        self.procs.append(p)
        return p

    def stop(self, p: subprocess.Popen[bytes]) -> None:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def stop_all(self) -> None:
        for p in reversed(self.procs):
            try:
                self.stop(p)
            except Exception:
                pass


def start_halb(procs: Procs, port: int, origin_port: int, core: int | str | None, *, mode: str = "http",
               workers: int = 1, env: dict[str, str] | None = None,
               tls: TlsFiles | None = None, extra: tuple[str, ...] = ()) -> subprocess.Popen[bytes]:
    """halb's standalone data plane in front of the origin, every feature on as shipped
    (with `tls`: --listen is a TLS frontend, as a node serves HTTPS)."""
    return procs.start([PY, "-m", "halb.dataplane.run", "--listen", f"127.0.0.1:{port}", "--mode", mode,
                        "--workers", str(workers), "--backend", f"origin=127.0.0.1:{origin_port}",
                        *halb_tls_args(tls), *extra], core,
                       stdout=subprocess.DEVNULL, cwd=str(ROOT), env=dict(os.environ, **(env or {})))


@dataclass
class Result:
    rps: float
    p50_ms: float
    p99_ms: float
    mib_s: float
    cpu_us_per_req: float
    requests: int
    user_us_per_req: float = 0.0
    sys_us_per_req: float = 0.0
    errors: int = 0  # wrk socket errors (connect, read, write, timeout) + non-2xx/3xx answers
    load: float = float("nan")  # 1-minute load average when the run started (the machine is shared)


@dataclass
class Case:
    name: str
    path: str
    conns: int
    mode: str  # http | tcp
    headers: tuple[str, ...] = ()  # extra wrk -H headers ("Connection: close": a connection per request)
    target: str = "rps"  # rps | mib_s | errors | tls: what the case is judged on
    scheme: str = "http"  # https: both proxies terminate TLS (bench/tls.py)
    llhttp: bool = False  # also run halb without the C head fast path
    asyncio_tcp: bool = False  # also run halb's TCP mode without the C relay
    access_log: bool = False  # also run halb with the access log on (judged against halb with it off)
    results: dict[str, list[Result]] = field(default_factory=dict)
    syscalls: dict[str, float] = field(default_factory=dict)  # per request, strace -c


def _ms(v: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s)", v)
    if not m:
        return float("nan")
    x = float(m.group(1))
    return {"us": x / 1000, "ms": x, "s": x * 1000}[m.group(2)]


def _mib(v: str) -> float:
    m = re.match(r"([\d.]+)([KMG]?B)", v)
    if not m:
        return float("nan")
    return float(m.group(1)) * {"B": 1 / 2**20, "KB": 1 / 1024, "MB": 1, "GB": 1024}[m.group(2)]


def cpu_ticks(pid: int) -> tuple[int, int]:
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return int(parts[11]), int(parts[12])  # utime, stime (fields 14, 15)


def run_wrk(port: int, case: Case, duration: int, core: int | str | None, pids: list[int],
            threads: int = 1) -> Result:
    url = f"{case.scheme}://127.0.0.1:{port}{case.path}"
    args = [tool("wrk"), f"-t{threads}", f"-c{case.conns}", f"-d{duration}s", "--latency"]
    for h in case.headers:
        args += ["-H", h]
    args.append(url)
    if core is not None and shutil.which("taskset"):
        args = ["taskset", "-c", str(core), *args]
    load = os.getloadavg()[0]
    c0 = [cpu_ticks(p) for p in pids]
    out = subprocess.run(args, capture_output=True, text=True, timeout=duration + 60).stdout
    c1 = [cpu_ticks(p) for p in pids]
    u = sum(b[0] - a[0] for a, b in zip(c0, c1))
    st = sum(b[1] - a[1] for a, b in zip(c0, c1))
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    n = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"\s50%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"\s99%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    mib = _mib(re.search(r"Transfer/sec:\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    hz = os.sysconf("SC_CLK_TCK")
    per = 1e6 / hz / max(n, 1)
    return Result(rps, p50, p99, mib, (u + st) * per, n, u * per, st * per, wrk_errors(out), load)


def wrk_errors(out: str) -> int:
    """Socket errors (connect, read, write, timeout) plus non-2xx/3xx responses."""
    n = 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        n += sum(int(x) for x in m.groups())
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        n += int(m.group(1))
    return n


T = TypeVar("T")


def strace_during(pid: int, args: list[str], work: Callable[[], T]) -> tuple[str, T]:
    """Attach `strace args` to `pid`, run `work` (the load), detach; strace's output and
    what `work` returned. Detaching with SIGINT makes strace write its summary (-c)."""
    with tempfile.NamedTemporaryFile(suffix=".strace", delete=False) as f:
        out = f.name
    st = subprocess.Popen(["strace", "-p", str(pid), "-o", out, *args],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.0)  # attached
        result = work()
    finally:
        st.send_signal(signal.SIGINT)
        try:
            st.wait(20)
        except subprocess.TimeoutExpired:
            st.kill()
            st.wait()
    try:
        return Path(out).read_text(), result
    finally:
        os.unlink(out)


def syscalls_per_request(pid: int, port: int, case: Case, core: int | str | None, seconds: int = 3) -> float:
    """System calls of the proxy process per request, counted by `strace -c` under load.

    strace slows the proxy, so only the count is used (it does not depend on speed, unlike
    req/s or CPU time on a shared machine). NaN when strace is missing or not permitted."""
    if shutil.which("strace") is None:
        return float("nan")
    text, r = strace_during(pid, ["-c", "-f"], lambda: run_wrk(port, case, seconds, core, []))
    try:
        total = [ln for ln in text.splitlines() if ln.rstrip().endswith("total")]
        calls = int(total[-1].split()[3]) if total else 0
    except (ValueError, IndexError):
        calls = 0
    return calls / r.requests if calls and r.requests else float("nan")


NGINX_CONF = """worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/nginx.err warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_requests 1000000;
  keepalive_timeout 300s;
  sendfile on;
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location = / {{ return 200 "hello world\\n"; }}
    location = /big {{ alias {dir}/big.bin; }}
  }}
}}
"""

HAPROXY_CONF = """global
  nbthread 1
  maxconn 4000
{tune}
defaults
  mode {mode}
  timeout connect 5s
  timeout client 60s
  timeout server 60s
{options}
frontend f
  bind 127.0.0.1:{port}
  default_backend b
backend b
  server origin 127.0.0.1:{origin}
"""


def haproxy_conf(mode: str, bulk: bool, port: int, origin: int, tls: TlsFiles | None = None) -> str:
    if mode == "tcp":
        opts, tune = "  option splice-auto\n", "  tune.bufsize 65536\n"
    elif bulk:
        opts = "  option http-keep-alive\n  option splice-auto\n"
        tune = "  tune.bufsize 65536\n  tune.maxrewrite 1024\n"
    else:
        opts, tune = "  option http-keep-alive\n", ""
    conf = HAPROXY_CONF.format(mode=mode, options=opts, tune=tune, port=port, origin=origin)
    return haproxy_tls(conf, tls) if tls is not None else conf


def versions() -> dict[str, str]:
    def first(cmd: list[str]) -> str:
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
            return (r.stdout or r.stderr).strip().splitlines()[0]
        except Exception:
            return "n/a"

    import httptools
    import uvloop

    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": f"{cpu} ({os.cpu_count()} cores)", "kernel": platform.release(),
        "python": platform.python_version(), "uvloop": uvloop.__version__, "httptools": httptools.__version__,
        "haproxy": first([tool("haproxy"), "-v"]), "nginx": first([tool("nginx"), "-v"]),
        "wrk": first([tool("wrk"), "--version"]),
        "halb HTTP head fast path": first([PY, "-c", "from halb.dataplane.http_proxy import accelerated as a; "
                                           "print('C extension (halb.dataplane._fasthttp)' if a() else "
                                           "'not built: llhttp only')"]),
        "halb TCP mode relay": first([PY, "-c", "from halb.dataplane.tcp_relay import available as a; "
                                      "print('C extension (halb.dataplane._tcprelay)' if a() else "
                                      "'not built: asyncio Protocols')"]),
        "halb TLS record calls": first([PY, "-c", "from halb.certs.tls import tls_direct as a; "
                                        "print('C extension (halb.certs._tlsdirect)' if a() else "
                                        "'not built: CPython ssl methods')"]),
        "halb TLS transport": first([PY, "-c", "from halb.dataplane import tls_stream as t; "
                                     "print(f'halb tls_stream, {t.core_in_use()} core' if t.enabled() else "
                                     "'uvloop SSLProtocol (HALB_TLS_STREAM=0)')"]),
    }


def profile_halb(pid: int, port: int, duration: int, core: int | None) -> str:
    spy = Path(sys.executable).parent / "py-spy"
    if not spy.exists():
        return "py-spy not installed (pip install py-spy) - no profile taken."
    with tempfile.NamedTemporaryFile(suffix=".txt", delete=False) as f:
        out = f.name
    args = [tool("wrk"), "-t1", "-c50", f"-d{duration + 2}s", f"http://127.0.0.1:{port}/"]
    if core is not None:
        args = ["taskset", "-c", str(core), *args]
    load = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1)
        subprocess.run([str(spy), "record", "-p", str(pid), "-d", str(duration), "-r", "250", "-f", "raw",
                        "-o", out, "--nonblocking"], capture_output=True, timeout=duration + 30)
    finally:
        load.wait(duration + 30)
    from collections import Counter

    selfc: Counter[str] = Counter()
    total = 0
    for line in open(out):
        stack, _, n = line.rstrip().rpartition(" ")
        if not stack:
            continue
        total += int(n)
        frame = stack.split(";")[-1]
        selfc[re.sub(r" \(.*/", " (", frame)] += int(n)
    os.unlink(out)
    rows = [f"| {100 * n / max(total, 1):.1f} % | `{f}` |" for f, n in selfc.most_common(12)]
    return "| self samples | frame |\n|---:|---|\n" + "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, default=8)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--profile", action="store_true", help="py-spy profile of halb under small-HTTP load")
    ap.add_argument("--no-install", action="store_true")
    ap.add_argument("--no-strace", action="store_true", help="skip the syscalls-per-request counts")
    ap.add_argument("--only", default="", help="run only the cases whose name contains one of these texts (separated by |)")
    ap.add_argument("--scaling", choices=["auto", "force", "off"], default="auto",
                    help="workers=2 vs workers=1: auto runs it on 4+ cores")
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    args = ap.parse_args()
    # SIGTERM/SIGHUP unwind like Ctrl-C, so the finally below stops nginx, HAProxy and halb
    # (a plain SIGTERM used to leave them running)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, _frame: sys.exit(128 + signum))

    missing = ensure_bench_tools(not args.no_install)
    if "haproxy" in missing or "wrk" in missing:
        print(f"SKIP: cannot run the benchmark, missing {', '.join(missing)} "
              "(install with apt-get as root, or run `apt-get install haproxy wrk nginx-light`).")
        return 0
    ncpu = os.cpu_count() or 1
    proxy_core, load_core = (0, 1) if ncpu >= 2 else (None, None)
    if ncpu < 2:
        print("note: fewer than 2 cores, running without pinning")

    procs = Procs()
    tmp = Path(tempfile.mkdtemp(prefix="halb-bench-"))
    tmp.chmod(0o755)  # nginx workers run as another user
    cases = [Case("small HTTP responses (12 B), 50 conns", "/", 50, "http", llhttp=True),
             Case("TCP mode, small HTTP responses, 50 conns", "/", 50, "tcp", asyncio_tcp=True),
             Case("TCP mode, new connection per request (Connection: close), 50 conns", "/", 50, "tcp",
                  headers=("Connection: close",), asyncio_tcp=True),
             Case("HTTP, 1,000 keep-alive connections", "/", 1000, "http", target="errors"),
             Case("1 MiB response bodies, 8 conns", "/big", 8, "http", target="mib_s"),
             # the access log's cost: the same build with it on vs off (target >= 0.9x req/s)
             Case("plain HTTP with access log, small responses, 50 conns", "/", 50, "http", target="access_log",
                  access_log=True)]
    # HTTPS: the same small responses through TLS termination (bench/tls.py)
    cases += [Case("HTTPS keep-alive, small responses, 50 conns", "/", 50, "http", target="tls", scheme="https"),
              Case("HTTPS, new TLS connection per request (Connection: close), 50 conns", "/", 50, "http",
                   headers=("Connection: close",), target="tls", scheme="https")]
    if args.only:
        wanted = [w.strip().lower() for w in args.only.split("|") if w.strip()]
        cases = [c for c in cases if any(w in c.name.lower() for w in wanted)]
    big_path = "/big"
    load_before = os.getloadavg()
    profile_md = ""
    tls_files = make_cert(tmp) if any(c.scheme == "https" for c in cases) else None
    try:
        # origin: nginx when available, else halb's built-in origin
        origin_port = free_port()
        if "nginx" not in missing:
            (tmp / "big.bin").write_bytes(os.urandom(BIG))
            (tmp / "big.bin").chmod(0o644)
            (tmp / "nginx.conf").write_text(NGINX_CONF.format(dir=tmp, port=origin_port))
            procs.start([tool("nginx"), "-c", str(tmp / "nginx.conf")], load_core)
            origin_name = "nginx"
        else:
            procs.start([PY, "-m", "halb.dataplane.origin", "--port", str(origin_port)], load_core,
                        stdout=subprocess.DEVNULL)
            big_path = f"/bytes/{BIG}"
            for c in cases:
                if c.path == "/big":
                    c.path = big_path
            origin_name = "halb built-in origin"
        wait_port(origin_port)
        check = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{size_download}",
                                f"http://127.0.0.1:{origin_port}{big_path}"], capture_output=True, text=True)
        if check.stdout.strip() != f"200 {BIG}":
            raise RuntimeError(f"origin does not serve the 1 MiB body: {check.stdout!r}")

        direct = run_wrk(origin_port, Case("direct", "/", 50, "http"), args.duration, load_core, [])
        for case in cases:
            print(f"== {case.name}", flush=True)
            bulk = case.path != "/"
            hap_port, halb_port = free_port(), free_port()
            tls = tls_files if case.scheme == "https" else None
            conf = tmp / f"haproxy-{case.mode}-{bulk}-{case.scheme}.cfg"
            conf.write_text(haproxy_conf(case.mode, bulk, hap_port, origin_port, tls))
            hap = procs.start([tool("haproxy"), "-f", str(conf), "-db"], proxy_core,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            halb = start_halb(procs, halb_port, origin_port, proxy_core, mode=case.mode, tls=tls)
            proxies = [("haproxy", hap_port, hap), ("halb", halb_port, halb)]
            if case.llhttp:
                # the same halb without the C head fast path: what a machine without a C
                # compiler gets (reported, not judged against the target)
                slow_port = free_port()
                slow = start_halb(procs, slow_port, origin_port, proxy_core, env={"HALB_HTTP_ACCEL": "0"})
                proxies.append((LLHTTP_ONLY, slow_port, slow))
            if case.asyncio_tcp:
                # TCP mode on asyncio Protocols: what a machine without the C relay gets
                aio_port = free_port()
                aio = start_halb(procs, aio_port, origin_port, proxy_core, mode="tcp",
                                 env={"HALB_TCP_RELAY": "python"})
                proxies.append((ASYNCIO_TCP, aio_port, aio))
            if case.access_log:
                al_port = free_port()
                al = start_halb(procs, al_port, origin_port, proxy_core, extra=("--access-log", str(tmp / "access.log")))
                proxies.append((ACCESS_LOG_ON, al_port, al))
            for _, port, _ in proxies:
                wait_port(port)
            for name, port, p in proxies:
                run_wrk(port, case, 2, load_core, [p.pid])  # warm-up
            for i in range(args.runs):
                for name, port, p in proxies:
                    r = run_wrk(port, case, args.duration, load_core, [p.pid])
                    case.results.setdefault(name, []).append(r)
                    print(f"  run {i + 1} {name:8s} {r.rps:9.0f} req/s  p50 {r.p50_ms:6.2f} ms  p99 {r.p99_ms:6.2f} ms"
                          f"  {r.mib_s:8.1f} MiB/s  {r.cpu_us_per_req:6.1f} us CPU/req"
                          f" (user {r.user_us_per_req:.1f} sys {r.sys_us_per_req:.1f})  errors {r.errors}", flush=True)
            if not bulk and not args.no_strace:
                for name, port, p in [x for x in proxies if x[0] != LLHTTP_ONLY]:
                    case.syscalls[name] = syscalls_per_request(p.pid, port, case, load_core)
                    print(f"  {name:8s} {case.syscalls[name]:.1f} syscalls/request", flush=True)
            if args.profile and case.llhttp:
                profile_md = profile_halb(halb.pid, halb_port, 5, load_core)
            for _, _, p in proxies:
                procs.stop(p)
        scaling = Scaling(note="not measured (--scaling off).")
        if args.scaling != "off":
            print("== worker scaling", flush=True)
            scaling = worker_scaling(procs, origin_port, args, ncpu)
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    load_after = os.getloadavg()
    write_report(Path(args.out), cases, direct, origin_name, versions(), args, load_before, load_after, profile_md,
                 scaling)
    print(f"wrote {args.out}")
    return 0


@dataclass
class Scaling:
    """`workers = 1` vs `workers = 2` on small HTTP responses (req/s per run)."""

    one: list[Result] = field(default_factory=list)
    two: list[Result] = field(default_factory=list)
    note: str = ""


def worker_scaling(procs: Procs, origin_port: int, args: argparse.Namespace, ncpu: int) -> Scaling:
    """halb with 1 and 2 data-plane workers, pinned to two cores, load on the others.

    Needs 4 cores (2 for the proxy, 2 for wrk and the origin) to mean anything; with
    --scaling force it runs on fewer (the code path is exercised, the ratio is not a result).
    """
    sc = Scaling()
    if ncpu < 4 and args.scaling != "force":
        sc.note = (f"not measured: this machine has {ncpu} cores; the comparison needs 2 for the proxy and "
                   "2 for wrk and the origin (run on a 4-core machine, or `--scaling force` to exercise it).")
        return sc
    proxy_cores = "0,1" if ncpu >= 2 else None
    load_cores = f"2-{ncpu - 1}" if ncpu >= 4 else None
    if ncpu < 4:
        sc.note = (f"**forced on {ncpu} cores: proxy, wrk and origin share them, so the ratio below says "
                   "nothing about scaling** (it only shows the measurement runs).")
    case = Case("small HTTP, 100 conns", "/", 100, "http")
    for workers, bucket in ((1, sc.one), (2, sc.two)):
        port = free_port()
        p = start_halb(procs, port, origin_port, proxy_cores, workers=workers)
        try:
            wait_port(port)
            time.sleep(1.0)  # workers > 1: let every worker bind its listener
            # req/s and latency only: the workers' CPU is not in the parent's /proc counters
            run_wrk(port, case, 2, load_cores, [], threads=2)  # warm-up
            for i in range(args.runs):
                r = run_wrk(port, case, args.duration, load_cores, [], threads=2)
                bucket.append(r)
                print(f"  workers={workers} run {i + 1} {r.rps:9.0f} req/s  p99 {r.p99_ms:6.2f} ms", flush=True)
        finally:
            procs.stop(p)
    return sc


def scaling_lines(sc: Scaling) -> list[str]:
    lines = ["## Worker scaling (`workers = 2` vs `workers = 1`)", ""]
    if sc.note:
        lines += [sc.note, ""]
    if sc.one and sc.two:
        r = med(sc.two, "rps") / med(sc.one, "rps")
        lines += ["| workers | req/s (median) | p99 ms | runs |", "|---:|---:|---:|---|",
                  f"| 1 | {med(sc.one, 'rps'):,.0f} | {med(sc.one, 'p99_ms'):.2f} | "
                  + ", ".join(f"{x.rps:,.0f}" for x in sc.one) + " |",
                  f"| 2 | {med(sc.two, 'rps'):,.0f} | {med(sc.two, 'p99_ms'):.2f} | "
                  + ", ".join(f"{x.rps:,.0f}" for x in sc.two) + " |", "",
                  f"2 workers / 1 worker: **{r:.2f}x** (target ≥ 1.8x where cores allow"
                  + (")." if not sc.note else "; not judged here).")]
    return lines + [""]


def med(rs: list[Result], attr: str) -> float:
    return statistics.median(getattr(r, attr) for r in rs)


def target_lines(cases: list[Case]) -> list[str]:
    """Each target: met or missed, with the medians it was judged on."""
    out = []
    for c in cases:
        h, b = c.results.get("haproxy", []), c.results.get("halb", [])
        if not h or not b:
            continue
        on = c.results.get(ACCESS_LOG_ON, [])
        if c.target == "access_log" and on:
            r = med(on, "rps") / med(b, "rps")
            cpu = med(on, "cpu_us_per_req") / med(b, "cpu_us_per_req")
            out.append(f"* {c.name}: req/s with the log on / off {r:.2f}x (target ≥ 0.9x): "
                       f"**{'met' if r >= 0.9 else 'missed'}**; CPU per request {cpu:.2f}x")
            continue
        if c.target == "mib_s":
            r = med(b, "mib_s") / med(h, "mib_s")
            out.append(f"* {c.name}: MiB/s {r:.2f}x (target ≥ 1.0x): **{'met' if r >= 1.0 else 'missed'}**")
        elif c.target == "errors":
            e, eh = sum(x.errors for x in b), sum(x.errors for x in h)
            r = med(b, "rps") / med(h, "rps")
            p = med(b, "p99_ms") / med(h, "p99_ms")
            out.append(f"* {c.name}: halb errors {e} over {len(b)} runs (target 0; HAProxy {eh}): "
                       f"**{'met' if e == 0 else 'missed'}**; req/s {r:.2f}x, p99 {p:.2f}x (reported, not judged)")
        elif c.target == "tls":
            r = med(b, "rps") / med(h, "rps")
            p = med(b, "p99_ms") / med(h, "p99_ms")
            out.append(f"* {c.name}: req/s {r:.2f}x (target ≥ 0.8x): **{'met' if r >= 0.8 else 'missed'}**; "
                       f"p99 {p:.2f}x (reported)")
        elif c.mode == "tcp":
            r = med(b, "rps") / med(h, "rps")
            out.append(f"* {c.name}: req/s {r:.2f}x (target ≥ 0.9x): **{'met' if r >= 0.9 else 'missed'}**")
        else:
            r = med(b, "rps") / med(h, "rps")
            p = med(b, "p99_ms") / med(h, "p99_ms")
            ok = r >= 0.8 and p <= 1.5
            out.append(f"* {c.name}: req/s {r:.2f}x (target ≥ 0.8x), p99 {p:.2f}x (target ≤ 1.5x): "
                       f"**{'met' if ok else 'missed'}**")
    return out


def per_request_lines(cases: list[Case]) -> list[str]:
    """CPU time and system calls per request: steadier than req/s on a busy machine."""
    rows = []
    for c in cases:
        h, b = c.results.get("haproxy", []), c.results.get("halb", [])
        if not h or not b:
            continue
        sh, sb = c.syscalls.get("haproxy", float("nan")), c.syscalls.get("halb", float("nan"))
        def n(v: float) -> str:
            return "–" if v != v else f"{v:.1f}"  # NaN: not counted (bulk case, or no strace)

        rows.append(f"| {c.name} | {med(h, 'cpu_us_per_req'):.1f} | {med(b, 'cpu_us_per_req'):.1f} | "
                    f"{med(b, 'cpu_us_per_req') / med(h, 'cpu_us_per_req'):.2f}x | {n(sh)} | {n(sb)} |")
        a = c.results.get(ASYNCIO_TCP, [])
        if a:  # the same case without the C relay, in the halb columns (not judged)
            rows.append(f"| {c.name}, {ASYNCIO_TCP} (not judged) | {med(h, 'cpu_us_per_req'):.1f} | "
                        f"{med(a, 'cpu_us_per_req'):.1f} | {med(a, 'cpu_us_per_req') / med(h, 'cpu_us_per_req'):.2f}x "
                        f"| {n(sh)} | {n(c.syscalls.get(ASYNCIO_TCP, float('nan')))} |")
    if not rows:
        return []
    return ["", "## Per request: CPU time and system calls", "",
            "With `Connection: close` a request is a connection, so these are per connection there. "
            "System calls are counted with `strace -c -f` on the proxy process over a separate 3 s load "
            "(strace slows the process; only the count is used).", "",
            "| case | HAProxy CPU µs | halb CPU µs | halb/HAProxy CPU | HAProxy syscalls | halb syscalls |",
            "|---|---:|---:|---:|---:|---:|", *rows]


def write_report(path: Path, cases: list[Case], direct: Result, origin: str, ver: dict[str, str],
                 args: argparse.Namespace, lb: tuple[float, ...], la: tuple[float, ...], profile_md: str,
                 scaling: Scaling) -> None:
    lines = ["# Benchmarks: halb data plane vs HAProxy", "",
             f"Generated by `make bench` (`bench/run.py`) on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
             "Each proxy pinned to core 0; wrk (1 thread) and the origin "
             f"({origin}, 1 worker) share core 1; loopback only. {args.runs} runs of {args.duration} s per "
             "proxy and case, interleaved; tables show medians (all runs below).", "",
             "| machine | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in ver.items()]
    lines += [f"| load average before / after | {lb[0]:.2f} / {la[0]:.2f} (other work on the machine skews req/s; "
              "CPU time per request is the steadier figure) |",
              f"| wrk → origin directly (load-side ceiling) | {direct.rps:,.0f} req/s, p99 {direct.p99_ms:.2f} ms |", "",
              "## Results (medians)", "",
              "| case | proxy | req/s | p50 ms | p99 ms | MiB/s | CPU µs/req (user + sys) | halb/HAProxy req/s "
              "(per-run range) | p99 ratio | CPU ratio |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in cases:
        h, b = c.results.get("haproxy", []), c.results.get("halb", [])
        if not h or not b:
            continue
        rows = [("HAProxy", h), ("halb", b)]
        for variant in (LLHTTP_ONLY, ASYNCIO_TCP):
            if c.results.get(variant):
                rows.append((f"{variant} (not judged)", c.results[variant]))
        if c.results.get(ACCESS_LOG_ON):  # judged against "halb" (targets below)
            rows.append((ACCESS_LOG_ON, c.results[ACCESS_LOG_ON]))
        for name, rs in rows:
            ratio = ""
            if name != "HAProxy":
                per_run = [x.rps / y.rps for x, y in zip(rs, h)]  # interleaved runs, paired
                bold = "**" if name == "halb" else ""
                ratio = (f"{bold}{med(rs, 'rps') / med(h, 'rps'):.2f}x{bold} ({min(per_run):.2f}-{max(per_run):.2f}) | "
                         f"{med(rs, 'p99_ms') / med(h, 'p99_ms'):.2f}x | "
                         f"{med(rs, 'cpu_us_per_req') / med(h, 'cpu_us_per_req'):.2f}x")
            else:
                ratio = " | | "
            lines.append(f"| {c.name} | {name} | {med(rs, 'rps'):,.0f} | {med(rs, 'p50_ms'):.2f} | "
                         f"{med(rs, 'p99_ms'):.2f} | {med(rs, 'mib_s'):,.1f} | {med(rs, 'cpu_us_per_req'):.1f} "
                         f"({med(rs, 'user_us_per_req'):.1f} + {med(rs, 'sys_us_per_req'):.1f}) | {ratio} |")
    bulk = [c for c in cases if c.path != "/"]
    if bulk and bulk[0].results.get("halb") and bulk[0].results.get("haproxy"):
        c = bulk[0]
        lines += ["", f"1 MiB bodies: halb/HAProxy MiB/s = **{med(c.results['halb'], 'mib_s') / med(c.results['haproxy'], 'mib_s'):.2f}x**."]
    lines += ["", "Targets (measured, not asserted): ≥ 0.8x HAProxy req/s in HTTP mode with p99 ≤ 1.5x, "
              "≥ 0.9x in TCP mode (also with a new connection per request), ≥ 1.0x MiB/s on 1 MiB bodies, "
              "0 errors with 1,000 keep-alive connections; HTTPS (keep-alive, and a new TLS connection per "
              "request) ≥ 0.8x HAProxy req/s; plain HTTP with the access log on ≥ 0.9x the same build with it "
              "off.", ""]
    lines += target_lines(cases)
    lines += [""] + scaling_lines(scaling)
    lines += per_request_lines(cases)
    lines += ["", "## All runs", "", "| case | proxy | run | req/s | p50 ms | p99 ms | MiB/s | CPU µs/req | user µs | sys µs "
              "| errors | load avg |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in cases:
        for name, rs in c.results.items():
            for i, r in enumerate(rs):
                lines.append(f"| {c.name} | {name} | {i + 1} | {r.rps:,.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | "
                             f"{r.mib_s:,.1f} | {r.cpu_us_per_req:.1f} | {r.user_us_per_req:.1f} | {r.sys_us_per_req:.1f} "
                             f"| {r.errors} | {r.load:.1f} |")
    lines += ["", "## Configuration", "",
              "* HAProxy: `nbthread 1`, keep-alive both sides; TCP and bulk cases add `tune.bufsize 65536` "
              "and `option splice-auto` (what an operator sets for bulk transfer).",
              "* halb: `python -m halb.dataplane.run` (uvloop, one process, every feature on with default "
              "options: retries + budget, passive outlier detection, request ids, X-Forwarded-*, limits and "
              "timeouts, smooth weighted round robin), with the C head fast path as `pip install` builds it; "
              f"\"{LLHTTP_ONLY}\" is the same with `HALB_HTTP_ACCEL=0`; TCP mode runs on the C relay "
              f"(`halb.dataplane._tcprelay`), \"{ASYNCIO_TCP}\" is the same with `HALB_TCP_RELAY=python`.",
              f"* \"{ACCESS_LOG_ON}\": the same halb with `--access-log FILE` (`[dataplane] access_log`): one JSON "
              "line per request to a file on the temp directory's disk (docs/dataplane.md#access-log).",
              "* nginx origin: 1 worker, `return 200` for the small case, `sendfile` for the 1 MiB file.",
              "* HTTPS cases: " + TLS_NOTE + ".", ""]
    if NOTES.exists():
        lines += [NOTES.read_text().rstrip(), ""]
    if profile_md:
        lines += ["### py-spy profile of halb (small HTTP, top self frames)", "", profile_md, ""]
    path.write_text("\n".join(lines) + "\n" + kept_section(path))


def kept_section(path: Path, begin: str = "<!-- control-plane:begin -->", end: str = "<!-- control-plane:end -->") -> str:
    """The control-plane section `make bench-control` writes into the same file (kept as is)."""
    old = path.read_text() if path.exists() else ""
    if begin not in old or end not in old:
        return ""
    return "\n" + old[old.index(begin):old.index(end) + len(end)] + "\n"


if __name__ == "__main__":
    sys.exit(main())

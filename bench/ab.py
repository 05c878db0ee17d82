"""A/B of two or more halb trees on one path: CPU per request, system calls, body buffers.

`bench/instr.py` answers "does the new code run more instructions?". When it says no, this
answers "then what else differs?" for the same trees, side by side on one nginx origin:

    .venv/bin/python bench/ab.py --commit a27afa4 --tree . [--path /big] [--rounds 8]

* every tree's `python -m halb.dataplane.run` runs at once, pinned to core 0 as in
  `make bench`; wrk (8 connections) and nginx share core 1;
* CPU µs per request (utime + stime of the proxy, /proc) over `--rounds` short wrk runs,
  interleaved tree by tree, so background load on the shared machine hits every tree alike
  (medians printed; on this machine single runs move by 10-20 %);
* `strace -c` system calls per request, and a short `strace -e raw=read,write` that buckets
  read/write sizes and prints the addresses of the body buffers (uvloop's receive buffer
  and the bytes object it hands over): same sizes and counts mean the same kernel work.

`--commit C` exports commit C with `git archive` to a temporary tree and builds its C
extensions in place (as `--tree` of instr.py expects). Wrap it in `flock
/work/wt/heavy.lock` on the shared machine.
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from run import NGINX_CONF, Procs, cpu_ticks, free_port, strace_during, tool, wait_port  # noqa: E402

PROXY_CORE, LOAD_CORE = "0", "1"


@dataclass
class Arm:
    """One tree under test and what was measured on it."""

    label: str
    tree: Path
    proc: subprocess.Popen[bytes] | None = None
    port: int = 0
    extra: tuple[str, ...] = ()  # more arguments for halb.dataplane.run (--access-log FILE)
    cpu: list[tuple[float, float]] = field(default_factory=list)  # (user, sys) µs per request
    faults: list[float] = field(default_factory=list)  # minor page faults per 1,000 requests


def minor_faults(pid: int) -> int:
    """Minor page faults of the whole process so far (its threads included): kernel time that
    no system call count shows, e.g. memory the allocator gave back and takes again."""
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[7])  # minflt (field 10)


def prepare_tree(commit: str, parent: Path) -> Path:
    """`git archive` of `commit` with its C extensions built in place. pyproject.toml is set
    aside for the build: older trees' metadata fails the venv's setuptools validation, and
    build_ext needs none of it."""
    out = parent / f"tree-{commit}"
    out.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
    meta = out / "pyproject.toml"
    meta.rename(out / "pyproject.toml.aside")
    try:
        r = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=out,
                           capture_output=True, text=True)
    finally:
        (out / "pyproject.toml.aside").rename(meta)
    if r.returncode != 0:
        raise SystemExit(f"building {commit}'s C extensions failed:\n{r.stderr[-2000:]}")
    return out


def wrk(port: int, path: str, conns: int, seconds: int) -> int:
    """Requests wrk completed (on the load core)."""
    out = subprocess.run(["taskset", "-c", LOAD_CORE, tool("wrk"), "-t1", f"-c{conns}", f"-d{seconds}s",
                          f"http://127.0.0.1:{port}{path}"], capture_output=True, text=True,
                         timeout=seconds + 60).stdout
    m = re.search(r"(\d+) requests in", out)
    if not m:
        raise RuntimeError(f"wrk gave no request count: {out[-500:]!r}")
    return int(m.group(1))


def syscall_report(arm: Arm, path: str, conns: int) -> list[str]:
    """System calls per request (strace -c), read/write size buckets and body buffer addresses."""
    assert arm.proc is not None
    lines = [f"== {arm.label}"]
    pid = arm.proc.pid
    text, n = strace_during(pid, ["-c", "-f"], lambda: wrk(arm.port, path, conns, 3))
    for ln in text.splitlines():
        m = re.match(r"\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)\s*$", ln)
        if m and int(m.group(1)) / n >= 0.01:
            lines.append(f"   {m.group(2):16s} {int(m.group(1)) / n:7.2f} per request")
    text, n = strace_during(pid, ["-e", "trace=read,write,writev", "-e", "raw=read,write,writev"],
                            lambda: wrk(arm.port, path, conns, 1))
    sizes: collections.Counter[tuple[str, int]] = collections.Counter()
    bufs: collections.Counter[tuple[str, int]] = collections.Counter()
    for ln in text.splitlines():
        m = re.match(r"(read|write|writev)\(0x[0-9a-f]+, 0x([0-9a-f]+), 0x([0-9a-f]+)\)\s+= 0x([0-9a-f]+)", ln)
        if not m:
            continue
        call, ret = m.group(1), int(m.group(4), 16)
        sizes[(call, 1 << max(ret - 1, 0).bit_length())] += 1
        if ret >= 65536 and call != "writev":
            bufs[(call, int(m.group(2), 16))] += 1
    for (call, size), c in sorted(sizes.items()):
        if c / n >= 0.05:
            lines.append(f"   {call:6s} returns <= {size:>7,} bytes {c / n:6.2f} per request")
    for (call, addr), c in bufs.most_common(4):
        lines.append(f"   {call} buffer {addr:#x} (mod 64: {addr % 64}, mod 4096: {addr % 4096}) {c / n:.2f} per request")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tree", action="append", default=[], help="a directory whose halb runs (repeatable)")
    ap.add_argument("--commit", action="append", default=[], help="a commit, exported and built (repeatable)")
    ap.add_argument("--path", default="/big", help="/big: the 1 MiB file, /: small responses")
    ap.add_argument("--conns", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--seconds", type=int, default=4)
    ap.add_argument("--no-strace", action="store_true")
    ap.add_argument("--access-log", action="store_true",
                    help="also run every tree with the access log on (a file in the temp dir)")
    args = ap.parse_args()
    for b in ("wrk", "nginx", "taskset") + (() if args.no_strace else ("strace",)):
        if shutil.which(b) is None and not Path(tool(b)).exists():
            print(f"SKIP: {b} not installed")
            return 0
    tmp = Path(tempfile.mkdtemp(prefix="halb-ab-"))
    tmp.chmod(0o755)
    arms = [Arm(f"commit {c}", prepare_tree(c, tmp)) for c in args.commit]
    arms += [Arm(f"tree {t}", Path(t).resolve()) for t in args.tree]
    if args.access_log:
        arms += [Arm(f"{a.label} +access log", a.tree, extra=("--access-log", str(tmp / f"access-{i}.log")))
                 for i, a in enumerate(list(arms))]
    if len(arms) < 2:
        ap.error("give two or more arms (--tree, --commit)")
    procs = Procs()
    try:
        (tmp / "big.bin").write_bytes(os.urandom(1 << 20))
        (tmp / "big.bin").chmod(0o644)
        origin = free_port()
        (tmp / "nginx.conf").write_text(NGINX_CONF.format(dir=tmp, port=origin))
        procs.start([tool("nginx"), "-c", str(tmp / "nginx.conf")], LOAD_CORE,
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(origin)
        for arm in arms:
            arm.port = free_port()
            arm.proc = procs.start([sys.executable, "-m", "halb.dataplane.run", "--listen", f"127.0.0.1:{arm.port}",
                                    "--backend", f"origin=127.0.0.1:{origin}", *arm.extra],
                                   PROXY_CORE, cwd=arm.tree, stdout=subprocess.PIPE)
            assert arm.proc.stdout is not None
            arm.proc.stdout.readline()  # READY
            wrk(arm.port, args.path, args.conns, 2)  # warm-up
        hz = os.sysconf("SC_CLK_TCK")
        print(f"load average at start {os.getloadavg()[0]:.2f}")
        for r in range(args.rounds):
            for arm in (arms if r % 2 == 0 else arms[::-1]):
                assert arm.proc is not None
                (u0, s0), f0 = cpu_ticks(arm.proc.pid), minor_faults(arm.proc.pid)
                n = wrk(arm.port, args.path, args.conns, args.seconds)
                (u1, s1), f1 = cpu_ticks(arm.proc.pid), minor_faults(arm.proc.pid)
                per = 1e6 / hz / max(n, 1)
                arm.cpu.append(((u1 - u0) * per, (s1 - s0) * per))
                arm.faults.append((f1 - f0) * 1000 / max(n, 1))
                print(f"round {r} load {os.getloadavg()[0]:.2f} {arm.label}: {n} requests, "
                      f"{(u1 - u0 + s1 - s0) * per:.1f} µs/request (user {(u1 - u0) * per:.1f})", flush=True)
        print(f"load average at end {os.getloadavg()[0]:.2f}")
        for arm in arms:
            tot = [u + s for u, s in arm.cpu]
            print(f"{arm.label}: median CPU {statistics.median(tot):.1f} µs/request "
                  f"(user {statistics.median(u for u, _ in arm.cpu):.1f}, sys {statistics.median(s for _, s in arm.cpu):.1f}); "
                  f"runs {', '.join(f'{t:.0f}' for t in tot)}; minor faults per 1,000 requests "
                  f"{statistics.median(arm.faults):.2f}")
        if not args.no_strace:
            for arm in arms:
                print("\n".join(syscall_report(arm, args.path, args.conns)))
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Memory-safety fuzz of the C head fast path under AddressSanitizer + UBSan (not part of `make test`).

The differential tests (tests/unit/test_fasthttp.py) show the C parser agrees with llhttp;
this shows it never reads or writes out of bounds on hostile input. It builds
halb/dataplane/_fasthttp.c with -fsanitize=address,undefined into a temporary directory,
re-runs itself with the sanitizer runtime preloaded and PYTHONMALLOC=malloc (so every bytes
object is its own heap block that ASan can guard), then feeds the parser every truncation
of generated heads, mutated heads and random bytes for --seconds. Any finding aborts with
the sanitizer's report and a non-zero exit code.

    .venv/bin/python tests/fuzz_fasthttp.py [--seconds 60]
"""
from __future__ import annotations

import random
import sys
import time
from pathlib import Path

import sanitized_build  # tests/ is on sys.path when this script runs

ROOT = Path(__file__).resolve().parent.parent


def fuzz(moddir: str, seconds: int) -> int:
    fast = sanitized_build.load_sanitized(moddir, "_fasthttp", ROOT / "tests" / "unit")
    if fast is None:
        return 2
    import test_fasthttp as gen  # the differential tests' generators

    rng = random.Random(1)
    reqs = gen.COMMON + [gen.gen_request(rng) for _ in range(200)]
    resps = [gen.gen_response(rng) for _ in range(200)]
    calls = 0
    for s in reqs:  # every truncation: reads at every boundary
        for i in range(len(s) + 1):
            fast.parse_request(s[:i], 65536, b"x-hash")
            fast.parse_request(s[:i], i, None)
            calls += 2
    for s in resps:
        for i in range(len(s) + 1):
            fast.parse_response(s[:i], 65536)
            fast.parse_response(s[:i], max(i - 3, 0))
            calls += 2
    # heads larger than the 8 KiB stack buffer take the heap path
    big = b"GET / HTTP/1.1\r\nHost: a\r\n" + b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 50) for i in range(400)) + b"\r\n"
    assert fast.parse_request(big, 1 << 20, None) is not None
    bigr = (b"HTTP/1.0 200 OK\r\n" + b"".join(b"X-H%d: v\r\nConnection: close\r\n" % i for i in range(400))
            + b"Content-Length: 0\r\n\r\n")
    assert fast.parse_response(bigr, 1 << 20) is not None
    t_end = time.monotonic() + seconds
    while time.monotonic() < t_end:
        s = gen.mutate(rng.choice(reqs), rng)
        fast.parse_request(s, rng.choice([65536, len(s), 10]), rng.choice([None, b"x-hash", b""]),
                           rng.choice([100, 3, 0, -1]))
        r = gen.mutate(rng.choice(resps), rng)
        fast.parse_response(r, rng.choice([65536, len(r), 5]))
        b = rng.randbytes(rng.randint(0, 64))
        fast.parse_request(b, 65536, None)
        fast.parse_response(b, 65536)
        calls += 4
    print(f"{calls:,} parser calls under ASan+UBSan, no finding")
    return 0


def main() -> int:
    return sanitized_build.main(__doc__, "halb/dataplane/_fasthttp.c", "_fasthttp", __file__, fuzz)


if __name__ == "__main__":
    sys.exit(main())

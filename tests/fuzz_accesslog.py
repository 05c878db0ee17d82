"""Memory-safety run of the C access-log formatter under AddressSanitizer + UBSan (not part of
`make test`).

tests/unit/test_access_log_format.py shows the C and Python formatters write the same
bytes; this shows `_accesslog.c` (`Lines.add`/`add_at`/`take`) does so
without reading or writing out of bounds on any input: for --seconds it feeds records of
random hostile bytes and lengths around every limit (MAX_PATH, MAX_HOST, the 6-byte
escapes that make a line's worst case), huge and negative numbers, wrong types (which
must raise and leave the pending lines as they were), through the sanitized build, and
compares every line with the Python formatter's.

    .venv/bin/python tests/fuzz_accesslog.py [--seconds 30]
"""
from __future__ import annotations

import random
import sys
import time
from pathlib import Path

import sanitized_build  # tests/ is on sys.path when this script runs

ROOT = Path(__file__).resolve().parent.parent


def fuzz(moddir: str, seconds: int) -> int:
    sanitized = sanitized_build.load_sanitized(moddir, "_accesslog")
    if sanitized is None:
        return 2
    from halb.dataplane import access_log
    rng = random.Random(1)

    def blob() -> bytes | None:
        n = rng.choice([0, 1, 5, 255, 256, 257, 1023, 1024, 1025, 3000])
        if rng.random() < 0.1:
            return None
        return bytes(rng.choice([0, 0x22, 0x5C, 0x3F, 0x7F, 0x80, 0xFF, rng.randrange(256)]) for _ in range(n))

    def name() -> str | None:
        return None if rng.random() < 0.2 else "".join(rng.choice("ab\"\\é\x01/:") for _ in range(rng.choice([0, 3, 300])))

    def record() -> tuple[object, ...]:
        t0 = rng.choice([0.0, 1000.0, 1e9])
        return (t0 + rng.random() * 100, t0, blob(), blob() or b"", name(), name(), blob(), blob() or b"GET",
                blob() or b"/", rng.choice([0, 200, 499, -1, 2**62]), rng.choice([0, 10, 2**63 - 1, -5]),
                name(), rng.choice([0, 1, 10**15]), name())

    rounds = lines = refused = 0
    t_end = time.monotonic() + seconds
    while time.monotonic() < t_end:
        recs = [record() for _ in range(rng.randrange(1, 300))]
        offset = rng.choice([0.0, 1.7e9])
        want = access_log.py_format_lines(recs, offset)
        pending = sanitized.Lines()
        pending.wall_offset = offset
        for r in recs:
            pending.add_at(*r)
            if rng.random() < 0.05:  # a malformed record: refused, the pending lines unchanged
                bad = list(r)
                bad[rng.choice([2, 6, 8])] = "a str"
                try:
                    pending.add_at(*bad)
                except TypeError:
                    refused += 1
                else:
                    print("a malformed record was accepted", file=sys.stderr)
                    return 1
        data, n = pending.take()
        if data != want or n != len(recs):
            print("Lines differs from the Python formatter", file=sys.stderr)
            return 1
        pending.add(1.0, b"r", b"c", None, "s", None, b"GET", b"/", 200, 1, None, 1, None)  # the clock path
        rounds += 1
        lines += len(recs)
    print(f"{rounds:,} batches, {lines:,} lines identical to the Python formatter's, {refused:,} malformed "
          "records refused, under ASan+UBSan, no finding")
    return 0


def main() -> int:
    return sanitized_build.main(__doc__, "halb/dataplane/_accesslog.c", "_accesslog", __file__, fuzz,
                                ("-Wall", "-Wextra", "-Wno-unused-parameter"))


if __name__ == "__main__":
    sys.exit(main())

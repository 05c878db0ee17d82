"""Memory-safety run of the C TCP relay under AddressSanitizer + UBSan (not part of `make test`).

tests/integration/test_tcprelay_stress.py shows the relay delivers every byte; this shows it
does so without reading or writing out of bounds, using freed connections or leaking
buffers on any path those tests take. It builds halb/dataplane/_tcprelay.c with
-fsanitize=address,undefined into a temporary directory, re-runs itself with the sanitizer
runtime preloaded and PYTHONMALLOC=malloc, puts the sanitized Relay in place of the normal
one, and drives rounds of tests/relay_stress.py (random payloads, half-closes, resets on
both sides, slow readers) with relay buffer sizes from 1 byte to 64 KiB for --seconds. A
finding aborts with the sanitizer's report and a non-zero exit code.

    .venv/bin/python tests/fuzz_tcprelay.py [--seconds 60]
"""
from __future__ import annotations

import random
import sys
import time
from pathlib import Path

import sanitized_build  # tests/ is on sys.path when this script runs

ROOT = Path(__file__).resolve().parent.parent


def fuzz(moddir: str, seconds: int) -> int:
    sanitized = sanitized_build.load_sanitized(moddir, "_tcprelay")
    if sanitized is None:
        return 2

    from halb.dataplane import tcp_relay
    from halb.dataplane.testing import run
    from tests.relay_stress import stress

    tcp_relay.Relay = sanitized.Relay
    rng = random.Random(1)
    rounds = conns = checked = 0
    t_end = time.monotonic() + seconds
    while time.monotonic() < t_end:
        tcp_relay.RELAY_BUFSIZE = rng.choice([1, 7, 1000, 4096, 65536])
        small = tcp_relay.RELAY_BUFSIZE < 1000
        out = run(stress(clients=60, concurrency=rng.choice([1, 8, 30]), seed=rng.randrange(1 << 30),
                         max_payload=5_000 if small else 300_000), timeout=300)
        if out.failures:
            print(f"relay failures (bufsize {tcp_relay.RELAY_BUFSIZE}): {out.failures[:5]}", file=sys.stderr)
            return 1
        rounds += 1
        conns += sum(out.counts.values())
        checked += out.bytes_checked
    print(f"{rounds} rounds, {conns:,} connections, {checked / 2**20:,.1f} MiB checked end to end "
          "under ASan+UBSan, no finding")
    return 0


def main() -> int:
    return sanitized_build.main(__doc__, "halb/dataplane/_tcprelay.c", "_tcprelay", __file__, fuzz,
                                 ("-Wall", "-Wextra", "-Wno-unused-parameter"))


if __name__ == "__main__":
    sys.exit(main())

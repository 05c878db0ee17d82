"""Memory-safety run of halb's C TLS paths under AddressSanitizer + UBSan (not part of `make test`).

tests/integration/test_tls_stream.py and tests/unit/test_tlsdirect.py show what the TLS
transport and the record calls do; this shows the C halves (`_tlsdirect.c`: `Direct`,
`StreamCore`) do it without reading or writing out of bounds, using freed objects or
miscounting references on any path those take. It builds halb/certs/_tlsdirect.c with
-fsanitize=address,undefined into a temporary directory, re-runs itself with the sanitizer
runtime preloaded and PYTHONMALLOC=malloc, binds the sanitized module to CPython's libssl,
and for --seconds drives real TLS connections (Python ssl clients in threads, uvloop
server) through a `TlsStream` built on the sanitized `StreamCore`: random payloads from 1
byte to 300 KB echoed and checked byte for byte, reads paused and resumed by the
application at random, connections ended by the server's close, the client's
close_notify, a client reset, or a tampered record. A finding aborts with the
sanitizer's report and a non-zero exit code.

    .venv/bin/python tests/fuzz_tls.py [--seconds 60]
"""
from __future__ import annotations

import asyncio
import random
import socket
import ssl
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Any

import sanitized_build  # tests/ is on sys.path when this script runs

ROOT = Path(__file__).resolve().parent.parent


class Echo(asyncio.Protocol):
    """Echoes; pauses its reading at random for a moment (records wait in the BIO)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.t: Any = None

    def connection_made(self, transport: Any) -> None:
        self.t = transport

    def data_received(self, data: bytes) -> None:
        self.t.write(data)
        if data.startswith(b"CLOSE"):
            self.t.close()
        elif self.rng.random() < 0.05:
            self.t.pause_reading()
            asyncio.get_running_loop().call_later(self.rng.random() * 0.02, self.t.resume_reading)


def client(port: int, ca: str, rng: random.Random, stats: dict[str, int]) -> None:
    ctx = ssl.create_default_context(cafile=ca)
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    end = rng.choice(["close_notify", "reset", "server_close", "tamper", "plain"])
    try:
        if end == "plain":  # not TLS at all: the handshake fails
            raw.sendall(b"GET / HTTP/1.1\r\n\r\n" * rng.randrange(1, 50))
            raw.recv(100)
            stats[end] += 1
            return
        s = ctx.wrap_socket(raw, server_hostname="tls.example")
        for _ in range(rng.randrange(1, 6)):
            size = rng.choice([1, 17, 1000, 16384, 16385, 50_000, 300_000])
            payload = rng.randbytes(size)
            s.sendall(payload)
            got = bytearray()
            while len(got) < size:
                chunk = s.recv(size - len(got))
                if not chunk:
                    break
                got += chunk
            if bytes(got) != payload:
                stats["mismatch"] += 1
            stats["bytes"] += size
        if end == "close_notify":
            s.unwrap().close()
        elif end == "reset":
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
        elif end == "server_close":
            s.sendall(b"CLOSE")
            while s.recv(65536):
                pass
            s.close()
        else:  # a record whose tag does not verify: the server aborts
            s.sendall(b"x")
            s.recv(1)
            sock = socket.socket(fileno=s.detach())  # the TCP socket under the TLS session
            sock.sendall(b"\x17\x03\x03\x00\x20" + rng.randbytes(32))
            try:
                sock.recv(100)
            except OSError:
                pass
            sock.close()
        stats[end] += 1
    except (OSError, ssl.SSLError):
        stats["errors"] += 1
    finally:
        raw.close()


def fuzz(moddir: str, seconds: int) -> int:
    sanitized = sanitized_build.load_sanitized(moddir, "_tlsdirect")
    if sanitized is None:
        return 2
    import _ssl

    import uvloop

    from halb.certs import tls as tls_mod
    from halb.certs.tls import load_context
    from halb.dataplane import tls_stream
    from tests.certs_util import make_ca, make_leaf

    if not sanitized.load(_ssl.__file__):
        print("SKIP: libssl's functions not found through _ssl")
        return 0
    tls_mod._bind_direct = sanitized.bind  # records through the sanitized Direct
    bound = [0]

    def bind_counted(self: Any, *args: Any) -> bool:
        ok = bool(sanitized.StreamCore._bind_core(self, *args))
        bound[0] += ok
        return ok

    stream_cls = type("SanitizedTlsStream", (sanitized.StreamCore, tls_stream._Stream),
                      {"__slots__": tls_stream._FIELDS, "_bind_core": bind_counted})
    ca = make_ca()
    leaf = make_leaf(ca, ["tls.example"])
    ca_file = Path(moddir) / "ca.pem"
    ca_file.write_text(ca.cert_pem)
    ctx = load_context(leaf.cert_pem + ca.cert_pem, leaf.key_pem().encode())
    stats: dict[str, int] = {k: 0 for k in ("bytes", "mismatch", "errors", "close_notify", "reset",
                                            "server_close", "tamper", "plain")}
    rng = random.Random(1)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: stream_cls(loop, ctx, Echo(rng), 2.0), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        t_end = time.monotonic() + seconds
        while time.monotonic() < t_end:
            threads = [threading.Thread(target=client, args=(port, str(ca_file), random.Random(rng.random()), stats))
                       for _ in range(rng.randrange(1, 12))]
            for t in threads:
                t.start()
            while any(t.is_alive() for t in threads):
                await asyncio.sleep(0.01)
        server.close()

    uvloop.run(main())
    ends = sum(stats[k] for k in ("close_notify", "reset", "server_close", "tamper", "plain"))
    if bound[0] < ends - stats["plain"] - stats["errors"]:  # every TLS connection took the C path
        print(f"error: only {bound[0]} connections bound the sanitized StreamCore", file=sys.stderr)
        return 1
    print(f"{ends + stats['errors']:,} connections ({stats}; {bound[0]:,} on the C core), "
          f"{stats['bytes'] / 2**20:,.1f} MiB echoed "
          "under ASan+UBSan, no finding")
    return 1 if stats["mismatch"] else 0


def main() -> int:
    return sanitized_build.main(__doc__, "halb/certs/_tlsdirect.c", "_tlsdirect", __file__, fuzz,
                                ("-Wall", "-Wextra", "-Wno-unused-parameter"))


if __name__ == "__main__":
    sys.exit(main())

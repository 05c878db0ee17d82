"""A test backend that requires a PROXY header (v1 or v2) on every connection and reports
what it read, parsed by an independent implementation (the `proxy-protocol` package), so a
halb bug cannot hide behind its own parser.

    python -m tests.proxy_backend --listen 127.0.0.1:PORT [--no-proxy]

Each connection: the header, then (HTTP) one request answered with JSON
{"proxy": "v1"|"v2"|null, "source": "IP:PORT", "dest": "IP:PORT", "xff": "..."} and a close,
or (a connection that sends no HTTP head, e.g. TCP mode) the same JSON right after the header.
"""
from __future__ import annotations

import argparse
import asyncio
import json

from proxyprotocol.v1 import ProxyProtocolV1
from proxyprotocol.v2 import ProxyProtocolV2

V2_SIG = b"\r\n\r\n\x00\r\nQUIT\n"


async def read_header(r: asyncio.StreamReader) -> tuple[str, object]:
    first = await r.readexactly(1)
    if first == b"P":
        line = first + await r.readuntil(b"\r\n")
        return "v1", ProxyProtocolV1().unpack(line)
    rest = await r.readexactly(15)
    head = first + rest
    if head[:12] != V2_SIG:
        raise ValueError("no PROXY header")
    body = await r.readexactly(int.from_bytes(head[14:16], "big"))
    return "v2", ProxyProtocolV2().unpack(head + body)


def addr(a: object) -> str | None:
    return f"{a[0]}:{a[1]}" if isinstance(a, tuple) else None  # type: ignore[index]


async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter, need_proxy: bool) -> None:
    try:
        version, result = (await read_header(r)) if need_proxy else (None, None)
        report = {"proxy": version, "source": addr(getattr(result, "source", None)),
                  "dest": addr(getattr(result, "dest", None)), "xff": None}
        try:
            head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 0.5)
        except (asyncio.TimeoutError, asyncio.IncompleteReadError):
            head = b""
        if head:
            for line in head.decode("latin-1").split("\r\n"):
                if line.lower().startswith("x-forwarded-for:"):
                    report["xff"] = line.split(":", 1)[1].strip()
            body = json.dumps(report).encode()
            w.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        else:
            w.write(json.dumps(report).encode())
        await w.drain()
    except (ValueError, asyncio.IncompleteReadError, ConnectionError):
        pass  # a health check's bare connect, or no header: nothing to answer
    finally:
        w.close()


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--listen", required=True)
    ap.add_argument("--no-proxy", action="store_true")
    a = ap.parse_args()
    host, port = a.listen.rsplit(":", 1)
    server = await asyncio.start_server(lambda r, w: handle(r, w, not a.no_proxy), host, int(port))
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())

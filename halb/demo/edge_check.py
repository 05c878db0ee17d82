"""Is the demo edge served? One HTTPS request per node, verified against the demo CA.

`cluster up` prints ready-to-paste commands only after this says every node answers them:
a frontend and its certificate reach each node through Raft a moment after the write
commits, and a command that fails the first time it is pasted teaches the wrong lesson."""
from __future__ import annotations

import http.client
import socket
import ssl
import time
from pathlib import Path
from typing import Any

from halb.demo.edge import DEMO_CA_CERT, DemoEdge


def https_get(address: str, host: str, path: str, cafile: Path, timeout: float = 2.0) -> tuple[int, bytes]:
    """GET https://host/path from address (HOST:PORT), SNI and Host `host`, verified against cafile."""
    ctx = ssl.create_default_context(cafile=str(cafile))
    addr, port = address.rsplit(":", 1)
    with socket.create_connection((addr, int(port)), timeout=timeout) as raw:
        with ctx.wrap_socket(raw, server_hostname=host) as tls:
            tls.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            resp = http.client.HTTPResponse(tls)  # type: ignore[arg-type]
            resp.begin()
            return resp.status, resp.read()


def wait_served(edge: DemoEdge, fe: dict[str, Any], directory: Path, timeout: float) -> list[str]:
    """Wait until every node's frontend address answers the shop host with a routed answer
    (not the frontend's own 404); returns the addresses that still do not."""
    pending = list(fe["listen"])
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for address in list(pending):
            try:
                status, _ = https_get(address, edge.shop_host, "/health", directory / DEMO_CA_CERT)
            except (OSError, ssl.SSLError, http.client.HTTPException):
                continue
            if status != 404:
                pending.remove(address)
        if pending:
            time.sleep(0.1)
    return pending

"""Toxic behaviour over real sockets on 127.0.0.1, through a `halb toxiproxy serve` subprocess.

Timing assertions use lower bounds (the toxic must delay at least this much) and
generous upper bounds, because the machine is shared and slow at times.
"""
from __future__ import annotations

import socket
import time
from typing import Any, Iterator

import pytest
import requests

from halb.chaos.toxiproxy import ToxiproxyProcess
from halb.chaos.toxiproxy.testing import TcpServer, echo_handler, payload_handler, recv_until_closed

pytestmark = pytest.mark.timeout(60)

SLACK = 0.02  # timer granularity allowance for lower bounds


@pytest.fixture(scope="module")
def tp() -> Iterator[ToxiproxyProcess]:
    proc = ToxiproxyProcess()
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


class Api:
    def __init__(self, url: str) -> None:
        self.url = url
        self.s = requests.Session()

    def proxy(self, name: str, upstream: str) -> tuple[str, int]:
        r = self.s.post(f"{self.url}/proxies", json={"name": name, "upstream": upstream,
                                                    "listen": "127.0.0.1:0"}, timeout=10)
        assert r.status_code == 201, r.text
        host, port = r.json()["listen"].rsplit(":", 1)
        return host, int(port)

    def toxic(self, proxy: str, type_: str, stream: str = "downstream", toxicity: float = 1.0,
              name: str | None = None, **attributes: int) -> str:
        name = name or f"{type_}_{stream}"
        r = self.s.post(f"{self.url}/proxies/{proxy}/toxics",
                        json={"name": name, "type": type_, "stream": stream, "toxicity": toxicity,
                              "attributes": attributes}, timeout=10)
        assert r.status_code == 200, r.text
        return name

    def update_toxic(self, proxy: str, name: str, body: dict[str, Any]) -> None:
        r = self.s.post(f"{self.url}/proxies/{proxy}/toxics/{name}", json=body, timeout=10)
        assert r.status_code == 200, r.text

    def delete_toxic(self, proxy: str, name: str) -> None:
        assert self.s.delete(f"{self.url}/proxies/{proxy}/toxics/{name}", timeout=10).status_code == 204

    def set_enabled(self, proxy: str, enabled: bool) -> None:
        r = self.s.post(f"{self.url}/proxies/{proxy}", json={"enabled": enabled}, timeout=10)
        assert r.status_code == 200, r.text

    def clear(self) -> None:
        for name in self.s.get(f"{self.url}/proxies", timeout=10).json():
            self.s.delete(f"{self.url}/proxies/{name}", timeout=10)


@pytest.fixture()
def api(tp: ToxiproxyProcess) -> Iterator[Api]:
    client = Api(tp.url)
    try:
        yield client
    finally:
        client.clear()


@pytest.fixture()
def echo() -> Iterator[TcpServer]:
    srv = TcpServer(echo_handler)
    try:
        yield srv
    finally:
        srv.close()


def connect(addr: tuple[str, int]) -> socket.socket:
    return socket.create_connection(addr, timeout=10)


def echo_rtt(sock: socket.socket, payload: bytes = b"ping") -> float:
    start = time.monotonic()
    sock.sendall(payload)
    data, _, _ = recv_until_closed(sock, len(payload), 10)
    assert data == payload
    return time.monotonic() - start


# ---------------------------------------------------------------- latency

def test_latency_downstream(api: Api, echo: TcpServer) -> None:
    addr = api.proxy("lat", echo.address)
    api.toxic("lat", "latency", latency=300)
    with connect(addr) as sock:
        assert echo_rtt(sock) >= 0.3 - SLACK
        assert echo_rtt(sock) >= 0.3 - SLACK


def test_latency_both_directions_add_up(api: Api, echo: TcpServer) -> None:
    addr = api.proxy("lat2", echo.address)
    api.toxic("lat2", "latency", stream="upstream", latency=200)
    api.toxic("lat2", "latency", stream="downstream", latency=200)
    with connect(addr) as sock:
        assert echo_rtt(sock) >= 0.4 - SLACK


def test_latency_added_to_live_connection(api: Api, echo: TcpServer) -> None:
    addr = api.proxy("live", echo.address)
    with connect(addr) as sock:
        assert echo_rtt(sock) < 5
        api.toxic("live", "latency", latency=250)
        assert echo_rtt(sock) >= 0.25 - SLACK
        api.delete_toxic("live", "latency_downstream")
        assert echo_rtt(sock) < 5


def test_toxicity_zero_never_applies(api: Api, echo: TcpServer) -> None:
    addr = api.proxy("zero", echo.address)
    api.toxic("zero", "latency", toxicity=0.0, latency=3000)
    api.toxic("zero", "limit_data", toxicity=0.0, bytes=1)
    api.toxic("zero", "timeout", stream="upstream", toxicity=0.0, timeout=0)
    for _ in range(5):
        with connect(addr) as sock:
            assert echo_rtt(sock, b"hello world") < 2.0


# ---------------------------------------------------------------- timeout

def test_timeout_drops_data_then_closes(api: Api, echo: TcpServer) -> None:
    addr = api.proxy("to", echo.address)
    api.toxic("to", "timeout", timeout=400)
    with connect(addr) as sock:
        sock.sendall(b"lost")
        start = time.monotonic()
        data, _, eof = recv_until_closed(sock, 1, 10)
        elapsed = time.monotonic() - start
    assert data == b"" and eof
    assert elapsed >= 0.4 - 0.1  # timer started at accept, just before the send


def test_timeout_zero_holds_forever_until_removed(api: Api, echo: TcpServer) -> None:
    addr = api.proxy("to0", echo.address)
    api.toxic("to0", "timeout", timeout=0)
    with connect(addr) as sock:
        sock.sendall(b"swallowed")
        data, _, eof = recv_until_closed(sock, 1, 1.0)
        assert data == b"" and not eof  # nothing, and still open, after a bounded wait
        api.delete_toxic("to0", "timeout_downstream")  # removing a timeout toxic closes the connection
        data, _, eof = recv_until_closed(sock, 1, 10)
        assert eof


# ---------------------------------------------------------------- reset_peer

def test_reset_peer_gives_econnreset(api: Api, echo: TcpServer) -> None:
    addr = api.proxy("rp", echo.address)
    api.toxic("rp", "reset_peer", timeout=100)
    with connect(addr) as sock:
        start = time.monotonic()
        sock.sendall(b"hello")
        with pytest.raises(ConnectionResetError):
            recv_until_closed(sock, 1, 10)
        assert time.monotonic() - start >= 0.1 - SLACK


def test_reset_peer_added_later_closes_with_fin(api: Api, echo: TcpServer) -> None:
    addr = api.proxy("rp2", echo.address)
    with connect(addr) as sock:
        assert echo_rtt(sock) < 5  # the connection is fully set up before the toxic exists
        api.toxic("rp2", "reset_peer", timeout=50)
        sock.sendall(b"hello")
        data, _, eof = recv_until_closed(sock, 1, 10)
        assert data == b"" and eof


def test_latency_removal_releases_held_data(api: Api, echo: TcpServer) -> None:
    addr = api.proxy("lat3", echo.address)
    api.toxic("lat3", "latency", latency=20_000)
    with connect(addr) as sock:
        sock.sendall(b"held")
        data, _, _ = recv_until_closed(sock, 4, 0.3)
        assert data == b""
        api.delete_toxic("lat3", "latency_downstream")
        data, _, _ = recv_until_closed(sock, 4, 10)
        assert data == b"held"


# ---------------------------------------------------------------- bandwidth

def test_bandwidth_caps_throughput(api: Api) -> None:
    size = 60_000
    payload = bytes(range(256)) * (size // 256)
    with TcpServer(payload_handler(payload, linger_s=0.2)) as blaster:
        addr = api.proxy("bw", blaster.address)
        api.toxic("bw", "bandwidth", rate=60)  # 60 KB/s -> about 1 s for 60 kB
        with connect(addr) as sock:
            start = time.monotonic()
            data, _, _ = recv_until_closed(sock, len(payload), 20)
            elapsed = time.monotonic() - start
    assert data == payload
    assert elapsed >= 0.75, f"{len(payload)} bytes at 60 KB/s took only {elapsed:.2f}s"


def test_bandwidth_zero_holds_until_removed(api: Api, echo: TcpServer) -> None:
    addr = api.proxy("bw0", echo.address)
    api.toxic("bw0", "bandwidth", rate=0)
    with connect(addr) as sock:
        sock.sendall(b"held")
        data, _, eof = recv_until_closed(sock, 4, 0.7)
        assert data == b"" and not eof
        api.delete_toxic("bw0", "bandwidth_downstream")
        data, _, _ = recv_until_closed(sock, 4, 10)
        assert data == b"held"  # released, not dropped


# ---------------------------------------------------------------- limit_data

def test_limit_data_closes_after_n_bytes(api: Api) -> None:
    payload = b"x" * 10_000
    with TcpServer(payload_handler(payload, linger_s=5)) as blaster:
        addr = api.proxy("lim", blaster.address)
        api.toxic("lim", "limit_data", bytes=1000)
        with connect(addr) as sock:
            start = time.monotonic()
            data, _, eof = recv_until_closed(sock, len(payload), 10)
            elapsed = time.monotonic() - start
    assert len(data) == 1000 and eof
    assert elapsed < 4, "closed by the toxic, not by the server"


def test_limit_data_counter_survives_update(api: Api, echo: TcpServer) -> None:
    addr = api.proxy("lim2", echo.address)
    api.toxic("lim2", "limit_data", bytes=10)
    with connect(addr) as sock:
        sock.sendall(b"12345")
        assert recv_until_closed(sock, 5, 10)[0] == b"12345"
        api.update_toxic("lim2", "limit_data_downstream", {"attributes": {"bytes": 12}})
        sock.sendall(b"abcdefghij")
        data, _, eof = recv_until_closed(sock, 100, 10)
        assert data == b"abcdefg" and eof


def test_limit_data_upstream_cuts_what_the_server_gets(api: Api) -> None:
    received: list[bytes] = []

    def sink(conn: socket.socket) -> None:
        while data := conn.recv(65536):
            received.append(data)

    with TcpServer(sink) as server:
        addr = api.proxy("lim3", server.address)
        api.toxic("lim3", "limit_data", stream="upstream", bytes=6)
        with connect(addr) as sock:
            sock.sendall(b"0123456789")
            _, _, eof = recv_until_closed(sock, 1, 10)
            assert eof  # the whole connection goes down once the limit is hit
        deadline = time.monotonic() + 5
        while b"".join(received) != b"012345" and time.monotonic() < deadline:
            time.sleep(0.02)
    assert b"".join(received) == b"012345"


# ---------------------------------------------------------------- slicer

def test_slicer_delivers_everything_in_pieces(api: Api) -> None:
    payload = bytes(i % 251 for i in range(20_000))
    with TcpServer(payload_handler(payload, linger_s=0.5)) as blaster:
        addr = api.proxy("sl", blaster.address)
        api.toxic("sl", "slicer", average_size=1000, size_variation=200, delay=5000)
        with connect(addr) as sock:
            start = time.monotonic()
            data, reads, _ = recv_until_closed(sock, len(payload), 10)
            elapsed = time.monotonic() - start
    assert data == payload
    assert reads >= 5, f"only {reads} reads: not sliced"
    assert elapsed >= 0.05  # about 20 pieces with 5 ms after each


# ---------------------------------------------------------------- slow_close

def test_slow_close_delays_close(api: Api) -> None:
    with TcpServer(payload_handler(b"bye")) as closer:
        addr = api.proxy("sc", closer.address)
        api.toxic("sc", "slow_close", delay=500)
        start = time.monotonic()
        with connect(addr) as sock:
            data, _, eof = recv_until_closed(sock, 100, 10)
            elapsed = time.monotonic() - start
    assert data == b"bye" and eof
    assert elapsed >= 0.5 - SLACK


def test_no_toxic_close_is_prompt(api: Api) -> None:
    with TcpServer(payload_handler(b"bye")) as closer:
        addr = api.proxy("nsc", closer.address)
        with connect(addr) as sock:
            data, _, eof = recv_until_closed(sock, 100, 10)
    assert data == b"bye" and eof


# ---------------------------------------------------------------- enable / disable

def test_disable_closes_live_connections_and_refuses_new(api: Api, echo: TcpServer) -> None:
    addr = api.proxy("dis", echo.address)
    with connect(addr) as sock:
        assert echo_rtt(sock) < 5
        api.set_enabled("dis", False)
        try:
            data, _, eof = recv_until_closed(sock, 1, 10)
            assert data == b"" and eof
        except ConnectionResetError:
            pass  # also a close
    with pytest.raises(ConnectionRefusedError):
        connect(addr).close()
    api.set_enabled("dis", True)
    with connect(addr) as sock:
        assert echo_rtt(sock) < 5


def test_dead_upstream_gives_eof(api: Api) -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    dead = probe.getsockname()[1]
    probe.close()  # nothing listens there now
    addr = api.proxy("dead", f"127.0.0.1:{dead}")
    with connect(addr) as sock:
        try:
            data, _, eof = recv_until_closed(sock, 1, 10)
            assert data == b"" and eof
        except ConnectionResetError:
            pass


def test_bulk_relay_without_toxics(api: Api, echo: TcpServer) -> None:
    addr = api.proxy("bulk", echo.address)
    payload = bytes(i % 256 for i in range(2_000_000))
    with connect(addr) as sock:
        sock.sendall(payload[:1_000_000])
        first, _, _ = recv_until_closed(sock, 1_000_000, 20)
        sock.sendall(payload[1_000_000:])
        second, _, _ = recv_until_closed(sock, 1_000_000, 20)
    assert first + second == payload

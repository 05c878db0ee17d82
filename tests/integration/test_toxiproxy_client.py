"""toxiproxy-python 0.1.1 driving `halb toxiproxy serve` started as a real subprocess."""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from typing import Any, Iterator

import pytest
import requests
from toxiproxy import Toxiproxy
from toxiproxy.exceptions import InvalidToxic, NotFound, ProxyExists

from halb.chaos.toxiproxy import ToxiproxyProcess
from halb.chaos.toxiproxy.testing import TcpServer

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def tp_process() -> Iterator[ToxiproxyProcess]:
    proc = ToxiproxyProcess(stderr=None)
    proc.start()
    try:
        yield proc
    finally:
        code = proc.stop()
        assert code == 0, f"server exited with {code} on SIGTERM"


@pytest.fixture()
def client(tp_process: ToxiproxyProcess) -> Iterator[Toxiproxy]:
    tp = Toxiproxy()
    tp.update_api_consumer("127.0.0.1", tp_process.port)
    try:
        yield tp
    finally:
        tp.destroy_all()


def roundtrip(listen: str, payload: bytes = b"ping") -> bytes:
    host, port = listen.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(payload)
        return sock.recv(1024)


def test_running_and_version(client: Toxiproxy) -> None:
    assert client.running()
    assert client.version() == b'{"version": "2.12.0"}\n'


def test_create_get_list_destroy(client: Toxiproxy, echo: TcpServer) -> None:
    proxy = client.create(upstream=echo.address, name="echo")
    assert proxy.enabled is True and proxy.listen.startswith("127.0.0.1:")
    assert roundtrip(proxy.listen) == b"ping"
    assert set(client.proxies()) == {"echo"}
    assert client.get_proxy("echo").listen == proxy.listen
    assert client.get_proxy("missing") is None
    with pytest.raises(ProxyExists):
        client.create(upstream=echo.address, name="echo")
    assert proxy.destroy() is True
    assert client.proxies() == {}
    with pytest.raises(NotFound):
        proxy.destroy()
    assert client.destroy("not a proxy") is False


def test_create_disabled_then_enable(client: Toxiproxy, echo: TcpServer) -> None:
    proxy = client.create(upstream=echo.address, name="later", enabled=False)
    assert proxy.enabled is False
    proxy.enable()
    live = client.get_proxy("later")
    assert live.enabled is True
    assert roundtrip(live.listen) == b"ping"


def test_server_side_conflict_maps_to_proxy_exists(client: Toxiproxy, tp_process: ToxiproxyProcess,
                                                    echo: TcpServer) -> None:
    client.create(upstream=echo.address, name="dup")
    r = requests.post(tp_process.url + "/proxies", json={"name": "dup", "upstream": echo.address}, timeout=10)
    assert r.status_code == 409


def test_toxics_add_list_remove(client: Toxiproxy, echo: TcpServer) -> None:
    proxy = client.create(upstream=echo.address, name="tox")
    proxy.add_toxic(type="latency", attributes={"latency": 10, "jitter": 2})
    proxy.add_toxic(type="bandwidth", stream="upstream", name="bw", toxicity=0.5, attributes={"rate": 1000})
    toxics = proxy.toxics()
    assert set(toxics) == {"latency_downstream", "bw"}
    bw = proxy.get_toxic("bw")
    assert (bw.type, bw.stream, bw.toxicity, bw.attributes) == ("bandwidth", "upstream", 0.5, {"rate": 1000})
    assert proxy.get_toxic("nope") is None
    with pytest.raises(ProxyExists):
        proxy.add_toxic(type="noop", name="bw")
    with pytest.raises(InvalidToxic):
        proxy.add_toxic(type="down")
    with pytest.raises(InvalidToxic):
        proxy.add_toxic(type="latency", name="neg", attributes={"latency": -1})
    assert proxy.destroy_toxic("bw") is True
    assert set(proxy.toxics()) == {"latency_downstream"}
    with pytest.raises(NotFound):
        proxy.destroy_toxic("bw")
    assert roundtrip(proxy.listen) == b"ping"


def test_disable_enable_and_down(client: Toxiproxy, echo: TcpServer) -> None:
    proxy = client.create(upstream=echo.address, name="flip")
    host, port = proxy.listen.rsplit(":", 1)
    proxy.disable()
    assert client.get_proxy("flip").enabled is False
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((host, int(port)), timeout=5).close()
    proxy.enable()
    assert roundtrip(proxy.listen) == b"ping"  # same port again
    with proxy.down():
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((host, int(port)), timeout=5).close()
    assert roundtrip(proxy.listen) == b"ping"


def test_reset(client: Toxiproxy, echo: TcpServer) -> None:
    proxy = client.create(upstream=echo.address, name="rst")
    proxy.add_toxic(type="timeout", attributes={"timeout": 0})
    proxy.disable()
    assert client.reset() is True
    again = client.get_proxy("rst")
    assert again.enabled is True and again.toxics() == {}
    assert roundtrip(again.listen) == b"ping"


def test_populate_client_side(client: Toxiproxy, echo: TcpServer) -> None:
    created = client.populate([
        {"name": "pa", "upstream": echo.address, "listen": "127.0.0.1:0"},
        {"name": "pb", "upstream": echo.address, "listen": "127.0.0.1:0"},
    ])
    assert sorted(p.name for p in created) == ["pa", "pb"]
    assert set(client.proxies()) == {"pa", "pb"}
    # an entry whose listen string matches the stored one is left alone
    pa = client.get_proxy("pa")
    assert client.populate([{"name": "pa", "upstream": echo.address, "listen": pa.listen}]) == []
    assert roundtrip(client.get_proxy("pa").listen) == b"ping"
    client.destroy_all()
    assert client.proxies() == {}


def test_server_populate_endpoint(tp_process: ToxiproxyProcess, client: Toxiproxy, echo: TcpServer) -> None:
    r = requests.post(tp_process.url + "/populate",
                      json=[{"name": "pp", "upstream": echo.address, "listen": "127.0.0.1:0"}], timeout=10)
    assert r.status_code == 201
    assert roundtrip(r.json()["proxies"][0]["listen"]) == b"ping"


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_serve_stops_cleanly_on_signal(sig: str, tmp_path: Any, echo: TcpServer) -> None:
    config = tmp_path / "proxies.json"
    config.write_text(json.dumps([{"name": "cfg", "upstream": echo.address, "listen": "127.0.0.1:0"}]))
    proc = ToxiproxyProcess(config=str(config))
    proc.start()
    try:
        proxies = requests.get(proc.url + "/proxies", timeout=10).json()
        assert roundtrip(proxies["cfg"]["listen"]) == b"ping"
        assert proc.proc is not None
        proc.proc.send_signal(getattr(signal, sig))
        assert proc.proc.wait(15) == 0
    finally:
        proc.stop()


def test_serve_reports_port_in_use(echo: TcpServer) -> None:
    result = subprocess.run([sys.executable, "-m", "halb", "toxiproxy", "serve", "--port", str(echo.port)],
                            capture_output=True, timeout=30)
    assert result.returncode != 0
    assert b"Traceback" not in result.stderr


def test_serve_warns_loudly_when_the_api_is_not_on_loopback() -> None:
    """192.0.2.1 (TEST-NET-1) is not an address of this machine: the bind fails, so nothing is
    exposed, but the warning comes first."""
    result = subprocess.run([sys.executable, "-m", "halb", "toxiproxy", "serve", "--host", "192.0.2.1",
                             "--port", "0"], capture_output=True, text=True, timeout=30)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "WARNING" in result.stderr and "no authentication" in result.stderr and "open relay" in result.stderr
    assert result.stderr.index("WARNING") < result.stderr.index("Error")


def test_exposure_warning_only_for_non_loopback_hosts() -> None:
    from halb.cli.toxiproxy_cmd import exposure_warning

    for host in ("127.0.0.1", "127.3.2.1", "::1", "[::1]", "localhost"):
        assert exposure_warning(host) is None, host
    for host in ("0.0.0.0", "::", "", "10.1.2.3", "192.0.2.1", "proxy.example"):
        w = exposure_warning(host)
        assert w is not None and "open relay" in w, host
    assert "every interface" in exposure_warning("0.0.0.0")  # type: ignore[operator]

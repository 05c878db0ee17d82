"""HTTP API of the Toxiproxy-compatible server: status codes, bodies, validation.

The server runs in-process on a background loop thread with a free port; every
test starts from an empty registry.
"""
from __future__ import annotations

import json
import socket
from typing import Any, Iterator

import pytest
import requests

from halb.chaos.toxiproxy.testing import TcpServer, ThreadedServer
from halb.chaos.toxiproxy.toxics import Slicer, float32_json, float32

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def server() -> Iterator[ThreadedServer]:
    srv = ThreadedServer()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture()
def api(server: ThreadedServer) -> Iterator["Api"]:
    client = Api(server.url)
    try:
        yield client
    finally:
        for name in list(client.get("/proxies").json()):
            client.delete(f"/proxies/{name}")


class Api:
    def __init__(self, base: str) -> None:
        self.base = base
        self.s = requests.Session()

    def get(self, path: str, **kw: Any) -> requests.Response:
        return self.s.get(self.base + path, timeout=10, **kw)

    def post(self, path: str, body: Any = None, raw: bytes | None = None, **kw: Any) -> requests.Response:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        return self.s.post(self.base + path, data=data, timeout=10, **kw)

    def patch(self, path: str, body: Any) -> requests.Response:
        return self.s.patch(self.base + path, data=json.dumps(body), timeout=10)

    def delete(self, path: str) -> requests.Response:
        return self.s.delete(self.base + path, timeout=10)

    def create(self, name: str, upstream: str, **extra: Any) -> dict[str, Any]:
        r = self.post("/proxies", {"name": name, "upstream": upstream, "listen": "127.0.0.1:0", **extra})
        assert r.status_code == 201, r.text
        return r.json()


def assert_error(r: requests.Response, status: int, message: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.text.endswith("\n")
    body = r.json()
    assert body["status"] == status
    if message is not None:
        assert body["error"] == message, body
    assert r.headers["Content-Type"].startswith("text/plain")
    return body


def test_version_and_request_id(api: Api) -> None:
    r = api.get("/version")
    assert r.status_code == 200
    assert r.text == '{"version": "2.12.0"}\n'
    assert r.headers["Content-Type"] == "application/json;charset=utf-8"
    assert len(r.headers["X-Toxiproxy-Request-Id"]) == 20


def test_unknown_path_wrong_method_and_browser(api: Api) -> None:
    r = api.get("/nope")
    assert (r.status_code, r.text) == (404, "404 page not found\n")
    assert api.get("/proxies/").status_code == 404
    assert "X-Toxiproxy-Request-Id" not in r.headers
    for method, path in [("GET", "/reset"), ("PUT", "/proxies"), ("HEAD", "/version")]:
        r = api.s.request(method, api.base + path, timeout=10)
        assert r.status_code == 405 and r.text == ""
    r = api.get("/version", headers={"User-Agent": "Mozilla/5.0"})
    assert (r.status_code, r.text) == (403, "User agent not allowed\n")


def test_proxy_crud(api: Api, echo: TcpServer) -> None:
    assert api.get("/proxies").json() == {}
    created = api.create("db", echo.address)
    assert created["listen"].startswith("127.0.0.1:") and not created["listen"].endswith(":0")
    assert created == {"name": "db", "listen": created["listen"], "upstream": echo.address,
                       "enabled": True, "toxics": []}
    assert api.get("/proxies/db").json() == created
    assert api.get("/proxies").json() == {"db": created}
    assert_error(api.post("/proxies", {"name": "db", "upstream": echo.address}), 409, "proxy already exists")
    # partial update: only enabled
    r = api.post("/proxies/db", {"enabled": False})
    assert r.status_code == 200 and r.json()["enabled"] is False
    assert r.json()["listen"] == created["listen"]
    r = api.patch("/proxies/db", {"enabled": True})
    assert r.json()["enabled"] is True and r.json()["listen"] == created["listen"]  # same port again
    assert api.post("/proxies/db", {}).json() == created
    assert api.delete("/proxies/db").status_code == 204
    assert_error(api.get("/proxies/db"), 404, "proxy not found")
    assert_error(api.delete("/proxies/db"), 404, "proxy not found")
    assert_error(api.post("/proxies/db", {"enabled": True}), 404, "proxy not found")


def test_proxy_name_is_url_decoded(api: Api, echo: TcpServer) -> None:
    api.create("a b", echo.address)
    assert api.get("/proxies/a%20b").json()["name"] == "a b"


def test_create_disabled_keeps_listen_verbatim(api: Api, echo: TcpServer) -> None:
    r = api.post("/proxies", {"name": "x", "upstream": echo.address, "listen": "localhost:0", "enabled": False})
    assert r.status_code == 201
    assert r.json()["listen"] == "localhost:0" and r.json()["enabled"] is False
    r = api.post("/proxies/x", {"enabled": True})
    assert r.json()["listen"].startswith("127.0.0.1:")


def test_update_listen_moves_proxy(api: Api, echo: TcpServer) -> None:
    first = api.create("m", echo.address)["listen"]
    moved = api.post("/proxies/m", {"listen": "127.0.0.1:0"}).json()
    assert moved["enabled"] is True and moved["listen"] != first
    port = int(first.rsplit(":", 1)[1])
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_bind_conflict_is_500(api: Api, echo: TcpServer) -> None:
    r = api.post("/proxies", {"name": "c", "upstream": echo.address, "listen": echo.address})
    body = assert_error(r, 500)
    assert "address already in use" in body["error"]
    assert_error(api.get("/proxies/c"), 404)


def test_body_decoding_rules(api: Api, echo: TcpServer) -> None:
    assert_error(api.post("/proxies", raw=b""), 400, "bad request body: EOF")
    assert_error(api.post("/proxies", raw=b"{not json"), 400)
    assert_error(api.post("/proxies", raw=b'{"name": 5, "upstream": "x:1"}'), 400)
    assert_error(api.post("/proxies", raw=b'{"name": "q", "upstream": "x:1", "enabled": "yes"}'), 400)
    assert_error(api.post("/proxies", {"upstream": echo.address}), 400, "missing required field: name")
    assert_error(api.post("/proxies", {"name": "n"}), 400, "missing required field: upstream")
    assert_error(api.post("/proxies", raw=b"null"), 400, "missing required field: name")
    assert_error(api.post("/proxies", raw=b"[1, 2]"), 400)
    # case-insensitive keys, trailing garbage ignored, unknown keys ignored
    raw = ('{"NAME": "ci", "Upstream": "%s", "listen": "127.0.0.1:0", "x": 1} trailing junk' % echo.address).encode()
    r = api.post("/proxies", raw=raw)
    assert r.status_code == 201 and r.json()["name"] == "ci"
    # null leaves the current value
    assert api.post("/proxies/ci", raw=b'{"enabled": null}').json()["enabled"] is True
    assert_error(api.post("/proxies/ci", raw=b""), 400, "bad request body: EOF")


@pytest.mark.parametrize("field,value", [("listen", "local373"), ("listen", "127.0.0.1:99999"),
                                         ("listen", "1:2:3"), ("upstream", "nohostport"),
                                         ("upstream", "127.0.0.1:-1")])
def test_bad_addresses_are_400(api: Api, echo: TcpServer, field: str, value: str) -> None:
    body = {"name": "bad", "upstream": echo.address, "listen": "127.0.0.1:0", field: value}
    assert_error(api.post("/proxies", body), 400)
    assert api.get("/proxies").json() == {}
    api.create("good", echo.address)
    assert_error(api.post("/proxies/good", {field: value}), 400)
    assert api.get("/proxies/good").json()["enabled"] is True


def test_toxic_crud_and_order(api: Api, echo: TcpServer) -> None:
    api.create("t", echo.address)
    r = api.post("/proxies/t/toxics", {"type": "latency", "attributes": {"latency": 100}})
    assert r.status_code == 200
    assert r.json() == {"attributes": {"latency": 100, "jitter": 0}, "name": "latency_downstream",
                        "type": "latency", "stream": "downstream", "toxicity": 1}
    r = api.post("/proxies/t/toxics", {"type": "bandwidth", "stream": "UpStream", "toxicity": 0.2})
    assert r.json() == {"attributes": {"rate": 0}, "name": "bandwidth_UpStream", "type": "bandwidth",
                        "stream": "UpStream", "toxicity": 0.2}
    api.post("/proxies/t/toxics", {"type": "noop", "name": "n2", "stream": "downstream"})
    names = [t["name"] for t in api.get("/proxies/t/toxics").json()]
    assert names == ["bandwidth_UpStream", "latency_downstream", "n2"]  # upstream first
    assert [t["name"] for t in api.get("/proxies/t").json()["toxics"]] == names
    assert_error(api.post("/proxies/t/toxics", {"type": "noop", "name": "n2", "stream": "upstream"}),
                 409, "toxic already exists")
    # update merges attributes, keeps toxicity unless given, ignores type/stream
    r = api.post("/proxies/t/toxics/latency_downstream", {"attributes": {"jitter": 5}, "type": "timeout"})
    assert r.json()["attributes"] == {"latency": 100, "jitter": 5} and r.json()["type"] == "latency"
    r = api.patch("/proxies/t/toxics/latency_downstream", {"toxicity": 0.5})
    assert r.json()["toxicity"] == 0.5 and r.json()["attributes"]["latency"] == 100
    assert api.get("/proxies/t/toxics/n2").json()["type"] == "noop"
    assert api.delete("/proxies/t/toxics/n2").status_code == 204
    assert_error(api.delete("/proxies/t/toxics/n2"), 404, "toxic not found")
    assert_error(api.get("/proxies/t/toxics/n2"), 404, "toxic not found")
    assert_error(api.post("/proxies/t/toxics/n2", {"toxicity": 1}), 404, "toxic not found")
    assert_error(api.get("/proxies/zz/toxics"), 404, "proxy not found")
    assert_error(api.get("/proxies/zz/toxics/n2"), 404, "proxy not found")
    assert_error(api.post("/proxies/zz/toxics", {"type": "noop"}), 404, "proxy not found")


@pytest.mark.parametrize("body,message", [
    ({"type": "down"}, "invalid toxic type"),
    ({"type": ""}, "invalid toxic type"),
    ({}, "invalid toxic type"),
    ({"type": "latency", "stream": ""}, "stream was invalid, can be either upstream or downstream"),
    ({"type": "latency", "stream": "sideways"}, "stream was invalid, can be either upstream or downstream"),
    ({"type": "latency", "attributes": {"latency": 1.0}}, None),
    ({"type": "latency", "attributes": {"latency": 1e3}}, None),
    ({"type": "latency", "attributes": {"latency": "100"}}, None),
    ({"type": "latency", "attributes": {"latency": True}}, None),
    ({"type": "latency", "attributes": {"latency": 2**63}}, None),
    ({"type": "latency", "attributes": {"latency": -1}}, None),
    ({"type": "latency", "attributes": [1]}, None),
    ({"type": "timeout", "attributes": {"timeout": -5}}, None),
    ({"type": "bandwidth", "attributes": {"rate": -1}}, None),
    ({"type": "slicer"}, None),
    ({"type": "slicer", "attributes": {"average_size": 2, "size_variation": 50}}, None),
    ({"type": "limit_data", "attributes": {"bytes": -1}}, None),
    ({"type": 7}, None),
    ({"type": "noop", "toxicity": "high"}, None),
    ({"type": "noop", "toxicity": 1e300}, None),
    ({"type": "noop", "name": ["x"]}, None),
])
def test_bad_toxics_are_400(api: Api, echo: TcpServer, body: dict[str, Any], message: str | None) -> None:
    api.create("bt", echo.address)
    assert_error(api.post("/proxies/bt/toxics", body), 400, message)
    assert api.get("/proxies/bt/toxics").json() == []


def test_bad_toxic_json_and_updates(api: Api, echo: TcpServer) -> None:
    api.create("bu", echo.address)
    assert_error(api.post("/proxies/bu/toxics", raw=b""), 400, "bad request body: EOF")
    assert_error(api.post("/proxies/bu/toxics", raw=b'{"type": NaN}'), 400)
    assert_error(api.post("/proxies/bu/toxics", raw=b'{"type": "noop", "toxicity": NaN}'), 400)
    api.post("/proxies/bu/toxics", {"type": "slicer", "attributes": {"average_size": 10, "size_variation": 5}})
    assert_error(api.post("/proxies/bu/toxics/slicer_downstream", {"attributes": {"size_variation": 11}}), 400)
    assert_error(api.post("/proxies/bu/toxics/slicer_downstream", {"attributes": {"delay": -1}}), 400)
    assert_error(api.post("/proxies/bu/toxics/slicer_downstream", {"toxicity": []}), 400)
    # a rejected update leaves the toxic unchanged
    assert api.get("/proxies/bu/toxics/slicer_downstream").json()["attributes"] == {
        "average_size": 10, "size_variation": 5, "delay": 0}
    # toxicity outside [0, 1] is stored and echoed, like the real server
    r = api.post("/proxies/bu/toxics", {"type": "noop", "toxicity": 5})
    assert r.json()["toxicity"] == 5


def test_populate(api: Api, echo: TcpServer) -> None:
    r = api.post("/populate", [])
    assert r.status_code == 201 and r.json() == {"proxies": None}
    items = [{"name": "p1", "upstream": echo.address, "listen": "127.0.0.1:0"},
             {"name": "p2", "upstream": echo.address, "listen": "127.0.0.1:0", "enabled": False}]
    r = api.post("/populate", items)
    assert r.status_code == 201 and r.headers["Content-Type"].startswith("application/json")
    p1, p2 = r.json()["proxies"]
    assert p1["enabled"] is True and p2["enabled"] is False
    # identical item (same resolved listen, same upstream) keeps the proxy and its toxics
    api.post("/proxies/p1/toxics", {"type": "noop"})
    r = api.post("/populate", [{"name": "p1", "upstream": echo.address, "listen": p1["listen"]}])
    assert r.json()["proxies"][0]["toxics"] != []
    # different upstream replaces it (toxics gone)
    r = api.post("/populate", [{"name": "p1", "upstream": "127.0.0.1:1", "listen": p1["listen"]}])
    assert r.json()["proxies"][0]["toxics"] == [] and r.json()["proxies"][0]["upstream"] == "127.0.0.1:1"
    # validation happens before anything is created
    r = api.post("/populate", [{"name": "p3", "upstream": echo.address}, {"name": "p4"}])
    assert r.status_code == 400
    assert r.json() == {"error": "missing required field: upstream at proxy 2", "status": 400, "proxies": None}
    assert "p3" not in api.get("/proxies").json()
    assert api.post("/populate", {"name": "x"}).status_code == 400


def test_reset(api: Api, echo: TcpServer) -> None:
    api.create("r1", echo.address)
    api.post("/proxies/r1/toxics", {"type": "latency", "attributes": {"latency": 10}})
    api.post("/proxies/r1", {"enabled": False})
    r = api.post("/reset", raw=b"garbage")
    assert r.status_code == 204 and r.text == ""
    p = api.get("/proxies/r1").json()
    assert p["enabled"] is True and p["toxics"] == []


def test_server_survives_garbage(api: Api, echo: TcpServer) -> None:
    for raw in [b"\xff\xfe", b"{" * 5000, b'{"name": "' + b"a" * 100 + b'"', b"[[[[", b"1e999999"]:
        assert api.post("/proxies", raw=raw).status_code == 400
        assert api.post("/populate", raw=raw).status_code == 400
    assert api.get("/version").status_code == 200


def test_float32_formatting() -> None:
    assert float32_json(float32(0.2)) == 0.2
    assert float32_json(float32(1.0)) == 1
    assert float32_json(float32(0.1234567)) == 0.1234567


def test_slicer_cut_points_cover_input() -> None:
    for length, avg, var in [(1, 1, 0), (1000, 7, 3), (65536, 100, 100), (10, 100, 0)]:
        pieces = Slicer.cut_points(length, avg, var)
        assert pieces[0][0] == 0 and pieces[-1][1] == length
        assert all(a < b for a, b in pieces)
        assert all(pieces[i][1] == pieces[i + 1][0] for i in range(len(pieces) - 1))

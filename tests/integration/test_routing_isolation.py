"""One service in the replicated state that cannot be built must not freeze routing for the
others (issue 11 item 1b), on a real node process, also after a restart; and reads of the
replicated state are consistent under concurrent writes (issue 11 item 3).

The bad services get in through `inject_node.py`: a real node whose state machine also
stores a service without validation (`test.inject_service`, submitted through Raft), so the
test does not depend on how strict the API's validation is.
"""
from __future__ import annotations

import json
import signal
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from halb.demo.launcher import Child, halb_argv
from tests.conftest import Cluster, admin_urlopen, free_port, wait_until

pytestmark = pytest.mark.timeout(180)

INJECT = Path(__file__).with_name("inject_node.py")


def call(c: Cluster, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    req = urllib.request.Request(c.url("n1", path), method=method,
                                 data=None if body is None else json.dumps(body).encode(),
                                 headers={"Authorization": f"Bearer {c.token}", "Content-Type": "application/json"})
    try:
        with admin_urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def routed(c: Cluster, service: str) -> dict[str, Any]:
    """The backends the node's data plane has for `service` (name -> stats row)."""
    code, body = c.get("n1", "/v1/dataplane")
    assert code == 200, body
    return body["services"].get(service, {}).get("backends", {})


def start_injecting(c: Cluster, inject_file: Path) -> Child:
    child = Child("n1", [sys.executable, str(INJECT), str(inject_file),
                         *halb_argv("node", "run", "--config", str(c.config("n1")))[3:]],
                  c.directory / "logs" / "n1.log")
    child.start()
    c.nodes["n1"] = child
    return child


def test_bad_service_in_state_does_not_freeze_routing_of_others(cluster_factory):
    c = cluster_factory(n=1, start=False)
    port = free_port()
    host = c.spec_of("n1").host
    inject = c.directory / "inject.json"
    inject.write_text(json.dumps([
        # both sort before "checkout": the old code stopped at the first of them
        {"name": "aaa-options", "listen": f"{host}:{port}", "options": "abc",
         "backends": [{"name": "x", "address": "127.0.0.1:9"}]},
        {"name": "aab-hashkey", "listen": f"{host}:{free_port()}", "algorithm": "maglev", "hash_key": 5,
         "backends": [{"name": "y", "address": "127.0.0.1:9"}]},
    ]))
    start_injecting(c, inject)
    c.leader()
    wait_until(lambda: (c.directory / "inject.json.done").exists(), 20, 0.1, "bad services injected")
    wait_until(lambda: {"aaa-options", "aab-hashkey"} <= {s["name"] for s in call(c, "GET", "/v1/services")[1]["services"]},
               10, 0.1, "bad services in the replicated state")
    wait_until(lambda: set(routed(c, "checkout")) == {"A", "B", "C"}, 10, 0.1, "seeded service routed")

    # every later change of the unrelated service reaches the data plane
    assert call(c, "POST", "/v1/services/checkout/backends", {"name": "D", "address": f"127.0.0.1:{free_port()}"})[0] == 201
    wait_until(lambda: "D" in routed(c, "checkout"), 5, 0.05, "added backend routed")
    assert call(c, "POST", "/v1/services/checkout/backends/A/drain")[0] == 200
    wait_until(lambda: routed(c, "checkout")["A"]["admin_state"] == "drain", 5, 0.05, "drain routed")
    assert call(c, "PUT", "/v1/services/checkout/backends/B/weight", {"weight": 7})[0] == 200
    wait_until(lambda: routed(c, "checkout")["B"]["weight"] == 7, 5, 0.05, "weight routed")
    assert call(c, "DELETE", "/v1/services/checkout/backends/C")[0] == 200
    wait_until(lambda: "C" not in routed(c, "checkout"), 5, 0.05, "removal routed")
    # ...and health targets follow too (the prober knows D: it has a local view)
    code, rows = call(c, "GET", "/v1/services/checkout/backends")
    assert code == 200 and {r["name"]: r["local"] is not None for r in rows["backends"]} == \
        {"A": True, "B": True, "D": True}

    # the bad ones are skipped and reported: status warning, local event list, ERROR log
    assert "aaa-options" not in routed(c, "__none__") and "aaa-options" not in c.get("n1", "/v1/dataplane")[1]["services"]
    status = c.cli_json("cluster", "status")
    by_name = {s["name"]: s for s in status["services"]}
    assert by_name["aaa-options"]["routing"] == "error" and by_name["aab-hashkey"]["routing"] == "error"
    assert by_name["checkout"]["routing"] == "ok"
    assert any("options must be a map" in w for w in by_name["aaa-options"]["warnings"])
    assert any("hash_key must be a string" in w for w in by_name["aab-hashkey"]["warnings"])
    text = c.cli("cluster", "status").stdout
    assert "aaa-options" in text and "WARNING" in text
    events = c.get("n1", "/v1/local-events")[1]["events"]
    assert {("local.routing_error", "aaa-options"), ("local.routing_error", "aab-hashkey"),
            ("local.health_error", "aaa-options")} <= {(e["kind"], e["service"]) for e in events}
    log = (c.directory / "logs" / "n1.log").read_text()
    assert "ERROR" in log and "service aaa-options skipped on this node" in log

    # restart in that state: the journal replays the bad services; the others are served
    c.nodes["n1"].signal(signal.SIGTERM)
    c.nodes["n1"].proc.wait(15)
    start_injecting(c, inject)  # inject.json is *.done now: nothing is submitted again
    c.leader()
    wait_until(lambda: set(routed(c, "checkout")) == {"A", "B", "D"}, 15, 0.1, "routing after restart")
    assert routed(c, "checkout")["A"]["admin_state"] == "drain"
    assert call(c, "POST", "/v1/services/checkout/backends", {"name": "E", "address": f"127.0.0.1:{free_port()}"})[0] == 201
    wait_until(lambda: "E" in routed(c, "checkout"), 5, 0.05, "change after restart routed")
    by_name = {s["name"]: s for s in c.cli_json("cluster", "status")["services"]}
    assert by_name["aaa-options"]["routing"] == "error" and by_name["checkout"]["routing"] == "ok"

    # removing the bad service clears its warning
    assert call(c, "DELETE", "/v1/services/aaa-options")[0] == 200
    wait_until(lambda: "aaa-options" not in {s["name"] for s in c.cli_json("cluster", "status")["services"]},
               5, 0.1, "bad service removed")


def test_concurrent_backend_adds_keep_targets_and_routing_consistent(cluster_factory):
    """Bulk concurrent adds: no "changed size during iteration", every add routed and checked."""
    c = cluster_factory(n=1)
    per_client, clients = 150, 8
    errors: list[str] = []

    def client(k: int) -> None:
        for i in range(per_client):
            code, body = call(c, "POST", "/v1/services/checkout/backends",
                              {"name": f"b{k}-{i}", "address": f"127.1.{k}.{i + 1}:9"})
            if code != 201:
                errors.append(f"{code} {body}")

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[:3]
    want = {f"b{k}-{i}" for k in range(clients) for i in range(per_client)} | {"A", "B", "C"}
    wait_until(lambda: set(routed(c, "checkout")) == want, 10, 0.1, "every added backend routed")
    code, rows = call(c, "GET", "/v1/services/checkout/backends")
    assert code == 200
    missing = [r["name"] for r in rows["backends"] if r["local"] is None]
    assert not missing, f"{len(missing)} backends without a health check target, e.g. {missing[:5]}"
    log = (c.directory / "logs" / "n1.log").read_text()
    assert "changed size during iteration" not in log

"""ACME without a CA: when orders run (pure schedule), the replicated commands, and every
HTTP listener answering exactly the published HTTP-01 tokens (a real data plane)."""
from __future__ import annotations

import dataclasses

import pytest

from halb.certs.acme_orders import RETRY_MAX_S, RETRY_MIN_S, next_run, renewal_time, retry_delay
from halb.control.commands import CommandError, validate_command
from halb.control.state import ClusterState

DAY = 86400.0


def order(**kw):
    return {"name": "shop", "domains": ["shop.example"], "directory": "https://ca/dir", **kw}


def cert(at=1000.0, nb=1000.0, na=1000.0 + 90 * DAY, source="acme", sans=("shop.example",)):
    return {"name": "shop", "at": at, "not_before": nb, "not_after": na, "source": source, "sans": list(sans)}


def test_an_order_without_certificate_is_due_at_once():
    assert next_run(order(), None).at == 0.0
    assert next_run(order(), cert(source="file")).reason == "no certificate yet"
    assert next_run(order(domains=["a.example", "shop.example"]), cert()).at == 0.0


def test_renewal_at_two_thirds_of_the_lifetime():
    due = next_run(order(), cert())
    assert due.at == pytest.approx(1000.0 + 60 * DAY) == renewal_time(1000.0, 1000.0 + 90 * DAY)
    assert "two thirds" in due.reason


def test_an_explicit_renewal_is_due_when_asked_and_skips_the_failure_backoff():
    c = cert(at=5000.0)
    assert next_run(order(renew_requested=6000.0), c).at == 6000.0
    assert next_run(order(renew_requested=4000.0), c).at > 6000.0  # asked before the cert was stored: done
    failing = order(renew_requested=7000.0, failures=3, failed_at=6500.0)
    assert next_run(failing, c).at == 7000.0  # asked after the failure: no waiting


def test_failures_back_off_doubling_up_to_an_hour():
    assert [retry_delay(n) for n in (0, 1, 2, 3)] == [0.0, RETRY_MIN_S, 2 * RETRY_MIN_S, 4 * RETRY_MIN_S]
    assert retry_delay(50) == RETRY_MAX_S
    due = next_run(order(failures=2, failed_at=100.0), None)
    assert due.at == 100.0 + 2 * RETRY_MIN_S and "2 failure" in due.reason


@pytest.mark.parametrize("domains, reason", [
    (["*.shop.example"], "wildcard"), (["10.0.0.1"], "not a DNS name"), (["shop"], "not a DNS name"),
    (["-bad.example"], "not a DNS name"), ([], "1 to"), (["a.example", "A.example"], "twice"),
])
def test_acme_request_refuses_names_http01_cannot_validate(domains, reason):
    with pytest.raises(CommandError, match=reason):
        validate_command("acme.request", order(domains=domains))


def test_acme_request_needs_an_https_directory_and_pem_bundle():
    with pytest.raises(CommandError, match="https://"):
        validate_command("acme.request", order(directory="http://ca/dir"))
    with pytest.raises(CommandError, match="ca_bundle"):
        validate_command("acme.request", order(ca_bundle="-----BEGIN PRIVATE KEY-----"))
    assert validate_command("acme.request", order(domains=["Shop.Example."]))["domains"] == ["shop.example"]


def test_state_orders_failures_challenges_and_a_file_certificate_conflict():
    st = ClusterState()
    assert st.apply({"op": "acme.request", "args": order(), "at": 10.0}).result["ok"]
    r = st.apply({"op": "acme.failed", "args": {"name": "shop", "reason": "DNS"}, "at": 20.0})
    assert r.result["order"]["failures"] == 1 and st.events[-1].kind == "cert.acme_failed"
    assert "no certificate yet" in st.events[-1].message
    assert st.apply({"op": "acme.renew", "args": {"name": "nope"}}).result["error"] == "not_found"
    tok = "t" * 43
    ch = {"token": tok, "key_authorization": tok + ".thumb", "expires": 100.0}
    assert st.apply({"op": "acme.challenge", "args": ch, "at": 30.0}).result["ok"]
    old = {"token": "o" * 43, "key_authorization": "o" * 43 + ".x", "expires": 50.0}
    st.apply({"op": "acme.challenge", "args": old, "at": 40.0})
    st.apply({"op": "acme.challenge", "args": dict(ch, token="n" * 43, key_authorization="n" * 43 + ".y"),
              "at": 60.0})
    assert set(st.acme_challenges) == {tok, "n" * 43}  # the expired one went
    with pytest.raises(CommandError, match="TOKEN.THUMBPRINT"):
        validate_command("acme.challenge", dict(ch, key_authorization="other.thumb"))
    st.apply({"op": "acme.challenge_clear", "args": {"tokens": [tok]}})
    assert set(st.acme_challenges) == {"n" * 43}
    # a certificate from a file under another name blocks an order of that name
    st.certs["web"] = {"name": "web", "source": "file"}
    assert st.apply({"op": "acme.request", "args": order(name="web")}).result["error"] == "conflict"
    # removing an ACME certificate (issued or not) stops its renewals
    assert st.apply({"op": "cert.remove", "args": {"name": "shop"}}).result["ok"]
    assert "shop" not in st.acme_orders
    copy = ClusterState.from_dict(st.to_dict())
    assert copy.acme_challenges == st.acme_challenges and copy.acme_orders == st.acme_orders


def test_answers_reach_worker_processes_in_the_snapshot():
    from halb.dataplane.snapshot import RoutingSnapshot
    from halb.routing_cache import RoutingCache

    st = ClusterState()
    tok = "t" * 43
    st.apply({"op": "acme.challenge", "args": {"token": tok, "key_authorization": tok + ".k", "expires": 1e12}})
    snap = RoutingCache("127.0.0.1").build(st, lambda s, b: True)
    assert snap.acme_challenges == ((tok, tok + ".k"),)
    assert RoutingSnapshot.from_wire(snap.to_wire()).acme_challenges == snap.acme_challenges


def test_every_http_listener_answers_exactly_the_published_tokens():
    from halb.dataplane.engine import DataPlane
    from halb.dataplane.testing import processes, raw_request, run, service, snapshot, spawn_origin
    from tests.conftest import free_port

    with processes() as procs:
        origin_port = free_port()
        procs.append(spawn_origin("o", origin_port))

        async def main() -> None:
            base = snapshot(service("shop", [("127.0.0.1", origin_port)]))
            dp = DataPlane("t")
            await dp.start(base)
            try:
                port = dp.bound_port("shop")
                path = b"/.well-known/acme-challenge/"
                dp.update(dataclasses.replace(base, version=2, acme_challenges=(("tok1", "tok1.thumb"),)))
                r = await raw_request(port, b"GET " + path + b"tok1 HTTP/1.1\r\nHost: shop.example\r\n\r\n")
                assert r is not None and r.status == 200 and r.body == b"tok1.thumb"
                assert r.headers["content-type"] == "text/plain"
                r = await raw_request(port, b"HEAD " + path + b"tok1 HTTP/1.1\r\nHost: x\r\n\r\n", head_only=True)
                assert r is not None and r.status == 200 and r.headers["content-length"] == "10"
                # another token, another method, another path: the service answers as before
                for req in (b"GET " + path + b"other HTTP/1.1\r\nHost: x\r\n\r\n",
                            b"POST " + path + b"tok1 HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
                            b"GET /tok1 HTTP/1.1\r\nHost: x\r\n\r\n"):
                    r = await raw_request(port, req)
                    assert r is not None and r.body != b"tok1.thumb", req
                dp.update(dataclasses.replace(base, version=3))  # withdrawn
                r = await raw_request(port, b"GET " + path + b"tok1 HTTP/1.1\r\nHost: x\r\n\r\n")
                assert r is not None and r.body != b"tok1.thumb"
            finally:
                await dp.stop()

        run(main())

"""Certificates before Raft: pair checks, key sealing, command shapes, state apply."""
from __future__ import annotations

import time

import pytest

from halb.certs.pem import CertError, check_pair
from halb.certs.sealing import KeySealer, SealError, is_sealed
from halb.control.commands import CommandError, validate_command
from halb.control.state import ClusterState
from tests.certs_util import make_ca, make_key, make_leaf


@pytest.fixture(scope="module")
def ca():
    return make_ca()


def test_a_good_pair_is_normalised_leaf_first(ca):
    leaf = make_leaf(ca, ["shop.example", "*.shop.example", "127.0.0.1"])
    pair = check_pair(ca.cert_pem + leaf.cert_pem, leaf.key_pem(), time.time())
    assert pair.info.sans == ("shop.example", "*.shop.example", "127.0.0.1")
    assert pair.chain_pem.startswith(leaf.cert_pem) and pair.chain_pem.endswith(ca.cert_pem)
    assert pair.key_pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    assert pair.info.not_after > time.time() + 80 * 86400
    assert pair.info.key_type == "ECDSA secp256r1" and len(pair.info.fingerprint) == 64


@pytest.mark.parametrize("case, reason", [
    ("mismatch", "does not belong"),
    ("expired", "expired at"),
    ("future", "not valid before"),
    ("no_san", "no subjectAltName"),
    ("not_pem", "not PEM"),
    ("garbage_pem", "not valid PEM"),
    ("encrypted_key", "encrypted"),
    ("small_rsa", "at least 2048"),
    ("key_not_pem", "not a PEM private key"),
])
def test_a_bad_pair_is_refused_with_its_reason(ca, case, reason):
    leaf = make_leaf(ca, ["shop.example"])
    cert, key = leaf.cert_pem, leaf.key_pem()
    if case == "mismatch":
        key = make_leaf(ca, ["other.example"]).key_pem()
    elif case == "expired":
        old = make_leaf(ca, ["shop.example"], start_days=-30, days=-1)
        cert, key = old.cert_pem, old.key_pem()
    elif case == "future":
        new = make_leaf(ca, ["shop.example"], start_days=2, days=30)
        cert, key = new.cert_pem, new.key_pem()
    elif case == "no_san":
        bare = make_leaf(ca, None)
        cert, key = bare.cert_pem, bare.key_pem()
    elif case == "not_pem":
        cert = "hello"
    elif case == "garbage_pem":
        cert = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
    elif case == "encrypted_key":
        key = leaf.key_pem(password=b"pw")
    elif case == "small_rsa":
        weak = make_leaf(ca, ["shop.example"], key=make_key("rsa1024"))
        cert, key = weak.cert_pem, weak.key_pem()
    elif case == "key_not_pem":
        key = "not a key"
    with pytest.raises(CertError, match=reason):
        check_pair(cert, key, time.time())


def test_sealed_keys_open_only_with_the_same_secret_and_name():
    sealer = KeySealer("s3cret")
    sealed = sealer.seal(b"-----BEGIN PRIVATE KEY-----\nabc\n", "web")
    assert is_sealed(sealed) and b"PRIVATE" not in sealed.encode() and "abc" not in sealed
    assert KeySealer("s3cret").open(sealed, "web") == b"-----BEGIN PRIVATE KEY-----\nabc\n"
    with pytest.raises(SealError):
        KeySealer("other").open(sealed, "web")
    with pytest.raises(SealError):
        sealer.open(sealed, "api")  # moved to another certificate's name
    assert sealer.seal(b"x" * 40, "web") != sealer.seal(b"x" * 40, "web")  # a fresh nonce each time


def _cert_args(ca, sealer, name="web"):
    leaf = make_leaf(ca, ["shop.example"])
    pair = check_pair(leaf.cert_pem, leaf.key_pem(), time.time())
    return {"name": name, "chain": pair.chain_pem, "key_sealed": sealer.seal(pair.key_pem, name),
            "sans": list(pair.info.sans), "not_after": pair.info.not_after}, leaf


def test_the_state_machine_refuses_a_plaintext_key(ca):
    args, leaf = _cert_args(ca, KeySealer("s"))
    for bad in (leaf.key_pem(), "v1.short", 7):
        with pytest.raises(CommandError, match="sealed"):
            validate_command("cert.add", dict(args, key_sealed=bad))
    with pytest.raises(CommandError, match="no private key"):
        validate_command("cert.add", dict(args, chain=args["chain"] + leaf.key_pem()))
    with pytest.raises(CommandError, match="source"):
        validate_command("cert.add", dict(args, source="ftp"))


def test_apply_add_conflict_replace_remove_and_snapshot(ca):
    sealer = KeySealer("s")
    st = ClusterState()
    args, _ = _cert_args(ca, sealer)
    r = st.apply({"op": "cert.add", "args": args, "by": "alice"}).result
    assert r["ok"] and r["cert"]["sans"] == ["shop.example"] and "key_sealed" not in r["cert"]
    again = st.apply({"op": "cert.add", "args": args}).result
    assert again["error"] == "conflict"
    newer, _ = _cert_args(ca, sealer)
    assert st.apply({"op": "cert.add", "args": dict(newer, replace=True)}).result["ok"]
    assert st.certs["web"]["key_sealed"] == newer["key_sealed"]
    copy = ClusterState.from_dict(st.to_dict())
    assert copy.certs == st.certs
    assert [e.kind for e in st.events] == ["cert.added", "cert.replaced"]
    assert st.apply({"op": "cert.remove", "args": {"name": "web"}}).result["ok"]
    assert st.apply({"op": "cert.remove", "args": {"name": "web"}}).result["error"] == "not_found"
    assert st.certs == {}

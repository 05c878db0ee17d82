"""SNI selection (pure) and the certificate set a node builds from the replicated records:
exact SAN, wildcard one label deep, default certificate, isolation of a bad certificate,
reuse of unchanged ones; and a real handshake through memory BIOs (no sockets) that gets
the certificate SNI asks for."""
from __future__ import annotations

import ssl

import pytest

from halb.certs.sealing import KeySealer
from halb.certs.tls import CertSet, DirectSSLObject, SniIndex, load_context, select_cert, server_context, tls_direct
from tests.certs_util import make_ca, make_leaf

RECORDS = {
    "shop": {"sans": ["shop.example", "www.shop.example"], "not_after": 100.0, "at": 2.0},
    "wild": {"sans": ["*.shop.example"], "not_after": 100.0, "at": 3.0},
    "old": {"sans": ["api.example"], "not_after": 50.0, "at": 1.0},
    "new": {"sans": ["api.example"], "not_after": 90.0, "at": 4.0},
}


@pytest.mark.parametrize("name,default,want", [
    ("shop.example", "", "shop"),
    ("www.shop.example", "", "shop"),  # exact beats the wildcard
    ("a.shop.example", "", "wild"),
    ("A.Shop.Example.", "", "wild"),  # case and trailing dot
    ("a.b.shop.example", "", "old"),  # a wildcard covers one label only: default
    ("api.example", "", "new"),  # same SAN twice: the one that expires last
    (None, "", "old"),  # no SNI: the oldest certificate
    ("nobody.test", "shop", "shop"),  # the frontend's default_cert
    ("nobody.test", "gone", "old"),  # a default_cert not in the store: the oldest
])
def test_select(name, default, want):
    index = SniIndex.build(RECORDS)
    assert select_cert(index, name, default, RECORDS) == want


def test_empty_store_selects_nothing():
    assert select_cert(SniIndex.build({}), "shop.example") is None


def _record(leaf, ca, sealer, name, at=1.0):
    return {"name": name, "chain": leaf.cert_pem + ca.cert_pem, "key_sealed": sealer.seal(leaf.key_pem().encode(), name),
            "sans": [str(s) for s in leaf.sans], "not_after": 1e10, "at": at}


def _handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, sni: str | None) -> ssl.SSLObject:
    """A complete TLS handshake between two SSLObjects over memory BIOs."""
    bios = [ssl.MemoryBIO() for _ in range(4)]
    client = client_ctx.wrap_bio(bios[0], bios[1], server_hostname=sni)
    server = server_ctx.wrap_bio(bios[2], bios[3], server_side=True)
    done = [False, False]
    for _ in range(20):
        for i, (obj, out_bio, in_bio) in enumerate(((client, bios[1], bios[2]), (server, bios[3], bios[0]))):
            if not done[i]:
                try:
                    obj.do_handshake()
                    done[i] = True
                except ssl.SSLWantReadError:
                    pass
            data = out_bio.read()
            if data:
                in_bio.write(data)
        if all(done):
            return client
    raise AssertionError("handshake did not finish")


def test_certificate_set_isolates_a_bad_certificate_and_serves_by_sni():
    ca = make_ca()
    sealer = KeySealer("x" * 32)
    shop = make_leaf(ca, ["shop.example"])
    wild = make_leaf(ca, ["*.shop.example"])
    shop.sans, wild.sans = ["shop.example"], ["*.shop.example"]
    records = {"shop": _record(shop, ca, sealer, "shop", 1.0), "wild": _record(wild, ca, sealer, "wild", 2.0)}
    records["broken"] = dict(records["shop"], name="broken", sans=["broken.example"], at=0.5)  # sealed for "shop"
    certs = CertSet.build(records, sealer)
    assert set(certs.contexts) == {"shop", "wild"} and "broken" in certs.errors
    # unchanged certificates are reused as they are (no decrypt, no reload)
    again = CertSet.build(records, sealer, certs)
    assert again.contexts["shop"] is certs.contexts["shop"]

    client_ctx = ssl.create_default_context(cadata=ca.cert_pem)
    client_ctx.set_alpn_protocols(["h2", "http/1.1"])
    srv = server_context(lambda: certs, lambda: "")
    for sni, leaf in (("shop.example", shop), ("a.shop.example", wild)):
        client = _handshake(srv, client_ctx, sni)  # verifies the chain and the name
        assert client.getpeercert(binary_form=True) == leaf.cert.public_bytes(ssl_encoding())
        assert client.selected_alpn_protocol() == "http/1.1"  # never h2: halb speaks HTTP/1.1
        assert client.version() in ("TLSv1.2", "TLSv1.3")
    with pytest.raises(ssl.SSLError):
        _handshake(srv, client_ctx, "a.b.shop.example")  # default (oldest loaded: shop) does not verify


def test_tls_below_1_2_is_refused():
    ca = make_ca()
    sealer = KeySealer("y" * 32)
    leaf = make_leaf(ca, ["shop.example"])
    leaf.sans = ["shop.example"]
    certs = CertSet.build({"shop": _record(leaf, ca, sealer, "shop")}, sealer)
    client_ctx = ssl.create_default_context(cadata=ca.cert_pem)
    client_ctx.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    with pytest.warns(DeprecationWarning):
        client_ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    with pytest.raises(ssl.SSLError):
        _handshake(server_context(lambda: certs, lambda: ""), client_ctx, "shop.example")


def ssl_encoding():
    from cryptography.hazmat.primitives.serialization import Encoding

    return Encoding.DER


def test_direct_sslobject_reads_and_writes_records_through_the_c_methods():
    """The listening context's SSLObjects skip ssl.py's forwarding frames (uvloop calls
    read/write/pending per record): halb's C calls when _tlsdirect is built, else CPython's
    C methods; either way data goes both ways, into a buffer too (tests/unit/test_tlsdirect.py
    compares the two paths)."""
    ca = make_ca()
    leaf = make_leaf(ca, ["shop.example"])
    ctx = load_context(leaf.cert_pem + ca.cert_pem, leaf.key_pem().encode())
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    server = ctx.wrap_bio(s_in, s_out, server_side=True)
    assert isinstance(server, DirectSSLObject)
    owner = server.read.__self__
    assert owner is server.pending.__self__ is server.write.__self__
    assert owner is not server and (type(owner).__name__ == "Direct") == tls_direct()
    client = ssl.create_default_context(cadata=ca.cert_pem).wrap_bio(c_in, c_out, server_hostname="shop.example")

    def pump() -> None:
        for _ in range(10):
            for obj in (client, server):
                try:
                    obj.do_handshake()
                except ssl.SSLWantReadError:
                    pass
            s_in.write(c_out.read())
            c_in.write(s_out.read())

    pump()
    assert server.version() in ("TLSv1.2", "TLSv1.3") and server.selected_alpn_protocol() is None
    client.write(b"GET / HTTP/1.1\r\n\r\n")
    s_in.write(c_out.read())
    assert server.read(256 * 1024) == b"GET / HTTP/1.1\r\n\r\n"
    assert server.pending() == 0
    assert server.write(b"HTTP/1.1 200 OK\r\n\r\nhello") == 24
    c_in.write(s_out.read())
    assert client.read(1024) == b"HTTP/1.1 200 OK\r\n\r\nhello"
    client.write(b"more")
    s_in.write(c_out.read())
    buf = bytearray(16)
    assert server.read(16, buf) == 4 and bytes(buf[:4]) == b"more"
    with pytest.raises(ssl.SSLWantReadError):
        server.read(1024)

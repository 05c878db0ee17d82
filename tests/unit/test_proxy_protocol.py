"""PROXY protocol headers: what halb sends parses with an independent implementation, and
halb's parser takes split input, refuses garbage and long lines."""
from __future__ import annotations

import pytest
from proxyprotocol.v1 import ProxyProtocolV1
from proxyprotocol.v2 import ProxyProtocolV2

from halb.dataplane.proxy_protocol import ProxyHeaderError, header, parse

ADDRS = [(("10.1.2.3", 4567), ("10.0.0.1", 80)), (("2001:db8::1", 1), ("2001:db8::2", 443)),
         (("10.1.2.3", 5), ("::1", 80))]


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("addrs", ADDRS)
def test_headers_round_trip_and_match_an_independent_parser(version, addrs):
    h = header(version, addrs)
    n, got = parse(h + b"GET / HTTP/1.1\r\n")
    assert n == len(h)
    lib = (ProxyProtocolV1() if version == "v1" else ProxyProtocolV2()).unpack(h)
    assert (str(lib.source[0]), lib.source[1]) == got[0] and (str(lib.dest[0]), lib.dest[1]) == got[1]
    if addrs[0][0] == "10.1.2.3" and addrs[1][0] == "10.0.0.1":
        assert got == addrs
    for i in range(len(h)):  # every prefix asks for more
        assert parse(h[:i]) is None


@pytest.mark.parametrize("bad", [
    b"GET / HTTP/1.1\r\n", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n", b"PROXY TCP4 1.2.3.4\r\n",
    b"PROXY TCP4 1.2.3.4 ::1 1 2\r\n", b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", b"PROXY " + b"x" * 120,
    b"\r\n\r\n\x00\r\nQUIT\n\x31\x11\x00\x0c" + bytes(12), b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\xff\xff",
    b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x04" + bytes(4),
])
def test_garbage_is_refused(bad):
    with pytest.raises(ProxyHeaderError):
        parse(bad)


def test_unknown_and_local_keep_the_socket_addresses():
    assert parse(b"PROXY UNKNOWN\r\nrest") == (15, None)
    local = b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00"
    assert parse(local + b"x") == (16, None)

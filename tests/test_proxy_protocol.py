"""The PROXY protocol parser and X-Forwarded-For (server/support/proxy_protocol.py), without a
daemon: both header versions, every bound, hostile input, and that reading consumes nothing
after the header. HAProxy itself talks to a daemon in tests/test_haproxy.py."""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time

import pytest
from hypothesis import given, settings, strategies as st

from scriptsftp.server.support.proxy_protocol import (
    V1_MAX, V2_MAX_LENGTH, V2_SIGNATURE, ProxyError, TrustedProxies, forwarded_for, looks_like_header,
    parse_v1, parse_v2, read_header, read_header_async,
)


def v2(src: str = "192.0.2.7", sport: int = 40000, *, command: int = 1, family: int = 0x11,
       tlv: bytes = b"") -> bytes:
    if family >> 4 == 1:
        body = socket.inet_aton(src) + socket.inet_aton("198.51.100.1") + struct.pack("!HH", sport, 22)
    elif family >> 4 == 2:
        body = socket.inet_pton(socket.AF_INET6, src) + bytes(16) + struct.pack("!HH", sport, 22)
    else:
        body = b""
    body += tlv
    return V2_SIGNATURE + bytes([0x20 | command, family]) + struct.pack("!H", len(body)) + body


def test_v1_tcp4_tcp6_unknown() -> None:
    assert parse_v1(b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 22\r\n").client == ("192.0.2.7", 40000)
    assert parse_v1(b"PROXY TCP6 2001:db8::7 2001:db8::1 40000 22\r\n").client == ("2001:db8::7", 40000)
    assert parse_v1(b"PROXY UNKNOWN\r\n").client is None
    assert parse_v1(b"PROXY UNKNOWN ffff:f...f 4 5\r\n").client is None


@pytest.mark.parametrize("line", [
    b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 22\n",          # no CR
    b"PROXY TCP4 192.0.2.7 198.51.100.1 40000\r\n",           # field missing
    b"PROXY TCP4 2001:db8::7 198.51.100.1 40000 22\r\n",      # family mismatch
    b"PROXY TCP6 192.0.2.7 2001:db8::1 40000 22\r\n",
    b"PROXY TCP4 192.0.2.777 198.51.100.1 40000 22\r\n",
    b"PROXY TCP4 192.0.2.07 198.51.100.1 40000 22\r\n",       # leading zero
    b"PROXY TCP4 192.0.2.7 198.51.100.1 65536 22\r\n",
    b"PROXY TCP4 192.0.2.7 198.51.100.1 040000 22\r\n",
    b"PROXY TCP4 192.0.2.7 198.51.100.1 -1 22\r\n",
    b"PROXY TCP4  192.0.2.7 198.51.100.1 40000 22\r\n",       # two spaces
    b"PROXY UDP4 192.0.2.7 198.51.100.1 40000 22\r\n",
    b"PROXY TCP4 \xff.0.2.7 198.51.100.1 40000 22\r\n",
    b"PROXY " + b"1" * 110 + b"\r\n",                          # over 107 bytes
])
def test_v1_malformed(line: bytes) -> None:
    with pytest.raises(ProxyError):
        parse_v1(line)


def test_v2_ipv4_ipv6_local_unix_and_tlvs() -> None:
    assert parse_v2(v2()).client == ("192.0.2.7", 40000)
    assert parse_v2(v2("2001:db8::7", family=0x21)).client == ("2001:db8::7", 40000)
    assert parse_v2(v2("::ffff:192.0.2.9", family=0x21)).client == ("192.0.2.9", 40000)
    assert parse_v2(v2(command=0, family=0x00)).client is None  # LOCAL: a health check
    assert parse_v2(v2(family=0x31)).client is None              # AF_UNIX: nothing to tell
    assert parse_v2(v2(tlv=b"\x04\x00\x03abc")).client == ("192.0.2.7", 40000)


@pytest.mark.parametrize("header", [
    v2()[:-1],                                                   # shorter than announced
    v2() + b"x",
    b"\r\n\r\n\x00\r\nQUIT!" + v2()[12:],                        # bad signature
    v2()[:12] + b"\x11" + v2()[13:],                             # version 1 in a v2 header
    v2()[:12] + b"\x22" + v2()[13:],                             # command 2
    v2()[:13] + b"\x41" + v2()[14:],                             # family 4
    v2()[:13] + b"\x13" + v2()[14:],                             # transport 3
    V2_SIGNATURE + b"\x21\x11\x00\x04" + bytes(4),               # IPv4 block too short
    V2_SIGNATURE + b"\x21\x21\x00\x0c" + bytes(12),              # IPv6 block too short
])
def test_v2_malformed(header: bytes) -> None:
    with pytest.raises(ProxyError):
        parse_v2(header)


@given(st.binary(max_size=300))
@settings(max_examples=300, deadline=None)
def test_parsers_never_raise_anything_but_proxy_error(data: bytes) -> None:
    for parse in (parse_v1, parse_v2):
        try:
            parse(data)
        except ProxyError:
            pass
    try:
        parse_v2(V2_SIGNATURE + data)
    except ProxyError:
        pass


def test_looks_like_header() -> None:
    assert looks_like_header(b"PROXY TCP4")
    assert looks_like_header(V2_SIGNATURE)
    assert looks_like_header(b"PRO")  # could still be one
    assert not looks_like_header(b"PUT /x")
    assert not looks_like_header(b"SSH-2.0")
    assert not looks_like_header(b"\x16\x03\x01")  # a TLS ClientHello
    assert not looks_like_header(b"")


def pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    return a, b


@pytest.mark.parametrize("header, client", [
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 22\r\n", ("192.0.2.7", 40000)),
    (v2(), ("192.0.2.7", 40000)),
    (v2(command=0, family=0), None),
])
def test_read_header_consumes_exactly_the_header(header: bytes, client: tuple[str, int] | None) -> None:
    ours, theirs = pair()
    with ours, theirs:
        theirs.sendall(header + b"SSH-2.0-client\r\n")
        got = read_header(ours, time.monotonic() + 5)
        assert got.client == client
        assert ours.recv(100) == b"SSH-2.0-client\r\n"  # the protocol behind it is intact
        assert ours.gettimeout() is None


def test_read_header_async_consumes_exactly_the_header() -> None:
    ours, theirs = pair()
    ours.setblocking(False)

    async def run() -> tuple[object, bytes]:
        got = await read_header_async(ours, 5)
        return got.client, await asyncio.get_running_loop().sock_recv(ours, 100)

    with ours, theirs:
        theirs.sendall(v2() + b"GET / HTTP/1.1\r\n")
        assert asyncio.run(run()) == (("192.0.2.7", 40000), b"GET / HTTP/1.1\r\n")


@pytest.mark.parametrize("data, why", [
    (b"SSH-2.0-OpenSSH_9.2\r\n", "no PROXY header"),
    (b"PROXY " + b"9" * 200, "longer than 107"),
    (V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", V2_MAX_LENGTH + 1), "at most"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r", "not complete in time"),  # a slow (stalled) proxy
    (b"PROX", "not complete in time"),
])
def test_read_header_refuses(data: bytes, why: str) -> None:
    ours, theirs = pair()
    with ours, theirs:
        theirs.sendall(data)
        started = time.monotonic()
        with pytest.raises(ProxyError, match=why):
            read_header(ours, time.monotonic() + 0.5)
        assert time.monotonic() - started < 3


def test_read_header_v1_reads_at_most_107_bytes() -> None:
    ours, theirs = pair()
    with ours, theirs:
        theirs.sendall(b"PROXY " + b"9" * 500)
        with pytest.raises(ProxyError):
            read_header(ours, time.monotonic() + 2)
        rest = b""
        ours.setblocking(False)
        rest = ours.recv(1000)
        assert len(rest) == 500 + 6 - V1_MAX  # nothing past the bound was read


def test_read_header_trickled_within_the_deadline() -> None:
    ours, theirs = pair()
    header = b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 22\r\n"

    def trickle() -> None:
        for i in range(0, len(header), 5):
            theirs.sendall(header[i:i + 5])
            time.sleep(0.01)

    with ours, theirs:
        t = threading.Thread(target=trickle)
        t.start()
        assert read_header(ours, time.monotonic() + 5).client == ("192.0.2.7", 40000)
        t.join()


def test_read_header_closed_early() -> None:
    ours, theirs = pair()
    with ours:
        theirs.sendall(b"PROXY TCP4 1.2")
        theirs.close()
        with pytest.raises(ProxyError, match="closed"):
            read_header(ours, time.monotonic() + 5)


def test_trusted_proxies() -> None:
    t = TrustedProxies(["10.0.0.0/8", "2001:db8::/32", "127.0.0.2/32"])
    assert t and t.trusts("10.1.2.3") and t.trusts("2001:db8::1") and t.trusts("::ffff:10.0.0.1")
    assert not t.trusts("127.0.0.1") and not t.trusts("192.0.2.1") and not t.trusts("not-an-ip")
    assert not TrustedProxies([])


def test_forwarded_for_takes_the_rightmost_untrusted_hop() -> None:
    t = TrustedProxies(["10.0.0.0/8"])
    assert forwarded_for(["198.51.100.9"], "10.0.0.1", t) == "198.51.100.9"
    # a client writes what it likes on the left; the hop our proxy appended is on the right
    assert forwarded_for(["1.1.1.1, 198.51.100.9"], "10.0.0.1", t) == "198.51.100.9"
    assert forwarded_for(["1.1.1.1", "198.51.100.9, 10.0.0.5"], "10.0.0.1", t) == "198.51.100.9"
    assert forwarded_for(["10.0.0.7, 10.0.0.5"], "10.0.0.1", t) == "10.0.0.7"  # every hop trusted
    assert forwarded_for([], "10.0.0.1", t) == "10.0.0.1"
    assert forwarded_for(["garbage"], "10.0.0.1", t) == "10.0.0.1"
    assert forwarded_for(["garbage, 10.0.0.5"], "10.0.0.1", t) == "10.0.0.5"
    assert forwarded_for(["[2001:db8::9]"], "10.0.0.1", t) == "2001:db8::9"
    assert forwarded_for([",".join(["1.1.1.1"] * 100)], "10.0.0.1", t) == "10.0.0.1"  # bounded

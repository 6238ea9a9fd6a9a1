"""The PROXY protocol (HAProxy's, versions 1 and 2) and ``X-Forwarded-For``: who the client
behind a load balancer is.

A balancer in TCP mode that connects to us on a client's behalf starts the connection with a
header naming the client (``send-proxy`` / ``send-proxy-v2`` in HAProxy). The header is believed
only from ``[cluster] trusted_proxies`` (:class:`TrustedProxies`); the front ends read it before
their protocol library sees the socket, then serve the connection as the named client's: logs,
events, ``allowed_ips`` and the defender see that address (docs/cluster.md).

Reading is bounded and hostile-input safe (docs/architecture.md rule 11): every ``recv`` asks
for exactly the bytes the header still needs, so nothing of the protocol behind it is consumed
(a version 1 line is read a byte at a time, at most 107 bytes; a version 2 header is 16 bytes
and then the length it announces, at most :data:`V2_MAX_LENGTH`), and all of it within one
deadline, the caller's pre-authentication time. There is no dependency: the PyPI packages for
this are small and either unmaintained or asyncio-only, and this parser is fully tested
(tests/test_proxy_protocol.py) against HAProxy itself (tests/test_haproxy.py).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct
import time
from dataclasses import dataclass
from typing import Generator, Iterable

__all__ = [
    "ProxyError", "ProxiedAddress", "TrustedProxies", "V1_MAX", "V2_SIGNATURE", "V2_MAX_LENGTH",
    "parse_v1", "parse_v2", "read_header", "read_header_async", "looks_like_header", "forwarded_for",
]

V1_MAX = 107  # the longest version 1 line, CRLF included (the specification's bound)
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_MAX_LENGTH = 4096  # address block and TLVs; HAProxy sends well under 1 KiB even with TLS TLVs
_V1_PREFIX = b"PROXY "
_PREFIX_LEN = 6  # enough to tell "PROXY " from the start of the version 2 signature


class ProxyError(Exception):
    """A missing, malformed, oversized or too slow PROXY header; the connection must close."""


@dataclass(frozen=True)
class ProxiedAddress:
    """What a header said: the client's address and port, or None for a connection the proxy
    makes on its own behalf (v2 LOCAL, v1 UNKNOWN: health checks), served as the proxy's."""

    client: tuple[str, int] | None
    version: int


class TrustedProxies:
    """The networks of ``[cluster] trusted_proxies``."""

    def __init__(self, networks: Iterable[str] = ()) -> None:
        self.networks = tuple(ipaddress.ip_network(n, strict=False) for n in networks)

    def __bool__(self) -> bool:
        return bool(self.networks)

    def trusts(self, ip: str) -> bool:
        try:
            addr = ipaddress.ip_address(ip.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        return any(addr in net for net in self.networks)


# --- parsing -----------------------------------------------------------------------------


def looks_like_header(first: bytes) -> bool:
    """Whether the first bytes a client sent start a PROXY header (either version); needs
    up to 6 bytes, fewer answer on what they have."""
    n = min(len(first), _PREFIX_LEN)
    return n > 0 and (first[:n] == _V1_PREFIX[:n] or first[:n] == V2_SIGNATURE[:n])


def _ip(text: str, family: int) -> str:
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        raise ProxyError(f"bad address {text[:40]!r}") from None
    if addr.version != family:
        raise ProxyError(f"address {text!r} is not IPv{family}")
    if text != str(addr) and family == 4:  # no leading zeros ("010.0.0.1" is ambiguous)
        raise ProxyError(f"bad address {text!r}")
    return str(addr)


def _port(text: str) -> int:
    if not text.isdigit() or len(text) > 5 or (len(text) > 1 and text[0] == "0") or int(text) > 65535:
        raise ProxyError(f"bad port {text[:10]!r}")
    return int(text)


def parse_v1(line: bytes) -> ProxiedAddress:
    """One version 1 line, CRLF included: ``PROXY TCP4 SRC DST SPORT DPORT\\r\\n`` (or TCP6,
    or ``PROXY UNKNOWN…``)."""
    if len(line) > V1_MAX or not line.endswith(b"\r\n") or not line.startswith(_V1_PREFIX):
        raise ProxyError("malformed version 1 header")
    try:
        text = line[:-2].decode("ascii")
    except UnicodeDecodeError:
        raise ProxyError("version 1 header is not ASCII") from None
    parts = text.split(" ")
    if len(parts) >= 2 and parts[1] == "UNKNOWN":
        return ProxiedAddress(None, 1)
    if len(parts) != 6 or parts[1] not in ("TCP4", "TCP6"):
        raise ProxyError("malformed version 1 header")
    family = 4 if parts[1] == "TCP4" else 6
    src = _ip(parts[2], family)
    _ip(parts[3], family)
    sport = _port(parts[4])
    _port(parts[5])
    return ProxiedAddress((src, sport), 1)


def parse_v2(header: bytes) -> ProxiedAddress:
    """One whole version 2 header: the 16 fixed bytes and the block they announce."""
    if len(header) < 16 or header[:12] != V2_SIGNATURE:
        raise ProxyError("malformed version 2 header")
    ver_cmd, fam, length = header[12], header[13], struct.unpack("!H", header[14:16])[0]
    if ver_cmd >> 4 != 2:
        raise ProxyError(f"unknown version {ver_cmd >> 4}")
    if len(header) != 16 + length:
        raise ProxyError("version 2 header length mismatch")
    command = ver_cmd & 0x0F
    if command == 0:  # LOCAL: the proxy's own connection (a health check)
        return ProxiedAddress(None, 2)
    if command != 1:
        raise ProxyError(f"unknown command {command}")
    body = header[16:]
    family, transport = fam >> 4, fam & 0x0F
    if transport not in (0, 1, 2):
        raise ProxyError(f"unknown transport {transport}")
    if family == 1:  # AF_INET: 4 + 4 + 2 + 2
        if length < 12:
            raise ProxyError("version 2 IPv4 block too short")
        src = str(ipaddress.IPv4Address(body[0:4]))
        sport = struct.unpack("!H", body[8:10])[0]
    elif family == 2:  # AF_INET6: 16 + 16 + 2 + 2
        if length < 36:
            raise ProxyError("version 2 IPv6 block too short")
        v6 = ipaddress.IPv6Address(body[0:16])
        src = str(v6.ipv4_mapped) if v6.ipv4_mapped is not None else str(v6)
        sport = struct.unpack("!H", body[32:34])[0]
    elif family in (0, 3):  # AF_UNSPEC, AF_UNIX: no client address to tell
        return ProxiedAddress(None, 2)
    else:
        raise ProxyError(f"unknown address family {family}")
    return ProxiedAddress((src, sport), 2)


# --- reading from a socket -------------------------------------------------------------------


def _recv_exact(sock: socket.socket, n: int, deadline: float) -> bytes:
    out = b""
    while len(out) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise ProxyError("PROXY header not complete in time")
        sock.settimeout(left)
        try:
            chunk = sock.recv(n - len(out))
        except socket.timeout:
            raise ProxyError("PROXY header not complete in time") from None
        except OSError as exc:
            raise ProxyError(f"connection failed before the PROXY header: {exc}") from None
        if not chunk:
            raise ProxyError("connection closed before the PROXY header was complete")
        out += chunk
    return out


def _header_steps() -> Generator[int, bytes, ProxiedAddress]:
    """The framing of a PROXY header (either version) without I/O: yields how many bytes it
    needs next and is sent exactly those, so the blocking and the asyncio readers share it and
    neither reads a byte past the header."""
    first = yield _PREFIX_LEN
    if first == _V1_PREFIX:
        line = first
        while not line.endswith(b"\r\n"):
            if len(line) >= V1_MAX:
                raise ProxyError(f"version 1 header longer than {V1_MAX} bytes")
            line += yield 1
        return parse_v1(line)
    if first == V2_SIGNATURE[:_PREFIX_LEN]:
        fixed = first + (yield 16 - _PREFIX_LEN)
        if fixed[:12] != V2_SIGNATURE:
            raise ProxyError("malformed version 2 header")
        length = struct.unpack("!H", fixed[14:16])[0]
        if length > V2_MAX_LENGTH:
            raise ProxyError(f"version 2 header of {length} bytes (at most {V2_MAX_LENGTH})")
        return parse_v2(fixed + (yield length))
    raise ProxyError("no PROXY header")


def read_header(sock: socket.socket, deadline: float) -> ProxiedAddress:
    """Read one PROXY header (either version) off a connected socket by ``deadline``
    (``time.monotonic()``), consuming nothing after it. The socket is left blocking, with no
    timeout; ProxyError if there is no valid header in time."""
    steps = _header_steps()
    try:
        need = next(steps)
        while True:
            need = steps.send(_recv_exact(sock, need, deadline))
    except StopIteration as done:
        header: ProxiedAddress = done.value
        return header
    finally:
        try:
            sock.settimeout(None)
        except OSError:
            pass


async def read_header_async(sock: socket.socket, timeout: float) -> ProxiedAddress:
    """:func:`read_header` for a non-blocking socket on an asyncio loop; the socket stays
    non-blocking."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout

    async def exact(n: int) -> bytes:
        out = b""
        while len(out) < n:
            left = deadline - loop.time()
            if left <= 0:
                raise ProxyError("PROXY header not complete in time")
            try:
                chunk = await asyncio.wait_for(loop.sock_recv(sock, n - len(out)), left)
            except asyncio.TimeoutError:
                raise ProxyError("PROXY header not complete in time") from None
            except OSError as exc:
                raise ProxyError(f"connection failed before the PROXY header: {exc}") from None
            if not chunk:
                raise ProxyError("connection closed before the PROXY header was complete")
            out += chunk
        return out

    steps = _header_steps()
    try:
        need = next(steps)
        while True:
            need = steps.send(await exact(need))
    except StopIteration as done:
        header: ProxiedAddress = done.value
        return header


# --- X-Forwarded-For ---------------------------------------------------------------------------


def forwarded_for(values: Iterable[str], peer: str, trusted: TrustedProxies, max_hops: int = 32) -> str:
    """The client address an ``X-Forwarded-For`` chain names, for a request ``peer`` (a trusted
    proxy) sent: the rightmost hop that is not itself a trusted proxy (a client can write any
    hop to the left of it, none to the right). Every hop trusted: the leftmost. No header, or a
    malformed hop reached before an untrusted one: ``peer``."""
    hops: list[str] = []
    for value in values:
        hops.extend(h.strip() for h in value.split(","))
    if not hops or len(hops) > max_hops:
        return peer
    chosen = peer
    for hop in reversed(hops):
        try:
            addr = ipaddress.ip_address(hop.strip("[]"))
        except ValueError:
            return chosen  # the nearest hop known, a trusted one (or the peer)
        chosen = str(addr)
        if not trusted.trusts(chosen):
            return chosen
    return chosen

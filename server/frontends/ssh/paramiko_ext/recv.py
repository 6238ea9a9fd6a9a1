"""Packets into paramiko through one receive buffer per connection, with a size limit and few copies.

What paramiko 5.1's ``Packetizer`` does per packet, and what is done here instead:

* Two ``recv()`` calls (the first cipher block, then the rest), however many
  packets the kernel already holds. Here ``recv_into()`` fills a per-connection
  buffer with whatever has arrived, so a burst of small packets (a client's
  pipelined READ requests, window adjustments) costs one system call.
* No upper bound on the length field: after key exchange, before any login, a
  client could announce a 4 GiB packet, and our earlier ``recv_into`` version
  of ``read_all`` allocated it up front. Here a packet longer than
  ``PACKET_LIMIT`` ends the connection, as OpenSSH does (``Bad packet length``).
* Each packet was copied three or four times on its way in (``header[4:] +
  rest``, ``seq + packet`` for the MAC, ``packet[1:...]``, ``payload[1:]``).
  Here the MAC is fed views of the buffer, aes-ctr and aes-gcm decrypt from a
  view, and the message body is sliced once.

Two hooks for the SFTP packet stream (sftp_stream.py): ``set_sink`` hands a
channel's data to it straight from the decrypted packet, without a ``Message``
or the channel's pipe, and ``before_wait`` runs a callback just before the
transport thread would block on the socket (held replies leave then).

The unencrypted start, compression and packet dumps keep paramiko's own
``read_message``, which reads through the same buffer via ``read_all``. Rekey requests, keepalives, handshake
timeouts and the rekey overflow guard behave as in paramiko.
``tests/test_paramiko_recv.py`` feeds both implementations the same bytes.
"""

from __future__ import annotations

import errno
import hmac
import os
import socket
import struct
from typing import Any, Callable

from paramiko.common import MSG_CHANNEL_DATA, MSG_IGNORE, xffffffff
from paramiko.message import Message
from paramiko.packet import NeedRekeyException, Packetizer, first_arg
from paramiko.ssh_exception import SSHException

PACKET_LIMIT = 262144 + 4096  # [sftp] max_packet is at most 256 KiB of data; the rest is headers
BUFFER_START = 36 * 1024  # grows to the largest packet seen; 100 idle sessions hold 3.6 MB
_U32 = struct.Struct(">I")
_U32_PAIR = struct.Struct(">II")


class _RecvBuffer:
    __slots__ = ("data", "start", "end")

    def __init__(self) -> None:
        self.data = bytearray(BUFFER_START)
        self.start = 0  # first byte not yet consumed
        self.end = 0  # one past the last byte received


def _buffer(pk: Packetizer) -> _RecvBuffer:
    rb = pk.__dict__.get("_scriptsftp_recv")
    if rb is None:
        rb = pk.__dict__["_scriptsftp_recv"] = _RecvBuffer()
        remainder = pk._Packetizer__remainder  # type: ignore[attr-defined]  # bytes read past the banner
        if remainder:
            _room(rb, len(remainder))
            rb.data[:len(remainder)] = remainder
            rb.end = len(remainder)
            pk._Packetizer__remainder = b""  # type: ignore[attr-defined]
    return rb


def _room(rb: _RecvBuffer, n: int) -> None:
    """Make ``rb.data[rb.start:]`` able to hold ``n`` bytes."""
    if len(rb.data) - rb.start >= n:
        return
    held = rb.end - rb.start
    if rb.start:
        rb.data[:held] = rb.data[rb.start:rb.end]
        rb.start, rb.end = 0, held
    if len(rb.data) < n:
        rb.data.extend(bytes(n - len(rb.data)))


def fill(pk: Packetizer, n: int, check_rekey: bool = False) -> _RecvBuffer:
    """Block until ``n`` unconsumed bytes are buffered; the timeout and rekey rules of read_all."""
    rb = _buffer(pk)
    if rb.end - rb.start >= n:
        return rb
    if rb.start == rb.end:
        rb.start = rb.end = 0  # all consumed: the next read gets the whole buffer, not its end
    _room(rb, n)
    sock = pk._Packetizer__socket  # type: ignore[attr-defined]
    had = rb.end - rb.start
    while rb.end - rb.start < n:
        got_timeout = False
        if pk.handshake_timed_out():
            raise EOFError()
        try:
            with memoryview(rb.data) as view:
                k = _recv_into(sock, view[rb.end:], pk)
            if k == 0:
                raise EOFError()
            rb.end += k
        except socket.timeout:
            got_timeout = True
        except socket.error as e:
            if first_arg(e) == errno.EAGAIN:
                got_timeout = True
            elif pk._Packetizer__closed:  # type: ignore[attr-defined]
                raise EOFError()
            else:
                raise
        if got_timeout:
            if pk._Packetizer__closed:  # type: ignore[attr-defined]
                raise EOFError()
            if check_rekey and had == 0 and rb.end == rb.start and pk._Packetizer__need_rekey:  # type: ignore[attr-defined]
                raise NeedRekeyException()
            pk._check_keepalive()  # type: ignore[attr-defined]
    return rb


def _recv_into(sock: socket.socket, view: memoryview, pk: Packetizer) -> int:
    """``sock.recv_into(view)`` without the poll() Python makes first on a socket with a timeout.

    Such a socket's descriptor is non-blocking underneath, so ``os.readv`` returns at once
    with what has arrived; only when nothing has does the timed ``recv_into`` wait, after
    the ``before_wait`` callbacks ran. The poll cost a system call and a GIL hand-off per
    packet. (paramiko always sets a timeout; a blocking socket would make readv() wait past
    the keepalive and rekey checks.)"""
    if sock.gettimeout() is not None:
        try:
            return os.readv(sock.fileno(), [view])
        except BlockingIOError:
            pass
    _run_before_wait(pk)
    return sock.recv_into(view)


def before_wait(pk: Packetizer, fn: Callable[[], None]) -> None:
    """Have the transport thread call ``fn`` once, the next time it is about to wait for the socket.

    While other connections keep the server busy, the SFTP front end holds its small
    replies until then: libssh2 (curl) sends three WRITEs at a time, and their three status
    replies leave in one packet and one system call instead of three. ``fn`` must not
    raise or block."""
    hooks = pk.__dict__.setdefault("_scriptsftp_before_wait", [])
    if fn not in hooks:
        hooks.append(fn)


def _run_before_wait(pk: Packetizer) -> None:
    hooks = pk.__dict__.get("_scriptsftp_before_wait")
    if hooks:
        pk.__dict__["_scriptsftp_before_wait"] = []
        for fn in hooks:
            fn()


def read_all(pk: Packetizer, n: int, check_rekey: bool = False) -> bytes:
    """``Packetizer.read_all`` through the buffer."""
    if n > PACKET_LIMIT + 64:
        raise SSHException(f"Bad packet length {n}")
    rb = fill(pk, n, check_rekey)
    out = bytes(rb.data[rb.start:rb.start + n])
    rb.start += n
    return out


def keyed_hmac(pk: Packetizer, direction: str) -> Any:
    """The HMAC of one direction ("in" or "out"), keyed once per key (a rekey brings a new
    key object); callers ``copy()`` it per packet instead of keying HMAC every time."""
    d = pk.__dict__
    key = d["_Packetizer__mac_key_" + direction]
    cached = d.get("_scriptsftp_mac_" + direction)
    if cached is None or cached[0] is not key:
        cached = d["_scriptsftp_mac_" + direction] = (
            key, hmac.new(key, digestmod=d["_Packetizer__mac_engine_" + direction]))
    return cached[1]


def read_message(pk: Packetizer) -> tuple[int, Message]:
    """``Packetizer.read_message``: aes-gcm and aes-ctr (ETM or not) read from the buffer without
    copies; the unencrypted start, compression and packet dumps by paramiko's own code."""
    p = "_Packetizer__"
    d = pk.__dict__
    engine = d[p + "block_engine_in"]
    if engine is None or d[p + "compress_engine_in"] is not None or d[p + "dump_packets"]:
        return _original_read_message(pk)
    seq = d[p + "sequence_number_in"]
    if d[p + "aead_in"]:
        plain, packet_size, raw = _open_gcm(pk, d, engine)
        padding, cmd = plain[0], plain[1]
        body_start = 2
    elif d[p + "etm_in"]:
        plain, packet_size, raw = _open_etm(pk, d, engine, seq)
        padding, cmd = plain[0], plain[1]
        body_start = 2
    else:
        plain, packet_size, raw = _open_mac_on_plaintext(pk, d, engine, seq)
        padding, cmd = plain[4], plain[5]
        body_start = 6
        packet_size += 4  # plain still starts with the length field
    if padding + body_start > packet_size:
        raise SSHException("Invalid packet padding")
    next_seq = (seq + 1) & xffffffff
    if next_seq == 0 and not pk._initial_kex_done:  # type: ignore[attr-defined]
        raise SSHException("Sequence number rolled over during initial kex!")
    d[p + "sequence_number_in"] = next_seq
    _count_received(pk, raw)
    end = packet_size - padding
    if cmd == MSG_CHANNEL_DATA and d.get("_scriptsftp_sinks") and _to_sink(d["_scriptsftp_sinks"], plain, body_start, end):
        return MSG_IGNORE, Message()  # taken: the transport loop goes on to the next packet
    msg = Message(plain[body_start:end])
    msg.seqno = seq
    return cmd, msg


def set_sink(pk: Packetizer, chanid: int, sink: Callable[[memoryview], bool] | None) -> None:
    """Have CHANNEL_DATA for local channel ``chanid`` go to ``sink`` straight from the packet.

    paramiko turns each data packet into a ``Message`` (a copy), dispatches it through the
    transport loop to ``Channel._feed`` (another copy, into the channel's pipe, under its
    lock), from which the SFTP handler reads it again: for curl's 30 KB WRITEs, about a
    fifth of the server's time. ``sink(data)`` gets a view of the decrypted data in the
    transport thread and returns False to have the packet take that usual way after all
    (it must then have kept nothing). None removes the sink."""
    sinks = pk.__dict__.setdefault("_scriptsftp_sinks", {})
    if sink is None:
        sinks.pop(chanid, None)
    else:
        sinks[chanid] = sink


def _to_sink(sinks: dict[int, Callable[[memoryview], bool]], plain: bytes, body: int, end: int) -> bool:
    if end - body < 8:
        return False
    chanid, n = _U32_PAIR.unpack_from(plain, body)
    sink = sinks.get(chanid)
    if sink is None or body + 8 + n > end:
        return False  # malformed: paramiko's own parse deals with it
    return sink(memoryview(plain)[body + 8:body + 8 + n])


def _length(rb: _RecvBuffer, head: bytes | None = None) -> int:
    packet_size = _U32.unpack_from(head if head is not None else rb.data, 0 if head is not None else rb.start)[0]
    if packet_size > PACKET_LIMIT or packet_size < 8:
        raise SSHException(f"Bad packet length {packet_size}")
    return packet_size


def _mac(pk: Packetizer, seq: int) -> Any:
    """A copy of the inbound keyed HMAC, already fed the sequence number."""
    mac = keyed_hmac(pk, "in").copy()
    mac.update(_U32.pack(seq))
    return mac


def _open_gcm(pk: Packetizer, d: dict[str, Any], engine: Any) -> tuple[bytes, int, int]:
    """AES-GCM: the length is the associated data; the tag authenticates everything."""
    packet_size = _length(fill(pk, 4, check_rekey=True))
    total = 4 + packet_size + 16
    rb = fill(pk, total)
    start = rb.start
    iv = d["_Packetizer__iv_in"]
    with memoryview(rb.data) as view:
        plain = engine.decrypt(iv, view[start + 4:start + total], view[start:start + 4])
    rb.start += total
    d["_Packetizer__iv_in"] = pk._inc_iv_counter(iv)  # type: ignore[attr-defined]
    return plain, packet_size, total


def _open_etm(pk: Packetizer, d: dict[str, Any], engine: Any, seq: int) -> tuple[bytes, int, int]:
    """aes-ctr, MAC over the ciphertext: check the MAC on the buffer, then decrypt once."""
    mac_size = d["_Packetizer__mac_size_in"]
    packet_size = _length(fill(pk, 4, check_rekey=True))
    total = 4 + packet_size + mac_size
    rb = fill(pk, total)
    start = rb.start
    mac = _mac(pk, seq)
    with memoryview(rb.data) as view:
        mac.update(view[start:start + 4 + packet_size])
        if not hmac.compare_digest(mac.digest()[:mac_size], view[start + 4 + packet_size:start + total]):
            raise SSHException("Mismatched MAC")
        plain = engine.update(view[start + 4:start + 4 + packet_size])
    rb.start += total
    return plain, packet_size, total


def _open_mac_on_plaintext(pk: Packetizer, d: dict[str, Any], engine: Any, seq: int) -> tuple[bytes, int, int]:
    """aes-ctr, MAC over the plaintext (libssh2, curl): the first block holds the length."""
    bsize, mac_size = d["_Packetizer__block_size_in"], d["_Packetizer__mac_size_in"]
    rb = fill(pk, bsize, check_rekey=True)
    with memoryview(rb.data) as view:
        first = engine.update(view[rb.start:rb.start + bsize])
    packet_size = _length(rb, first)
    if (packet_size + 4) % bsize:
        raise SSHException("Invalid packet blocking")
    total = 4 + packet_size + mac_size
    rb = fill(pk, total)
    start = rb.start
    with memoryview(rb.data) as view:
        plain = first + engine.update(view[start + bsize:start + 4 + packet_size])
        mac = _mac(pk, seq)
        mac.update(plain)
        if not hmac.compare_digest(mac.digest()[:mac_size], view[start + 4 + packet_size:start + total]):
            raise SSHException("Mismatched MAC")
    rb.start += total
    return plain, packet_size, total


def _count_received(pk: Packetizer, raw: int) -> None:
    """paramiko's rekey accounting after a packet, word for word."""
    p = "_Packetizer__"
    d = pk.__dict__
    d[p + "received_bytes"] += raw
    d[p + "received_packets"] += 1
    if d[p + "need_rekey"]:
        d[p + "received_bytes_overflow"] += raw
        d[p + "received_packets_overflow"] += 1
        if d[p + "received_packets_overflow"] >= pk.REKEY_PACKETS_OVERFLOW_MAX \
                or d[p + "received_bytes_overflow"] >= pk.REKEY_BYTES_OVERFLOW_MAX:
            raise SSHException("Remote transport is ignoring rekey requests")
    elif d[p + "received_packets"] >= pk.REKEY_PACKETS or d[p + "received_bytes"] >= pk.REKEY_BYTES:
        d[p + "received_bytes_overflow"] = 0
        d[p + "received_packets_overflow"] = 0
        pk._trigger_rekey()  # type: ignore[attr-defined]


_original_read_message = Packetizer.read_message


class BufferedPacketizer(Packetizer):
    """A Packetizer that reads through the buffer. The server's transports use it
    (transport.ServerTransport); paramiko clients in the same process (tests, tools) keep
    paramiko's own reader: a client closed from another thread while its reader sits
    between ``sock.fileno()`` and ``readv()`` could read from a reused descriptor, which
    the server prevents for its own connections (transport.ConnectionSocket)."""

    read_all = read_all
    read_message = read_message

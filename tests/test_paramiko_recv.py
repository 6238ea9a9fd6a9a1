"""paramiko_recv reads exactly what paramiko's own sender wrote, however the bytes arrive.

Two Packetizers over a socketpair, keyed alike: the sender is stock paramiko,
the receiver the buffered reader (with its copy-free aes-ctr + ETM path). The
bytes are delivered whole, or cut in random pieces by a feeding thread. Hostile
input (huge length, bad MAC, bad padding) ends the read with SSHException.
"""

from __future__ import annotations

import os
import random
import socket
import struct
import threading
import time
from hashlib import sha256

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.ciphers.algorithms import AES
from cryptography.hazmat.primitives.ciphers.modes import CTR
from paramiko.common import MSG_CHANNEL_DATA, MSG_IGNORE, cMSG_CHANNEL_DATA, cMSG_IGNORE
from paramiko.message import Message
from paramiko.packet import Packetizer
from paramiko.ssh_exception import SSHException

from scriptsftp.server.frontends.ssh.paramiko_ext import recv as paramiko_recv

MODES = ["ctr-etm", "ctr", "gcm", "none"]


def _messages() -> list[tuple[int, bytes]]:
    sizes = [0, 1, 15, 16, 17, 100, 4000, 32768, 65000, 262144]
    return [(MSG_CHANNEL_DATA if i % 2 else MSG_IGNORE, os.urandom(n)) for i, n in enumerate(sizes)]


def _encode(t: int, body: bytes) -> Message:
    m = Message()
    m.add_byte(cMSG_CHANNEL_DATA if t == MSG_CHANNEL_DATA else cMSG_IGNORE)
    if t == MSG_CHANNEL_DATA:
        m.add_int(5)
    m.add_string(body)
    return m


def _keyed(mode: str, out: Packetizer, inn: Packetizer) -> None:
    key, iv, mac_key = os.urandom(16), os.urandom(16), os.urandom(32)
    if mode == "none":
        return
    if mode == "gcm":
        out.set_outbound_cipher(AESGCM(key), 16, None, 16, None, aead=True, iv_out=iv[:12])
        inn.set_inbound_cipher(AESGCM(key), 16, None, 16, None, aead=True, iv_in=iv[:12])
        return
    etm = mode == "ctr-etm"
    out.set_outbound_cipher(Cipher(AES(key), CTR(iv)).encryptor(), 16, sha256, 32, mac_key, sdctr=True, etm=etm)
    inn.set_inbound_cipher(Cipher(AES(key), CTR(iv)).decryptor(), 16, sha256, 32, mac_key, etm=etm)


def _wire(mode: str, messages: list[tuple[int, bytes]]) -> tuple[bytes, Packetizer, socket.socket]:
    """The bytes stock paramiko writes for ``messages``, and a receiver keyed to read them."""
    a, b = socket.socketpair()
    sink_a, sink_b = socket.socketpair()
    out, inn = Packetizer(sink_a), paramiko_recv.BufferedPacketizer(b)
    _keyed(mode, out, inn)
    got = bytearray()
    reader = threading.Thread(target=lambda: _read_until_closed(sink_b, got))
    reader.start()
    for t, body in messages:
        Packetizer.send_message(out, _encode(t, body))  # paramiko's own sender, untouched
    sink_a.close()
    reader.join(10)
    sink_b.close()
    return bytes(got), inn, a


def _read_until_closed(sock: socket.socket, into: bytearray) -> None:
    while True:
        data = sock.recv(1 << 20)
        if not data:
            return
        into += data


def _check(inn: Packetizer, messages: list[tuple[int, bytes]]) -> None:
    for t, body in messages:
        ptype, m = inn.read_message()
        assert ptype == t
        if t == MSG_CHANNEL_DATA:
            assert m.get_int() == 5
        assert m.get_binary() == body


@pytest.mark.parametrize("mode", MODES)
def test_reads_what_paramiko_wrote_in_one_piece(mode: str) -> None:
    messages = _messages()
    wire, inn, feed = _wire(mode, messages)
    threading.Thread(target=feed.sendall, args=(wire,), daemon=True).start()
    _check(inn, messages)


@pytest.mark.parametrize("mode", MODES)
def test_reads_what_paramiko_wrote_in_random_pieces(mode: str) -> None:
    messages = _messages()
    wire, inn, feed = _wire(mode, messages)
    rng = random.Random(len(wire))

    def trickle() -> None:
        pos = 0
        while pos < len(wire):
            n = rng.choice([1, 3, 7, 100, 5000, 70000])
            feed.sendall(wire[pos:pos + n])
            pos += n
            if rng.random() < 0.05:
                time.sleep(0.001)

    threading.Thread(target=trickle, daemon=True).start()
    _check(inn, messages)


def test_bytes_read_past_the_banner_are_not_lost() -> None:
    messages = _messages()[:4]
    wire, inn, feed = _wire("ctr-etm", messages)
    inn._Packetizer__remainder = wire[:10]  # what readline() kept after the version line
    feed.sendall(wire[10:])
    _check(inn, messages)


@pytest.mark.parametrize("mode", MODES)
def test_a_huge_length_is_refused_before_anything_is_allocated(mode: str) -> None:
    wire, inn, feed = _wire(mode, [(MSG_IGNORE, b"x")])
    if mode in ("ctr-etm", "gcm", "none"):
        feed.sendall(struct.pack(">I", 0xFFFFFF00) + bytes(60))  # the length travels in the clear
    else:
        feed.sendall(os.urandom(64))  # decrypts to a random length: 1 in 16,000 fits the limit
    with pytest.raises(SSHException, match="Bad packet length|Invalid packet blocking|Mismatched MAC"):
        inn.read_message()
    rb = inn.__dict__.get("_scriptsftp_recv")
    assert rb is None or len(rb.data) <= paramiko_recv.PACKET_LIMIT + 1024


@pytest.mark.parametrize("mode", ["ctr-etm", "ctr", "gcm"])
def test_a_flipped_bit_fails_the_mac(mode: str) -> None:
    wire, inn, feed = _wire(mode, [(MSG_CHANNEL_DATA, os.urandom(1000))])
    bad = bytearray(wire)
    bad[40] ^= 1
    feed.sendall(bytes(bad))
    with pytest.raises((SSHException, Exception)) as info:
        inn.read_message()
    assert "MAC" in str(info.value) or "InvalidTag" in type(info.value).__name__


def test_rekey_is_requested_after_the_packet_limit() -> None:
    messages = [(MSG_IGNORE, b"a")] * 3
    wire, inn, feed = _wire("ctr-etm", messages)
    inn.REKEY_PACKETS = 2
    feed.sendall(wire)
    inn.read_message()
    assert not inn.need_rekey()
    inn.read_message()
    assert inn.need_rekey()


def test_daemon_drops_a_client_announcing_a_huge_packet(daemon) -> None:
    """After key exchange, before any login: a 4 GiB length (in the clear with an ETM MAC) closes
    the connection at once, with nothing allocated for it."""
    import paramiko

    transport = paramiko.Transport(("127.0.0.1", daemon.port), disabled_algorithms={
        "macs": ["hmac-sha2-256", "hmac-sha2-512"], "ciphers": ["aes128-gcm@openssh.com", "aes256-gcm@openssh.com"]})
    transport.start_client(timeout=10)
    assert transport.local_mac == "hmac-sha2-256-etm@openssh.com"
    rss_before = _rss_kib(daemon.proc.pid)
    transport.packetizer._Packetizer__socket.sendall(struct.pack(">I", 0xFFFFFF00) + os.urandom(60))
    transport.join(10)  # the client's transport thread ends when the server hangs up
    assert not transport.is_alive(), "the server kept the connection open"
    daemon.wait_log(r"disconnect after")
    assert _rss_kib(daemon.proc.pid) - rss_before < 50 * 1024


def _rss_kib(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.parametrize("mode", ["ctr-etm", "ctr", "gcm"])  # no sink before keys: channels come after
def test_channel_data_goes_to_its_sink_unless_declined(mode: str) -> None:
    """set_sink: a channel's data reaches the sink as it left paramiko's sender, the packet is
    then an IGNORE to the transport loop; a declined packet and other channels' and other
    messages take the usual way."""
    messages = _messages()
    wire, inn, feed = _wire(mode, messages)
    taken: list[bytes] = []
    answers = iter([True, False] * len(messages))

    def sink(view: memoryview) -> bool:
        ok = next(answers)
        if ok:
            taken.append(bytes(view))
        return ok

    paramiko_recv.set_sink(inn, 5, sink)
    paramiko_recv.set_sink(inn, 6, lambda view: pytest.fail("not this channel"))
    threading.Thread(target=feed.sendall, args=(wire,), daemon=True).start()
    expected_taken = []
    ok = True
    for t, body in messages:
        ptype, m = inn.read_message()
        if t == MSG_CHANNEL_DATA and ok:
            assert ptype == MSG_IGNORE
            expected_taken.append(body)
        else:
            assert ptype == t
            if t == MSG_CHANNEL_DATA:
                assert m.get_int() == 5
            assert m.get_binary() == body
        if t == MSG_CHANNEL_DATA:
            ok = not ok
    assert taken == expected_taken
    paramiko_recv.set_sink(inn, 5, None)


def test_before_wait_runs_once_just_before_the_reader_would_block() -> None:
    messages = _messages()[:3]
    wire, inn, feed = _wire("ctr-etm", messages)
    calls: list[int] = []
    waiting = threading.Event()

    def hook() -> None:
        calls.append(len(calls))
        waiting.set()

    feed.sendall(wire[:len(wire) // 2])
    paramiko_recv.before_wait(inn, hook)
    paramiko_recv.before_wait(inn, hook)  # once, however often asked
    threading.Thread(target=lambda: (waiting.wait(10), feed.sendall(wire[len(wire) // 2:])), daemon=True).start()
    _check(inn, messages)
    assert calls == [0]

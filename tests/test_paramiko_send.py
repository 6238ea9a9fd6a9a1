"""paramiko_send builds the same packets as paramiko's own send path, in every cipher mode we offer.

Unit level: two Packetizers over a socketpair, keyed alike, one sending with
``send_data_packets`` and the other decoding with paramiko's ``read_message``.
End to end: OpenSSH ``sftp`` downloads through each cipher/MAC shape (curl's
libssh2 shape, aes-ctr with a MAC on the plaintext, is in test_curl.py).
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
from hashlib import sha256

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.ciphers.algorithms import AES
from cryptography.hazmat.primitives.ciphers.modes import CTR
from paramiko.common import MSG_CHANNEL_DATA, MSG_IGNORE, cMSG_CHANNEL_DATA, cMSG_IGNORE
from paramiko.message import Message
from paramiko.packet import Packetizer

from scriptsftp.server.frontends.ssh.paramiko_ext.send import send_data_packets

from conftest import SSH_OPTS, require_tool

MODES = ["ctr-etm", "ctr", "gcm"]
SIZES = [1, 15, 16, 17, 1000, 32704, 7]


def _keyed(mode: str, key: bytes, iv: bytes, mac_key: bytes) -> tuple[Packetizer, Packetizer, socket.socket]:
    """A sending and a receiving Packetizer set up as paramiko's Transport would for ``mode``."""
    a, b = socket.socketpair()
    out, inn = Packetizer(a), Packetizer(b)
    if mode == "gcm":
        out.set_outbound_cipher(AESGCM(key), 16, None, 16, None, aead=True, iv_out=iv[:12])
        inn.set_inbound_cipher(AESGCM(key), 16, None, 16, None, aead=True, iv_in=iv[:12])
    else:
        etm = mode == "ctr-etm"
        out.set_outbound_cipher(Cipher(AES(key), CTR(iv)).encryptor(), 16, sha256, 32, mac_key, sdctr=True, etm=etm)
        inn.set_inbound_cipher(Cipher(AES(key), CTR(iv)).decryptor(), 16, sha256, 32, mac_key, etm=etm)
    return out, inn, b


def _secrets() -> tuple[bytes, bytes, bytes]:
    return os.urandom(16), os.urandom(16), os.urandom(32)


def _ignore() -> Message:
    m = Message()
    m.add_byte(cMSG_IGNORE)
    m.add_string(b"after the batch")
    return m


@pytest.mark.parametrize("mode", MODES)
def test_batch_decodes_with_paramiko_and_keeps_the_stream_in_step(mode: str) -> None:
    out, inn, _ = _keyed(mode, *_secrets())
    chunks = [os.urandom(n) for n in SIZES]
    send_data_packets(out, 7, [memoryview(c) for c in chunks])
    out.send_message(_ignore())  # sequence number, CTR stream and GCM nonce must have moved on exactly
    for chunk in chunks:
        ptype, m = inn.read_message()
        assert ptype == MSG_CHANNEL_DATA
        assert m.get_int() == 7
        assert m.get_binary() == chunk
    ptype, m = inn.read_message()
    assert (ptype, m.get_binary()) == (MSG_IGNORE, b"after the batch")


def _both_ways(mode: str, chanid: int) -> tuple[Packetizer, socket.socket, Packetizer, socket.socket]:
    """The same chunks sent by send_data_packets and by paramiko's send_message, keyed alike.
    The peer sockets are returned so that they stay referenced: a collected one closes."""
    secrets = _secrets()
    fast, _, fast_peer = _keyed(mode, *secrets)
    slow, _, slow_peer = _keyed(mode, *secrets)
    chunks = [os.urandom(n) for n in SIZES]
    send_data_packets(fast, chanid, [memoryview(c) for c in chunks])
    for chunk in chunks:
        m = Message()
        m.add_byte(cMSG_CHANNEL_DATA)
        m.add_int(chanid)
        m.add_string(chunk)
        slow.send_message(m)
    return fast, fast_peer, slow, slow_peer


@pytest.mark.parametrize("mode", MODES)
def test_counters_match_paramikos_own_path(mode: str) -> None:
    fast, fast_peer, slow, slow_peer = _both_ways(mode, 3)
    for name in ("sent_bytes", "sent_packets", "sequence_number_out"):
        assert getattr(fast, "_Packetizer__" + name) == getattr(slow, "_Packetizer__" + name), name
    fast_peer.close()
    slow_peer.close()


@pytest.mark.parametrize("mode", ["ctr-etm", "ctr"])
def test_ctr_output_is_byte_identical_to_paramikos(mode: str) -> None:
    """aes-ctr pads with zeros, so both paths must produce the very same bytes."""
    fast, fast_peer, slow, slow_peer = _both_ways(mode, 9)
    fast_peer.settimeout(5)
    slow_peer.settimeout(5)
    expected = _drain(slow_peer)
    assert _drain(fast_peer, len(expected)) == expected


def _drain(sock: socket.socket, size: int | None = None) -> bytes:
    got = bytearray()
    while size is None or len(got) < size:
        try:
            sock.settimeout(0.2 if size is None else 5)
            data = sock.recv(1 << 20)
        except socket.timeout:
            break
        if not data:
            break
        got += data
    return bytes(got)


def test_rekey_is_requested_when_a_batch_crosses_the_limit() -> None:
    out, _, peer = _keyed("ctr-etm", *_secrets())
    out.REKEY_PACKETS = 3
    send_data_packets(out, 1, [memoryview(b"x")] * 2)
    assert not out.need_rekey()
    send_data_packets(out, 1, [memoryview(b"x")] * 2)
    assert out.need_rekey()
    peer.close()


# --- end to end ------------------------------------------------------------------

CLIENT_SHAPES = {
    "aes128-gcm": ["-c", "aes128-gcm@openssh.com"],
    "aes256-gcm": ["-c", "aes256-gcm@openssh.com"],
    "aes128-ctr+etm": ["-c", "aes128-ctr", "-o", "MACs=hmac-sha2-256-etm@openssh.com"],
    "aes256-ctr+sha512": ["-c", "aes256-ctr", "-o", "MACs=hmac-sha2-512"],
}


@pytest.fixture(scope="module")
def daemon(module_daemons):
    d = module_daemons.start()
    d.home().mkdir(parents=True, exist_ok=True)
    return d


@pytest.mark.parametrize("shape", sorted(CLIENT_SHAPES))
def test_openssh_download_in_every_cipher_shape(daemon, alice_key, tmp_path, shape: str) -> None:
    require_tool("sftp")
    data = os.urandom(3 * 2**20 + 12345)  # several 255 KiB replies, and a short last one
    (daemon.home() / "big.bin").write_bytes(data)
    target = tmp_path / "got.bin"
    proc = subprocess.run(
        ["sftp", "-b", "-", "-i", str(alice_key.private), "-P", str(daemon.port), *SSH_OPTS,
         *CLIENT_SHAPES[shape], "alice@127.0.0.1"],
        input=f"get big.bin {target}\n", text=True, capture_output=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert hashlib.sha256(target.read_bytes()).digest() == hashlib.sha256(data).digest()


"""Refuse an SSH connection before the key exchange, with a reason the client prints.

A connection the defender refuses (banned address, rate limit, connection caps)
or that a ``connect`` script vetoed must cost as little as possible: no
Diffie-Hellman, no host-key signature, no paramiko transport thread. RFC 4253
lets either side send SSH_MSG_DISCONNECT as soon as the version strings are
exchanged; before the key exchange packets are unencrypted (no MAC, block
size 8), so one small write carries the reason. OpenSSH prints it as
"Received disconnect from HOST port N:11: reason"; paramiko raises an
SSHException.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time

VERSION = b"SSH-2.0-scriptsftp\r\n"
DISCONNECT_BY_APPLICATION = 11
_MSG_DISCONNECT = 1


def _string(b: bytes) -> bytes:
    return struct.pack(">I", len(b)) + b


def disconnect_packet(reason: str, code: int = DISCONNECT_BY_APPLICATION) -> bytes:
    """One unencrypted SSH binary packet carrying SSH_MSG_DISCONNECT."""
    payload = bytes([_MSG_DISCONNECT]) + struct.pack(">I", code) + _string(reason.encode()[:1000]) + _string(b"en")
    pad = 8 - (5 + len(payload)) % 8
    if pad < 4:
        pad += 8
    return struct.pack(">IB", 1 + len(payload) + pad, pad) + payload + os.urandom(pad)


# Refused connections waiting for their client to close (see refuse()). Bounded so
# that a flood of connections that never close cannot pile up threads here: past
# the bound a refusal is sent and the socket closed at once.
_draining = threading.BoundedSemaphore(128)


def refuse(sock: socket.socket, reason: str, timeout: float = 1.0) -> None:
    """Send our version and a DISCONNECT, then let the client close first.

    Closing with unread client bytes in our receive buffer would send a TCP RST,
    and a client may then report "connection reset" instead of our reason; so we
    shut down our side and drain what the client sends (its version line, its
    KEXINIT) until it closes or ``timeout`` passes. Real clients close within a
    round trip of reading the DISCONNECT."""
    try:
        sock.settimeout(timeout)
        sock.sendall(VERSION + disconnect_packet(reason))
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        return
    if not _draining.acquire(blocking=False):
        return
    try:
        deadline = time.monotonic() + timeout
        received = 0
        while received < 65536 and time.monotonic() < deadline:
            chunk = sock.recv(4096)
            if not chunk:
                break
            received += len(chunk)
    except OSError:
        pass
    finally:
        _draining.release()

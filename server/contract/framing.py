"""Length-prefixed JSON messages over a Unix socket, with file descriptors alongside.

The SSH worker processes and the core talk this way (ssh_workers, core_link,
remote_core). JSON, not pickle, in both directions: a worker parses raw network
input from clients, so the core must never run code a compromised worker could
craft, and JSON decodes to data only. Descriptors travel as SCM_RIGHTS on the
``sendmsg`` that carries the message, so they arrive with the message they belong
to (the receiver reads each message's header with ``recvmsg``).

Lone surrogates (file names that are not UTF-8, kept with ``surrogateescape``)
survive the round trip: ``json.dumps`` writes them as ``\\udcXX`` escapes.
"""

from __future__ import annotations

import json
import os
import socket
import struct
from typing import Any

_HEADER = struct.Struct("!I")
MAX_FDS = 4
_FIRST_READ = 65536


class LinkClosed(EOFError):
    """The other side closed the socket (or died): no more messages."""


def send(sock: socket.socket, message: Any, fds: list[int] | tuple[int, ...] = ()) -> None:
    payload = json.dumps(message, separators=(",", ":")).encode()
    data = _HEADER.pack(len(payload)) + payload
    if fds:
        sent = socket.send_fds(sock, [data], list(fds))
        if sent < len(data):
            sock.sendall(data[sent:])
    else:
        sock.sendall(data)


def receive(sock: socket.socket, max_size: int, *, alternating: bool = False) -> tuple[Any, list[int]]:
    """The next message and the descriptors that came with it (the caller owns them).

    ``alternating``: the peer sends nothing more until this message is answered (a
    connection's link), so one ``recvmsg`` may take the whole message: a round trip
    costs one system call here instead of two. Elsewhere (a worker's command socket)
    only the header is read first, so that no read runs into the next message.

    A message announced longer than ``max_size`` closes nothing and raises ValueError:
    the caller ends the link, since the stream cannot be resynchronised."""
    want = _FIRST_READ if alternating else _HEADER.size
    header = b""
    fds: list[int] = []
    while len(header) < _HEADER.size:
        chunk, got, _flags, _addr = socket.recv_fds(sock, want - len(header), MAX_FDS)
        fds.extend(got)
        if not chunk:
            close_fds(fds)
            raise LinkClosed("link closed")
        header += chunk
    (size,) = _HEADER.unpack_from(header)
    if size > max_size or len(header) > _HEADER.size + size:
        close_fds(fds)
        raise ValueError(f"message of {size} bytes (limit {max_size})" if size > max_size
                         else "a message arrived before the last one was answered")
    body = bytearray(size)
    body[:len(header) - _HEADER.size] = header[_HEADER.size:]
    view = memoryview(body)[len(header) - _HEADER.size:]
    while view:
        n = sock.recv_into(view)
        if n == 0:
            close_fds(fds)
            raise LinkClosed("link closed mid-message")
        view = view[n:]
    try:
        return json.loads(body), fds
    except ValueError:
        close_fds(fds)
        raise


def close_fds(fds: list[int]) -> None:
    """Close descriptors received with a message that are not wanted (never leak one)."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass

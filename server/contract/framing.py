"""Length-prefixed JSON messages over a Unix socket, with file descriptors alongside.

Every process boundary of the server talks this way: the SSH worker processes and the
core (worker_pool, core_link, remote_core: :func:`send`, :func:`receive`), and the
script pool and its sandboxed workers (scripting/workers.py, scripting/worker_main.py:
:func:`encode` with ``strict``, :class:`FrameReader`, :func:`decode_object`, since
they read with deadlines and buffer what arrives). One frame: a 4-byte big-endian
length, then that many bytes of JSON.

JSON, not pickle, in both directions: a worker parses raw network input from clients
(or runs a user's script), so the parent must never run code a compromised worker
could craft, and JSON decodes to data only. Descriptors travel as SCM_RIGHTS on the
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


class MalformedMessage(ValueError):
    """A frame that is not a well-formed message (too long, not JSON, not an object)."""


def encode(message: Any, *, strict: bool = False) -> bytes:
    """One whole frame (header and JSON payload) for ``message``.

    ``strict``: ASCII only and no NaN/Infinity (ValueError), what :func:`decode_object`
    accepts; the script workers' channel is strict both ways."""
    if strict:
        payload = json.dumps(message, ensure_ascii=True, separators=(",", ":"), allow_nan=False).encode("ascii")
    else:
        payload = json.dumps(message, separators=(",", ":")).encode()
    return _HEADER.pack(len(payload)) + payload


def send(sock: socket.socket, message: Any, fds: list[int] | tuple[int, ...] = ()) -> None:
    send_frame(sock, encode(message), fds)


def send_frame(sock: socket.socket, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> None:
    """Send an encoded frame, ``fds`` with its first bytes (SCM_RIGHTS). Blocks until all
    is sent (or the socket's timeout raises TimeoutError)."""
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


def _no_constants(name: str) -> Any:
    raise ValueError(f"JSON constant {name} is not allowed")


def decode_object(payload: bytes) -> dict[str, Any]:
    """One frame's payload, strictly: UTF-8 JSON text that is an object, without NaN or
    Infinity. Data only; MalformedMessage otherwise."""
    try:
        obj = json.loads(payload.decode("utf-8"), parse_constant=_no_constants)
    except (ValueError, RecursionError, UnicodeDecodeError, MemoryError) as e:
        raise MalformedMessage(f"not a JSON message ({type(e).__name__})") from None
    if type(obj) is not dict:
        raise MalformedMessage("message is not a JSON object")
    return obj


class FrameReader:
    """Whole frames out of a stream read in pieces of any size (half a frame, or several).

    For a reader that cannot stop at a frame's end (a read with a deadline takes what
    has arrived): :meth:`feed` what was read, then take frames with :meth:`next_frame`
    until it answers None."""

    __slots__ = ("_buf", "max_size")

    def __init__(self, max_size: int) -> None:
        self._buf = bytearray()
        self.max_size = max_size

    def feed(self, data: bytes) -> None:
        self._buf += data

    def next_frame(self) -> bytes | None:
        """The next whole frame's payload, or None until more is fed. A frame announced
        longer than ``max_size`` raises MalformedMessage: the stream cannot be resynchronised."""
        buf = self._buf
        if len(buf) < _HEADER.size:
            return None
        (size,) = _HEADER.unpack_from(buf)
        if size > self.max_size:
            raise MalformedMessage(f"frame of {size} bytes exceeds the limit")
        end = _HEADER.size + size
        if len(buf) < end:
            return None
        payload = bytes(buf[_HEADER.size:end])
        del buf[:end]
        return payload

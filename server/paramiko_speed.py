"""Two copy-avoiding replacements inside paramiko's data path (paramiko pinned to 5.1.*).

Profiled on a 256 MiB SFTP upload, the top costs outside the MAC itself were
byte copying, not protocol work:

* ``Packetizer.read_all`` grew its result with ``bytes +=`` per ``recv``: a
  256 KiB packet arriving in many segments was copied over and over. Here it
  receives with ``recv_into`` into one buffer of the final size.
* ``Channel.in_buffer`` (a ``BufferedPipe``) keeps data in an ``array('B')``,
  appends with ``frombytes`` and removes consumed data from the *front*, so
  with a large window every read shifts everything still buffered. Here the
  buffer is a queue of the received chunks; reads take whole chunks without
  copying when they can.

And one per-packet cost of the MAC check (ciphers without AEAD: aes-ctr with
hmac-sha2, which OpenSSH and curl pick): ``util.constant_time_bytes_eq``
compared MACs in a Python loop (9.6 us per packet here, a third of the HMAC
itself on a 32 KiB packet); ``hmac.compare_digest`` is the C constant-time
compare. (The one-shot ``hmac.digest`` was measured too: no gain over
paramiko's ``HMAC`` object, so it is left alone.)

Behaviour (blocking, timeouts, EOF, rekey and keepalive checks) is kept line
for line; ``tests/test_paramiko_speed.py`` checks the buffer against the
original semantics.
"""

from __future__ import annotations

import errno
import hmac
import socket
from collections import deque

import paramiko.channel
import paramiko.util
from paramiko.buffered_pipe import BufferedPipe
from paramiko.packet import NeedRekeyException, Packetizer, first_arg


class ChunkBuffer:
    """The subset of ``array('B')`` that BufferedPipe uses, over a deque of chunks."""

    __slots__ = ("_chunks", "_len")

    def __init__(self) -> None:
        self._chunks: deque[bytes] = deque()
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def frombytes(self, data: bytes) -> None:
        if data:
            self._chunks.append(bytes(data))
            self._len += len(data)

    def take(self, limit: int | None) -> bytes:
        """Remove and return the first ``limit`` bytes (all when None)."""
        if limit is None or limit >= self._len:
            if len(self._chunks) == 1:
                out = self._chunks.popleft()
            else:
                out = b"".join(self._chunks)
                self._chunks.clear()
            self._len = 0
            return out
        first = self._chunks[0]
        if len(first) == limit:
            self._len -= limit
            return self._chunks.popleft()
        if len(first) > limit:
            self._chunks[0] = first[limit:]
            self._len -= limit
            return first[:limit]
        parts, need = [], limit
        while need:
            chunk = self._chunks.popleft()
            if len(chunk) > need:
                self._chunks.appendleft(chunk[need:])
                chunk = chunk[:need]
            parts.append(chunk)
            need -= len(chunk)
        self._len -= limit
        return b"".join(parts)

    def __delitem__(self, key: slice) -> None:
        # BufferedPipe deletes what it just read; ChunkPipe already removed it in take().
        pass


class ChunkPipe(BufferedPipe):
    def __init__(self) -> None:
        super().__init__()
        self._buffer = ChunkBuffer()  # type: ignore[assignment]

    def _buffer_frombytes(self, data: bytes) -> None:
        self._buffer.frombytes(data)

    def _buffer_tobytes(self, limit: int | None = None) -> bytes:
        return self._buffer.take(limit)


def _read_all(self: Packetizer, n: int, check_rekey: bool = False) -> bytes:
    sock = self._Packetizer__socket  # type: ignore[attr-defined]
    if not hasattr(sock, "recv_into"):
        return _original_read_all(self, n, check_rekey)
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    remainder = self._Packetizer__remainder  # type: ignore[attr-defined]
    if remainder:
        head = remainder[:n]
        buf[: len(head)] = head
        self._Packetizer__remainder = remainder[len(head):]  # type: ignore[attr-defined]
        got = len(head)
    while got < n:
        got_timeout = False
        if self.handshake_timed_out():
            raise EOFError()
        try:
            k = sock.recv_into(view[got:], n - got)
            if k == 0:
                raise EOFError()
            got += k
        except socket.timeout:
            got_timeout = True
        except socket.error as e:
            arg = first_arg(e)
            if arg == errno.EAGAIN:
                got_timeout = True
            elif self._Packetizer__closed:  # type: ignore[attr-defined]
                raise EOFError()
            else:
                raise
        if got_timeout:
            if self._Packetizer__closed:  # type: ignore[attr-defined]
                raise EOFError()
            if check_rekey and got == 0 and self._Packetizer__need_rekey:  # type: ignore[attr-defined]
                raise NeedRekeyException()
            self._check_keepalive()
    return bytes(buf)


_original_read_all = Packetizer.read_all
_installed = False


def install() -> None:
    """Apply the replacements once (idempotent)."""
    global _installed
    if _installed:
        return
    paramiko.util.constant_time_bytes_eq = hmac.compare_digest
    Packetizer.read_all = _read_all  # type: ignore[method-assign]
    paramiko.channel.BufferedPipe = ChunkPipe  # Channel.__init__ looks the name up in its module
    _installed = True

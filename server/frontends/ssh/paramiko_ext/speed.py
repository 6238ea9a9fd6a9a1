"""Copy-avoiding replacements inside paramiko's data path (paramiko pinned to 5.1.*).

Profiled on a 256 MiB SFTP upload, the top costs outside the MAC itself were
byte copying, not protocol work:

* ``Packetizer.read_all`` grew its result with ``bytes +=`` per ``recv``: a
  256 KiB packet arriving in many segments was copied over and over. The
  server's transports read through ``recv.py`` instead (one buffer per
  connection, a packet size limit, copy-free decryption; see transport.py).
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

Both replacements are process-wide and applied by ``paramiko_ext.install()``,
not by importing this module. Behaviour (blocking, timeouts, EOF, rekey and
keepalive checks) is kept line for line; ``tests/test_paramiko_speed.py``
checks the buffer against the original semantics.
"""

from __future__ import annotations

import socket
import time
from collections import deque
from typing import Callable

import paramiko
from paramiko.buffered_pipe import BufferedPipe
from paramiko.common import cMSG_CHANNEL_WINDOW_ADJUST
from paramiko.message import Message


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
    """A channel's input buffer. ``quiet``: feeding does not wake the reader, who is woken
    by ``kick()`` instead (the SFTP handler, whose transport thread answers most requests
    itself; see sftp_stream.py)."""

    def __init__(self) -> None:
        super().__init__()
        self._buffer = ChunkBuffer()
        self.quiet = False
        self.kicked = False

    def feed(self, data: bytes) -> None:
        with self._lock:  # type: ignore[attr-defined]
            if self._event is not None:  # type: ignore[attr-defined]
                self._event.set()  # type: ignore[attr-defined]
            self._buffer_frombytes(bytes(data))
            if not self.quiet:
                self._cv.notify_all()  # type: ignore[attr-defined]

    def kick(self) -> None:
        with self._lock:  # type: ignore[attr-defined]
            self.kicked = True
            self._cv.notify_all()  # type: ignore[attr-defined]

    def __len__(self) -> int:
        """Bytes buffered, read without the lock (one int: an estimate at worst, which is all
        the SFTP stream's per-packet checks need; BufferedPipe's takes the lock every time)."""
        return self._buffer._len

    def drop(self) -> None:
        """Forget everything buffered (the queue of a channel closed for it)."""
        with self._lock:  # type: ignore[attr-defined]
            self._buffer = ChunkBuffer()

    def wait_for_input(self, deadline: Callable[[], float] | None) -> None:
        """Block until bytes are buffered, the pipe is closed or :meth:`kick` was called (the
        kick is then cleared). ``deadline()``: the ``time.monotonic()`` after which
        ``socket.timeout`` is raised instead, asked again after every wakeup (it moves
        while the transport thread answers requests)."""
        with self._lock:  # type: ignore[attr-defined]
            while not (self._buffer._len or self._closed or self.kicked):  # type: ignore[attr-defined]
                if deadline is not None:
                    left = deadline() - time.monotonic()
                    if left <= 0:
                        raise socket.timeout()
                    self._cv.wait(left)  # type: ignore[attr-defined]
                else:
                    self._cv.wait()  # type: ignore[attr-defined]
            self.kicked = False

    def _buffer_frombytes(self, data: bytes) -> None:
        self._buffer.frombytes(data)

    def _buffer_tobytes(self, limit: int | None = None) -> bytes:
        return self._buffer.take(limit)


def recv_nowait(chan: paramiko.Channel, limit: int) -> bytes | None:
    """Up to ``limit`` bytes ``chan`` has buffered, without waiting: b"" when nothing, None at EOF.

    Like ``Channel.recv``, it grants the peer more window as data is consumed."""
    pipe = chan.in_buffer
    with pipe._lock:  # type: ignore[attr-defined]
        if not len(pipe._buffer):  # type: ignore[attr-defined]
            return None if pipe._closed else b""  # type: ignore[attr-defined]
        out = pipe._buffer_tobytes(limit)  # type: ignore[attr-defined]
    grant_window(chan, len(out))
    return out


def grant_window(chan: paramiko.Channel, consumed: int) -> None:
    """``consumed`` bytes of the channel were taken: open the peer's window again when due
    (as ``Channel.recv`` does; may wait out a key exchange, so never from the transport
    thread while one runs)."""
    ack = chan._check_add_window(consumed)  # type: ignore[attr-defined]
    if ack > 0:
        m = Message()
        m.add_byte(cMSG_CHANNEL_WINDOW_ADJUST)
        m.add_int(chan.remote_chanid)
        m.add_int(ack)
        chan.transport._send_user_message(m)  # type: ignore[union-attr]

"""The SFTP packet stream of one channel: requests in, replies out, answered by two threads.

What paramiko's ``SFTPServer`` does here (one thread per channel, woken per packet
through the channel's pipe, one ``send()`` per reply) made request/reply clients wait
on thread switches. :class:`SFTPStream` instead:

* reads the channel's bytes into one buffer and parses requests in place (a WRITE's
  data is never copied on its way to the file);
* lets the transport thread answer READ and WRITE on open handles right after it
  decrypted the packet (``recv.set_sink``) or buffered it (``ServerTransport.set_pump``),
  and wakes the channel's thread only for the rest (events, scripts, publishing);
* holds small replies while more requests are buffered, or, on a busy server
  (:class:`channels.ReplyPacing`), until the transport thread would wait for input,
  and sends them together (``send.send_all``: one packet, one system call);
* bounds what a client may queue without reading replies (``[sftp] max_queued_bytes``).

It knows SFTP's framing (length, type, request id; READ and WRITE's layout for the
fast path), not what a request means: :class:`sftp.SFTPHandler` subclasses it and
supplies the hooks at the end of the class (the Session calls). The hooks are plain
methods of one object: no extra call layer per packet.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from typing import Any, Callable, cast

import paramiko
from paramiko.message import Message
from paramiko.sftp import (
    CMD_INIT, CMD_READ, CMD_STATUS, CMD_VERSION, CMD_WRITE, SFTP_BAD_MESSAGE, SFTP_EOF, SFTP_FAILURE,
    SFTP_NO_SUCH_FILE, SFTP_OK, SFTP_OP_UNSUPPORTED, SFTP_PERMISSION_DENIED, SFTPError,
)

from scriptsftp.server.contract.ports import UNLIMITED, ThrottlePort
from scriptsftp.server.frontends.ssh.channels import ChannelHost
from scriptsftp.server.frontends.ssh.paramiko_ext import recv as paramiko_recv
from scriptsftp.server.frontends.ssh.paramiko_ext import send as paramiko_send
from scriptsftp.server.frontends.ssh.paramiko_ext import speed as paramiko_speed
from scriptsftp.server.frontends.ssh.paramiko_ext.transport import ServerTransport
from scriptsftp.server.support.logs import BoundedLog

log = logging.getLogger("scriptsftp.sftp")
_unexpected = BoundedLog(logging.ERROR)  # a bug in the transport thread: a traceback once, then a count

SFTP_VERSION = 3
RECV_SIZE = 1 << 20  # channel bytes taken per read: every pipelined request already there
READ_REPLY_MAX = 262144  # a READ reply never exceeds this (max_read is at most 256 KiB - 1024)
_U32 = struct.Struct(">I")
_U32_PAIR = struct.Struct(">II")
_OFFSET_LENGTH = struct.Struct(">QI")  # what READ and WRITE carry after their handle
HOLD_MAX = 32 * 1024  # replies held back while more requests are buffered, at most this much
HOLD_COUNT = 16  # ... and at most this many: a client that keeps 64 requests in flight still sees steady replies

# Answered by the transport thread when they arrive (SFTPStream._pump): no events, no scripts.
_INLINE = frozenset({CMD_READ, CMD_WRITE})

_STATUS_TEXT = {
    SFTP_OK: "Success", SFTP_EOF: "End of file", SFTP_NO_SUCH_FILE: "No such file",
    SFTP_PERMISSION_DENIED: "Permission denied", SFTP_FAILURE: "Failure", SFTP_BAD_MESSAGE: "Bad message",
    SFTP_OP_UNSUPPORTED: "Operation unsupported",
}


class SFTPStream(paramiko.SubsystemHandler):
    """One SFTP subsystem channel as a stream of requests and replies (see the module docstring)."""

    #: (name, version) pairs the VERSION reply advertises; the subclass that implements them says
    EXTENSIONS: tuple[tuple[str, str], ...] = ()

    def __init__(self, channel: paramiko.Channel, name: str, server: paramiko.ServerInterface,
                 host: ChannelHost) -> None:
        super().__init__(channel, name, server)
        self.host = host
        host.add_worker(self)  # joined before the connection counts as ended
        self.limits = host.limits
        self._crowded = host.pacing.crowded  # bound once: called per pumped packet
        self.sock = channel
        transport = channel.get_transport()
        assert transport is not None  # a channel asking for a subsystem has its connection
        # the same objects for the channel's life, looked up once (the pump reads them per packet)
        self._pipe = cast(paramiko_speed.ChunkPipe, channel.in_buffer)  # paramiko_ext.install() made it one
        self._clear_to_send = transport.clear_to_send  # set while no key exchange runs
        self._packetizer = transport.packetizer
        self.sid = ""  # the session's id, for log lines, once it is open
        self._in: bytes | memoryview = b""  # SFTP bytes read from the channel and not yet parsed, from _in_pos on
        self._in_pos = 0
        self._tail: list[bytes | memoryview] = []  # channel bytes after _in, not yet joined (see _peek)
        self._tail_len = 0
        self._held: list[bytes] = []  # small replies not yet sent (see _write_all)
        self._held_bytes = 0
        self._work = threading.Lock()  # held by whichever thread is answering requests
        self._inline_hold = False  # replies of the transport thread wait for its next wait (_pump_locked)
        self._closed = False
        # last request answered, or request bytes received: a slow client inside one large
        # WRITE is not stalled (the idle and stall timeouts count from here)
        self._last_request = time.monotonic()
        self._timed_out: str | None = None  # why the server closed the channel (idle, stall, queue), if it did
        self._overflowed = False  # closed for queueing more than max_queued request bytes
        # the user's bandwidth (the subclass sets the session's): while either is limited,
        # READ and WRITE are answered by the channel's thread, which may wait for it
        self._up: ThrottlePort = UNLIMITED
        self._down: ThrottlePort = UNLIMITED

    # --- lifecycle ---------------------------------------------------------

    def start_subsystem(self, name: str, transport: ServerTransport, channel: paramiko.Channel) -> None:  # type: ignore[override]
        if not self._begin(channel):
            return
        quiet = self.limits.quiet_limit(transferring=True)
        if quiet:  # a reply the client does not take (a stalled download) waits no longer than this
            channel.settimeout(quiet)
        pipe = self._pipe
        try:
            self._send_server_version()
            # From here on the transport thread answers READs and WRITEs itself (_pump) and
            # wakes this thread only for what it leaves.
            pipe.quiet = True
            transport.set_pump(channel, self._pump)
            paramiko_recv.set_sink(transport.packetizer, channel.chanid, self._sink)
            while True:
                with self._work:
                    self._serve()
                self._wait_for_input(pipe)
        except socket.timeout:
            self._timed_out = self._timeout_reason()
            log.info("sftp %s: channel closed", self._timed_out, extra={"sid": self.sid})
        except EOFError:
            return
        except (OSError, SFTPError) as exc:
            log.info("sftp channel error: %s", exc, extra={"sid": self.sid})
        finally:
            paramiko_recv.set_sink(transport.packetizer, channel.chanid, None)
            transport.set_pump(channel, None)
            with self._work:
                self._closed = True
                self._end(self._timed_out)
            # sshd reports sftp-server's exit; without it OpenSSH scp (SFTP mode) exits 1. Not
            # once the channel is closed (the client closed it; paramiko already answered with
            # its own CLOSE): nothing may follow that (RFC 4254 5.3), the client drops it.
            if not channel.closed:
                try:
                    channel.send_exit_status(0)
                except Exception:
                    pass
            self.host.channel_ended(self._timed_out)

    def finish_subsystem(self) -> None:
        with self._work:
            self._closed = True
            self._end(self._timed_out)
        super().finish_subsystem()

    # --- requests: one stream, two threads that may answer it -------------------------
    #
    # paramiko hands each packet from its transport thread to this channel's thread through
    # a condition variable: per request a wakeup, a GIL hand-off and a thread switch, which
    # made request/reply clients (libssh2 keeps about 64 KiB in flight) wait on thread
    # switches. Now the transport thread, right after it decrypted a packet (_sink) or
    # buffered it in the channel (_pump), answers what cannot block and this thread answers
    # the rest. Whoever holds ``_work`` consumes the stream, in order; the other leaves it alone.

    def _serve(self) -> None:
        """Answer every complete request buffered here or in the channel, in order (holding _work)."""
        while True:
            if self._peek() is None:
                if not self._refill():
                    break
                continue
            self._answer()
        self._flush()

    def _pump(self) -> None:
        """Called by the transport thread after it buffered data for this channel."""
        if self._overflow():
            return
        if not self._work.acquire(blocking=False):
            return  # the SFTP thread is at work; it looks at the channel before it waits
        try:
            kick = self._pump_locked()
        finally:
            self._work.release()
        if kick:
            self._pipe.kick()

    def _sink(self, data: memoryview) -> bool:
        """Data for this channel straight from the transport's packet reader (paramiko_recv.set_sink).

        Taken into the request stream and answered as _pump would, when nothing is queued
        before it in the channel and no key exchange runs (the window adjustment it may
        send must not wait here); otherwise False, and it goes through the channel."""
        chan = self.sock
        if len(self._pipe) or not self._clear_to_send.is_set() or self._overflow(len(data)):
            return False
        if not self._work.acquire(blocking=False):
            return False
        try:
            if self._closed or chan.closed:
                return False
            self._tail.append(data)
            self._tail_len += len(data)
            self._last_request = time.monotonic()
            try:
                paramiko_speed.grant_window(chan, len(data))
            except Exception:  # the connection is failing: the transport loop finds out itself
                return True
            kick = self._pump_locked()
        finally:
            self._work.release()
        if kick:
            self._pipe.kick()
        return True

    def _pump_locked(self) -> bool:
        """Answer READ and WRITE on open handles in the transport thread (holding _work).

        Only while the peer's window already holds the reply (waiting for window in this
        thread would stop the very thread that reads the window adjustments) and no key
        exchange is running. Stops at anything else (scripts may run, a publish may take
        seconds) and returns True: the SFTP thread must be woken for it."""
        kick = False
        self._inline_hold = self._crowded(self)
        try:
            if self._closed:
                return False
            clear = self._clear_to_send
            # a READ or WRITE may wait for the user's bandwidth: never in this thread
            up, down = self._up, self._down
            while True:
                if not clear.is_set():
                    kick = True  # key exchange: only the SFTP thread may wait for it
                    break
                head = self._peek()
                if head is None:
                    if not self._refill():
                        break
                    continue
                t, size = head
                if t not in _INLINE or up.rate or down.rate or not self._window_holds(
                        READ_REPLY_MAX if t == CMD_READ else 1024):
                    kick = True
                    break
                self._answer()
            if self._held:
                if self._inline_hold and not kick:
                    # more packets may already be on their way (libssh2 sends three WRITEs,
                    # then waits): their replies join these, sent when the transport would wait
                    paramiko_recv.before_wait(self._packetizer, self._flush_before_wait)
                elif not self._flush_inline():
                    kick = True
        except Exception as exc:  # never into paramiko's loop: the SFTP thread meets it again
            self._log_unexpected(exc, "sftp inline request failed")
            kick = True
        finally:
            self._inline_hold = False
        return kick

    # --- bounded queue: a client that sends requests and reads no replies ----------------
    #
    # Requests are answered as they arrive; they wait here only while their replies cannot
    # leave (the client's window is closed: it reads nothing) or this channel's thread is busy
    # (a script). What may wait is otherwise bounded only by the window we grant (64 MiB by
    # default), per channel. A client that has more than ``max_queued`` bytes of requests
    # waiting while it takes none of our replies is not a slow client but a stalled or
    # hostile one: the channel is closed and what it queued dropped, instead of holding that
    # memory until the stall timeout (and, through the allocator, long after).

    def _queued(self) -> int:
        """Request bytes received on this channel and not yet answered (read without locks:
        an estimate, which is all a bound needs)."""
        return len(self._pipe) + self._tail_len + len(self._in) - self._in_pos

    def _replies_blocked(self) -> bool:
        """Our replies cannot leave because the client's window is closed (not a key exchange)."""
        return self._clear_to_send.is_set() and self.sock.out_window_size < READ_REPLY_MAX + HOLD_MAX + 1024

    def _overflow(self, arriving: int = 0) -> bool:
        """True once the channel is closed for its queue (and data still arriving is dropped)."""
        if self._overflowed:
            self._drop_input()
            return True
        if self._queued() + arriving <= self.limits.max_queued or not self._replies_blocked():
            return False
        self._overflowed = True
        self._timed_out = "too many requests waiting: the client reads no replies"
        log.warning("sftp channel closed: more than %d bytes of requests queued while the client reads no "
                    "replies", self.limits.max_queued, extra={"sid": self.sid})
        # not from the transport thread (closing sends a message, which may wait for a key
        # exchange this very thread has to run); the channel thread, blocked sending, wakes
        threading.Thread(target=self._close_overflowed, name="sftp-overflow", daemon=True).start()
        self._drop_input()
        return True

    def _close_overflowed(self) -> None:
        try:
            self.sock.close()
        except Exception:
            pass
        self._drop_input()

    def _drop_input(self) -> None:
        """Forget the bytes waiting in the channel (the queue of a channel closed for it)."""
        self._pipe.drop()

    def _flush_before_wait(self) -> None:
        """The transport thread is about to wait for the socket: the replies _pump held leave now.

        If the SFTP thread is answering, it sends them itself at the end of ``_serve``; if
        they cannot leave from this thread (key exchange, closed window), it is woken for them."""
        if not self._work.acquire(blocking=False):
            return
        try:
            if self._closed or self._flush_inline():
                return
        except Exception as exc:
            self._log_unexpected(exc, "sftp reply failed")
        finally:
            self._work.release()
        self._pipe.kick()

    def _log_unexpected(self, exc: Exception, what: str) -> None:
        """A failure in the transport thread that is not the connection ending (a bug): logged
        with its traceback (once, then a line per 10 s with a count: a client could hit it with
        every packet); the SFTP thread, woken, meets the connection's state itself."""
        if not isinstance(exc, (EOFError, OSError, SFTPError)):
            _unexpected.log(log, what, extra={"sid": self.sid}, exc_info=True)

    def _flush_inline(self) -> bool:
        """Send held replies from the transport thread if that cannot wait; False if it would."""
        if not self._held:
            return True
        if not (self._clear_to_send.is_set() and self._window_holds(0)):
            return False
        self._flush()
        return True

    def _window_holds(self, reply: int) -> bool:
        return self.sock.out_window_size >= self._held_bytes + reply + 1024

    def _quiet_limit(self) -> float:
        return self.limits.quiet_limit(self._transferring())

    def _timeout_reason(self) -> str:
        return self.limits.timeout_reason(self._transferring())

    def _wait_for_input(self, pipe: paramiko_speed.ChunkPipe) -> None:
        """Sleep until the channel has bytes, is closed, or the transport thread left work here.

        The idle (or stall) timeout counts from the last request answered by either thread."""
        idle = self._quiet_limit()
        pipe.wait_for_input((lambda: self._last_request + idle) if idle else None)

    def _peek(self) -> tuple[int, int] | None:
        """Type and size of the next request once it is complete here, else None.

        Bytes arriving for an incomplete request wait in ``_tail`` and are joined once, when
        the request is complete (not once per packet of a 255 KiB WRITE). The type is -1 for an
        empty message (skipped by _answer) or an oversized one (refused by _answer): never
        answered inline."""
        have = len(self._in) - self._in_pos
        if have < 4 and self._tail:
            self._join_tail()
            have = len(self._in) - self._in_pos
        if have < 4:
            return None
        size = _U32.unpack_from(self._in, self._in_pos)[0]
        if size == 0 or size > self.limits.max_read + 65536:
            return -1, size
        if have < 4 + size:
            if have + self._tail_len < 4 + size:
                return None
            self._join_tail()
        return self._in[self._in_pos + 4], size

    def _join_tail(self) -> None:
        if self._in_pos == len(self._in) and len(self._tail) == 1:
            self._in = self._tail[0]  # often a view of one decrypted packet (_sink): not copied
        else:
            self._in = bytes(self._in[self._in_pos:]) + b"".join(self._tail)
        self._in_pos = 0
        self._tail, self._tail_len = [], 0

    def _refill(self) -> bool:
        """Take what the channel holds, without waiting; False when it holds nothing."""
        chunk = paramiko_speed.recv_nowait(self.sock, RECV_SIZE)
        if chunk is None:
            raise EOFError()
        if not chunk:
            return False
        self._tail.append(chunk)
        self._tail_len += len(chunk)
        self._last_request = time.monotonic()
        return True

    def _answer(self) -> None:
        """Parse and answer the complete request _peek() saw."""
        size = _U32.unpack_from(self._in, self._in_pos)[0]
        if size > self.limits.max_read + 65536:
            raise SFTPError(f"message of {size} bytes refused")
        start = self._in_pos + 4
        self._in_pos = start + size
        self._last_request = time.monotonic()
        if size == 0:
            return
        t = self._in[start]
        if t in _INLINE and self._answer_direct(t, start, start + size):
            return
        msg = Message(self._in[start:start + size])
        msg.get_byte()
        self._dispatch(t, msg.get_int(), msg)

    def _answer_direct(self, t: int, start: int, end: int) -> bool:
        """A well-formed READ or WRITE, parsed in place without a Message (a WRITE's data is
        not copied); False leaves a malformed one to the generic parse and its error replies.

        Both are: type, request id, handle string, uint64 offset, uint32 (READ: the length
        wanted; WRITE: the length of the data that follows)."""
        buf = self._in
        if end - start < 9:
            return False
        request, hlen = _U32_PAIR.unpack_from(buf, start + 1)
        h_end = start + 9 + hlen
        if h_end + 12 > end:
            return False
        offset, n = _OFFSET_LENGTH.unpack_from(buf, h_end)
        handle = bytes(buf[start + 9:h_end])
        if t == CMD_READ:
            self._guarded(t, request, self._read, request, handle, offset, n)
            return True
        if h_end + 12 + n > end:
            return False
        data = memoryview(buf)[h_end + 12:h_end + 12 + n]
        self._guarded(t, request, self._write, request, handle, offset, data)
        return True

    def _read_packet(self) -> tuple[int | None, Message]:
        """One SFTP message, waiting for it (only the INIT exchange, before _pump takes part)."""
        size = struct.unpack(">I", self._read_all(4))[0]
        if size == 0 or size > self.limits.max_read + 65536:
            raise SFTPError(f"message of {size} bytes refused")
        msg = Message(self._read_all(size))
        return msg.get_byte()[0], msg

    def _read_all(self, n: int) -> bytes:
        data, pos = self._in, self._in_pos
        parts, have = [data[pos:]], len(data) - pos
        while have < n:
            chunk = self.sock.recv(max(n - have, RECV_SIZE))
            if not chunk:
                raise EOFError()
            parts.append(chunk)
            have += len(chunk)
        self._in, self._in_pos = b"".join(parts), n
        return self._in[:n]

    def _send_server_version(self) -> int:
        t, init = self._read_packet()
        if t != CMD_INIT:
            raise SFTPError("Incompatible sftp protocol")
        version = init.get_int()
        msg = Message()
        msg.add_int(SFTP_VERSION)
        for ext, ver in self.EXTENSIONS:
            msg.add_string(ext)
            msg.add_string(ver)
        self._send_packet(CMD_VERSION, msg)
        return version

    # --- replies ------------------------------------------------------------

    def _write_all(self, out: bytes | bytearray | memoryview) -> None:
        """Send a reply, or hold a small one back while the next request is already buffered.

        Held replies leave together, in one SSH packet, once no complete request is left (end
        of ``_serve``) or, when the transport thread answers, once it would wait for more
        (``_flush_before_wait``): a client that pipelines 64 WRITEs gets its 64 status replies in
        a few packets instead of 64, each of which cost an encryption, a MAC and a system call.
        Every reply leaves through paramiko_send (no per-packet copies, one sendmsg() per batch)."""
        if len(out) < HOLD_MAX and (self._inline_hold or len(self._in) > self._in_pos or self._tail):
            self._held.append(bytes(out))
            self._held_bytes += len(out)
            if self._held_bytes < HOLD_MAX and len(self._held) < HOLD_COUNT:
                return
            out = b""
        self._flush()
        if out:
            paramiko_send.send_all(self.sock, out)

    def _flush(self) -> None:
        if self._held:
            held, self._held, self._held_bytes = self._held, [], 0
            paramiko_send.send_all(self.sock, b"".join(held))

    def _send_packet(self, t: int, msg: Message) -> None:
        """One reply built as a paramiko Message (what paramiko's ``BaseSFTP._send_packet`` does)."""
        packet = msg.asbytes()
        self._write_all(struct.pack(">IB", len(packet) + 1, t) + packet)

    def _reply_raw(self, t: int, request: int, payload: bytes) -> None:
        """Send one reply without building a paramiko Message (hot path for DATA)."""
        self._write_all(struct.pack(">IBI", len(payload) + 5, t, request) + payload)

    def _reply_status(self, request: int, code: int, message: str = "") -> None:
        text = (message or _STATUS_TEXT.get(code, "Failure")).encode("utf-8", "replace")
        self._reply_raw(CMD_STATUS, request, struct.pack(">II", code, len(text)) + text + b"\0\0\0\0")

    # --- what the request handler (sftp.SFTPHandler) supplies ---------------------------

    def _begin(self, channel: paramiko.Channel) -> bool:
        """Before the INIT exchange: set up (set ``sid``); False refuses the channel (closed)."""
        raise NotImplementedError

    def _end(self, timed_out: str | None) -> None:
        """The channel is gone (``timed_out``: why the server closed it, if it did)."""
        raise NotImplementedError

    def _transferring(self) -> bool:
        """A file is open: the stall timeout applies, not only the idle timeout."""
        raise NotImplementedError

    def _dispatch(self, t: int, request: int, msg: Message) -> None:
        """Answer request ``t`` (its id already read from ``msg``)."""
        raise NotImplementedError

    def _guarded(self, t: int, request: int, fn: Callable[..., None], *args: Any) -> None:
        """``fn(*args)``, its failure turned into the request's status reply."""
        raise NotImplementedError

    def _read(self, request: int, handle: bytes, offset: int, length: int) -> None:
        """A READ parsed in place (the fast path)."""
        raise NotImplementedError

    def _write(self, request: int, handle: bytes, offset: int, data: bytes | memoryview) -> None:
        """A WRITE parsed in place; ``data`` is a view of the request (the fast path)."""
        raise NotImplementedError

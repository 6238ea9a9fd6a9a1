"""SFTP v3 front end: paramiko's packet framing, our request handling.

paramiko's public ``SFTPServerInterface`` cannot carry a reason text, ignores
the outcome of CLOSE (so a rejected upload would look successful), turns every
exception into a bare FAILURE and bounds neither READ lengths nor open handles.
So this module replaces ``SFTPServer._process`` and ``_send_server_version``
(private; paramiko is pinned to 5.1.* for that) and speaks to the Session
directly. It holds no policy: every request becomes one Session call and every
Session error one status code plus a message.

Extensions advertised: ``posix-rename@openssh.com``, ``statvfs@openssh.com``,
``fstatvfs@openssh.com``, ``fsync@openssh.com``, ``limits@openssh.com`` (so
OpenSSH clients use ~255 KiB requests) and ``expand-path@openssh.com``.
``hardlink@openssh.com`` is not offered: a hard link would let one name keep
a file alive after a script vetoed or deleted the other.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from typing import Any

import paramiko
from paramiko.sftp import (
    CMD_ATTRS, CMD_CLOSE, CMD_DATA, CMD_EXTENDED, CMD_EXTENDED_REPLY, CMD_FSETSTAT, CMD_FSTAT,
    CMD_HANDLE, CMD_INIT, CMD_LSTAT, CMD_MKDIR, CMD_NAME, CMD_OPEN, CMD_OPENDIR, CMD_READ,
    CMD_READDIR, CMD_READLINK, CMD_REALPATH, CMD_REMOVE, CMD_RENAME, CMD_RMDIR, CMD_SETSTAT,
    CMD_STAT, CMD_STATUS, CMD_SYMLINK, CMD_VERSION, CMD_WRITE, SFTP_BAD_MESSAGE, SFTP_EOF,
    SFTP_FAILURE, SFTP_FLAG_APPEND, SFTP_FLAG_CREATE, SFTP_FLAG_EXCL, SFTP_FLAG_READ,
    SFTP_FLAG_TRUNC, SFTP_FLAG_WRITE, SFTP_NO_SUCH_FILE, SFTP_OK, SFTP_OP_UNSUPPORTED,
    SFTP_PERMISSION_DENIED, Message, SFTPError,
)
from paramiko.sftp_attr import SFTPAttributes

from scriptsftp.server.frontends.ssh.paramiko_ext import recv as paramiko_recv

from scriptsftp.server.frontends.ssh.paramiko_ext import send as paramiko_send

from scriptsftp.server.frontends.ssh.paramiko_ext import speed as paramiko_speed
from scriptsftp.server.frontends.ssh.paramiko_ext.transport import ServerTransport
from scriptsftp.server.frontends.ssh.channels import ChannelHost
from scriptsftp.server.contract.errors import FsError, NotFound, PermissionDenied
from scriptsftp.server.support.logs import BoundedLog
from scriptsftp.server.core.session import DirHandle, ReadHandle, Session, WriteHandle
from scriptsftp.server.core.storage import Entry

log = logging.getLogger("scriptsftp.sftp")

SFTP_VERSION = 3
READDIR_BATCH = 100
RECV_SIZE = 1 << 20  # channel bytes taken per read: every pipelined request already there
READ_REPLY_MAX = 262144  # a READ reply never exceeds this (max_read is at most 256 KiB - 1024)
_U32 = struct.Struct(">I")
_U32_PAIR = struct.Struct(">II")
_OFFSET_LENGTH = struct.Struct(">QI")  # what READ and WRITE carry after their handle
HOLD_MAX = 32 * 1024  # replies held back while more requests are buffered, at most this much
HOLD_COUNT = 16  # ... and at most this many: a client that keeps 64 requests in flight still sees steady replies
_DATA_HEADER = struct.Struct(">IBII")  # length, SSH_FXP_DATA, request id, data length


_unexpected = BoundedLog(logging.ERROR)


def status_of(exc: FsError) -> int:
    if isinstance(exc, NotFound):
        return SFTP_NO_SUCH_FILE
    if isinstance(exc, PermissionDenied):
        return SFTP_PERMISSION_DENIED
    return SFTP_FAILURE


_ATTR_FIELDS = ((SFTPAttributes.FLAG_SIZE, 8), (SFTPAttributes.FLAG_UIDGID, 8),
                (SFTPAttributes.FLAG_PERMISSIONS, 4), (SFTPAttributes.FLAG_AMTIME, 8))
MAX_EXTENDED_ATTRS = 64  # OpenSSH's sftp-server keeps none; a client sending more is hostile


def read_attrs(msg: Message) -> SFTPAttributes:
    """An ATTRS structure from a client request, every length bounded by the bytes left.

    paramiko's ``SFTPAttributes._from_msg`` trusts the extended-attribute count and
    pads short reads with zeros: ``count = 0xFFFFFFFF`` in one OPEN or SETSTAT loops
    four billion times past the end of the packet (a CPU pinned for ~40 minutes,
    before any permission check). Malformed attributes answer ``SSH_FX_BAD_MESSAGE``."""
    buf = msg.packet
    left = len(buf.getbuffer()) - buf.tell()

    def take(n: int) -> None:
        nonlocal left
        if n > left:
            raise _Reply(SFTP_BAD_MESSAGE, "malformed attributes")
        left -= n

    take(4)
    flags = msg.get_int()
    attr = SFTPAttributes()
    attr._flags = flags
    for flag, size in _ATTR_FIELDS:
        if flags & flag:
            take(size)
    if flags & SFTPAttributes.FLAG_SIZE:
        attr.st_size = msg.get_int64()
    if flags & SFTPAttributes.FLAG_UIDGID:
        attr.st_uid, attr.st_gid = msg.get_int(), msg.get_int()
    if flags & SFTPAttributes.FLAG_PERMISSIONS:
        attr.st_mode = msg.get_int()
    if flags & SFTPAttributes.FLAG_AMTIME:
        attr.st_atime, attr.st_mtime = msg.get_int(), msg.get_int()
    if flags & SFTPAttributes.FLAG_EXTENDED:
        take(4)
        count = msg.get_int()
        if count > MAX_EXTENDED_ATTRS or count * 8 > left:
            raise _Reply(SFTP_BAD_MESSAGE, "malformed attributes")
        for _ in range(2 * count):  # name, value: read and ignored
            take(4)
            n = msg.get_int()
            take(n)
            buf.seek(n, 1)
    return attr


def attrs_of(entry: Entry, name: str | None = None) -> SFTPAttributes:
    attr = SFTPAttributes.from_stat(entry.st, name if name is not None else entry.name)
    return attr


class SFTPHandler(paramiko.SFTPServer):
    """One SFTP subsystem channel = one Session."""

    def __init__(self, channel: paramiko.Channel, name: str, server: paramiko.ServerInterface,
                 host: ChannelHost) -> None:
        super().__init__(channel, name, server, paramiko.SFTPServerInterface)
        self.host = host
        host.add_worker(self)  # joined before the connection counts as ended
        self.limits = host.limits
        self._crowded = host.pacing.crowded  # bound once: called per pumped packet
        self.session: Session | None = None
        self._handles: dict[bytes, ReadHandle | WriteHandle | DirHandle] = {}
        self._next = 1
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

    # --- lifecycle ---------------------------------------------------------

    def start_subsystem(self, name: str, transport: ServerTransport, channel: paramiko.Channel) -> None:  # type: ignore[override]
        try:
            self.session = self.host.open_session("sftp")
        except FsError as exc:
            log.info("sftp refused: %s", exc.message)
            channel.close()
            return
        quiet = self.limits.quiet_limit(transferring=True)
        if quiet:  # a reply the client does not take (a stalled download) waits no longer than this
            channel.settimeout(quiet)
        self.sock = channel
        pipe = channel.in_buffer
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
            log.info("sftp %s: channel closed", self._timed_out, extra={"sid": self.session.id})
        except EOFError:
            return
        except (OSError, SFTPError) as exc:
            log.info("sftp channel error: %s", exc, extra={"sid": self.session.id})
        finally:
            paramiko_recv.set_sink(transport.packetizer, channel.chanid, None)
            transport.set_pump(channel, None)
            with self._work:
                self._end()
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
            self._end()
        paramiko.SubsystemHandler.finish_subsystem(self)

    def _end(self) -> None:
        """Channel gone: uploads never closed by the client are discarded, not published."""
        self._closed = True
        handles, self._handles = self._handles, {}
        reason = self._timed_out or "connection closed before the transfer completed"
        for h in handles.values():
            h.abort(reason)
        if self.session is not None:
            self.session.close()

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
            self.sock.in_buffer.kick()

    def _sink(self, data: memoryview) -> bool:
        """Data for this channel straight from the transport's packet reader (paramiko_recv.set_sink).

        Taken into the request stream and answered as _pump would, when nothing is queued
        before it in the channel and no key exchange runs (the window adjustment it may
        send must not wait here); otherwise False, and it goes through the channel."""
        chan = self.sock
        if len(chan.in_buffer._buffer) or not chan.transport.clear_to_send.is_set() or self._overflow(len(data)):
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
            chan.in_buffer.kick()
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
            clear = self.sock.transport.clear_to_send
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
                if t not in _INLINE or not self._window_holds(READ_REPLY_MAX if t == CMD_READ else 1024):
                    kick = True
                    break
                self._answer()
            if self._held:
                if self._inline_hold and not kick:
                    # more packets may already be on their way (libssh2 sends three WRITEs,
                    # then waits): their replies join these, sent when the transport would wait
                    paramiko_recv.before_wait(self.sock.transport.packetizer, self._flush_before_wait)
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
        return len(self.sock.in_buffer._buffer) + self._tail_len + len(self._in) - self._in_pos

    def _replies_blocked(self) -> bool:
        """Our replies cannot leave because the client's window is closed (not a key exchange)."""
        chan = self.sock
        return chan.transport.clear_to_send.is_set() and chan.out_window_size < READ_REPLY_MAX + HOLD_MAX + 1024

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
                    "replies", self.limits.max_queued, extra={"sid": self.session.id if self.session else ""})
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
        pipe = self.sock.in_buffer
        with pipe._lock:
            pipe._buffer = paramiko_speed.ChunkBuffer()

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
        self.sock.in_buffer.kick()

    def _log_unexpected(self, exc: Exception, what: str) -> None:
        """A failure in the transport thread that is not the connection ending (a bug): logged
        with its traceback; the SFTP thread, woken, meets the connection's state itself."""
        if not isinstance(exc, (EOFError, OSError, SFTPError)):
            log.exception(what, extra={"sid": self.session.id if self.session else ""})

    def _flush_inline(self) -> bool:
        """Send held replies from the transport thread if that cannot wait; False if it would."""
        if not self._held:
            return True
        if not (self.sock.transport.clear_to_send.is_set() and self._window_holds(0)):
            return False
        self._flush()
        return True

    def _window_holds(self, reply: int) -> bool:
        return self.sock.out_window_size >= self._held_bytes + reply + 1024

    def _transferring(self) -> bool:
        """A file is open: the stall timeout applies, not only the idle timeout."""
        return any(not isinstance(h, DirHandle) for h in list(self._handles.values()))

    def _quiet_limit(self) -> float:
        return self.limits.quiet_limit(self._transferring())

    def _timeout_reason(self) -> str:
        return self.limits.timeout_reason(self._transferring())

    def _wait_for_input(self, pipe: paramiko_speed.ChunkPipe) -> None:
        """Sleep until the channel has bytes, is closed, or the transport thread left work here.

        The idle (or stall) timeout counts from the last request answered by either thread."""
        idle = self._quiet_limit()
        with pipe._lock:
            while not (len(pipe._buffer) or pipe._closed or pipe.kicked):
                if idle:
                    left = self._last_request + idle - time.monotonic()
                    if left <= 0:
                        raise socket.timeout()
                    pipe._cv.wait(left)
                else:
                    pipe._cv.wait()
            pipe.kicked = False

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
        for ext, ver in (
            ("posix-rename@openssh.com", "1"), ("statvfs@openssh.com", "2"), ("fstatvfs@openssh.com", "2"),
            ("fsync@openssh.com", "1"), ("limits@openssh.com", "1"), ("expand-path@openssh.com", "1"),
        ):
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

    def _reply_raw(self, t: int, request: int, payload: bytes) -> None:
        """Send one reply without building a paramiko Message (hot path for DATA)."""
        self._write_all(struct.pack(">IBI", len(payload) + 5, t, request) + payload)

    def _reply_status(self, request: int, code: int, message: str = "") -> None:
        text = (message or _DESC.get(code, "Failure")).encode("utf-8", "replace")
        self._reply_raw(CMD_STATUS, request, struct.pack(">II", code, len(text)) + text + b"\0\0\0\0")

    def _reply_attrs(self, request: int, attr: SFTPAttributes) -> None:
        msg = Message()
        msg.add_int(request)
        attr._pack(msg)
        self._send_packet(CMD_ATTRS, msg)

    def _reply_name(self, request: int, path: str) -> None:
        msg = Message()
        msg.add_int(request)
        msg.add_int(1)
        msg.add_string(path)
        msg.add_string(path)
        SFTPAttributes()._pack(msg)
        self._send_packet(CMD_NAME, msg)

    def _add_handle(self, obj: ReadHandle | WriteHandle | DirHandle) -> bytes:
        if len(self._handles) >= self.limits.max_handles:
            obj.abort("too many open handles")
            raise _Reply(SFTP_FAILURE, f"too many open handles (limit {self.limits.max_handles})")
        name = b"h%d" % self._next
        self._next += 1
        self._handles[name] = obj
        return name

    def _lookup_handle(self, msg: Message) -> Any:
        return self._handle(msg.get_binary())

    def _handle(self, name: bytes) -> Any:
        h = self._handles.get(name)
        if h is None:
            raise _Reply(SFTP_BAD_MESSAGE, "invalid handle")
        return h

    # --- dispatch -------------------------------------------------------------

    def _dispatch(self, t: int, request: int, msg: Message) -> None:
        fn = _TABLE.get(t)
        if fn is None:
            self._reply_status(request, SFTP_OP_UNSUPPORTED)
            return
        self._guarded(t, request, fn, self, request, msg)

    def _guarded(self, t: int, request: int, fn: Any, *args: Any) -> None:
        """``fn(*args)``, its failure turned into the request's status reply."""
        try:
            fn(*args)
        except _Reply as r:
            self._reply_status(request, r.code, r.message)
        except FsError as exc:
            self._reply_status(request, status_of(exc), exc.message)
        except UnicodeDecodeError:
            self._reply_status(request, SFTP_FAILURE, "path is not valid UTF-8")
        except (OSError, EOFError):
            raise
        except Exception:
            # a bug, hit by a client request: the first with its traceback, then one line per
            # 10 s with a count, whatever the client pipelines (54 KB of requests made 938 KB of log)
            _unexpected.log(log, "sftp request %d failed", t, extra={"sid": self.session.id if self.session else ""},
                            exc_info=True)
            self._reply_status(request, SFTP_FAILURE, "internal error")

    def _op_open(self, request: int, msg: Message) -> None:
        assert self.session is not None
        path = msg.get_text()
        pflags = msg.get_int()
        attr = read_attrs(msg)
        if pflags & (SFTP_FLAG_WRITE | SFTP_FLAG_APPEND):
            mode = attr.st_mode & 0o777 if attr._flags & attr.FLAG_PERMISSIONS else 0o644
            handle: ReadHandle | WriteHandle = self.session.open_write(
                path,
                truncate=bool(pflags & SFTP_FLAG_TRUNC),
                append=bool(pflags & SFTP_FLAG_APPEND),
                exclusive=bool(pflags & SFTP_FLAG_EXCL),
                create=bool(pflags & SFTP_FLAG_CREATE),
                readable=bool(pflags & SFTP_FLAG_READ),
                mode=mode,
            )
        else:
            handle = self.session.open_read(path)
        self._reply_raw(CMD_HANDLE, request, _string(self._add_handle(handle)))

    def _op_close(self, request: int, msg: Message) -> None:
        key = msg.get_binary()
        h = self._handles.pop(key, None)
        if h is None:
            raise _Reply(SFTP_BAD_MESSAGE, "invalid handle")
        h.close()  # a WriteHandle publishes here; a veto raises and becomes the CLOSE status
        self._reply_status(request, SFTP_OK)

    def _op_read(self, request: int, msg: Message) -> None:
        self._read(request, msg.get_binary(), msg.get_int64(), msg.get_int())

    def _read(self, request: int, handle: bytes, offset: int, length: int) -> None:
        h = self._handle(handle)
        length = min(length, self.limits.max_read)
        if isinstance(h, DirHandle):
            raise _Reply(SFTP_FAILURE, "is a directory")
        buf = bytearray(13 + length)  # the reply is read straight into place behind its header
        n = h.read_into(offset, memoryview(buf)[13:])
        if not n:
            self._reply_status(request, SFTP_EOF)
            return
        _DATA_HEADER.pack_into(buf, 0, n + 9, CMD_DATA, request, n)
        self._write_all(memoryview(buf)[:13 + n])

    def _op_write(self, request: int, msg: Message) -> None:
        self._write(request, msg.get_binary(), msg.get_int64(), msg.get_binary())

    def _write(self, request: int, handle: bytes, offset: int, data: bytes | memoryview) -> None:
        h = self._handle(handle)
        if not isinstance(h, WriteHandle):
            raise _Reply(SFTP_PERMISSION_DENIED, "handle not open for writing")
        if len(data) > self.limits.max_read + 1024:
            raise _Reply(SFTP_FAILURE, "write request too large")
        h.write(offset, data)
        self._reply_status(request, SFTP_OK)

    def _op_remove(self, request: int, msg: Message) -> None:
        assert self.session is not None
        self.session.remove(msg.get_text())
        self._reply_status(request, SFTP_OK)

    def _op_rename(self, request: int, msg: Message) -> None:
        assert self.session is not None
        old, new = msg.get_text(), msg.get_text()
        self.session.rename(old, new, overwrite=False)  # SFTPv3: fails if the target exists
        self._reply_status(request, SFTP_OK)

    def _op_mkdir(self, request: int, msg: Message) -> None:
        assert self.session is not None
        path = msg.get_text()
        attr = read_attrs(msg)
        mode = attr.st_mode & 0o777 if attr._flags & attr.FLAG_PERMISSIONS else 0o755
        self.session.mkdir(path, mode)
        self._reply_status(request, SFTP_OK)

    def _op_rmdir(self, request: int, msg: Message) -> None:
        assert self.session is not None
        self.session.rmdir(msg.get_text())
        self._reply_status(request, SFTP_OK)

    def _op_opendir(self, request: int, msg: Message) -> None:
        assert self.session is not None
        path = msg.get_text()
        listing = self.session.opendir(path)  # read a batch per READDIR, never whole
        self._reply_raw(CMD_HANDLE, request, _string(self._add_handle(listing)))

    def _op_readdir(self, request: int, msg: Message) -> None:
        h = self._lookup_handle(msg)
        if not isinstance(h, DirHandle):
            raise _Reply(SFTP_FAILURE, "not a directory handle")
        batch = h.read(READDIR_BATCH)
        if not batch:
            self._reply_status(request, SFTP_EOF)
            return
        out = Message()
        out.add_int(request)
        out.add_int(len(batch))
        for entry in batch:
            attr = attrs_of(entry)
            out.add_string(entry.name)
            out.add_string(str(attr))
            attr._pack(out)
        self._send_packet(CMD_NAME, out)

    def _op_stat(self, request: int, msg: Message, follow: bool = True) -> None:
        assert self.session is not None
        self._reply_attrs(request, attrs_of(self.session.stat(msg.get_text(), follow=follow)))

    def _op_lstat(self, request: int, msg: Message) -> None:
        self._op_stat(request, msg, follow=False)

    def _op_fstat(self, request: int, msg: Message) -> None:
        h = self._lookup_handle(msg)
        if isinstance(h, DirHandle):
            raise _Reply(SFTP_FAILURE, "not a file handle")
        self._reply_attrs(request, SFTPAttributes.from_stat(h.fstat()))

    def _setstat_args(self, attr: SFTPAttributes) -> dict[str, Any]:
        args: dict[str, Any] = {}
        if attr._flags & attr.FLAG_PERMISSIONS:
            args["mode"] = attr.st_mode
        if attr._flags & attr.FLAG_AMTIME:
            args["times"] = (attr.st_atime, attr.st_mtime)
        if attr._flags & attr.FLAG_SIZE:
            args["size"] = attr.st_size
        if attr._flags & attr.FLAG_UIDGID:
            raise _Reply(SFTP_PERMISSION_DENIED, "changing owner or group is not supported")
        return args

    def _op_setstat(self, request: int, msg: Message) -> None:
        assert self.session is not None
        path = msg.get_text()
        self.session.setstat(path, **self._setstat_args(read_attrs(msg)))
        self._reply_status(request, SFTP_OK)

    def _op_fsetstat(self, request: int, msg: Message) -> None:
        assert self.session is not None
        h = self._lookup_handle(msg)
        args = self._setstat_args(read_attrs(msg))
        if not isinstance(h, WriteHandle):
            raise _Reply(SFTP_PERMISSION_DENIED, "handle not open for writing")
        self.session.fsetstat(h, **args)
        self._reply_status(request, SFTP_OK)

    def _op_readlink(self, request: int, msg: Message) -> None:
        assert self.session is not None
        self._reply_name(request, self.session.readlink(msg.get_text()))

    def _op_symlink(self, request: int, msg: Message) -> None:
        assert self.session is not None
        # OpenSSH (and paramiko) send the target first, despite the draft.
        target, link = msg.get_text(), msg.get_text()
        self.session.symlink(target, link)
        self._reply_status(request, SFTP_OK)

    def _op_realpath(self, request: int, msg: Message) -> None:
        assert self.session is not None
        self._reply_name(request, self.session.realpath(msg.get_text() or "."))

    def _op_extended(self, request: int, msg: Message) -> None:
        assert self.session is not None
        tag = msg.get_text()
        if tag == "posix-rename@openssh.com":
            old, new = msg.get_text(), msg.get_text()
            self.session.rename(old, new, overwrite=True)
            self._reply_status(request, SFTP_OK)
        elif tag in ("statvfs@openssh.com", "fstatvfs@openssh.com"):
            if tag == "statvfs@openssh.com":
                st = self.session.statvfs(msg.get_text())
            else:
                self._lookup_handle(msg)
                st = self.session.statvfs("/")
            flag = (1 if st.f_flag & 1 else 0) | (2 if st.f_flag & 2 else 0)
            payload = struct.pack(
                ">11Q", st.f_bsize, st.f_frsize, st.f_blocks, st.f_bfree, st.f_bavail, st.f_files,
                st.f_ffree, st.f_favail, st.f_fsid & 0xFFFFFFFFFFFFFFFF, flag, st.f_namemax,
            )
            self._reply_raw(CMD_EXTENDED_REPLY, request, payload)
        elif tag == "fsync@openssh.com":
            h = self._lookup_handle(msg)
            if isinstance(h, WriteHandle):
                h.fsync()
            self._reply_status(request, SFTP_OK)
        elif tag == "limits@openssh.com":
            payload = struct.pack(
                ">4Q", self.limits.max_read + 1024, self.limits.max_read, self.limits.max_read,
                self.limits.max_handles,
            )
            self._reply_raw(CMD_EXTENDED_REPLY, request, payload)
        elif tag == "expand-path@openssh.com":
            path = msg.get_text()
            if path == "~" or path.startswith("~/"):
                path = "/" + path[1:].lstrip("/")
            self._reply_name(request, self.session.realpath(path))
        else:
            self._reply_status(request, SFTP_OP_UNSUPPORTED, f"extension {tag} not supported")


class _Reply(Exception):
    def __init__(self, code: int, message: str) -> None:
        self.code, self.message = code, message


def _string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


_DESC = {
    SFTP_OK: "Success", SFTP_EOF: "End of file", SFTP_NO_SUCH_FILE: "No such file",
    SFTP_PERMISSION_DENIED: "Permission denied", SFTP_FAILURE: "Failure", SFTP_BAD_MESSAGE: "Bad message",
    SFTP_OP_UNSUPPORTED: "Operation unsupported",
}

_TABLE = {
    CMD_OPEN: SFTPHandler._op_open, CMD_CLOSE: SFTPHandler._op_close, CMD_READ: SFTPHandler._op_read,
    CMD_WRITE: SFTPHandler._op_write, CMD_REMOVE: SFTPHandler._op_remove, CMD_RENAME: SFTPHandler._op_rename,
    CMD_MKDIR: SFTPHandler._op_mkdir, CMD_RMDIR: SFTPHandler._op_rmdir, CMD_OPENDIR: SFTPHandler._op_opendir,
    CMD_READDIR: SFTPHandler._op_readdir, CMD_STAT: SFTPHandler._op_stat, CMD_LSTAT: SFTPHandler._op_lstat,
    CMD_FSTAT: SFTPHandler._op_fstat, CMD_SETSTAT: SFTPHandler._op_setstat, CMD_FSETSTAT: SFTPHandler._op_fsetstat,
    CMD_READLINK: SFTPHandler._op_readlink, CMD_SYMLINK: SFTPHandler._op_symlink,
    CMD_REALPATH: SFTPHandler._op_realpath, CMD_EXTENDED: SFTPHandler._op_extended,
}

# Answered by the transport thread when they arrive (SFTPHandler._pump): no events, no scripts.
_INLINE = frozenset({CMD_READ, CMD_WRITE})

__all__ = ["SFTPHandler", "status_of"]

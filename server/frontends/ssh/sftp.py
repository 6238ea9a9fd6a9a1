"""SFTP v3 front end, the request handling: each SFTP request mapped onto a Session call.

paramiko's public ``SFTPServerInterface`` cannot carry a reason text, ignores
the outcome of CLOSE (so a rejected upload would look successful), turns every
exception into a bare FAILURE and bounds neither READ lengths nor open handles.
So paramiko's ``SFTPServer`` is not used: the packet stream is ours
(sftp_stream.py, a ``paramiko.SubsystemHandler``) and this module speaks to the
Session directly. It holds no policy: every request becomes one Session call and
every Session error one status code plus a message.

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
import time
from typing import Any, TypeVar

import paramiko
from paramiko.sftp import (
    CMD_ATTRS, CMD_CLOSE, CMD_DATA, CMD_EXTENDED, CMD_EXTENDED_REPLY, CMD_FSETSTAT, CMD_FSTAT,
    CMD_HANDLE, CMD_LSTAT, CMD_MKDIR, CMD_NAME, CMD_OPEN, CMD_OPENDIR, CMD_READ,
    CMD_READDIR, CMD_READLINK, CMD_REALPATH, CMD_REMOVE, CMD_RENAME, CMD_RMDIR, CMD_SETSTAT,
    CMD_STAT, CMD_SYMLINK, CMD_WRITE, SFTP_BAD_MESSAGE, SFTP_EOF,
    SFTP_FAILURE, SFTP_FLAG_APPEND, SFTP_FLAG_CREATE, SFTP_FLAG_EXCL, SFTP_FLAG_READ,
    SFTP_FLAG_TRUNC, SFTP_FLAG_WRITE, SFTP_NO_SUCH_FILE, SFTP_OK, SFTP_OP_UNSUPPORTED,
    SFTP_PERMISSION_DENIED,
)
from paramiko.message import Message
from paramiko.sftp_attr import SFTPAttributes

from scriptsftp.server.frontends.ssh.channels import ChannelHost
from scriptsftp.server.frontends.ssh.paramiko_ext.sftp_attrs import attrs_with_flags, flags_of, pack_attrs
from scriptsftp.server.frontends.ssh.sftp_stream import SFTPStream
from scriptsftp.server.contract.errors import FsError, LimitExceeded, NotFound, PermissionDenied
from scriptsftp.server.contract.ports import (
    DirHandlePort, Entry, HandlePort, ReadHandlePort, SessionPort, ThrottlePort, WriteHandlePort,
)
from scriptsftp.server.support.logs import BoundedLog

log = logging.getLogger("scriptsftp.sftp")

READDIR_BATCH = 100
_DATA_HEADER = struct.Struct(">IBII")  # length, SSH_FXP_DATA, request id, data length


_unexpected = BoundedLog(logging.ERROR)

AnyHandle = TypeVar("AnyHandle", bound=HandlePort)


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
    attr = attrs_with_flags(flags)
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


class SFTPHandler(SFTPStream):
    """One SFTP subsystem channel = one Session: each request one Session call, each
    Session error one status reply (the stream, sftp_stream.SFTPStream, moves the bytes).

    The session is a ``SessionPort`` (server/contract/ports.py): the core's Session in a
    single-process server, a RemoteSession in an SSH worker. Its handles are kept in one
    table per kind (downloads, uploads, listings), as core_link keeps them: the table a
    handle's name is in says what it may do, so READ and WRITE find theirs with one dict
    lookup and no isinstance on a per-packet path. Names are unique across the tables."""

    EXTENSIONS = (
        ("posix-rename@openssh.com", "1"), ("statvfs@openssh.com", "2"), ("fstatvfs@openssh.com", "2"),
        ("fsync@openssh.com", "1"), ("limits@openssh.com", "1"), ("expand-path@openssh.com", "1"),
    )

    def __init__(self, channel: paramiko.Channel, name: str, server: paramiko.ServerInterface,
                 host: ChannelHost) -> None:
        super().__init__(channel, name, server, host)
        self.session: SessionPort[Any] | None = None
        self._reads: dict[bytes, ReadHandlePort] = {}
        self._writes: dict[bytes, WriteHandlePort] = {}
        self._listings: dict[bytes, DirHandlePort] = {}
        self._next = 1

    # --- lifecycle (hooks of SFTPStream) -------------------------------------------------

    def _begin(self, channel: paramiko.Channel) -> bool:
        try:
            self.session = self.host.open_session("sftp")
        except FsError as exc:
            log.info("sftp refused: %s", exc.message)
            channel.close()
            return False
        self.sid = self.session.id
        bandwidth = self.session.bandwidth  # the user's buckets, shared with all their sessions
        self._up, self._down = bandwidth.up, bandwidth.down
        return True

    def _end(self, timed_out: str | None) -> None:
        """Channel gone: uploads never closed by the client are discarded, not published."""
        handles: dict[bytes, HandlePort] = {**self._reads, **self._writes, **self._listings}
        self._reads, self._writes, self._listings = {}, {}, {}
        reason = timed_out or "connection closed before the transfer completed"
        for name in sorted(handles, key=lambda name: int(name[1:])):  # in the order they were opened
            handles[name].abort(reason)
        if self.session is not None:
            self.session.close()

    def _transferring(self) -> bool:
        """A file is open: the stall timeout applies, not only the idle timeout."""
        return bool(self._reads or self._writes)

    def _pace(self, throttle: ThrottlePort, n: int) -> None:
        """Wait until the user's bucket lets ``n`` more bytes move. Not for a client that is
        gone (the requests it left queued would spend the user's bandwidth for nothing); and
        not past the stall timeout: a READ or WRITE that cannot move within it is a stalled
        transfer, and the channel closes as for one (its uploads discarded, never published)."""
        if self.sock.closed:
            raise EOFError("channel closed")
        stall = self.limits.stall_timeout
        try:
            throttle.take(n, time.monotonic() + stall if stall else None)
        except LimitExceeded as exc:
            log.info("sftp %s", exc.message, extra={"sid": self.sid})
            raise socket.timeout(exc.message) from None

    # --- replies ------------------------------------------------------------

    def _reply_attrs(self, request: int, attr: SFTPAttributes) -> None:
        msg = Message()
        msg.add_int(request)
        pack_attrs(msg, attr)
        self._send_packet(CMD_ATTRS, msg)

    def _reply_name(self, request: int, path: str) -> None:
        msg = Message()
        msg.add_int(request)
        msg.add_int(1)
        msg.add_string(path)
        msg.add_string(path)
        pack_attrs(msg, SFTPAttributes())
        self._send_packet(CMD_NAME, msg)

    def _add_handle(self, table: dict[bytes, AnyHandle], obj: AnyHandle) -> bytes:
        if len(self._reads) + len(self._writes) + len(self._listings) >= self.limits.max_handles:
            obj.abort("too many open handles")
            raise _Reply(SFTP_FAILURE, f"too many open handles (limit {self.limits.max_handles})")
        name = b"h%d" % self._next
        self._next += 1
        table[name] = obj
        return name

    def _known(self, name: bytes) -> bytes:
        """``name``, if it is an open handle of any kind; else the request is malformed."""
        if name not in self._reads and name not in self._writes and name not in self._listings:
            raise _Reply(SFTP_BAD_MESSAGE, "invalid handle")
        return name

    def _file(self, name: bytes, refusal: str) -> ReadHandlePort | WriteHandlePort:
        """The download or upload called ``name``; a listing's name is refused with ``refusal``."""
        h: ReadHandlePort | WriteHandlePort | None = self._reads.get(name)
        if h is None:
            h = self._writes.get(name)
            if h is None:
                self._known(name)
                raise _Reply(SFTP_FAILURE, refusal)
        return h

    def _upload(self, name: bytes) -> WriteHandlePort:
        """The upload called ``name``; another kind of handle is refused."""
        h = self._writes.get(name)
        if h is None:
            self._known(name)
            raise _Reply(SFTP_PERMISSION_DENIED, "handle not open for writing")
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
            mode = (attr.st_mode or 0) & 0o777 if flags_of(attr) & attr.FLAG_PERMISSIONS else 0o644
            upload: WriteHandlePort = self.session.open_write(
                path,
                truncate=bool(pflags & SFTP_FLAG_TRUNC),
                append=bool(pflags & SFTP_FLAG_APPEND),
                exclusive=bool(pflags & SFTP_FLAG_EXCL),
                create=bool(pflags & SFTP_FLAG_CREATE),
                readable=bool(pflags & SFTP_FLAG_READ),
                mode=mode,
            )
            name = self._add_handle(self._writes, upload)
        else:
            name = self._add_handle(self._reads, self.session.open_read(path))
        self._reply_raw(CMD_HANDLE, request, _string(name))

    def _op_close(self, request: int, msg: Message) -> None:
        key = msg.get_binary()
        h: HandlePort | None = self._reads.pop(key, None)
        if h is None:
            h = self._writes.pop(key, None)
            if h is None:
                h = self._listings.pop(key, None)
                if h is None:
                    raise _Reply(SFTP_BAD_MESSAGE, "invalid handle")
        h.close()  # an upload publishes here; a veto raises and becomes the CLOSE status
        self._reply_status(request, SFTP_OK)

    def _op_read(self, request: int, msg: Message) -> None:
        self._read(request, msg.get_binary(), msg.get_int64(), msg.get_int())

    def _read(self, request: int, handle: bytes, offset: int, length: int) -> None:
        h: ReadHandlePort | WriteHandlePort | None = self._reads.get(handle)
        if h is None:  # the rare case: reading back an upload (w+), or no file at all
            h = self._file(handle, "is a directory")
        length = min(length, self.limits.max_read)
        buf = bytearray(13 + length)  # the reply is read straight into place behind its header
        limited = self._down.rate  # read first: the read may learn of a new limit (a worker's progress report)
        n = h.read_into(offset, memoryview(buf)[13:])
        if not n:
            self._reply_status(request, SFTP_EOF)
            return
        if limited:  # the reply leaves once the user's bucket allows it
            self._pace(self._down, n)
        _DATA_HEADER.pack_into(buf, 0, n + 9, CMD_DATA, request, n)
        self._write_all(memoryview(buf)[:13 + n])

    def _op_write(self, request: int, msg: Message) -> None:
        self._write(request, msg.get_binary(), msg.get_int64(), msg.get_binary())

    def _write(self, request: int, handle: bytes, offset: int, data: bytes | memoryview) -> None:
        h = self._writes.get(handle)
        if h is None:
            h = self._upload(handle)
        if len(data) > self.limits.max_read + 1024:
            raise _Reply(SFTP_FAILURE, "write request too large")
        if self._up.rate:  # the write (and its reply, so the client's next) waits for the user's bucket
            self._pace(self._up, len(data))
        h.write(offset, data)  # a view of the request: the file write takes any buffer
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
        mode = (attr.st_mode or 0) & 0o777 if flags_of(attr) & attr.FLAG_PERMISSIONS else 0o755
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
        self._reply_raw(CMD_HANDLE, request, _string(self._add_handle(self._listings, listing)))

    def _op_readdir(self, request: int, msg: Message) -> None:
        key = msg.get_binary()
        listing = self._listings.get(key)
        if listing is None:
            self._known(key)
            raise _Reply(SFTP_FAILURE, "not a directory handle")
        batch = listing.read(READDIR_BATCH)
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
            pack_attrs(out, attr)
        self._send_packet(CMD_NAME, out)

    def _op_stat(self, request: int, msg: Message, follow: bool = True) -> None:
        assert self.session is not None
        self._reply_attrs(request, attrs_of(self.session.stat(msg.get_text(), follow=follow)))

    def _op_lstat(self, request: int, msg: Message) -> None:
        self._op_stat(request, msg, follow=False)

    def _op_fstat(self, request: int, msg: Message) -> None:
        h = self._file(msg.get_binary(), "not a file handle")
        self._reply_attrs(request, SFTPAttributes.from_stat(h.fstat()))

    def _setstat_args(self, attr: SFTPAttributes) -> dict[str, Any]:
        args: dict[str, Any] = {}
        flags = flags_of(attr)
        if flags & attr.FLAG_PERMISSIONS:
            args["mode"] = attr.st_mode
        if flags & attr.FLAG_AMTIME:
            args["times"] = (attr.st_atime, attr.st_mtime)
        if flags & attr.FLAG_SIZE:
            args["size"] = attr.st_size
        if flags & attr.FLAG_UIDGID:
            raise _Reply(SFTP_PERMISSION_DENIED, "changing owner or group is not supported")
        return args

    def _op_setstat(self, request: int, msg: Message) -> None:
        assert self.session is not None
        path = msg.get_text()
        self.session.setstat(path, **self._setstat_args(read_attrs(msg)))
        self._reply_status(request, SFTP_OK)

    def _op_fsetstat(self, request: int, msg: Message) -> None:
        assert self.session is not None
        key = self._known(msg.get_binary())
        args = self._setstat_args(read_attrs(msg))
        self.session.fsetstat(self._upload(key), **args)
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
                self._known(msg.get_binary())
                st = self.session.statvfs("/")
            flag = (1 if st.f_flag & 1 else 0) | (2 if st.f_flag & 2 else 0)
            payload = struct.pack(
                ">11Q", st.f_bsize, st.f_frsize, st.f_blocks, st.f_bfree, st.f_bavail, st.f_files,
                st.f_ffree, st.f_favail, st.f_fsid & 0xFFFFFFFFFFFFFFFF, flag, st.f_namemax,
            )
            self._reply_raw(CMD_EXTENDED_REPLY, request, payload)
        elif tag == "fsync@openssh.com":
            key = self._known(msg.get_binary())
            upload = self._writes.get(key)
            if upload is not None:
                upload.fsync()
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


_TABLE = {
    CMD_OPEN: SFTPHandler._op_open, CMD_CLOSE: SFTPHandler._op_close, CMD_READ: SFTPHandler._op_read,
    CMD_WRITE: SFTPHandler._op_write, CMD_REMOVE: SFTPHandler._op_remove, CMD_RENAME: SFTPHandler._op_rename,
    CMD_MKDIR: SFTPHandler._op_mkdir, CMD_RMDIR: SFTPHandler._op_rmdir, CMD_OPENDIR: SFTPHandler._op_opendir,
    CMD_READDIR: SFTPHandler._op_readdir, CMD_STAT: SFTPHandler._op_stat, CMD_LSTAT: SFTPHandler._op_lstat,
    CMD_FSTAT: SFTPHandler._op_fstat, CMD_SETSTAT: SFTPHandler._op_setstat, CMD_FSETSTAT: SFTPHandler._op_fsetstat,
    CMD_READLINK: SFTPHandler._op_readlink, CMD_SYMLINK: SFTPHandler._op_symlink,
    CMD_REALPATH: SFTPHandler._op_realpath, CMD_EXTENDED: SFTPHandler._op_extended,
}

__all__ = ["SFTPHandler", "status_of"]

"""A file transfer on an open descriptor: positional reads and writes, bounded offsets,
OS errors as the contract's FsErrors, and an upload poisoned by its first failed write.

Why here: two kinds of handle share this code and live in layers that may not import
each other. The core's ``ReadHandle``/``WriteHandle`` (server/core/session.py) add the
Session's bookkeeping (logs, events, publishing) on top; an SSH worker's
``RemoteReadHandle``/``RemoteWriteHandle`` (server/frontends/ssh/remote_core.py) move the
bytes on the descriptor the core passed them and report the count back over the link.
A front end imports only the contract and support, the core only what is below it: so
the descriptor logic both inherit sits here, below both, and knows no Session.

This is the READ/WRITE hot path of every protocol: no extra call layers per packet.
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading
import time

from scriptsftp.server.contract.errors import FsError, PermissionDenied, QuotaExceeded, from_oserror
from scriptsftp.server.contract.ports import TransferLimit

#: the largest file offset the kernel takes (off_t); clients send 64-bit unsigned offsets
MAX_OFFSET = 2**63 - 1


class FdFile:
    """An open file of a transfer: its virtual path (for messages), its descriptor, when it
    started, and whether it is finished (closed or aborted, once)."""

    limit: TransferLimit | None = None
    """Quotas this transfer runs under, set by the core at open (None: none)."""

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self.fd = fd
        self.started = time.monotonic()
        self.done = False
        self._lock = threading.Lock()

    def fstat(self) -> os.stat_result:
        return os.fstat(self.fd)

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def _finish(self) -> bool:
        """Mark done once; False if it already was (close after abort and vice versa)."""
        with self._lock:
            if self.done:
                return False
            self.done = True
        return True

    def abort(self, reason: str) -> None:
        raise NotImplementedError


class FdReader(FdFile):
    """A download: positional reads, no shared offset; ``sent`` counts the bytes read."""

    def __init__(self, path: str, fd: int) -> None:
        super().__init__(path, fd)
        self.sent = 0

    def read(self, offset: int, length: int) -> bytes:
        if not 0 <= offset <= MAX_OFFSET:
            return b""  # past any end of file: EOF, as the kernel answers for a large offset
        if self.limit is not None:
            length = self._allowed(offset, length)
        try:
            data = os.pread(self.fd, length, offset)
        except OSError as exc:
            raise from_oserror(exc, self.path) from None
        self.sent += len(data)
        return data

    def read_into(self, offset: int, buf: memoryview) -> int:
        """``read()`` into the caller's buffer: the SFTP reply is built around it without a copy."""
        if not 0 <= offset <= MAX_OFFSET:
            return 0
        if self.limit is not None:
            buf = buf[:self._allowed(offset, len(buf))]
        try:
            n = os.preadv(self.fd, [buf], offset)
        except OSError as exc:
            raise from_oserror(exc, self.path) from None
        self.sent += n
        return n

    def _allowed(self, offset: int, length: int) -> int:
        """How much of a read the daily download quota lets through: a short read up to it
        (clients ask again), then the refusal; a read at the end of the file stays EOF."""
        assert self.limit is not None
        if self.limit.moved is None:
            return length
        left = self.limit.moved - self.sent
        if left > 0:
            return min(length, left)
        if length and os.pread(self.fd, 1, offset):
            raise QuotaExceeded(f"{self.path}: {self.limit.moved_reason}")
        return 0


class FdWriter(FdFile):
    """An upload: positional writes; ``written`` counts the bytes written. The first failed
    write, truncate or sync poisons it (``failed``): the staged bytes are no longer what the
    client sent, so later writes answer that error and closing discards instead of publishing
    (:meth:`_refuse_if_poisoned`, which calls the subclass's ``abort``)."""

    def __init__(self, path: str, fd: int) -> None:
        super().__init__(path, fd)
        self.written = 0
        self.failed: FsError | None = None
        """The first write error. It poisons the upload: close() then discards instead of
        publishing, because the staged bytes are no longer what the client sent."""

    def _poison(self, exc: OSError) -> FsError:
        error = from_oserror(exc, self.path)
        if self.failed is None:
            self.failed = error
        return error

    def _check_usable(self) -> None:
        """A poisoned upload refuses further writes with its first error: the client stops sooner."""
        if self.failed is not None:
            raise type(self.failed)(self.failed.message)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._check_usable()
        if self.limit is not None:
            self._within(self.limit, offset + len(data), len(data))
        try:
            if not 0 <= offset <= MAX_OFFSET - len(data):
                # a client's 64-bit offset beyond off_t: what the kernel answers for one inside
                # it but past the largest file (and os.pwrite would raise OverflowError)
                raise OSError(errno.EFBIG, "file too large")
            view = memoryview(data)
            while view:
                n = os.pwrite(self.fd, view, offset)
                if n <= 0:  # a short write that makes no progress is a failure too
                    raise OSError(errno.EIO, "short write")
                offset += n
                view = view[n:]
        except OSError as exc:
            raise self._poison(exc) from None
        self.written += len(data)

    def read(self, offset: int, length: int) -> bytes:
        if not 0 <= offset <= MAX_OFFSET:
            return b""
        try:
            return os.pread(self.fd, length, offset)
        except OSError as exc:
            raise from_oserror(exc, self.path) from None

    def read_into(self, offset: int, buf: memoryview) -> int:
        """Read back the upload being written (SFTP ``w+``: clients verify what they wrote).
        Only from a handle opened for reading too; the bytes count as no download."""
        if fcntl.fcntl(self.fd, fcntl.F_GETFL) & os.O_ACCMODE != os.O_RDWR:
            raise PermissionDenied(f"{self.path}: not open for reading")
        if not 0 <= offset <= MAX_OFFSET:
            return 0
        try:
            return os.preadv(self.fd, [buf], offset)
        except OSError as exc:
            raise from_oserror(exc, self.path) from None

    def _within(self, limit: TransferLimit, end: int, moving: int) -> None:
        """Refuse a write or truncate that a quota does not allow: it poisons the upload (the
        client's file would be cut short), which is then discarded, the old version kept."""
        if limit.end is not None and end > limit.end:
            reason = limit.end_reason
        elif limit.moved is not None and self.written + moving > limit.moved:
            reason = limit.moved_reason
        else:
            return
        self.failed = error = QuotaExceeded(f"{self.path}: {reason}")
        raise error

    def expect(self, size: int) -> None:
        """The client announced the size it will send (HTTP ``Content-Length``): refused now,
        before any byte, when a quota would stop it on the way."""
        self._check_usable()
        if self.limit is not None:
            self._within(self.limit, size, size)

    def truncate(self, size: int) -> None:
        self._check_usable()
        if self.limit is not None:
            self._within(self.limit, size, 0)
        try:
            os.ftruncate(self.fd, size)
        except OSError as exc:
            raise self._poison(exc) from None

    def fsync(self) -> None:
        os.fsync(self.fd)

    def _sync(self) -> None:
        """The bytes on disk before the rename that publishes them; a failure (EIO, ENOSPC on
        delayed allocation) poisons the upload like a failed write."""
        try:
            os.fsync(self.fd)
        except OSError as exc:
            self._poison(exc)

    def _refuse_if_poisoned(self) -> None:
        """Close of an upload whose write failed: discard it and answer the failure."""
        if self.failed is None or self.done:
            return
        reason = f"upload failed: {self.failed.message}"
        self.abort(reason)
        raise type(self.failed)(reason)


__all__ = ["FdFile", "FdReader", "FdWriter", "MAX_OFFSET"]

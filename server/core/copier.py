"""The bounded copier: large whole-file copies run on a few threads of their own.

Why: a copy of a large dense file (an SFTP ``r+``/append/resume reopen of a big file of
the user's own, a WebDAV COPY, ``api.fs.copy``) is seconds of disk I/O. On the thread of
the request it held an SFTP channel's thread, an FTP connection's thread or one of
HTTP's op threads for that long, and nothing bounded how many ran at once: a client
issuing COPY after COPY could keep the disk busy with as many copies as HTTP has op
threads, and every op thread with them. Here a small pool (``COPY_THREADS``) does the
copying; at most ``COPY_WAITING`` more copies wait for it, and one beyond that is refused
at once as busy (:class:`LimitExceeded`, a reply every protocol has: the client may
retry) instead of holding one more protocol thread.

The request's thread only waits on its copy's future, up to the request's deadline; past
it the copy is told to stop (checked between two ``COPY_STEP`` steps of
``copy_file_range``) and the copier closes its own duplicates of the descriptors, so the
request may discard its staged file at once. A copy smaller than ``INLINE_BELOW`` bytes
on disk stays on the request's thread: the hand-off would cost more than the copy.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Protocol

from scriptsftp.server.contract.errors import LimitExceeded
from scriptsftp.server.core.storage import allocated_bytes, copy_fd

COPY_THREADS = 2  # copies running at once, server-wide: the disk, not the CPU, is what they use
COPY_WAITING = 8  # copies queued behind them before one more is refused as busy
INLINE_BELOW = 8 << 20  # bytes allocated: below this a copy is done on the request's thread


class CopyFn(Protocol):
    def __call__(self, src: int, dst: int, *, deadline: float | None = None,
                 stop: threading.Event | None = None) -> None: ...


class Copier:
    """A fixed pool of copy threads with a bounded queue (see the module docstring)."""

    def __init__(self, threads: int = COPY_THREADS, waiting: int = COPY_WAITING,
                 inline_below: int = INLINE_BELOW, copy: CopyFn = copy_fd) -> None:
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="copier")
        self._slots = threading.BoundedSemaphore(threads + waiting)
        self.inline_below = inline_below
        self._copy = copy
        self._lock = threading.Lock()
        self.handed_off = 0  # copies the pool ran (for /metrics-style figures and the tests)
        self.refused = 0  # copies refused because the pool and its queue were full

    def copy(self, src: int, dst: int, *, deadline: float | None = None) -> None:
        """Copy the file open at ``src`` into ``dst`` (copy_fd: in the kernel, holes kept).

        Raises TimeoutError past ``deadline`` (``time.monotonic()``), LimitExceeded when the
        copier is full, and the copy's own OSError."""
        if allocated_bytes(src) < self.inline_below:
            self._copy(src, dst, deadline=deadline)
            return
        if not self._slots.acquire(blocking=False):
            with self._lock:
                self.refused += 1
            raise LimitExceeded("server busy: too many large copies at once, retry later")
        stop = threading.Event()
        fds: tuple[int, int] | None = None
        try:
            fds = self._dup(src, dst)
            future = self._pool.submit(self._run, fds, deadline, stop)
        except BaseException:
            if fds is not None:
                for fd in fds:
                    os.close(fd)
            self._slots.release()
            raise
        with self._lock:
            self.handed_off += 1
        try:
            future.result(None if deadline is None else max(0.0, deadline - time.monotonic()))
        except FutureTimeout:
            stop.set()
            raise TimeoutError("copy did not finish in time") from None
        except BaseException:
            stop.set()
            raise

    @staticmethod
    def _dup(src: int, dst: int) -> tuple[int, int]:
        """Descriptors of the copier's own: the request may close its ones once it gave up."""
        s = os.dup(src)
        try:
            return s, os.dup(dst)
        except BaseException:
            os.close(s)
            raise

    def _run(self, fds: tuple[int, int], deadline: float | None, stop: threading.Event) -> None:
        try:
            self._copy(fds[0], fds[1], deadline=deadline, stop=stop)
        finally:
            os.close(fds[0])
            os.close(fds[1])
            self._slots.release()


_default: Copier | None = None
_default_lock = threading.Lock()


def copier() -> Copier:
    """The process's copier (created on first use: only the core's process copies files)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Copier()
        return _default


def copy_large(src: int, dst: int, *, deadline: float | None = None) -> None:
    """copy_fd through the process's copier: what the Session and the Publisher call."""
    copier().copy(src, dst, deadline=deadline)


__all__ = ["COPY_THREADS", "COPY_WAITING", "INLINE_BELOW", "Copier", "CopyFn", "copier", "copy_large"]

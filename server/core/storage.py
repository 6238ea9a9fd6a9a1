"""What a home is made of: the :class:`Storage` interface, and :class:`LocalStorage`, a
directory on local disk, its first implementation.

The Session and the Publisher know only :class:`Storage`. Every operation works on a
:class:`Resolved` (an open parent directory plus a final name) that :meth:`Storage.resolve`
produced, never on a path string: what was checked is what is used. Another backend
(an object store) implements the same operations; it resolves to its own notion of a
parent (a prefix) and keeps the guarantee that nothing outside the home is reachable.

Confinement on local disk does not rely on checking a resolved path and then using it (a
symlink swapped in between would escape). Every operation walks from an fd on
the home directory, one component at a time, with ``O_NOFOLLOW``; a symlink met
on the way is read and, if its target stays inside the home, followed by
walking again from the home. A link pointing outside (``/etc``), climbing above
the home or looping is refused. The final operation is done relative to the
parent directory's fd, so what was checked is what is used.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat as statmod
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, Protocol

from scriptsftp.server.contract.dispatch import FileOpener

from scriptsftp.server.contract.errors import Failure, InvalidPath, NotFound, from_oserror
from scriptsftp.server.contract.ports import Entry as Entry  # the ports' value type, re-exported
from scriptsftp.server.core.vfs import STAGING_PREFIX, join

MAX_LINK_HOPS = 40
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class Resolved:
    """An open parent directory plus the final name: the unit every operation works on.

    Use as a context manager so the directory fd is always closed.
    """

    __slots__ = ("dir_fd", "name", "parts")

    def __init__(self, dir_fd: int, name: str, parts: tuple[str, ...]) -> None:
        self.dir_fd = dir_fd
        self.name = name  # "" means the home itself (dir_fd is the home)
        self.parts = parts  # the real (symlink-free) virtual components

    def __enter__(self) -> "Resolved":
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.dir_fd)


class Storage(Protocol):
    """One user's home, as the core uses it. Thread-safe; every call may raise ``OSError``
    (the Session maps it to the protocol-neutral errors) or an ``FsError`` of its own.

    Operations take a :class:`Resolved` from :meth:`resolve` and act relative to its open
    parent (the ``*at`` system calls, ``O_NOFOLLOW`` on the final name), so a symlink
    swapped in after a check is never followed out of the home (issue 15)."""

    home: Path
    """The home's real location: the key of the pending index, the root of stored link targets."""

    def close(self) -> None:
        """Release the home; later operations raise :class:`Failure` ("session closed")."""
        ...

    def reopen(self) -> "Storage":
        """Another storage on the same home, for work that outlives this one's session
        (an async pre-publish check); the caller closes it."""
        ...

    def locate(self, parts: tuple[str, ...]) -> tuple["Storage", tuple[str, ...]]:
        """The storage that holds ``parts`` and the parts within it: this one for a plain
        home, a virtual folder's own for a path in one (core/mounts.py). Uploads are staged
        and published there, and pending ones keyed by its ``home``, so the rename stays on
        one filesystem and every user who mounts a folder sees the same pending files."""
        ...

    def resolve(self, parts: tuple[str, ...], follow: bool = True) -> Resolved:
        """Open the parent of ``parts`` (symlinks inside the home followed, the final one
        only when ``follow``); a context manager that closes it again."""
        ...

    def host_to_virtual(self, target: str, base: tuple[str, ...]) -> tuple[str, ...] | None:
        """A link target as stored → virtual components below ``base``, None if it leaves the home."""
        ...

    def stat(self, r: Resolved) -> os.stat_result:
        """The entry itself (a link is not followed)."""
        ...

    def exists(self, r: Resolved) -> bool:
        ...

    def open_dir_fd(self, r: Resolved) -> int:
        """A descriptor on the directory ``r`` names, for a listing read in batches."""
        ...

    def scandir(self, r: Resolved) -> list[Entry]:
        """The whole listing, staging names left out."""
        ...

    def read_entries(self, fd: int, entries: Iterator[os.DirEntry[str]], count: int) -> list[Entry]:
        """Up to ``count`` more entries of a listing opened with :meth:`open_dir_fd`."""
        ...

    def open_file(self, r: Resolved, flags: int, mode: int = 0o644) -> int:
        """A descriptor on the file ``r`` names, never through a final symlink."""
        ...

    def new_staging_name(self) -> str:
        """A fresh hidden name for a staged upload beside its target."""
        ...

    def mkdir(self, r: Resolved, mode: int = 0o755) -> None:
        ...

    def rmdir(self, r: Resolved) -> None:
        ...

    def unlink(self, r: Resolved) -> None:
        ...

    def rename(self, src: Resolved, dst: Resolved) -> None:
        """Atomic replace of ``dst`` (publishing an upload relies on it)."""
        ...

    def chmod(self, r: Resolved, mode: int) -> None:
        """The entry's own mode, never a link's target; a link is refused."""
        ...

    def utime(self, r: Resolved, atime: float, mtime: float) -> None:
        ...

    def truncate(self, r: Resolved, size: int) -> None:
        ...

    def symlink(self, host_target: str, r: Resolved) -> None:
        ...

    def readlink(self, r: Resolved) -> str:
        ...

    def fsync_dir(self, r: Resolved) -> None:
        """Make a rename in ``r``'s directory durable."""
        ...

    def statvfs(self) -> os.statvfs_result:
        """Space on the home's filesystem (the upload reserve is checked against it)."""
        ...


#: how a storage is opened on a home (the Publisher reopens homes from staging records)
StorageOpener = Callable[[Path], Storage]


_HOME_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def _opened_path(fd: int, home: Path) -> Path:
    """The real path of the directory open as ``fd`` (what ``home.resolve()`` gives).

    Linux names it in /proc without walking the path; elsewhere, or if the name looks
    odd (the directory was removed meanwhile), fall back to resolve()."""
    try:
        name = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        name = ""
    if name.startswith("/") and not name.endswith(" (deleted)"):
        return Path(name)
    return home.resolve()


class LocalStorage:
    """A home that is a directory on local disk. Thread-safe: it holds only an fd on the home."""

    def __init__(self, home: Path) -> None:
        # Every SFTP/SCP/FTP/HTTP session makes one, on the login path. An existing home
        # costs an open() and a readlink() here; mkdir(exist_ok=True) + resolve() cost about
        # ten syscalls (each one a GIL hand-off to the connection's other threads).
        try:
            fd = os.open(home, _HOME_FLAGS)
        except FileNotFoundError:
            home.mkdir(parents=True, exist_ok=True)
            fd = os.open(home, _HOME_FLAGS)
        self._home_fd = fd
        self.home = _opened_path(fd, home)
        # close() may run in another thread than an operation: never dup a closed (or reused) fd
        self._fd_lock = threading.Lock()

    def close(self) -> None:
        with self._fd_lock:
            if self._home_fd >= 0:
                os.close(self._home_fd)
                self._home_fd = -1

    def reopen(self) -> "LocalStorage":
        return LocalStorage(self.home)

    def _dup_home(self) -> int:
        with self._fd_lock:
            if self._home_fd < 0:
                raise Failure("session closed")
            return os.dup(self._home_fd)

    # --- resolution -------------------------------------------------------

    def locate(self, parts: tuple[str, ...]) -> tuple["LocalStorage", tuple[str, ...]]:
        return self, parts

    def resolve(self, parts: tuple[str, ...], follow: bool = True) -> Resolved:
        """Open the parent directory of ``parts``; follow a final symlink when ``follow``.

        Intermediate symlinks are always followed (inside the home only)."""
        hops = 0
        while True:
            if not parts:
                return Resolved(self._dup_home(), "", ())
            fd = self._dup_home()
            try:
                for i, name in enumerate(parts[:-1]):
                    try:
                        nfd = os.open(name, _DIR_FLAGS, dir_fd=fd)
                    except OSError as exc:
                        target = self._link_target(fd, name, parts[:i], exc)
                        if target is None:
                            raise from_oserror(exc, join(parts[: i + 1])) from None
                        hops += 1
                        if hops > MAX_LINK_HOPS:
                            raise InvalidPath(f"{join(parts)}: too many levels of symbolic links") from None
                        parts = target + parts[i + 1:]
                        break
                    os.close(fd)
                    fd = nfd
                else:
                    last = parts[-1]
                    if follow:
                        try:
                            st = os.stat(last, dir_fd=fd, follow_symlinks=False)
                        except FileNotFoundError:
                            st = None
                        if st is not None and statmod.S_ISLNK(st.st_mode):
                            target = self._read_link(fd, last, parts[:-1])
                            hops += 1
                            if hops > MAX_LINK_HOPS:
                                raise InvalidPath(f"{join(parts)}: too many levels of symbolic links")
                            os.close(fd)
                            fd = -1
                            parts = target
                            continue
                    result = Resolved(fd, last, parts)
                    fd = -1
                    return result
            finally:
                if fd >= 0:
                    os.close(fd)

    def _link_target(self, fd: int, name: str, base: tuple[str, ...], exc: OSError) -> tuple[str, ...] | None:
        """If ``name`` failed to open because it is a symlink, its confined target."""
        try:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        except OSError:
            return None
        if not statmod.S_ISLNK(st.st_mode):
            return None
        return self._read_link(fd, name, base)

    def _read_link(self, fd: int, name: str, base: tuple[str, ...]) -> tuple[str, ...]:
        """The target of a symlink as virtual components; refuse anything leaving the home."""
        raw = os.readlink(name, dir_fd=fd)
        parts = self.host_to_virtual(raw, base)
        if parts is None:
            raise NotFound(f"{join(base + (name,))}: symbolic link points outside the home")
        return parts

    def host_to_virtual(self, target: str, base: tuple[str, ...]) -> tuple[str, ...] | None:
        """A link target as stored on disk → virtual components, or None if it leaves the home."""
        if target.startswith("/"):
            home = str(self.home)
            if target != home and not target.startswith(home.rstrip("/") + "/"):
                return None
            pieces = target[len(home):].split("/")
            out: list[str] = []
        else:
            pieces = target.split("/")
            out = list(base)
        for piece in pieces:
            if piece in ("", "."):
                continue
            if piece == "..":
                if not out:
                    return None  # climbing above the home
                out.pop()
                continue
            if "\x00" in piece or piece.startswith(STAGING_PREFIX):
                return None
            out.append(piece)
        return tuple(out)

    # --- operations (all relative to a Resolved) --------------------------

    def stat(self, r: Resolved) -> os.stat_result:
        if not r.name:
            return os.fstat(r.dir_fd)
        return os.stat(r.name, dir_fd=r.dir_fd, follow_symlinks=False)

    def exists(self, r: Resolved) -> bool:
        try:
            self.stat(r)
            return True
        except FileNotFoundError:
            return False

    def open_dir_fd(self, r: Resolved) -> int:
        if not r.name:
            return os.dup(r.dir_fd)
        return os.open(r.name, _DIR_FLAGS, dir_fd=r.dir_fd)

    def scandir(self, r: Resolved) -> list[Entry]:
        """The whole listing at once (FTP, HTTP, api.fs); SFTP reads it in batches."""
        fd = self.open_dir_fd(r)
        try:
            with os.scandir(fd) as it:
                return self.read_entries(fd, it, sys.maxsize)
        finally:
            os.close(fd)

    def read_entries(self, fd: int, entries: Iterator[os.DirEntry[str]], count: int) -> list[Entry]:
        """Up to ``count`` entries more of a listing opened on ``fd`` (``os.scandir(fd)``), each
        stat'ed now: a listing read in batches never holds more than one batch. Fewer than
        ``count`` only at the end."""
        out: list[Entry] = []
        for de in entries:
            if de.name.startswith(STAGING_PREFIX):
                continue
            try:
                st = de.stat(follow_symlinks=False)
            except OSError:
                continue  # vanished while listing
            out.append(Entry(de.name, st))
            if len(out) >= count:
                break
        return out

    def open_file(self, r: Resolved, flags: int, mode: int = 0o644) -> int:
        if not r.name:
            raise from_oserror(IsADirectoryError(21, "is a directory"), "/")
        return os.open(r.name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=r.dir_fd)

    def new_staging_name(self) -> str:
        return STAGING_PREFIX + secrets.token_hex(8)

    def mkdir(self, r: Resolved, mode: int = 0o755) -> None:
        os.mkdir(r.name, mode, dir_fd=r.dir_fd)

    def rmdir(self, r: Resolved) -> None:
        os.rmdir(r.name, dir_fd=r.dir_fd)

    def unlink(self, r: Resolved) -> None:
        os.unlink(r.name, dir_fd=r.dir_fd)

    def rename(self, src: Resolved, dst: Resolved) -> None:
        os.rename(src.name, dst.name, src_dir_fd=src.dir_fd, dst_dir_fd=dst.dir_fd)

    def chmod(self, r: Resolved, mode: int) -> None:
        """Change the mode of the entry itself, never of what a link there points to.

        Linux has no lchmod, and a check (lstat) before a chmod by name leaves a window
        in which a symlink renamed over the entry is followed, possibly out of the home.
        So the entry is pinned first (``O_PATH|O_NOFOLLOW``: a link opens as the link),
        checked on that descriptor, and changed through it (``/proc/self/fd``)."""
        fd = os.open(r.name or ".", os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=r.dir_fd)
        try:
            if statmod.S_ISLNK(os.fstat(fd).st_mode):
                raise InvalidPath("cannot change the mode of a symbolic link")
            os.chmod(f"/proc/self/fd/{fd}", mode & 0o7777 & ~0o7000)
        finally:
            os.close(fd)

    def utime(self, r: Resolved, atime: float, mtime: float) -> None:
        os.utime(r.name or ".", (atime, mtime), dir_fd=r.dir_fd, follow_symlinks=False)

    def truncate(self, r: Resolved, size: int) -> None:
        fd = self.open_file(r, os.O_WRONLY)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)

    def symlink(self, host_target: str, r: Resolved) -> None:
        os.symlink(host_target, r.name, dir_fd=r.dir_fd)

    def readlink(self, r: Resolved) -> str:
        return os.readlink(r.name, dir_fd=r.dir_fd)

    def fsync_dir(self, r: Resolved) -> None:
        """Flush the directory holding ``r`` (a rename in it is durable only then)."""
        os.fsync(r.dir_fd)

    def statvfs(self) -> os.statvfs_result:
        fd = self._dup_home()
        try:
            return os.fstatvfs(fd)
        finally:
            os.close(fd)


def read_opener(storage: Storage, parts: tuple[str, ...]) -> FileOpener:
    """Reopens a file read-only through the confined walk, for scripts' ``api.file``: the
    pre-event's file, a staged upload, a published one. ``parts`` are real (symlink-free)."""

    def open_ro() -> int:
        with storage.resolve(parts, follow=False) as r:
            return storage.open_file(r, os.O_RDONLY)

    return open_ro


COPY_STEP = 16 << 20  # bytes per copy_file_range call: a deadline or a stop is checked between two


def copy_fd(src: int, dst: int, *, deadline: float | None = None,
            stop: threading.Event | None = None) -> None:
    """Copy a whole file between fds in the kernel (reflink where the fs can), holes kept.

    Only the data segments are copied (``SEEK_DATA``/``SEEK_HOLE``), then the size is set:
    1 byte written at offset 2^40 is a 4 KiB file, and its copy (a resume, an ``r+``
    open, a WebDAV COPY) must not become a terabyte of zeros. ``deadline``
    (``time.monotonic()``): past it, TimeoutError and the copy stops; so does ``stop``
    once set (the copier's waiter gave up, server/core/copier.py)."""
    size = os.fstat(src).st_size
    offset = 0
    while offset < size:
        try:
            start = os.lseek(src, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                break  # only a hole is left
            start = offset  # no SEEK_DATA on this filesystem: all of it is data
        try:
            end = min(os.lseek(src, start, os.SEEK_HOLE), size)
        except OSError:
            end = size
        _copy_range(src, dst, start, end, deadline, stop)
        offset = end
    os.ftruncate(dst, size)


def _copy_range(src: int, dst: int, offset: int, end: int, deadline: float | None,
                stop: threading.Event | None) -> None:
    while offset < end:
        if (deadline is not None and time.monotonic() > deadline) or (stop is not None and stop.is_set()):
            raise TimeoutError("copy did not finish in time")
        step = min(COPY_STEP, end - offset)
        try:
            n = os.copy_file_range(src, dst, step, offset, offset)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS, errno.EBADF):
                raise  # ENOSPC, EIO: the copy failed
            n = _copy_by_reading(src, dst, offset, step)
        if n <= 0:
            raise OSError(errno.EIO, "the file shrank while it was copied")
        offset += n


def _copy_by_reading(src: int, dst: int, offset: int, length: int) -> int:
    """copy_file_range is not offered between these filesystems: through a buffer."""
    done = 0
    while done < length:
        chunk = os.pread(src, min(1 << 20, length - done), offset + done)
        if not chunk:
            break
        view = memoryview(chunk)
        while view:
            n = os.pwrite(dst, view, offset + done)
            view = view[n:]
            done += n
    return done


def allocated_bytes(fd: int) -> int:
    """Disk space a file really takes (holes excluded): what a hole-keeping copy needs."""
    return os.fstat(fd).st_blocks * 512


__all__ = ["Entry", "LocalStorage", "Resolved", "Storage", "StorageOpener", "allocated_bytes", "copy_fd",
           "read_opener"]

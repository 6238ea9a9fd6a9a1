"""Virtual folders: a home with other directories mounted into it, as one :class:`Storage`.

A user's tree is their home plus the folders mounted in it (``folders = { "/shared" =
"NAME" }``; :class:`~.limits.Mount`). :class:`MountedStorage` implements the Storage
protocol by routing each call, by the path's leading components, to the storage of the
home or of the deepest folder that contains it, each opened through the daemon's
:data:`~.storage.StorageOpener`; so the Session's steps stay as they are and the
confinement of each storage (``O_NOFOLLOW``, ``*at`` calls from an fd on its root)
holds inside each folder: a symlink or ``..`` in a folder never leaves the folder.

A mount behaves like a bind mount that no path crosses except by its name:

- A symlink is resolved by the storage it is in and must stay there: one that leads from
  the home into a mount's place, or from a folder into a deeper folder's place, is
  refused like one that leaves the home (what lies under a mount point in the storage
  below is shadowed and never reachable).
- A mount point shows as a directory in its parent's listing, whether or not the storage
  below has an entry of that name (the entry it would shadow is left out); a directory
  reached through a link shows none, as the mount is not reachable that way. The parents
  of a deep mount point (``/a/b`` of ``/a/b/shared``) are made when the storage opens.
- Rename and link across a boundary, and removing or renaming a mount point or a
  directory above one, are refused by the Session (:func:`mounts_under`) with a message
  that says why; the storage refuses them too, as a second line.

Uploads in a folder are staged, checked and published in the folder (the Session asks
:meth:`MountedStorage.locate` for the folder's own storage): the atomic rename stays on
one filesystem, the staging records name the folder root as their home, and the pending
uploads are keyed by the folder, so every user who mounts it sees the same ones.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Protocol, Sequence

from scriptsftp.server.contract.errors import Failure, NotFound, PermissionDenied
from scriptsftp.server.core.limits import Mount
from scriptsftp.server.core.storage import Entry, Resolved, Storage, StorageOpener
from scriptsftp.server.core.vfs import join

log = logging.getLogger("scriptsftp.session")


class HasFolders(Protocol):
    """What this module reads of an account (the Session's ``Account``, which imports this
    module): its mounts, deepest first."""

    @property
    def folders(self) -> tuple[Mount, ...]: ...

    @property
    def home(self) -> Path: ...


def find_mount(mounts: Sequence[Mount], parts: tuple[str, ...]) -> Mount | None:
    """The deepest of ``mounts`` that holds ``parts`` (its mount point included), or None:
    the home. ``mounts`` are deepest first (as :attr:`Account.folders` keeps them)."""
    for mount in mounts:
        n = len(mount.vpath)
        if parts[:n] == mount.vpath:
            return mount
    return None


def mount_of(account: HasFolders, parts: tuple[str, ...]) -> Mount | None:
    """The virtual folder a path of ``account`` is in (None: the home); for the code that
    counts per folder (quotas) and names the folder (events)."""
    return find_mount(account.folders, parts)


def mounts_under(mounts: Sequence[Mount], parts: tuple[str, ...]) -> list[Mount]:
    """The mounts whose mount point is ``parts`` or lies below it: what removing or
    renaming ``parts`` would pull from under them."""
    n = len(parts)
    return [m for m in mounts if m.vpath[:n] == parts]


def folder_name(mount: Mount | None) -> str:
    """What events and log lines carry: the folder's name, empty in the home."""
    return "" if mount is None else mount.folder


def boundary_refusal(path: str, what: str) -> PermissionDenied:
    """The one message for an operation that would cross a virtual folder's boundary."""
    return PermissionDenied(f"{path}: cannot {what} across a virtual folder boundary")


def open_account_storage(open_storage: StorageOpener, account: HasFolders) -> Storage:
    """What a session of ``account`` stands on: the home as the opener makes it, with the
    account's folders mounted in it (opened through the same opener, when first used)."""
    home = open_storage(account.home)
    if not account.folders:
        return home
    return MountedStorage(home, account.folders, open_storage)


class MountedResolved(Resolved):
    """A :class:`Resolved` of one of the storages behind a :class:`MountedStorage`:
    ``parts`` are virtual from the user's root; ``inner`` is what ``owner`` resolved (its
    parts relative to its own root) and what the operation is handed."""

    __slots__ = ("inner", "owner", "mount", "named")

    def __init__(self, inner: Resolved, owner: Storage, mount: Mount | None, parts: tuple[str, ...],
                 named: tuple[str, ...]) -> None:
        super().__init__(inner.dir_fd, inner.name, parts)
        self.inner = inner
        self.owner = owner
        self.mount = mount
        self.named = named  # as the client named it: ``parts`` differ when a link was followed

    def __exit__(self, *exc: object) -> None:
        self.inner.__exit__(*exc)

    @property
    def mount_point(self) -> bool:
        """The root of a folder, which is a mount point: never made, removed or renamed."""
        return self.mount is not None and self.parts == self.mount.vpath


@dataclass
class _Listing:
    """A listing opened by :meth:`MountedStorage.open_dir_fd`: whose it is and the mount
    points to show in it after the real entries (the real ones they shadow left out)."""

    owner: Storage
    mounts: list[Entry] = field(default_factory=list)
    shadowed: frozenset[str] = frozenset()
    exhausted: bool = False


class MountedStorage:
    """A home with virtual folders in it; routes every call to the storage that holds the
    path. Thread-safe: the folders' storages are opened once, under a lock, when first used."""

    def __init__(self, home: Storage, mounts: Sequence[Mount], open_storage: StorageOpener) -> None:
        self._home = home
        self.home: Path = home.home
        self.mounts: tuple[Mount, ...] = tuple(sorted(mounts, key=lambda m: len(m.vpath), reverse=True))
        self._open_storage = open_storage
        self._lock = threading.Lock()
        self._folders: dict[Path, Storage] = {}  # by root: a folder mounted twice is one storage
        self._listings: dict[int, _Listing] = {}  # by descriptor, from open_dir_fd to the listing's end
        self._closed = False
        self._make_parents()

    # --- routing ------------------------------------------------------------------

    def _storage_for(self, mount: Mount | None) -> Storage:
        if mount is None:
            return self._home
        with self._lock:
            if self._closed:
                raise Failure("session closed")
            storage = self._folders.get(mount.root)
            if storage is None:
                storage = self._folders[mount.root] = self._open_storage(mount.root)
            return storage

    def locate(self, parts: tuple[str, ...]) -> tuple[Storage, tuple[str, ...]]:
        mount = find_mount(self.mounts, parts)
        if mount is None:
            return self._home, parts
        return self._storage_for(mount), parts[len(mount.vpath):]

    def resolve(self, parts: tuple[str, ...], follow: bool = True) -> Resolved:
        mount = find_mount(self.mounts, parts)
        prefix = () if mount is None else mount.vpath
        owner = self._storage_for(mount)
        inner = owner.resolve(parts[len(prefix):], follow)
        real = prefix + inner.parts
        if find_mount(self.mounts, real) is not mount:
            inner.__exit__(None, None, None)
            raise NotFound(f"{join(parts)}: symbolic link points across a virtual folder boundary")
        return MountedResolved(inner, owner, mount, real, parts)

    def host_to_virtual(self, target: str, base: tuple[str, ...]) -> tuple[str, ...] | None:
        mount = find_mount(self.mounts, base)
        prefix = () if mount is None else mount.vpath
        inside = self._storage_for(mount).host_to_virtual(target, base[len(prefix):])
        if inside is None:
            return None
        real = prefix + inside
        return real if find_mount(self.mounts, real) is mount else None

    @staticmethod
    def _of(r: Resolved) -> MountedResolved:
        if not isinstance(r, MountedResolved):
            raise TypeError("a Resolved of another storage")  # a bug, never a client's doing
        return r

    # --- listings: mount points show in their parents -------------------------------

    def _mount_entries(self, r: MountedResolved) -> list[Entry]:
        """The mount points directly in the directory ``r``, each with its folder root's stat.
        None in a directory reached through a link: the mounts are not reachable that way."""
        out: dict[str, Entry] = {}
        directory = r.parts
        if r.named != directory:
            return []
        n = len(directory)
        for mount in self.mounts:
            if len(mount.vpath) != n + 1 or mount.vpath[:n] != directory or mount.vpath[-1] in out:
                continue
            try:
                with self.resolve(mount.vpath) as root:
                    out[mount.vpath[-1]] = Entry(mount.vpath[-1], self.stat(root))
            except (OSError, Failure, NotFound) as exc:
                log.warning("virtual folder %s (%s) unavailable: %s", mount.folder, mount.root, exc)
        return list(out.values())

    def scandir(self, r: Resolved) -> list[Entry]:
        m = self._of(r)
        entries = m.owner.scandir(m.inner)
        extra = self._mount_entries(m)
        if not extra:
            return entries
        shadowed = {e.name for e in extra}
        return [e for e in entries if e.name not in shadowed] + extra

    def open_dir_fd(self, r: Resolved) -> int:
        m = self._of(r)
        fd = m.owner.open_dir_fd(m.inner)
        extra = self._mount_entries(m)
        with self._lock:  # a reused descriptor number replaces a listing that ended unread
            self._listings[fd] = _Listing(m.owner, extra, frozenset(e.name for e in extra))
        return fd

    def read_entries(self, fd: int, entries: Iterator[os.DirEntry[str]], count: int) -> list[Entry]:
        with self._lock:
            listing = self._listings.get(fd)
        if listing is None:
            return self._home.read_entries(fd, entries, count)
        if not listing.mounts:
            out = listing.owner.read_entries(fd, entries, count)
            if len(out) < count:
                self._end_listing(fd, listing)
            return out
        out = []
        while len(out) < count and not listing.exhausted:
            want = count - len(out)
            batch = listing.owner.read_entries(fd, entries, want)
            listing.exhausted = len(batch) < want
            out += [e for e in batch if e.name not in listing.shadowed]
        while len(out) < count and listing.mounts:
            out.append(listing.mounts.pop(0))
        if listing.exhausted and not listing.mounts:
            self._end_listing(fd, listing)
        return out

    def _end_listing(self, fd: int, listing: _Listing) -> None:
        with self._lock:
            if self._listings.get(fd) is listing:
                del self._listings[fd]

    # --- operations: the owner's, on what it resolved -----------------------------------

    def stat(self, r: Resolved) -> os.stat_result:
        m = self._of(r)
        return m.owner.stat(m.inner)

    def exists(self, r: Resolved) -> bool:
        m = self._of(r)
        return m.owner.exists(m.inner)

    def open_file(self, r: Resolved, flags: int, mode: int = 0o644) -> int:
        m = self._of(r)
        return m.owner.open_file(m.inner, flags, mode)

    def new_staging_name(self) -> str:
        return self._home.new_staging_name()

    def mkdir(self, r: Resolved, mode: int = 0o755) -> None:
        m = self._of(r)
        if m.mount_point:
            raise FileExistsError(errno.EEXIST, "a virtual folder is mounted here")
        m.owner.mkdir(m.inner, mode)

    def rmdir(self, r: Resolved) -> None:
        m = self._of(r)
        if m.mount_point:
            raise PermissionDenied(f"{join(r.parts)}: a virtual folder cannot be removed")
        m.owner.rmdir(m.inner)

    def unlink(self, r: Resolved) -> None:
        m = self._of(r)
        if m.mount_point:
            raise IsADirectoryError(errno.EISDIR, "a virtual folder")
        m.owner.unlink(m.inner)

    def rename(self, src: Resolved, dst: Resolved) -> None:
        a, b = self._of(src), self._of(dst)
        if a.mount_point or b.mount_point:
            raise PermissionDenied(f"{join(src.parts if a.mount_point else dst.parts)}: "
                                   "a virtual folder cannot be renamed or replaced")
        if a.owner is not b.owner:
            raise boundary_refusal(join(src.parts), "rename")
        a.owner.rename(a.inner, b.inner)

    def chmod(self, r: Resolved, mode: int) -> None:
        m = self._of(r)
        m.owner.chmod(m.inner, mode)

    def utime(self, r: Resolved, atime: float, mtime: float) -> None:
        m = self._of(r)
        m.owner.utime(m.inner, atime, mtime)

    def truncate(self, r: Resolved, size: int) -> None:
        m = self._of(r)
        m.owner.truncate(m.inner, size)

    def symlink(self, host_target: str, r: Resolved) -> None:
        m = self._of(r)
        if m.mount_point:
            raise FileExistsError(errno.EEXIST, "a virtual folder is mounted here")
        m.owner.symlink(host_target, m.inner)

    def readlink(self, r: Resolved) -> str:
        m = self._of(r)
        return m.owner.readlink(m.inner)

    def fsync_dir(self, r: Resolved) -> None:
        m = self._of(r)
        m.owner.fsync_dir(m.inner)

    def statvfs(self) -> os.statvfs_result:
        return self._home.statvfs()

    # --- lifetime ---------------------------------------------------------------------

    def _make_parents(self) -> None:
        """Make the missing parents of deep mount points (``/a/b`` of ``/a/b/shared``) in
        the storage that holds them, so they can be listed and walked like any directory.
        A failure is logged: the folder is still reachable by its full path."""
        made: set[tuple[str, ...]] = set()
        for mount in self.mounts:
            for depth in range(1, len(mount.vpath)):
                parent = mount.vpath[:depth]
                if parent in made or any(parent == m.vpath for m in self.mounts):
                    continue
                made.add(parent)
                try:
                    with self.resolve(parent, follow=False) as r:
                        if not self.exists(r):
                            self.mkdir(r, 0o755)
                except (OSError, Failure, NotFound, PermissionDenied) as exc:
                    log.warning("cannot make %s for virtual folder %s: %s", join(parent), mount.folder, exc)

    def reopen(self) -> "MountedStorage":
        return MountedStorage(self._home.reopen(), self.mounts, self._open_storage)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            folders, self._folders = list(self._folders.values()), {}
            self._listings.clear()
        for storage in folders:
            storage.close()
        self._home.close()


__all__ = ["HasFolders", "MountedResolved", "MountedStorage", "boundary_refusal", "find_mount", "folder_name", "mount_of",
           "mounts_under", "open_account_storage"]

"""The Session: the one door to files, for every protocol (docs/architecture.md rule 2).

Every file operation of every front end is a method here, and each method runs
the same steps in the same order (SFTPGo's ``BaseConnection`` is the model):

1. resolve the virtual path (normalised, confined, no staging names),
2. apply the filters and check the permission,
3. raise the ``pre-*`` event (a script may veto: :class:`~.errors.Vetoed`),
4. do the operation through :class:`~.storage.Storage`,
5. raise the ``post-*`` event,
6. log one line.

Front ends translate their protocol into these calls and the errors back into
their protocol's replies; they hold no policy of their own. Events are raised
only here (and in :mod:`.login` for connection and login events).

The home is a :class:`~.storage.Storage` (the interface; a :class:`~.storage.LocalStorage`
today), and an ``OSError`` from it becomes a protocol-neutral error about the
client's path in one place (``with fs_errors(path):``). A finished upload is
described (:class:`~.publish.StagedUpload`) and its ``pre-publish`` event built
here, then handed to the shared :class:`~.publish.Publisher`, which answers
published / pending or raises :class:`Vetoed`; the log lines are written here.
publish.py never imports this module.
"""

from __future__ import annotations

import functools
import fcntl
import logging
import os
import stat as statmod
import threading
import time
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, TypeVar

from scriptsftp.server.contract import events as ev
from scriptsftp.server.support import metrics
from scriptsftp.server.contract.dispatch import Dispatcher, FileOpener
from scriptsftp.server.contract.errors import (
    AlreadyExists, Failure, FsError, InvalidPath, IsADirectory, LimitExceeded, NoSpace, NotADirectory,
    NotFound, PermissionDenied, QuotaExceeded, Vetoed, from_oserror, fs_errors,
)
from scriptsftp.server.contract.ports import TransferLimit
from scriptsftp.server.core.publish import (
    Outcome, PendingUpload, Publisher, StagedUpload, UploadPolicy, pending_stat,
)
from scriptsftp.server.core.storage import (
    Entry, LocalStorage, Resolved, Storage, allocated_bytes, read_opener,
)
from scriptsftp.server.core.copier import copy_large
from scriptsftp.server.core.bandwidth import UserBandwidth
from scriptsftp.server.core.limits import Mount, Quota, Rates
from scriptsftp.server.core.mounts import boundary_refusal, find_mount, folder_name, mounts_under
from scriptsftp.server.core.quota import Quotas, Scope, scope_of
from scriptsftp.server.core.vfs import Access, join, split
from scriptsftp.server.support.fd_files import MAX_OFFSET as MAX_OFFSET
from scriptsftp.server.support.fd_files import FdFile, FdReader, FdWriter

if TYPE_CHECKING:
    from scriptsftp.server.core.staging import StagingRecords

log = logging.getLogger("scriptsftp.session")

AnyEvent = TypeVar("AnyEvent", bound=ev.Event)


@dataclass(frozen=True)
class Account:
    """A user as the core sees it after merging their groups."""

    name: str
    home: Path
    access: Access
    groups: tuple[str, ...] = ()
    protocols: frozenset[str] = frozenset({"sftp", "scp", "ftp", "http"})
    allowed_ips: tuple[IPv4Network | IPv6Network, ...] = ()  # empty = anywhere
    max_sessions: int = 0
    require_tls: bool = False
    setstat_mode: str = "times"  # without the setstat permission: "refuse" | "ignore" | "times"
    quota: Quota = Quota()  # of the home; each mount has its folder's own
    folders: tuple[Mount, ...] = ()  # virtual folders, deepest vpath first
    rates: Rates = Rates()
    home_folders: tuple[str, ...] = ()  # virtual paths made in the home (account creation, login)


class HandleBudget:
    """The handles (open files, directory listings) one user holds, over every session of
    theirs: all connections, all protocols, SSH channels included (docs/architecture.md rule 12).

    Each handle holds a descriptor and the daemon has one descriptor table: without a
    per-user bound, one user with many channels and connections could take the daemon to its
    descriptor limit and fail everybody else's logins and transfers. ``limit`` is read at
    each open, so a reload that changes it applies at once."""

    def __init__(self, user: str, limit: Callable[[], int]) -> None:
        self.user = user
        self.limit = limit
        self._held: set[object] = set()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._held)

    def check(self) -> None:
        """Refuse early (before any script runs) when the user is at the limit."""
        if len(self._held) >= self.limit():
            raise self._refusal()

    def take(self, handle: object) -> None:
        with self._lock:
            if handle in self._held:
                return
            if len(self._held) >= self.limit():
                raise self._refusal()
            self._held.add(handle)

    def give(self, handle: object) -> None:
        with self._lock:
            self._held.discard(handle)

    def _refusal(self) -> LimitExceeded:
        return LimitExceeded(f"too many open files (limit {self.limit()} per user)")


#: a refusal is recorded as: (event-like record, reason, kind); set by the daemon (audit trail, counter)
RefusalSink = Callable[[dict[str, Any], str, str], None]


def _refusals_recorded(op: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A Session operation whose refusals (permission, filter, limit, disk reserve) each leave
    one log line, an audit record (``scriptsftp events --decision denied``) and a count. A
    veto is not one of them: the engine records vetoes with the script that decided."""

    def wrap(method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def run(self: "Session", *args: Any, **kwargs: Any) -> Any:
            try:
                return method(self, *args, **kwargs)
            except (PermissionDenied, LimitExceeded, NoSpace) as exc:
                if not isinstance(exc, Vetoed):
                    self._refused(op, args, exc)
                raise

        return run

    return wrap


def _refusal_kind(exc: FsError) -> str:
    if isinstance(exc, QuotaExceeded):
        return "quota"
    if isinstance(exc, LimitExceeded):
        return "limit"
    if isinstance(exc, NoSpace):
        return "space"
    return "filter" if "filters" in exc.message else "permission"


class Session:
    """One logged-in user on one connection. Thread-safe."""

    def __init__(
        self,
        *,
        session_id: str,
        account: Account,
        protocol: str,
        remote_ip: str,
        dispatcher: Dispatcher,
        staging: "StagingRecords | None" = None,
        uploads: UploadPolicy | None = None,
        max_handles: int = 256,
        publisher: Publisher | None = None,
        tls: bool = False,
        budget: HandleBudget | None = None,
        on_close: Callable[["Session"], None] | None = None,
        storage: Storage | None = None,
        bandwidth: UserBandwidth | None = None,
    ) -> None:
        """``storage``: what the home is made of, chosen by whoever opens the session (the
        login core, from the daemon's ``StorageOpener``); a local directory by default.
        ``bandwidth``: the user's buckets, shared with their other sessions (the login core's
        :class:`~.bandwidth.BandwidthLimits`); this session's own by default."""
        self.id = session_id
        self.tls = tls  # only for the log: FTPS lines say tls=true
        self.refusals: RefusalSink | None = None  # set by the login core: audit trail and counter
        self.bandwidth = bandwidth if bandwidth is not None else UserBandwidth()
        self.account = account
        self.user = account.name
        self.protocol = protocol
        self.remote_ip = remote_ip
        self.dispatcher = dispatcher
        self.storage: Storage = storage if storage is not None else LocalStorage(account.home)
        # the home the storage was opened on: like the mounts below, a reload that moves the
        # account's home applies at its next login, never under an open session
        self.home_opened: Path = account.home
        # the virtual folders the storage was opened with: a reload that changes the
        # account's folders applies at its next login, never under an open session
        self.mounts: tuple[Mount, ...] = account.folders
        self.staging = staging
        self.uploads = uploads or UploadPolicy()
        # shared by every session of the daemon: it knows which paths wait for an async check
        self.publisher = publisher or Publisher(dispatcher, staging, self.uploads)
        self.pending = self.publisher.pending
        self.quotas: Quotas | None = self.publisher.quotas  # None: nothing counted, nothing limited
        self.max_handles = max_handles
        self.budget = budget  # the user's handles over all sessions (None: this session's bound only)
        self._on_close = on_close  # the login core's count of the user's sessions
        self.started = time.monotonic()
        self.bytes_in = 0
        self.bytes_out = 0
        self._handles: set[FileHandle] = set()
        self._listings: set[DirHandle] = set()  # open directory listings (SFTP OPENDIR)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._closed = False

    @property
    def account(self) -> Account:
        return self._account

    @account.setter
    def account(self, account: Account) -> None:
        """The account as the core knows it now (login, then each reload or database change
        that the login core applies to live sessions): its rates go to the user's buckets
        here, so that running transfers follow a changed limit without a step of their own."""
        self._account = account
        self.bandwidth.set(account.rates)

    # --- events -------------------------------------------------------------

    def _event(self, cls: type[AnyEvent], **fields: Any) -> AnyEvent:
        if self.mounts and "path" in fields and issubclass(cls, ev.PathEvent):
            fields["folder"] = folder_name(find_mount(self.mounts, split(str(fields["path"]))))
        return cls(
            session_id=self.id, protocol=self.protocol, remote_ip=self.remote_ip, user=self.user, **fields
        )

    def _pre(self, cls: type[ev.Event], file: FileOpener | None = None, **fields: object) -> None:
        """Raise a vetoable event; a veto becomes :class:`Vetoed` with the script's reason."""
        if not self.dispatcher.wants(cls.name):
            return
        decision = self.dispatcher.pre(self._event(cls, **fields), file)
        if not decision.allowed:
            reason = decision.reason or "denied by a server script"
            self._log(cls.name.removeprefix("pre-"), str(fields.get("path", "")), "vetoed", reason=reason)
            raise Vetoed(reason)

    def _post(self, cls: type[ev.Event], file: FileOpener | None = None, **fields: object) -> None:
        if self.dispatcher.wants(cls.name):
            self.dispatcher.post(self._event(cls, **fields), file)

    def _log(self, op: str, path: str, result: str, **extra: object) -> None:
        if op in ("upload", "download"):  # every transfer's outcome is logged here exactly once
            metrics.transfer(self.protocol, op, int(extra.get("bytes", 0) or 0), result)  # type: ignore[call-overload]
        if log.isEnabledFor(logging.INFO):
            log.info(
                "%s %s %s", op, path, result,
                extra={"sid": self.id, "user": self.user, "proto": self.protocol, "ip": self.remote_ip,
                       "op": op, "path": path, "result": result, **({"tls": "true"} if self.tls else {}), **extra},
            )

    def _refused(self, op: str, args: tuple[object, ...], exc: FsError) -> None:
        """One refused operation: a log line, and the record and count (see _refusals_recorded)."""
        kind = _refusal_kind(exc)
        path = str(args[-1] if op == "symlink" else args[0]) if args else ""
        target = str(args[1]) if op == "rename" and len(args) > 1 else ""
        extra = {"sid": self.id, "user": self.user, "proto": self.protocol, "ip": self.remote_ip,
                 "op": op, "path": path, "result": "denied", "kind": kind, "reason": exc.message}
        if self.tls:
            extra["tls"] = "true"
        log.info("%s %s denied", op, path, extra=extra)
        metrics.refusal(self.protocol, op, kind)
        if self.refusals is not None:
            self.refusals({"name": op, "session_id": self.id, "protocol": self.protocol, "remote_ip": self.remote_ip,
                           "user": self.user, "path": path, "target": target}, exc.message, kind)

    # --- resolution helpers ----------------------------------------------------

    def _parts(self, vpath: str) -> tuple[str, ...]:
        parts = split(vpath)
        self.account.access.check_filters(parts, join(parts))
        return parts

    def _require(
        self, permission: str, parts: tuple[str, ...], vpath: str, *, on_self: bool = False, follow: bool = False
    ) -> None:
        """Check ``permission`` where the entry is named and where it really is.

        Symlinks inside the home are followed (``follow``: the final one too), so
        the directory an operation really touches may differ from the one the
        client named. Its permissions and filters apply as well: otherwise a link
        made where the user may write (``/inbox/top -> ..``) would lend those
        rights to a read-only directory, or reveal a hidden one."""
        directory = parts if on_self else parts[:-1]
        self.account.access.require(permission, directory, vpath)
        with fs_errors(vpath), self.storage.resolve(parts, follow=follow or on_self) as r:
            real = r.parts
        if real != parts:
            self.account.access.check_filters(real, vpath, metadata=permission == "list" and not on_self)
            self.account.access.require(permission, real if on_self else real[:-1], vpath)

    def _pending_at(self, real: tuple[str, ...]) -> PendingUpload | None:
        """The upload waiting for its async check at ``real``, keyed where it is published
        (a virtual folder's root for a path in one, :meth:`Storage.locate`)."""
        storage, inside = self.storage.locate(real)
        return self.pending.get(storage.home, inside)

    def _pending_in(self, directory: tuple[str, ...]) -> dict[str, PendingUpload]:
        storage, inside = self.storage.locate(directory)
        return self.pending.in_directory(storage.home, inside)

    def _not_a_mount_point(self, parts: tuple[str, ...], path: str, what: str) -> None:
        """A mount point, or a directory holding one, is not the user's to remove or move."""
        if mounts_under(self.mounts, parts):
            raise PermissionDenied(f"{path}: a virtual folder is mounted here; it cannot be {what}")

    def _same_folder(self, a: tuple[str, ...], b: tuple[str, ...], path: str, what: str) -> None:
        """Rename and link stay inside one folder (or the home): they are refused across a
        boundary with a message, not failed half way by the filesystem (EXDEV)."""
        if self.mounts and folder_name(find_mount(self.mounts, a)) != folder_name(find_mount(self.mounts, b)):
            raise boundary_refusal(path, what)

    # --- read-only operations --------------------------------------------------

    def realpath(self, vpath: str) -> str:
        """Canonical virtual path (lexical; ``..`` stops at ``/``)."""
        return join(split(vpath))

    @_refusals_recorded("stat")
    def stat(self, vpath: str, follow: bool = True) -> Entry:
        parts = split(vpath)
        path = join(parts)
        self.account.access.check_filters(parts, path, metadata=True)
        if parts:
            self._require("list", parts, path, follow=follow)
        with fs_errors(path), self.storage.resolve(parts, follow=follow) as r:
            pending = self._pending_at(r.parts) if parts else None
            st = pending_stat(pending) if pending is not None else self.storage.stat(r)
        return Entry(parts[-1] if parts else "/", st)

    @_refusals_recorded("list")
    def listdir(self, vpath: str) -> list[Entry]:
        parts = self._parts(vpath)
        path = join(parts)
        self._require("list", parts, path, on_self=True)
        with fs_errors(path), self.storage.resolve(parts) as r:
            entries = self.storage.scandir(r)
            real = r.parts
        pending = self._pending_in(real)
        if pending:  # uploads waiting for an async check show with their uploaded size
            entries = [e for e in entries if e.name not in pending]
            entries += [Entry(name, pending_stat(u)) for name, u in pending.items()]
        access = self.account.access
        visible = [e for e in entries if not access.hidden(real, e.name)]
        self._log("list", path, "ok", entries=len(visible))
        return visible

    @_refusals_recorded("list")
    def opendir(self, vpath: str) -> "DirHandle":
        """A listing read in batches (SFTP OPENDIR/READDIR): the directory stays open and each
        batch is read and stat'ed when asked for, so a 20,000-entry directory costs one batch
        of memory per open listing, not the whole stat'ed list. Counts as an open handle."""
        parts = self._parts(vpath)
        path = join(parts)
        self._require("list", parts, path, on_self=True)
        self._check_handle_limit()
        with fs_errors(path), self.storage.resolve(parts) as r:
            fd = self.storage.open_dir_fd(r)
            real = r.parts
        try:
            entries = os.scandir(fd)
        except OSError as exc:
            os.close(fd)
            raise from_oserror(exc, path) from None
        # uploads waiting for an async check show with their uploaded size, after the rest
        pending = {name: upload for name, upload in self._pending_in(real).items()
                   if not self.account.access.hidden(real, name)}
        handle = DirHandle(self, path, real, fd, entries, pending)
        self._track(handle)
        return handle

    @_refusals_recorded("readlink")
    def readlink(self, vpath: str) -> str:
        parts = self._parts(vpath)
        path = join(parts)
        self._require("list", parts, path)
        with fs_errors(path), self.storage.resolve(parts, follow=False) as r:
            raw = self.storage.readlink(r)
            target = self.storage.host_to_virtual(raw, r.parts[:-1])
        if target is None:
            raise NotFound(f"{path}: symbolic link points outside the home")
        return join(target)

    def statvfs(self, vpath: str = "/") -> os.statvfs_result:
        parts = self._parts(vpath)
        return self.storage.locate(parts)[0].statvfs()

    # --- reading --------------------------------------------------------------

    @_refusals_recorded("download")
    def open_read(self, vpath: str) -> "ReadHandle":
        parts = self._parts(vpath)
        path = join(parts)
        if not parts:
            raise IsADirectory("/: is a directory")
        self._require("download", parts, path, follow=True)
        self._check_handle_limit()
        with fs_errors(path), self.storage.resolve(parts) as r:
            self._not_pending(r.parts, path)
            st = self.storage.stat(r)
            if statmod.S_ISDIR(st.st_mode):
                raise IsADirectory(f"{path}: is a directory")
            real = r.parts
        left = self._transfer_left("down", path)
        self._pre(ev.PreDownload, read_opener(self.storage, real), path=path, size=st.st_size)
        with fs_errors(path), self.storage.resolve(real, follow=False) as r:
            fd = self.storage.open_file(r, os.O_RDONLY)
        if not statmod.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise PermissionDenied(f"{path}: not a regular file")
        handle = ReadHandle(self, path, real, fd)
        if left is not None:
            handle.limit = TransferLimit(moved=left, moved_reason=Quotas.transfer_reason(self.account.rates, "down"))
        self._track(handle)
        return handle

    # --- writing --------------------------------------------------------------

    @_refusals_recorded("upload")
    def open_write(
        self, vpath: str, *, truncate: bool = True, append: bool = False, exclusive: bool = False,
        create: bool = True, readable: bool = False, mode: int = 0o644,
    ) -> "WriteHandle":
        """Open a file for upload.

        With atomic uploads the bytes go to a hidden staging file beside the
        target; the target changes only when :meth:`WriteHandle.close` publishes.
        Opening an existing file without ``truncate`` (resume, append, random
        writes) starts the staging file as a copy of it, so the old version stays
        intact and readable until publish."""
        parts = self._parts(vpath)
        path = join(parts)
        if not parts:
            raise IsADirectory("/: is a directory")
        self._require("upload", parts, path, follow=True)
        self._check_handle_limit()
        with fs_errors(path), self.storage.resolve(parts) as r:
            try:
                st: os.stat_result | None = self.storage.stat(r)
            except FileNotFoundError:
                st = None
            real = r.parts
        if self._pending_at(real) is not None:
            raise PermissionDenied(f"{path}: the previous upload of this file is still being checked; "
                                   "try again shortly")
        exists = st is not None
        if not exists and not create:
            raise NotFound(f"{path}: no such file")
        if exists:
            assert st is not None
            if statmod.S_ISDIR(st.st_mode):
                raise IsADirectory(f"{path}: is a directory")
            if exclusive:
                raise AlreadyExists(f"{path}: already exists")
            self._require("overwrite", parts, path, follow=True)
        kind = "append" if append else ("write" if truncate or not exists else "resume")
        self.uploads.check_free_space(self.storage.locate(real)[0].statvfs(), path)
        replaced = st.st_size if st is not None and statmod.S_ISREG(st.st_mode) else None
        scope, limit = self._upload_quota(real, path, replaced)
        self._pre(ev.PreUpload, path=path, size=st.st_size if st and not truncate else 0, mode=kind, exists=exists)

        flags = (os.O_RDWR if readable else os.O_WRONLY)
        if self.uploads.atomic:
            handle = self._open_staged(path, real, exists and not truncate, append, flags, mode, exists)
        else:
            flags |= os.O_CREAT | (os.O_TRUNC if truncate else 0) | (os.O_APPEND if append else 0)
            flags |= os.O_EXCL if exclusive else 0
            with fs_errors(path), self.storage.resolve(real, follow=False) as r:
                fd = self.storage.open_file(r, flags, mode)
            handle = WriteHandle(self, path, real, fd, staging_name=None, record_id=None, existed=exists)
            handle.replaced = replaced
            self._track(handle)
        handle.scope, handle.limit = scope, limit
        return handle

    def _upload_quota(self, real: tuple[str, ...], path: str,
                      replaced: int | None) -> tuple[Scope | None, TransferLimit | None]:
        """Whose quota an upload counts against, and how far it may go: refused here, before
        any script runs and any byte is staged, when the scope or the day's uploads are at
        their limit (docs/accounts.md "Quotas")."""
        if self.quotas is None:
            return None, None
        scope = scope_of(self.account, real, self.mounts)
        return scope, self.quotas.limits(scope, path, replaced, self.user, self.account.rates)

    def _transfer_left(self, direction: str, path: str) -> int | None:
        if self.quotas is None:
            return None
        return self.quotas.transfer_limit(self.user, self.account.rates, direction, path)

    def _transferred(self, up: int = 0, down: int = 0) -> None:
        """Count a finished or aborted transfer's bytes on the day, for users with a daily quota."""
        rates = self.account.rates
        if self.quotas is not None and ((up and rates.up_daily) or (down and rates.down_daily)):
            self.quotas.transferred(self.user, up if rates.up_daily else 0, down if rates.down_daily else 0)

    def _open_staged(
        self, path: str, real: tuple[str, ...], keep_content: bool, append: bool, flags: int, mode: int,
        existed: bool,
    ) -> "WriteHandle":
        staging_name = self.storage.new_staging_name()
        if self.staging is not None:  # the node's name in it: whose upload it is, in a shared home
            staging_name = self.staging.staging_name(staging_name)
        directory = real[:-1]
        record_id = None
        if self.staging is not None:  # recorded where it is published: a folder's root for a path in one
            where, inside = self.storage.locate(directory)
            record_id = self.staging.add(self.user, str(where.home), join(inside), staging_name, real[-1])
        fd = -1
        try:
            with self.storage.resolve(directory + (staging_name,), follow=False) as r:
                fd = self.storage.open_file(r, flags | os.O_CREAT | os.O_EXCL, 0o600)
            if keep_content:
                self._copy_published(real, fd, path)
            if append:  # only now: through an O_APPEND descriptor the copy could not keep its holes
                fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_APPEND)
            os.fchmod(fd, mode & 0o777)
        except (OSError, FsError) as exc:
            if fd >= 0:
                os.close(fd)
            self._discard_staged(directory, staging_name, record_id)
            if isinstance(exc, FsError):
                raise
            raise from_oserror(exc, path) from None
        handle = WriteHandle(self, path, real, fd, staging_name=staging_name, record_id=record_id, existed=existed)
        self._track(handle)
        return handle

    def _copy_published(self, real: tuple[str, ...], fd: int, path: str) -> None:
        """Start a staged upload as a copy of the published file (resume, ``r+``, append):
        holes kept, and refused up front when the copy would not fit above the reserve."""
        with self.storage.resolve(real, follow=False) as r:
            src = self.storage.open_file(r, os.O_RDONLY)
        try:
            self.uploads.check_free_space(self.storage.locate(real)[0].statvfs(), path, need=allocated_bytes(src))
            copy_large(src, fd)  # on the copier's threads when large (server/core/copier.py)
        finally:
            os.close(src)

    def _discard_staged(self, directory: tuple[str, ...], staging_name: str, record_id: int | None) -> None:
        self.publisher.discard(self.storage, self.user, directory, staging_name, record_id)

    def _not_pending(self, real: tuple[str, ...], path: str) -> None:
        """An upload waiting for its async check is not there yet for download, rename or delete."""
        if self._pending_at(real) is not None:
            raise NotFound(f"{path}: no such file")

    # --- namespace operations ---------------------------------------------------

    @_refusals_recorded("mkdir")
    def mkdir(self, vpath: str, mode: int = 0o755) -> None:
        parts = self._parts(vpath)
        path = join(parts)
        if not parts:
            raise AlreadyExists("/: already exists")
        self._require("mkdir", parts, path)
        self._pre(ev.PreMkdir, path=path)
        with fs_errors(path), self.storage.resolve(parts, follow=False) as r:
            self.storage.mkdir(r, mode & 0o777)
        self._log("mkdir", path, "ok")
        self._post(ev.PostMkdir, path=path)

    @_refusals_recorded("rmdir")
    def rmdir(self, vpath: str) -> None:
        parts = self._parts(vpath)
        path = join(parts)
        if not parts:
            raise PermissionDenied("/: cannot remove the home directory")
        self._require("rmdir", parts, path)
        self._not_a_mount_point(parts, path, "removed")
        with fs_errors(path), self.storage.resolve(parts, follow=False) as r:
            if not statmod.S_ISDIR(self.storage.stat(r).st_mode):
                raise NotADirectory(f"{path}: not a directory")
        self._pre(ev.PreRmdir, path=path)
        with fs_errors(path), self.storage.resolve(parts, follow=False) as r:
            self.storage.rmdir(r)
        self._log("rmdir", path, "ok")
        self._post(ev.PostRmdir, path=path)

    @_refusals_recorded("rmdir")
    def check_removable(self, vpath: str) -> None:
        """What :meth:`rmdir` refuses however empty the directory: asked by a tree delete
        (WebDAV DELETE, a MOVE over a collection) before it removes anything, so a shared
        folder is never emptied by a request that could not remove it anyway."""
        parts = split(vpath)
        path = join(parts)
        if not parts:
            raise PermissionDenied("/: cannot remove the home directory")
        self._not_a_mount_point(parts, path, "removed")

    @_refusals_recorded("delete")
    def remove(self, vpath: str) -> None:
        parts = self._parts(vpath)
        path = join(parts)
        if not parts:
            raise IsADirectory("/: is a directory")
        self._require("delete", parts, path)
        with fs_errors(path), self.storage.resolve(parts, follow=False) as r:
            self._not_pending(r.parts, path)
            st = self.storage.stat(r)
        if statmod.S_ISDIR(st.st_mode):
            raise IsADirectory(f"{path}: is a directory")
        self._pre(ev.PreDelete, path=path, size=st.st_size)
        with fs_errors(path), self.storage.resolve(parts, follow=False) as r:
            if self.quotas is None:
                self.storage.unlink(r)
            else:
                self._unlink_counted(r, self.quotas)
        self._log("delete", path, "ok", size=st.st_size)
        self._post(ev.PostDelete, path=path, size=st.st_size)

    def _unlink_counted(self, r: Resolved, quotas: Quotas) -> None:
        """Unlink and subtract what goes, read again under the scope's lock (the file may
        have been replaced since the checks and the pre-delete scripts)."""
        scope = scope_of(self.account, r.parts, self.mounts)
        with quotas.guard(scope):
            st = self.storage.stat(r)
            self.storage.unlink(r)
            if statmod.S_ISREG(st.st_mode):
                quotas.count(scope, -st.st_size, -1)

    @_refusals_recorded("rename")
    def rename(self, src_vpath: str, dst_vpath: str, *, overwrite: bool = False) -> None:
        """Rename; ``overwrite`` replaces an existing file (POSIX semantics), which
        also needs the ``overwrite`` permission where the target lives."""
        src_parts, dst_parts = self._parts(src_vpath), self._parts(dst_vpath)
        src, dst = join(src_parts), join(dst_parts)
        if not src_parts or not dst_parts:
            raise PermissionDenied("cannot rename the home directory")
        if dst_parts[: len(src_parts)] == src_parts and dst_parts != src_parts:
            raise InvalidPath(f"{dst}: cannot move a directory into itself")
        self._require("rename", src_parts, src)
        self._require("rename", dst_parts, dst)
        self._not_a_mount_point(src_parts, src, "renamed")
        self._not_a_mount_point(dst_parts, dst, "replaced")
        self._same_folder(src_parts, dst_parts, src, "rename")
        with fs_errors(src):
            with self.storage.resolve(src_parts, follow=False) as r:
                self._not_pending(r.parts, src)
                src_st = self.storage.stat(r)
            with self.storage.resolve(dst_parts, follow=False) as r:
                if self._pending_at(r.parts) is not None:
                    raise PermissionDenied(f"{dst}: an upload to this name is still being checked")
                try:
                    dst_st: os.stat_result | None = self.storage.stat(r)
                except FileNotFoundError:
                    dst_st = None
        if dst_st is not None and src_parts != dst_parts:
            if not overwrite:
                raise AlreadyExists(f"{dst}: already exists")
            if statmod.S_ISDIR(dst_st.st_mode):
                raise IsADirectory(f"{dst}: is a directory")
            self._require("overwrite", dst_parts, dst)
        self._pre(ev.PreRename, path=src, target=dst, size=src_st.st_size, overwrite=dst_st is not None)
        with fs_errors(src):
            with self.storage.resolve(src_parts, follow=False) as a, \
                    self.storage.resolve(dst_parts, follow=False) as b:
                if self.quotas is None:
                    self.storage.rename(a, b)
                else:
                    self._rename_counted(a, b, self.quotas)
        self._log("rename", src, "ok", target=dst)
        self._post(ev.PostRename, path=src, target=dst, size=src_st.st_size)

    def _rename_counted(self, a: Resolved, b: Resolved, quotas: Quotas) -> None:
        """A rename changes its scope's usage only by the file it replaces, read under the
        scope's lock (a rename never crosses a folder boundary: ``_same_folder``)."""
        scope = scope_of(self.account, a.parts, self.mounts)
        with quotas.guard(scope):
            moving = self.storage.stat(a)
            try:
                st: os.stat_result | None = self.storage.stat(b)
            except FileNotFoundError:
                st = None
            self.storage.rename(a, b)
            if st is not None and statmod.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) != (
                    moving.st_dev, moving.st_ino):  # onto itself (or a hard link of it): nothing goes
                quotas.count(scope, -st.st_size, -1)

    @_refusals_recorded("setstat")
    def setstat(
        self, vpath: str, *, mode: int | None = None, times: tuple[float, float] | None = None,
        size: int | None = None,
    ) -> None:
        parts = self._parts(vpath)
        path = join(parts)
        mode, times = self._setstat_granted(parts, path, mode, times, on_self=not parts, follow=True)
        with fs_errors(path), self.storage.resolve(parts) as r:
            if size is not None:
                # Truncating a published file would make a half file visible: refuse it.
                # (Truncating an open upload goes through its handle instead.)
                raise PermissionDenied(f"{path}: changing the size of a stored file is not allowed")
            if mode is not None:
                self.storage.chmod(r, mode)
            if times is not None:
                self.storage.utime(r, *times)
        self._log("setstat", path, "ok")

    def fsetstat(
        self, handle: "WriteHandle", *, mode: int | None = None, times: tuple[float, float] | None = None,
        size: int | None = None,
    ) -> None:
        """Attributes of a file being uploaded (e.g. ``put -p``); they travel with it at publish."""
        if mode is not None or times is not None:
            mode, times = self._setstat_granted(handle.real, handle.path, mode, times)
        if size is not None and handle.limit is not None:
            handle._within(handle.limit, size, 0)
        with fs_errors(handle.path):
            if size is not None:
                os.ftruncate(handle.fd, size)
            if mode is not None:
                os.fchmod(handle.fd, mode & 0o777)
            if times is not None:
                os.utime(handle.fd, times)

    def _setstat_granted(
        self, parts: tuple[str, ...], path: str, mode: int | None, times: tuple[float, float] | None, *,
        on_self: bool = False, follow: bool = False,
    ) -> tuple[int | None, tuple[float, float] | None]:
        """The mode and times this user may set here. Without the setstat permission the
        user's ``setstat_mode`` decides: ``refuse``; ``ignore`` (success, nothing changes);
        ``times``: a request that sets times has them applied and any mode in it ignored,
        while a plain mode change (chmod) is refused. Clients set the times of every upload
        they make; failing that fails the upload for upload-only partners (rclone:
        "SetModTime failed: permission denied"; ``put -p`` sends mode and times together)."""
        if mode is None and times is None:
            return mode, times
        try:
            self._require("setstat", parts, path, on_self=on_self, follow=follow)
            return mode, times
        except PermissionDenied:
            policy = self.account.setstat_mode
            if policy == "refuse" or (policy == "times" and times is None):
                raise
            kept = times if policy == "times" else None
            if log.isEnabledFor(logging.DEBUG):
                log.debug("setstat %s without permission: %s", path, "times applied, mode ignored"
                          if kept else "ignored", extra={"sid": self.id, "user": self.user})
            return None, kept

    @_refusals_recorded("symlink")
    def symlink(self, target_vpath: str, link_vpath: str) -> None:
        """Create a symlink. The target is a virtual path (relative to the link's
        directory or absolute in the home), and means a place in the home, as in a
        chroot: it is stored on disk as the absolute host path of that place, so
        moving the link anywhere never changes where it points, in the server or
        outside it. (A relative link moved to a shallower directory would point
        above the home, for any program outside the server that follows it.)"""
        link_parts = self._parts(link_vpath)
        link = join(link_parts)
        if not link_parts:
            raise AlreadyExists("/: already exists")
        self._require("symlink", link_parts, link)
        target_parts = split(target_vpath, join(link_parts[:-1]))
        self.account.access.check_filters(target_parts, join(target_parts))
        self._same_folder(link_parts, target_parts, link, "link")
        where, inside = self.storage.locate(target_parts)  # stored as a path in the folder it points into
        host_target = os.path.join(str(where.home), *inside)
        with fs_errors(link), self.storage.resolve(link_parts, follow=False) as r:
            self.storage.symlink(host_target, r)
        self._log("symlink", link, "ok", target=join(target_parts))

    # --- handles and lifetime ------------------------------------------------------

    def _check_handle_limit(self) -> None:
        """Refuse a new handle before any work (or script) when this session or its user is full."""
        with self._lock:
            if self._closed:
                raise Failure("session closed")
            if len(self._handles) + len(self._listings) >= self.max_handles:
                raise LimitExceeded(f"too many open files (limit {self.max_handles})")
        if self.budget is not None:
            self.budget.check()

    def _track(self, handle: "FileHandle | DirHandle") -> None:
        """Count an opened handle; one that the user's budget no longer admits (another of
        their sessions took the last slot meanwhile) is aborted and refused."""
        if self.budget is not None:
            try:
                self.budget.take(handle)
            except LimitExceeded:
                handle.abort("too many open files")
                raise
        with self._lock:
            if isinstance(handle, DirHandle):
                self._listings.add(handle)
            else:
                self._handles.add(handle)

    def _untrack(self, handle: "FileHandle | DirHandle") -> None:
        if self.budget is not None:
            self.budget.give(handle)
        with self._lock:
            if isinstance(handle, DirHandle):
                self._listings.discard(handle)
            else:
                self._handles.discard(handle)
            self._idle.notify_all()

    def close(self) -> None:
        """End the session: uploads still open are aborted (never published), listings closed."""
        with self._lock:
            self._closed = True
            handles = list(self._handles) + list(self._listings)
        for h in handles:
            h.abort("connection closed before the transfer completed")
        with self._lock:
            # a close/abort running in another thread (the front end's) still needs the storage
            self._idle.wait_for(lambda: not self._handles, timeout=120)
        on_close, self._on_close = self._on_close, None
        if on_close is not None:
            on_close(self)
        self.storage.close()

    def open_handles(self) -> list["FileHandle"]:
        """The files open now (running transfers, not listings): the daemon waits for them
        at shutdown and the admin API lists them."""
        with self._lock:
            return list(self._handles)


class FileHandle(FdFile):
    """A file a Session opened for a transfer: the descriptor work is support/fd_files.py's
    (an SSH worker's handles share it); this adds the session, the real path and the tracking.

    The handle stays tracked until :meth:`_release`, at the end of the close or abort
    (after ``_finish`` marked it done), so that Session.close waits for it instead of
    closing the storage under it."""

    def __init__(self, session: Session, path: str, real: tuple[str, ...], fd: int) -> None:
        super().__init__(path, fd)
        self.session = session
        self.real = real

    def _release(self) -> None:
        self.session._untrack(self)


class DirHandle:
    """An open directory listing: a descriptor and a scandir iterator on it, read one batch
    at a time (:meth:`read`). Entries hidden by filters, staging files and names that an
    upload waiting for its async check replaces are left out; those uploads come last."""

    def __init__(self, session: Session, path: str, real: tuple[str, ...], fd: int,
                 entries: Iterator[os.DirEntry[str]], pending: dict[str, PendingUpload]) -> None:
        self.session = session
        self.path = path
        self.real = real
        self.fd = fd
        self.started = time.monotonic()
        self.done = False
        self.count = 0
        self._entries = entries
        self._pending = pending
        self._lock = threading.Lock()

    def read(self, count: int) -> list[Entry]:
        """Up to ``count`` more visible entries; an empty list at the end."""
        with self._lock:
            if self.done:
                raise Failure(f"{self.path}: listing closed")
            out: list[Entry] = []
            while len(out) < count:
                batch = self.session.storage.read_entries(self.fd, self._entries, count - len(out))
                if not batch:
                    break
                out += [e for e in batch if self._visible(e.name)]
            if len(out) < count and self._pending:
                names = sorted(self._pending)[:count - len(out)]
                out += [Entry(n, pending_stat(self._pending.pop(n))) for n in names]
            self.count += len(out)
            return out

    def _visible(self, name: str) -> bool:
        return name not in self._pending and not self.session.account.access.hidden(self.real, name)

    def _end(self) -> bool:
        with self._lock:
            if self.done:
                return False
            self.done = True
            self._pending = {}
            try:
                self._entries.close()  # type: ignore[attr-defined]
            finally:
                os.close(self.fd)
        return True

    def close(self) -> None:
        """The client is done with it: one log line for the whole listing."""
        if self._end():
            try:
                self.session._log("list", self.path, "ok", entries=self.count)
            finally:
                self.session._untrack(self)

    def abort(self, reason: str) -> None:
        if self._end():
            self.session._untrack(self)


def _rate(nbytes: int, seconds: float) -> str:
    return f"{nbytes / max(seconds, 1e-6) / 1e6:.1f}MB/s"


class ReadHandle(FileHandle, FdReader):
    """A file open for download: positional reads, no shared offset (FdReader's)."""

    def close(self) -> None:
        if not self._finish():
            return
        try:
            stopped = self._stopped_by_quota()
            os.close(self.fd)
            secs = time.monotonic() - self.started
            s = self.session
            s.bytes_out += self.sent
            s._transferred(down=self.sent)
            s._log("download", self.path, "ok", bytes=self.sent, secs=round(secs, 3), rate=_rate(self.sent, secs))
            s._post(ev.PostDownload, path=self.path, size=self.sent, bytes=self.sent, duration=secs)
            if stopped is not None:
                s._refused("download", (self.path,), stopped)
        finally:
            self._release()

    def abort(self, reason: str) -> None:
        if self._finish():
            try:
                stopped = self._stopped_by_quota()
                os.close(self.fd)
                self.session.bytes_out += self.sent
                self.session._transferred(down=self.sent)
                self.session._log("download", self.path, "aborted", bytes=self.sent, reason=reason)
                if stopped is not None:
                    self.session._refused("download", (self.path,), stopped)
            finally:
                self._release()

    def _stopped_by_quota(self) -> QuotaExceeded | None:
        """A download that used up the day's quota with bytes of the file left: the reads
        past it were refused (in whichever process served them), recorded here as a refusal."""
        limit = self.limit
        if limit is None or limit.moved is None or self.sent < limit.moved or os.fstat(self.fd).st_size <= self.sent:
            return None
        return QuotaExceeded(f"{self.path}: {limit.moved_reason}")


class WriteHandle(FileHandle, FdWriter):
    """A file open for upload. ``close()`` publishes (and may raise a veto); ``abort()`` discards.
    Writes, read-back, truncate and the poisoning by a failed write are FdWriter's."""

    def __init__(
        self, session: Session, path: str, real: tuple[str, ...], fd: int, *,
        staging_name: str | None, record_id: int | None, existed: bool,
    ) -> None:
        super().__init__(session, path, real, fd)
        self.staging_name = staging_name
        self.record_id = record_id
        self.existed = existed
        self.scope: Scope | None = None  # whose quota the published file counts against
        self.replaced: int | None = None  # without staging: the size of the file written over

    def copy_from(self, src: int, *, deadline: float | None = None) -> None:
        """Fill this upload with the whole file open at ``src``, in the kernel, holes kept
        (WebDAV COPY, ``api.fs.copy``); refused up front if it would not fit above the
        reserve. A failure poisons the upload like a failed write."""
        self._check_usable()
        s = self.session
        if self.limit is not None:
            self._within(self.limit, os.fstat(src).st_size, 0)  # bytes the network never carries
        s.uploads.check_free_space(s.storage.locate(self.real)[0].statvfs(), self.path, need=allocated_bytes(src))
        try:
            copy_large(src, self.fd, deadline=deadline)  # on the copier's threads when large
        except OSError as exc:
            if isinstance(exc, TimeoutError):
                raise
            raise self._poison(exc) from None
        self.written = os.fstat(self.fd).st_size

    def close(self) -> None:
        """Complete the upload: publish it (atomic mode) and raise post-upload.

        Raises :class:`Vetoed` when a pre-publish script rejects the file; the
        staged bytes are then already gone (or quarantined) and the previous
        version of the file is untouched."""
        if self.failed is None and not self.done and self.session.uploads.fsync:
            self._sync()
        self._refuse_if_poisoned()
        if not self._finish():
            return
        try:
            s = self.session
            size = self.size()
            os.close(self.fd)
            s.bytes_in += self.written
            s._transferred(up=self.written)
            if self.staging_name is None:
                self._count_in_place(size)
            elif self._publish(size) is Outcome.PENDING:
                return  # async check: the publisher raises post-upload after the verdict
            secs = time.monotonic() - self.started
            s._log("upload", self.path, "ok", bytes=self.written, size=size, secs=round(secs, 3),
                   rate=_rate(self.written, secs))
            s._post(ev.PostUpload, read_opener(s.storage, self.real), path=self.path, size=size, duration=secs)
        finally:
            self._release()

    def _publish(self, size: int) -> Outcome:
        """Hand the complete staged file to the publisher; the outcome's log lines are the
        session's (the publisher logs only what it decides after the client was answered)."""
        s = self.session
        assert self.staging_name is not None
        where, inside = s.storage.locate(self.real)  # published in the folder that holds it
        upload = StagedUpload(where, s.user, self.path, inside, self.staging_name, self.record_id,
                              self.existed, size, self.scope)
        event = s._event(ev.PrePublish, path=self.path, size=size, exists=self.existed)
        try:
            outcome = s.publisher.publish(upload, event)
        except FsError as exc:
            if isinstance(exc, Vetoed):
                s._log("publish", self.path, "vetoed", reason=exc.message)
            s._log("upload", self.path, "rejected", bytes=self.written, reason=exc.message)
            raise
        if outcome is Outcome.PENDING:
            s._log("publish", self.path, "checking", size=size)
            s._log("upload", self.path, "accepted", bytes=self.written, size=size)
        return outcome

    def _count_in_place(self, size: int) -> None:
        """Without staging (``[uploads] atomic = false``) the file changed where it is, whole
        or not: counted as it stands, against what it was when the upload began."""
        quotas, scope = self.session.quotas, self.scope
        if quotas is not None and scope is not None:
            with quotas.guard(scope):
                quotas.count(scope, size - (self.replaced or 0), 0 if self.existed else 1)

    def abort(self, reason: str) -> None:
        """The client went away mid-transfer: nothing is published."""
        if not self._finish():
            return
        try:
            s = self.session
            size = self.size() if self.staging_name is None else 0
            os.close(self.fd)
            s.bytes_in += self.written
            s._transferred(up=self.written)
            if self.staging_name is not None:
                s._discard_staged(self.real[:-1], self.staging_name, self.record_id)
            else:
                self._count_in_place(size)
            if isinstance(self.failed, QuotaExceeded) or (self.limit is not None and self.limit.stopped(reason)):
                s._refused("upload", (self.path,), QuotaExceeded(reason))
            s._log("upload", self.path, "aborted", bytes=self.written, reason=reason)
            s._post(ev.UploadFailed, path=self.path, size=self.written, reason=reason)
        finally:
            self._release()


#: UploadPolicy is defined by publish.py (publishing is what it governs) and exported here
#: too: every Session is built with one.
__all__ = ["Account", "DirHandle", "FileHandle", "HandleBudget", "MAX_OFFSET", "ReadHandle", "RefusalSink",
           "Session", "UploadPolicy", "WriteHandle"]

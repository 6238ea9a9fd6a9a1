"""Publishing a staged upload: pre-publish checks, then an atomic rename (or rejection).

Every upload is written under a hidden staging name beside its target
(:mod:`.session`). When the client finishes, the Session describes the staged
file (:class:`StagedUpload`) and builds its ``pre-publish`` event;
:meth:`Publisher.publish` raises the event and only then renames the file over
the target. Nothing is ever visible under the final name unless it passed.

The seam runs one way: the Session calls the Publisher and writes the log lines
of the client's operation; the Publisher knows no Session (it is shared by all of
them, and its background checks outlive them) and logs only what happens after
the client was answered. :class:`UploadPolicy` (atomic, fsync, quarantine, disk
reserve) lives here because publishing is what it governs.

Two modes, per binding (``mode`` in ``[[bindings]]``):

- **sync** (default): the client's completion reply waits for the verdict and
  carries it (SFTP status on CLOSE, FTP reply, HTTP status, SCP error line).
- **async**: once the sync bindings passed, the client is told "done" at once and
  the async bindings run in the background. Meanwhile the final path is
  *pending*: STAT and listings show it with the uploaded size (clients that
  verify an upload by its size keep working), while download, rename and delete
  answer "no such file", and a new upload to it is refused until the verdict.
  The staged file itself stays hidden and untouchable. A previous version of
  the file stays on disk, unchanged, until the publish replaces it (or the
  veto leaves it in place).

Crash safety: the staging record says "checking" (with the event) from the
moment all bytes arrived, so after a crash the upload is checked again on start
(``[uploads] on_restart = "recheck"``) or deleted (``"discard"``); it is never
published unchecked and never left behind.

The pending index is per process (in memory, rebuilt from the staging records
on start); when several acceptor processes share a state_dir it will have to
move into the staging database (docs/architecture.md rule 10).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import stat as statmod
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from scriptsftp.server.contract import events as ev
from scriptsftp.server.contract.dispatch import ALLOW, Dispatcher, FileOpener
from scriptsftp.server.contract.errors import (
    Failure, FsError, IsADirectory, NoSpace, NotFound, Vetoed, from_oserror, fs_errors,
)
from scriptsftp.server.core.quota import Quotas, Scope
from scriptsftp.server.core.storage import LocalStorage, Resolved, Storage, StorageOpener, copy_fd, read_opener
from scriptsftp.server.core.vfs import join, split

if TYPE_CHECKING:
    from scriptsftp.server.core.staging import StagedRecord, StagingRecords

log = logging.getLogger("scriptsftp.session")

VETO_FALLBACK = "denied by a server script"


@dataclass
class UploadPolicy:
    """``[uploads]``: how every upload is staged and published, for all sessions alike."""

    atomic: bool = True
    quarantine: Path | None = None
    fsync: bool = True
    """Publish is durable: the staged file is flushed before the rename, its directory after."""
    min_free_space: int = 0
    """Bytes that must stay free on the home's filesystem and on ``state_dir``'s; below
    that, new uploads are refused at once (0: no reserve)."""
    state_dir: Path | None = None

    def check_free_space(self, home_fs: os.statvfs_result, path: str, need: int = 0) -> None:
        """Refuse an upload before it starts when a disk it needs is nearly full: a clear
        "no space" now beats a failure half way (and a reserve keeps the state databases
        writable, so the server can still clean up). ``need``: bytes the server itself is
        about to write on the home's filesystem (the copy a resume starts from)."""
        if need and home_fs.f_bavail * home_fs.f_frsize - need < self.min_free_space:
            raise NoSpace(f"{path}: not enough free space on the server to copy the file; try again later")
        if not self.min_free_space:
            return
        checks = [("the server's storage", home_fs)]
        if self.state_dir is not None:
            try:
                checks.append(("the server's state storage", os.statvfs(self.state_dir)))
            except OSError:
                pass
        for what, fs in checks:
            if fs.f_bavail * fs.f_frsize < self.min_free_space:
                raise NoSpace(f"{path}: {what} is nearly full; try again later")


class Outcome(Enum):
    """What :meth:`Publisher.publish` did with an upload it did not reject."""

    PUBLISHED = "published"
    """Renamed over the target now; the Session raises post-upload."""
    PENDING = "pending"
    """Sync checks passed, async ones decide later; the Publisher raises post-upload then."""


@dataclass(frozen=True)
class PendingUpload:
    """A complete upload whose async checks have not decided yet."""

    size: int
    mtime: float
    mode: int
    record_id: int | None


class PendingIndex:
    """Final paths (per home, as real path parts) that wait for an async verdict."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_path: dict[tuple[str, tuple[str, ...]], PendingUpload] = {}

    def add(self, home: Path, parts: tuple[str, ...], upload: PendingUpload) -> None:
        with self._lock:
            self._by_path[(str(home), parts)] = upload

    def remove(self, home: Path, parts: tuple[str, ...]) -> None:
        with self._lock:
            self._by_path.pop((str(home), parts), None)

    def get(self, home: Path, parts: tuple[str, ...]) -> PendingUpload | None:
        if not self._by_path:  # the common case costs no lock
            return None
        with self._lock:
            return self._by_path.get((str(home), parts))

    def in_directory(self, home: Path, directory: tuple[str, ...]) -> dict[str, PendingUpload]:
        if not self._by_path:
            return {}
        key, n = str(home), len(directory) + 1
        with self._lock:
            return {p[-1]: u for (h, p), u in self._by_path.items()
                    if h == key and len(p) == n and p[:-1] == directory}

    def __len__(self) -> int:
        return len(self._by_path)


def pending_stat(upload: PendingUpload) -> os.stat_result:
    """What STAT answers for a pending path: a regular file of the uploaded size."""
    m, ns = int(upload.mtime), int(upload.mtime * 1e9)
    return os.stat_result(
        (statmod.S_IFREG | (upload.mode & 0o777), 0, 0, 1, os.getuid(), os.getgid(), upload.size, m, m, m),
        {"st_atime": upload.mtime, "st_mtime": upload.mtime, "st_ctime": upload.mtime,
         "st_atime_ns": ns, "st_mtime_ns": ns, "st_ctime_ns": ns},
    )


@dataclass
class StagedUpload:
    """Where a complete staged upload lives and what it is for: all the Publisher needs
    from the Session (which builds it when the client finishes the upload)."""

    storage: Storage
    user: str
    path: str  # virtual final path, as the client named it
    final: tuple[str, ...]  # real final path parts (symlinks inside the home resolved)
    staging_name: str
    record_id: int | None
    existed: bool
    size: int
    scope: Scope | None = None  # whose quota it counts against (None: no accounting)

    @property
    def staged(self) -> tuple[str, ...]:
        return self.final[:-1] + (self.staging_name,)


class Publisher:
    """Runs pre-publish and publishes or rejects; one per daemon, shared by all sessions."""

    def __init__(
        self, dispatcher: Dispatcher, staging: "StagingRecords | None", uploads: UploadPolicy,
        *, workers: int = 2, pending: PendingIndex | None = None, open_storage: StorageOpener = LocalStorage,
        quotas: Quotas | None = None,
    ) -> None:
        self.dispatcher = dispatcher
        self.quotas = quotas  # usage is counted here, at the rename, and nowhere before it
        self.staging = staging
        self.uploads = uploads
        self.open_storage = open_storage  # homes named by staging records, rechecked after a crash
        # shared with the daemon's publisher by publishers that raise no events (api.fs)
        self.pending = pending if pending is not None else PendingIndex()
        self._pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="publish-check")
        self._running = 0
        self._idle = threading.Condition()

    # --- the client's side -------------------------------------------------------

    def publish(self, up: StagedUpload, event: ev.PrePublish) -> Outcome:
        """Check and publish a finished upload: :attr:`Outcome.PUBLISHED` now, or
        :attr:`Outcome.PENDING` when an async check decides later. Raises :class:`Vetoed`
        with the script's reason (or another FsError) if the upload was rejected; the
        staged bytes are then already gone (or quarantined)."""
        try:
            return self._check_and_publish(up, event)
        except Vetoed:
            raise  # rejected: reject() already discarded it
        except Exception as exc:
            # Whatever failed (a full state_dir, a script engine error, a bug), the staged
            # bytes and their record go now: left behind, they would hold the disk full.
            self.discard(up.storage, up.user, up.final[:-1], up.staging_name, up.record_id)
            self.pending.remove(up.storage.home, up.final)
            if isinstance(exc, FsError):
                raise
            log.exception("publish %s failed", up.path, extra=_ctx(event.to_dict(), up.path))
            raise Failure(f"{up.path}: the upload could not be completed (server error)") from None

    def _check_and_publish(self, up: StagedUpload, event: ev.PrePublish) -> Outcome:
        if self.staging is not None and up.record_id is not None:
            self.staging.checking(up.record_id, event.to_dict())
        if self.dispatcher.wants("pre-publish"):
            decision = self.dispatcher.pre(event, read_opener(up.storage, up.staged), mode="sync")
            if not decision.allowed:
                reason = decision.reason or VETO_FALLBACK
                self.reject(up, event.to_dict(), reason)
                raise Vetoed(reason)
            if self.dispatcher.has_async(event):
                self._start_async(up, event)
                return Outcome.PENDING
        self.finish(up, event.to_dict())
        return Outcome.PUBLISHED

    def _start_async(self, up: StagedUpload, event: ev.PrePublish) -> None:
        with fs_errors(up.path), up.storage.resolve(up.staged, follow=False) as r:
            st = up.storage.stat(r)
        self.pending.add(up.storage.home, up.final,
                         PendingUpload(up.size, st.st_mtime, st.st_mode, up.record_id))
        # The session (and its storage) may close before the verdict: the check owns a storage of its own.
        own = dataclasses.replace(up, storage=up.storage.reopen())
        self._submit(self._check_later, own, event.to_dict(), time.monotonic(), "async", "(async)")

    def _submit(self, fn: Any, *args: Any) -> None:
        with self._idle:
            self._running += 1
        self._pool.submit(self._run, fn, *args)

    def _run(self, fn: Any, *args: Any) -> None:
        try:
            fn(*args)
        except Exception:
            log.exception("background pre-publish check failed")
        finally:
            with self._idle:
                self._running -= 1
                self._idle.notify_all()

    def _check_later(self, up: StagedUpload, data: dict[str, Any], started: float, mode: str | None,
                     vetoed: str) -> None:
        """The verdict no client waits for: async bindings after the reply (``mode = "async"``),
        or every binding on an upload a crash caught mid-check (``mode = None``)."""
        try:
            decision = ALLOW
            if self.dispatcher.wants("pre-publish"):
                decision = self.dispatcher.pre(_rebuild(data), read_opener(up.storage, up.staged), mode=mode)
            if decision.allowed:
                try:
                    self.finish(up, data, duration=time.monotonic() - started)
                except FsError:
                    pass  # logged and upload-failed raised by finish()
            else:
                reason = decision.reason or VETO_FALLBACK
                self.reject(up, data, reason)
                log.info("publish %s vetoed %s: %s", up.path, vetoed, reason, extra=_ctx(data, up.path))
        finally:
            self.pending.remove(up.storage.home, up.final)
            up.storage.close()

    # --- outcomes ---------------------------------------------------------------------

    def finish(self, up: StagedUpload, data: dict[str, Any], *, duration: float | None = None) -> None:
        """Rename the staged file over the target; post-upload when it was a background check."""
        crossed: list[ev.QuotaThreshold] = []
        try:
            with up.storage.resolve(up.staged, follow=False) as src, \
                    up.storage.resolve(up.final, follow=False) as dst:
                if self.quotas is not None and up.scope is not None:
                    with self.quotas.guard(up.scope):
                        crossed = self._rename_counted(up, src, dst, self.quotas, up.scope, data)
                else:
                    self._replaceable(up, dst)
                    up.storage.rename(src, dst)
                if self.uploads.fsync:
                    self._sync_directory(up, dst)
        except (OSError, FsError) as exc:
            error = exc if isinstance(exc, FsError) else from_oserror(exc, up.path)
            self.discard(up.storage, up.user, up.final[:-1], up.staging_name, up.record_id)
            self.pending.remove(up.storage.home, up.final)
            self._post(ev.UploadFailed, data, path=up.path, size=up.size, reason=error.message)
            log.warning("publish %s failed: %s", up.path, error.message, extra=_ctx(data, up.path))
            raise error from None
        self._forget(up.record_id)
        # settled before anyone is told (log line, post-upload): the path is plainly there now
        self.pending.remove(up.storage.home, up.final)
        for threshold in crossed:
            if self.dispatcher.wants(threshold.name):
                self.dispatcher.post(threshold)
        if duration is not None:  # background: the front end already answered; we tell the scripts
            log.info("publish %s ok (checked in %.3fs)", up.path, duration, extra=_ctx(data, up.path))
            self._post(ev.PostUpload, data, path=up.path, size=up.size, duration=duration,
                       file=read_opener(up.storage, up.final))

    @staticmethod
    def _replaceable(up: StagedUpload, dst: Resolved) -> int | None:
        """The size of the published file the upload replaces (None: none, or not a regular
        file); a directory that took the name meanwhile refuses the publish."""
        try:
            st = up.storage.stat(dst)
        except FileNotFoundError:
            return None
        if statmod.S_ISDIR(st.st_mode):
            raise IsADirectory(f"{up.path}: a directory now has this name")
        return st.st_size if statmod.S_ISREG(st.st_mode) else None

    def _rename_counted(self, up: StagedUpload, src: Resolved, dst: Resolved, quotas: Quotas, scope: Scope,
                        data: dict[str, Any]) -> list[ev.QuotaThreshold]:
        """The rename with its accounting, under the scope's lock: what it replaces is read
        here, not when the upload began (another upload of the path may have been published
        since), and the exact quota check is made on it."""
        replaced = self._replaceable(up, dst)
        size = up.storage.stat(src).st_size
        quotas.check_publish(scope, up.path, size, replaced)
        up.storage.rename(src, dst)
        return quotas.count(scope, size - (replaced or 0), 0 if replaced is not None else 1, _common(data))

    @staticmethod
    def _sync_directory(up: StagedUpload, dst: Resolved) -> None:
        """The rename is durable only once its directory is on disk (rule 7). It has happened
        already, so a failure here cannot be undone: said loudly, not raised."""
        try:
            up.storage.fsync_dir(dst)
        except OSError as exc:
            log.error("publish %s: the directory could not be synced to disk (%s)", up.path, exc)

    def _forget(self, record_id: int | None) -> None:
        """Drop a staging record; one that cannot be dropped now (state_dir full) is an
        orphan whose file is gone, and the next start forgets it."""
        if record_id is None or self.staging is None:
            return
        try:
            self.staging.remove(record_id)
        except FsError as exc:
            log.warning("staging record %d not removed (%s): cleared at the next start", record_id, exc.message)

    def reject(self, up: StagedUpload, data: dict[str, Any], reason: str) -> None:
        self.discard(up.storage, up.user, up.final[:-1], up.staging_name, up.record_id, rejected=True)
        self.pending.remove(up.storage.home, up.final)
        self._post(ev.UploadFailed, data, path=up.path, size=up.size, reason=reason)

    def _post(self, cls: type[ev.Event], data: dict[str, Any], file: FileOpener | None = None,
              **fields: Any) -> None:
        if self.dispatcher.wants(cls.name):
            self.dispatcher.post(cls(**_common(data), **fields), file)

    def discard(self, storage: Storage, user: str, directory: tuple[str, ...], staging_name: str,
                record_id: int | None, *, rejected: bool = False) -> None:
        """Remove a staged upload; a rejected one goes to quarantine when configured."""
        try:
            with storage.resolve(directory + (staging_name,), follow=False) as r:
                if rejected and self.uploads.quarantine is not None:
                    self._quarantine(storage, r, user, staging_name)
                else:
                    storage.unlink(r)
        except (FileNotFoundError, NotFound):
            pass  # already gone: only the record is left to forget
        except (OSError, FsError):
            log.exception("could not remove staged upload %s", staging_name)
            return
        self._forget(record_id)

    def _quarantine(self, storage: Storage, r: Resolved, user: str, staging_name: str) -> None:
        assert self.uploads.quarantine is not None
        qdir = self.uploads.quarantine / user
        qdir.mkdir(parents=True, exist_ok=True, mode=0o700)
        qfd = os.open(qdir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.rename(r.name, staging_name, src_dir_fd=r.dir_fd, dst_dir_fd=qfd)
        except OSError:  # another filesystem: copy then remove
            src = storage.open_file(r, os.O_RDONLY)
            dst = os.open(staging_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=qfd)
            try:
                copy_fd(src, dst)
            finally:
                os.close(src)
                os.close(dst)
            storage.unlink(r)
        finally:
            os.close(qfd)

    # --- after a crash ---------------------------------------------------------------------

    def recheck(self, records: "list[StagedRecord]", *, why: str = "after restart") -> int:
        """Check again, in the background, uploads a crash caught mid-check (this node's at
        its start, or a dead node's it took over); return how many.

        Every pre-publish binding runs (sync and async alike: no client waits any
        more); the file is published if all pass, else deleted or quarantined."""
        started = 0
        for rec in records:
            if rec.event is None:
                continue
            try:
                storage = self.open_storage(Path(rec.home))
            except OSError as exc:
                log.error("cannot recheck %s%s: home unavailable (%s); kept for the next start",
                          rec.directory, rec.final_name, exc)
                continue
            data = dict(rec.event)
            final = split(rec.directory) + (rec.final_name,)
            path = str(data.get("path") or join(final))
            scope = self.quotas.scope_for(rec.user, split(path)) if self.quotas is not None else None
            up = StagedUpload(storage, rec.user, path, final, rec.staging_name,
                              rec.id, bool(data.get("exists")), int(data.get("size") or 0), scope)
            try:
                with storage.resolve(up.staged, follow=False) as r:
                    st = storage.stat(r)
            except (OSError, FsError):
                storage.close()
                self._forget(rec.id)
                continue
            self.pending.add(storage.home, final, PendingUpload(st.st_size, st.st_mtime, st.st_mode, rec.id))
            self._submit(self._check_later, up, data, time.monotonic(), None, f"on recheck {why}")
            started += 1
        return started

    # --- lifetime ------------------------------------------------------------------------------

    def busy(self) -> bool:
        with self._idle:
            return self._running > 0

    def busy_count(self) -> int:
        """Background (async) upload checks running now."""
        with self._idle:
            return self._running

    def close(self, timeout: float) -> None:
        """Wait up to ``timeout`` for background checks; unfinished ones are rechecked next start."""
        with self._idle:
            self._idle.wait_for(lambda: self._running == 0, timeout=timeout)
            left = self._running
        if left:
            log.warning("%d upload check(s) still running at shutdown: they run again at the next start", left)
        self._pool.shutdown(wait=False, cancel_futures=True)


_COMMON = ("session_id", "protocol", "remote_ip", "user", "folder")  # as the pre-publish had them


def _common(data: dict[str, Any]) -> dict[str, Any]:
    return {k: data[k] for k in _COMMON if k in data}


def _rebuild(data: dict[str, Any]) -> ev.PrePublish:
    fields = {k: v for k, v in data.items() if k != "name"}
    return ev.PrePublish(**fields)


def _ctx(data: dict[str, Any], path: str) -> dict[str, Any]:
    return {"sid": data.get("session_id", ""), "user": data.get("user", ""), "proto": data.get("protocol", ""),
            "ip": data.get("remote_ip", ""), "op": "publish", "path": path}

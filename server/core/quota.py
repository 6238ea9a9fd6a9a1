"""Quotas: what a home or a virtual folder holds, and what a user moves in a UTC day.

Usage is counted where a published file changes, never from what is being uploaded:
the Publisher adds the difference at the atomic rename (the new size less the size of
the file it replaces, one file more when it is new), the Session subtracts at delete and
at a rename that replaces a file. So a vetoed, aborted, failed or quarantined upload,
which never reaches the rename, is never counted. The numbers live in a
:class:`UsageLedger` (the account database; :class:`MemoryLedger` for tests), shared by
every process that changes files, and ``scriptsftp quota scan`` sets them from the disk.

A path's *scope* is the first of the account's mounts (deepest first) that holds it,
with that folder's quota shared by every user who mounts it, else the user's home.

Quotas are checked twice: when an upload opens (at or over the limit: refused before any
byte, and the handle is given the size it may reach, :class:`TransferLimit`, which the
process that moves the bytes enforces), and at the rename, exactly, under the scope's lock
(two uploads that each fit may not fit together). A limit of 0 means none.
"""

from __future__ import annotations

import datetime
import logging
import os
import stat as statmod
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol, Sequence
from contextlib import contextmanager

from scriptsftp.server.contract import events as ev
from scriptsftp.server.contract.errors import Failure, QuotaExceeded
from scriptsftp.server.contract.ports import TransferLimit
from scriptsftp.server.core.limits import Mount, Quota, Rates
from scriptsftp.server.core.mounts import find_mount
from scriptsftp.server.core.vfs import STAGING_PREFIX

log = logging.getLogger("scriptsftp.quota")


class UsageLedger(Protocol):
    """Where usage is kept: the account database's usage methods (``AccountDb`` fits).

    ``scope`` is ``"user:NAME"`` or ``"folder:NAME"``; ``day`` a UTC date ``"YYYY-MM-DD"``.
    Totals never go below 0; ``add_*`` are atomic and return the new totals."""

    def usage(self, scope: str) -> tuple[int, int]: ...

    def add_usage(self, scope: str, bytes_delta: int, files_delta: int) -> tuple[int, int]: ...

    def set_usage(self, scope: str, size: int, files: int) -> None: ...

    def transfer_usage(self, user: str, day: str) -> tuple[int, int]: ...

    def add_transfer(self, user: str, day: str, up: int, down: int) -> tuple[int, int]: ...


class MemoryLedger:
    """A :class:`UsageLedger` in memory: the unit tier's, and a daemon's without a database."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._usage: dict[str, tuple[int, int]] = {}
        self._transfer: dict[tuple[str, str], tuple[int, int]] = {}

    def usage(self, scope: str) -> tuple[int, int]:
        with self._lock:
            return self._usage.get(scope, (0, 0))

    def add_usage(self, scope: str, bytes_delta: int, files_delta: int) -> tuple[int, int]:
        with self._lock:
            size, files = self._usage.get(scope, (0, 0))
            totals = self._usage[scope] = (max(0, size + bytes_delta), max(0, files + files_delta))
            return totals

    def set_usage(self, scope: str, size: int, files: int) -> None:
        with self._lock:
            self._usage[scope] = (max(0, size), max(0, files))

    def transfer_usage(self, user: str, day: str) -> tuple[int, int]:
        with self._lock:
            return self._transfer.get((user, day), (0, 0))

    def add_transfer(self, user: str, day: str, up: int, down: int) -> tuple[int, int]:
        with self._lock:
            was_up, was_down = self._transfer.get((user, day), (0, 0))
            totals = self._transfer[(user, day)] = (max(0, was_up + up), max(0, was_down + down))
            return totals


class QuotaHolder(Protocol):
    """What a scope is worked out from: the core's ``Account`` (this module may not import
    the session, which imports it)."""

    @property
    def name(self) -> str: ...

    @property
    def quota(self) -> Quota: ...

    @property
    def folders(self) -> tuple[Mount, ...]: ...


@dataclass(frozen=True)
class Scope:
    """Whose quota a path counts against: ``key`` in the ledger, ``folder`` its virtual
    folder's name ("" for the home), ``quota`` its limits."""

    key: str
    folder: str
    quota: Quota

    def where(self) -> str:
        """How a message names it."""
        return f"folder {self.folder}" if self.folder else "your home"


def scope_of(account: QuotaHolder, parts: Sequence[str], mounts: Sequence[Mount] | None = None) -> Scope:
    """``mounts``: where the path's bytes go when that is not the account's own mounts (a
    session keeps the mounts it logged in with while a reload changes the account's); the
    quotas are always the account's of now (a folder no longer mounted keeps the last one)."""
    mount = find_mount(account.folders if mounts is None else tuple(mounts), tuple(parts))
    if mount is not None:
        quota = next((m.quota for m in account.folders if m.folder == mount.folder), mount.quota)
        return Scope(f"folder:{mount.folder}", mount.folder, quota)
    return Scope(f"user:{account.name}", "", account.quota)


def utc_day(now: datetime.datetime | None = None) -> str:
    """The day a transfer counts on: its end, in UTC."""
    return (now or datetime.datetime.now(datetime.timezone.utc)).strftime("%Y-%m-%d")


def human(n: int) -> str:
    """Bytes as a person reads them in a refusal: "10 MiB", "1.5 GiB", "512 bytes"."""
    size = float(n)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            text = f"{size:.1f}".removesuffix(".0") if unit != "bytes" else str(n)
            return f"{text} {unit}"
        size /= 1024
    return f"{n} bytes"  # not reached


class Quotas:
    """The accounting, one per daemon: shared by the Publisher (the rename) and every
    Session (checks at open, deletes, renames). Thread-safe."""

    def __init__(self, ledger: UsageLedger, thresholds: Sequence[int] = ()) -> None:
        self.ledger = ledger
        self.thresholds: tuple[int, ...] = tuple(sorted(set(thresholds)))
        """``[accounts] quota_thresholds`` (a reload replaces it)."""
        self._locks: dict[str, threading.Lock] = {}
        self._locks_lock = threading.Lock()
        self.accounts: Callable[[str], QuotaHolder | None] = lambda name: None
        """The account of a user by name, for uploads published with no session (checked
        again after a restart); set by the daemon."""

    def scope_for(self, user: str, parts: Sequence[str]) -> Scope | None:
        """The scope of a path of ``user``'s, looked up by name (None: no such user now)."""
        account = self.accounts(user)
        return None if account is None else scope_of(account, parts)

    @contextmanager
    def guard(self, scope: Scope) -> Iterator[None]:
        """Held around "stat what is replaced, change it, count it", so that two changes of
        one scope (two overwrites of one path) never count the same old size twice."""
        with self._locks_lock:
            lock = self._locks.setdefault(scope.key, threading.Lock())
        with lock:
            yield

    # --- checks ---------------------------------------------------------------------

    def upload_limit(self, scope: Scope, path: str, replaced: int | None) -> int | None:
        """At upload start: refuse when the scope is at or over its quota; else the largest
        size the file may grow to (None: no size quota). ``replaced``: the size of the
        published file the upload will replace (None: a new file)."""
        q = scope.quota
        if not q.limited:
            return None
        size, files = self._usage(scope, path)
        if q.files and replaced is None and files >= q.files:
            raise QuotaExceeded(f"{path}: quota exceeded: {scope.where()} holds {files} files, "
                                f"the limit is {q.files}")
        if not q.size:
            return None
        room = q.size - size + (replaced or 0)
        if room <= 0:
            raise QuotaExceeded(f"{path}: quota exceeded: {scope.where()} holds {human(size)}, "
                                f"the limit is {human(q.size)}")
        return room

    def _usage(self, scope: Scope, path: str) -> tuple[int, int]:
        """The ledger's figures for a check; a ledger that cannot answer (the database gone)
        refuses the upload rather than let a quota pass unchecked."""
        try:
            return self.ledger.usage(scope.key)
        except Exception as exc:
            log.error("quota of %s cannot be read: %s", scope.key, exc)
            raise Failure(f"{path}: the quota cannot be checked now; try again later") from None

    def size_reason(self, scope: Scope) -> str:
        return f"quota exceeded: {scope.where()} may hold {human(scope.quota.size)}"

    def check_publish(self, scope: Scope, path: str, new_size: int, replaced: int | None) -> None:
        """At the rename, under :meth:`guard`: the exact check. Only growth is refused, so a
        file that shrinks is published even in a scope over a lowered limit."""
        q = scope.quota
        if not q.limited:
            return
        size, files = self._usage(scope, path)
        grow = new_size - (replaced or 0)
        if q.size and grow > 0 and size + grow > q.size:
            raise QuotaExceeded(f"{path}: quota exceeded: {scope.where()} may hold {human(q.size)} "
                                f"and holds {human(size)}; this file needs {human(grow)} more")
        if q.files and replaced is None and files + 1 > q.files:
            raise QuotaExceeded(f"{path}: quota exceeded: {scope.where()} may hold {q.files} files")

    # --- counting -------------------------------------------------------------------

    def count(self, scope: Scope, bytes_delta: int, files_delta: int,
              who: dict[str, Any] | None = None) -> list[ev.QuotaThreshold]:
        """Add a change to the ledger; the ``quota-threshold`` events it raises (for the
        caller to post: this module dispatches nothing), one per threshold crossed upwards.
        ``who``: the session fields of the event (session_id, protocol, remote_ip, user)."""
        if not bytes_delta and not files_delta:
            return []
        try:
            size, files = self.ledger.add_usage(scope.key, bytes_delta, files_delta)
        except Exception as exc:
            # the file changed already and must not be reported as failed: the figure is off
            # until the next `scriptsftp quota scan`, which the line says
            log.error("quota usage of %s not updated (%+d bytes, %+d files): %s; run `scriptsftp quota scan`",
                      scope.key, bytes_delta, files_delta, exc)
            return []
        try:
            return self._crossed(scope, size, files, bytes_delta, files_delta, who or {})
        except Exception:  # never fail a change that happened over an event it raises
            log.exception("quota-threshold of %s not raised", scope.key)
            return []

    def _crossed(self, scope: Scope, size: int, files: int, bytes_delta: int, files_delta: int,
                 who: dict[str, Any]) -> list[ev.QuotaThreshold]:
        q = scope.quota
        if not self.thresholds or not q.limited:
            return []
        session = {k: who[k] for k in ("session_id", "protocol", "remote_ip", "user") if k in who}
        out: list[ev.QuotaThreshold] = []
        for kind, limit, now, delta in (("size", q.size, size, bytes_delta), ("files", q.files, files, files_delta)):
            if not limit or delta <= 0:
                continue
            before = now - delta
            for percent in self.thresholds:
                mark = limit * percent / 100
                if before < mark <= now:
                    out.append(ev.QuotaThreshold(**session, folder=scope.folder, kind=kind, percent=percent,
                                                 used=now, limit=limit))
        return out

    # --- transfer quotas ----------------------------------------------------------------

    def transfer_limit(self, user: str, rates: Rates, direction: str, path: str) -> int | None:
        """At transfer start: the bytes this upload (``"up"``) or download (``"down"``) may
        still move today; refused when none. None: no daily quota."""
        daily = rates.up_daily if direction == "up" else rates.down_daily
        if not daily:
            return None
        try:
            up, down = self.ledger.transfer_usage(user, utc_day())
        except Exception as exc:
            log.error("daily transfer of %s cannot be read: %s", user, exc)
            raise Failure(f"{path}: the transfer quota cannot be checked now; try again later") from None
        left = daily - (up if direction == "up" else down)
        if left <= 0:
            raise QuotaExceeded(f"{path}: {self.transfer_reason(rates, direction)}")
        return left

    @staticmethod
    def transfer_reason(rates: Rates, direction: str) -> str:
        daily, what = (rates.up_daily, "upload") if direction == "up" else (rates.down_daily, "download")
        return f"daily {what} quota of {human(daily)} reached; try again after midnight UTC"

    def limits(self, scope: Scope, path: str, replaced: int | None, user: str, rates: Rates) -> TransferLimit | None:
        """Both checks of an upload's start, as the limit its handle carries."""
        end = self.upload_limit(scope, path, replaced)
        moved = self.transfer_limit(user, rates, "up", path)
        if end is None and moved is None:
            return None
        return TransferLimit(end, moved, self.size_reason(scope), self.transfer_reason(rates, "up"))

    def transferred(self, user: str, up: int = 0, down: int = 0) -> None:
        """Bytes a finished or aborted transfer moved, on today's count (every byte moved
        counts, whether or not the upload was published)."""
        if up or down:
            try:
                self.ledger.add_transfer(user, utc_day(), up, down)
            except Exception as exc:
                log.error("daily transfer of %s not counted (%d up, %d down): %s", user, up, down, exc)


def recount(root: os.PathLike[str] | str, skip: Sequence[os.PathLike[str] | str] = ()) -> tuple[int, int]:
    """What a scope holds on disk: bytes and count of the regular files under ``root``,
    as the ledger counts them: staged uploads (hidden names) left out, symlinks neither
    followed nor counted, and ``skip`` (host paths: other scopes' directories inside this
    one) left out. A directory that cannot be read is an error, not a silent zero."""
    size = files = 0
    skipped = {os.path.realpath(p) for p in skip}
    stack = [os.fspath(root)]
    while stack:
        directory = stack.pop()
        with os.scandir(directory) as entries:
            for entry in entries:
                if entry.name.startswith(STAGING_PREFIX):
                    continue
                st = entry.stat(follow_symlinks=False)
                if statmod.S_ISDIR(st.st_mode):
                    if os.path.realpath(entry.path) not in skipped:
                        stack.append(entry.path)
                elif statmod.S_ISREG(st.st_mode):
                    size += st.st_size
                    files += 1
    return size, files


__all__ = ["MemoryLedger", "QuotaHolder", "Quotas", "Scope", "UsageLedger", "human", "recount", "scope_of",
           "utc_day"]

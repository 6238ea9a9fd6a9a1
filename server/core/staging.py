"""Durable records of uploads in progress, so a crash never leaves a staged file behind.

Each staged upload (a hidden ``.scriptsftp-part-*`` file beside its target) is
recorded in SQLite under ``state_dir`` before the first byte is written and
forgotten once it is published or discarded. A record is in one of two states:

- ``upload``: bytes are still arriving. After a crash the client never finished,
  so the staged file is deleted on the next start.
- ``check``: every byte arrived and the pre-publish checks are running (in sync
  mode while the client waits, in async mode in the background). The record then
  also holds the ``pre-publish`` event, so that after a crash the file can be
  checked again (``[uploads] on_restart = "recheck"``) or deleted (``"discard"``);
  it is never published unchecked.

Records live in the ``staging`` state database (:mod:`scriptsftp.server.contract.state`),
not in memory, so several server processes can later share them (docs/architecture.md rule 10).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scriptsftp.server.contract.errors import Failure, NoSpace, NotFound
from scriptsftp.server.contract.state import StateStoreFactory
from scriptsftp.server.core.storage import LocalStorage, StorageOpener
from scriptsftp.server.core.vfs import split

UPLOADING = "upload"
CHECKING = "check"


@dataclass(frozen=True)
class StagedRecord:
    id: int
    user: str
    home: str
    directory: str  # virtual directory of the target
    staging_name: str
    final_name: str
    created: float
    state: str = UPLOADING
    event: dict[str, Any] | None = None  # the pre-publish event, once state is CHECKING


@contextmanager
def _as_client_error() -> Iterator[None]:
    """A failed record is a failed upload, answered like one: a full state_dir is "no space"
    (FTP 452, HTTP 507, SFTP failure with that text), anything else a plain failure. Never
    a raw sqlite3 error, which the front ends would answer with a dropped connection."""
    try:
        yield
    except sqlite3.Error as exc:
        if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "full" in str(exc):
            raise NoSpace("the server's state storage is full; try again later") from exc
        raise Failure("the server could not record the upload") from exc


class StagingRecords:
    """Raises :class:`~.errors.FsError` (never ``sqlite3.Error``) from every method."""

    def __init__(self, stores: StateStoreFactory) -> None:
        self._db = stores.connect("staging")
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS staged (id INTEGER PRIMARY KEY, user TEXT, home TEXT,"
                " directory TEXT, staging_name TEXT, final_name TEXT, created REAL)"
            )
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(staged)")}
            if "state" not in columns:  # state dirs written by 0.1 before async publish
                self._db.execute(f"ALTER TABLE staged ADD COLUMN state TEXT NOT NULL DEFAULT '{UPLOADING}'")
                self._db.execute("ALTER TABLE staged ADD COLUMN event TEXT")

    def add(self, user: str, home: str, directory: str, staging_name: str, final_name: str) -> int:
        with self._lock, _as_client_error():
            cur = self._db.execute(
                "INSERT INTO staged (user, home, directory, staging_name, final_name, created)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (user, home, directory, staging_name, final_name, time.time()),
            )
            return int(cur.lastrowid or 0)

    def checking(self, record_id: int, event: dict[str, Any]) -> None:
        """All bytes arrived: from now on a crash means "check again", not "discard"."""
        with self._lock, _as_client_error():
            self._db.execute("UPDATE staged SET state = ?, event = ? WHERE id = ?",
                             (CHECKING, json.dumps(event), record_id))

    def remove(self, record_id: int) -> None:
        with self._lock, _as_client_error():
            self._db.execute("DELETE FROM staged WHERE id = ?", (record_id,))

    def leftovers(self) -> list[StagedRecord]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, user, home, directory, staging_name, final_name, created, state, event FROM staged"
            ).fetchall()
        return [StagedRecord(id=row[0], user=row[1], home=row[2], directory=row[3], staging_name=row[4],
                             final_name=row[5], created=row[6], state=row[7],
                             event=json.loads(row[8]) if row[8] else None) for row in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()


def discard_leftovers(records: StagingRecords, *, keep_checking: bool = False,
                      open_storage: StorageOpener = LocalStorage) -> int:
    """Delete the staged files a crash left behind; return how many were removed.

    With ``keep_checking``, uploads that had fully arrived and were being checked
    are kept for :func:`scriptsftp.server.core.publish.recheck_leftovers`. The staging
    name is looked up relative to the recorded home; a home or directory that
    vanished since simply has nothing to clean. The files go through the same confined
    walk as client operations (``open_storage`` on the recorded home)."""
    removed = 0
    for rec in records.leftovers():
        if keep_checking and rec.state == CHECKING and rec.event is not None:
            continue
        try:
            storage = open_storage(Path(rec.home))
        except OSError:
            continue  # home unavailable: keep the record, try again next start
        try:
            with storage.resolve(split(rec.directory) + (rec.staging_name,), follow=False) as r:
                storage.unlink(r)
            removed += 1
        except (FileNotFoundError, NotFound):
            pass  # already gone
        except Exception:
            storage.close()
            continue
        storage.close()
        records.remove(rec.id)
    return removed

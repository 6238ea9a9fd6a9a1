"""Durable records of uploads in progress, so a crash never leaves a staged file behind.

Each staged upload (a hidden ``.scriptsftp-part-*`` file beside its target) is
recorded in SQLite under ``state_dir`` before the first byte is written and
forgotten once it is published or discarded. On start the daemon reads what is
left: those uploads were interrupted by a crash. Records live in SQLite, not in
memory, so several server processes can later share them (DESIGN.md rule 10).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class StagedRecord:
    id: int
    user: str
    home: str
    directory: str  # virtual directory of the target
    staging_name: str
    final_name: str
    created: float


class StagingRecords:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS staged (id INTEGER PRIMARY KEY, user TEXT, home TEXT,"
                " directory TEXT, staging_name TEXT, final_name TEXT, created REAL)"
            )

    def add(self, user: str, home: str, directory: str, staging_name: str, final_name: str) -> int:
        with self._lock:
            cur = self._db.execute(
                "INSERT INTO staged (user, home, directory, staging_name, final_name, created)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (user, home, directory, staging_name, final_name, time.time()),
            )
            return int(cur.lastrowid or 0)

    def remove(self, record_id: int) -> None:
        with self._lock:
            self._db.execute("DELETE FROM staged WHERE id = ?", (record_id,))

    def leftovers(self) -> list[StagedRecord]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, user, home, directory, staging_name, final_name, created FROM staged"
            ).fetchall()
        return [StagedRecord(*row) for row in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()


def discard_leftovers(records: StagingRecords) -> int:
    """Delete every staged file a crash left behind; return how many were removed.

    The staging name is looked up relative to the recorded home; a home or
    directory that vanished since simply has nothing to clean."""
    from .storage import Storage  # the same confined walk as client operations
    from .errors import NotFound
    from .vfs import split

    removed = 0
    for rec in records.leftovers():
        try:
            storage = Storage(Path(rec.home))
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

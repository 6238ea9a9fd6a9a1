"""SQLite state databases in ``state_dir``, all opened one way.

Every state database is in WAL mode (readers never wait for the writer, and
several processes may share the file) with ``synchronous=NORMAL`` (a committed
write survives a crash of the server; the last transactions may be lost on a
power failure), autocommit (``BEGIN IMMEDIATE`` where a store needs a
read-modify-write) and usable from any thread (each store serialises its own
calls). What differs between them is an explicit argument of :func:`open_sqlite`,
and the table :data:`DATABASES` says which database takes which.

:class:`~.state.StateStores` opens them; with ``[cluster] database`` the shared ones are
PostgreSQL instead (:mod:`.state`).
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from scriptsftp.server.contract.state import StateName


def open_sqlite(
    path: Path, *, busy_timeout: float = 5.0, private: bool = False, auto_vacuum: str | None = None,
) -> sqlite3.Connection:
    """Open (creating it and its directory if missing) the state database at ``path``.

    ``busy_timeout``: seconds a statement waits for another connection's lock before
    "database is locked". ``private``: a new file is created readable by its owner only
    (it holds what scripts stored). ``auto_vacuum``: set on a new file (``INCREMENTAL``
    lets a store that deletes old rows give the space back)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if private and not path.exists():
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    db = sqlite3.connect(str(path), timeout=busy_timeout, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    if auto_vacuum is not None:
        db.execute(f"PRAGMA auto_vacuum={auto_vacuum}")
    return db


@dataclass(frozen=True)
class SQLiteDatabase:
    """One state database: its file in ``state_dir`` and how it is opened."""

    file: str
    busy_timeout: float = 5.0
    private: bool = False
    auto_vacuum: str | None = None


DATABASES: dict[StateName, SQLiteDatabase] = {
    "staging": SQLiteDatabase("staging.db"),
    # written by one thread from a queue; a reader (/api/events) may hold it a while
    "audit": SQLiteDatabase("audit.sqlite3", busy_timeout=30.0, auto_vacuum="INCREMENTAL"),
    "bans": SQLiteDatabase("defender.db"),
    "script-store": SQLiteDatabase("script-store.sqlite3", busy_timeout=10.0, private=True),
    "outbox": SQLiteDatabase("outbox.sqlite3", busy_timeout=10.0, private=True),
    # one claim per cron minute a binding fired (scripting/schedule_claims.py)
    "schedule": SQLiteDatabase("schedule.sqlite3", busy_timeout=10.0),
}


__all__ = ["DATABASES", "SQLiteDatabase", "open_sqlite"]

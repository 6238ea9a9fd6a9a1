"""The one migration runner of every database scriptsftp keeps (the account database and the
state stores), on SQLite and PostgreSQL alike.

Where a database records its schema version differs (the state stores: one row per store in
``state_schema``; the account database: its own ``schema_version`` table, kept so that
existing databases open as before), so that part is a :class:`VersionBook`. What is the same
for all is here: each step in its own transaction, one upgrader at a time on PostgreSQL (an
advisory lock, so nodes starting together apply each step once), and the rule that lets a
cluster be upgraded one node at a time:

- each step declares whether the previous release can run against the schema it makes
  (:class:`~scriptsftp.server.contract.state.Migration` ``compatible``);
- the runner records, with the version, the oldest schema version a scriptsftp must know
  to use the database (``min_code``, table ``schema_compat``): ``version - 1`` after a
  compatible step, ``version`` after any other;
- a scriptsftp whose last step is below the database's version runs against it when it
  knows at least ``min_code`` (and changes nothing), and refuses in one line otherwise.

A database whose version has no row of its own in ``schema_compat`` (migrated before it
existed, or a version recorded by hand) has its version as ``min_code``: nothing unknown is
taken as compatible.
"""

from __future__ import annotations

from typing import Callable, Protocol

from scriptsftp.server.contract.state import Cursor, Migration, Migrations, SqlDatabase


class SchemaTooNew(RuntimeError):
    """The database was migrated by a newer scriptsftp that the running one cannot work with."""


class VersionBook(Protocol):
    """Where one database records its schema version; ``name`` keys its ``schema_compat`` row."""

    name: str

    def read(self, cur: Cursor) -> int:
        """The version applied last, 0 for none; creates the book's table if missing."""
        ...

    def record(self, cur: Cursor, version: int) -> None: ...


class StateBook:
    """The state stores' book: one row per store in ``state_schema``."""

    def __init__(self, store: str) -> None:
        self.name = store

    def read(self, cur: Cursor) -> int:
        cur.execute("CREATE TABLE IF NOT EXISTS state_schema (store TEXT PRIMARY KEY, version INTEGER NOT NULL)")
        row = cur.execute("SELECT version FROM state_schema WHERE store = ?", (self.name,)).fetchone()
        return int(row[0]) if row else 0

    def record(self, cur: Cursor, version: int) -> None:
        cur.execute("INSERT INTO state_schema (store, version) VALUES (?, ?) ON CONFLICT (store) "
                    "DO UPDATE SET version = excluded.version", (self.name, version))


def steps(migrations: Migrations) -> list[Migration]:
    """``migrations`` as :class:`Migration` steps (a plain tuple is a step not compatible)."""
    return [m if isinstance(m, Migration) else Migration(m[0], m[1]) for m in migrations]


def latest(migrations: Migrations) -> int:
    return max((m.version for m in steps(migrations)), default=0)


_COMPAT_TABLE = ("CREATE TABLE IF NOT EXISTS schema_compat (name TEXT PRIMARY KEY, version INTEGER NOT NULL, "
                 "min_code INTEGER NOT NULL)")


def _min_code(cur: Cursor, book: VersionBook, version: int) -> int:
    """The oldest schema a scriptsftp must know to use ``version``: what the step that made
    it declared, or ``version`` itself when no step declared anything for it (a step recorded
    by a runner from before ``schema_compat``, or by hand)."""
    cur.execute(_COMPAT_TABLE)
    row = cur.execute("SELECT version, min_code FROM schema_compat WHERE name = ?", (book.name,)).fetchone()
    return int(row[1]) if row and int(row[0]) == version else version


def _record_min_code(cur: Cursor, book: VersionBook, version: int, min_code: int) -> None:
    cur.execute(_COMPAT_TABLE)
    cur.execute("INSERT INTO schema_compat (name, version, min_code) VALUES (?, ?, ?) ON CONFLICT (name) "
                "DO UPDATE SET version = excluded.version, min_code = excluded.min_code",
                (book.name, version, min_code))


def _refuse_if_too_new(cur: Cursor, db: SqlDatabase, book: VersionBook, what: str, current: int, known: int,
                       too_new: Callable[[str], Exception]) -> None:
    if current <= known:
        return
    needs = _min_code(cur, book, current)
    if needs > known:
        raise too_new(f"{db.where}: {what} has schema {current} (usable from {needs} on), newer than this "
                      f"scriptsftp's {known}: upgrade scriptsftp")


def check(db: SqlDatabase, book: VersionBook, migrations: Migrations, what: str,
          too_new: Callable[[str], Exception] = SchemaTooNew) -> int:
    """The database's version, after refusing (``too_new``) a schema this code cannot use."""
    known = latest(migrations)
    with db.transaction() as cur:
        current = book.read(cur)
        _refuse_if_too_new(cur, db, book, what, current, known, too_new)
        return current


def migrate(db: SqlDatabase, book: VersionBook, migrations: Migrations, *, what: str, lock: int,
            too_new: Callable[[str], Exception] = SchemaTooNew) -> list[int]:
    """Apply the steps of ``migrations`` the database lacks, each in its own transaction
    (on PostgreSQL under the advisory lock ``lock``); the versions applied. A schema newer
    than the last step is used as it is when it allows this code, else ``too_new`` is raised
    with a one-line message naming ``what`` ("the account database", "the audit store")."""
    applied: list[int] = []
    known = latest(migrations)
    for step in steps(migrations):
        with db.transaction() as cur:
            if db.dialect.name == "postgresql":
                cur.execute("SELECT pg_advisory_xact_lock(?)", (lock,))
            current = book.read(cur)
            _refuse_if_too_new(cur, db, book, what, current, known, too_new)
            if current >= step.version:
                continue
            for sql in step.statements:
                cur.execute(db.dialect.render(sql))
            book.record(cur, step.version)
            _record_min_code(cur, book, step.version, step.version - 1 if step.compatible else step.version)
            applied.append(step.version)
    return applied


__all__ = ["SchemaTooNew", "StateBook", "VersionBook", "check", "latest", "migrate", "steps"]

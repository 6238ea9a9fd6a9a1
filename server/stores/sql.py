"""One SQL database, SQLite or PostgreSQL, behind the same few calls.

The account database runs the same statements on both engines: they are written
with ``?`` placeholders and a handful of dialect words in braces (``{id}``,
``{greatest}``), which :class:`Dialect` fills in. Work happens in transactions
(:meth:`SqlDatabase.transaction`): SQLite's ``BEGIN IMMEDIATE`` takes the write lock
at once (two writers never deadlock on an upgrade from read to write); PostgreSQL
runs each transaction on a pooled connection.

Connections are per thread for SQLite (WAL: readers run in parallel with the one
writer) and from a bounded pool for PostgreSQL (a server process per connection is
too dear to keep one per thread of a busy daemon).
"""

from __future__ import annotations

import re
import sqlite3
import threading
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from scriptsftp.server.contract.state import Cursor, Dialect, Row, SqlDatabase
from scriptsftp.server.stores.sqlite import open_sqlite

# bytewise: text ordered by code point (what SQLite does by default) whatever the PostgreSQL
# database's collation, so listings and dumps come out in one order on both engines
SQLITE = Dialect("sqlite", {
    "id": "INTEGER PRIMARY KEY AUTOINCREMENT",
    "greatest": "max",
    "bytewise": "COLLATE BINARY",
    "without_rowid": "WITHOUT ROWID",
    "for_update": "",
    "seq_column": "",
    "insert_order": "rowid",
    "glob": "GLOB",
})
POSTGRESQL = Dialect("postgresql", {
    "id": "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
    "greatest": "GREATEST",
    "bytewise": 'COLLATE "C"',
    "without_rowid": "",
    "for_update": "FOR UPDATE",
    # what SQLite's rowid gives (the order rows were inserted in): a column of its own
    "seq_column": ", seq BIGINT GENERATED ALWAYS AS IDENTITY",
    "insert_order": "seq",
    # SQLite's GLOB on PostgreSQL: the pattern is turned into a regular expression by the caller
    "glob": "~",
})

#: a password in a PostgreSQL URL, hidden in messages and logs
_URL_PASSWORD = re.compile(r"(://[^:/@]*:)[^@]*@")


def redact_url(url: str) -> str:
    return _URL_PASSWORD.sub(r"\1***@", url)


class _ThreadConnection:
    """One thread's connection, closed when that thread ends (its ``threading.local`` value
    is dropped then) or by :meth:`SqliteDatabase.close`, whichever comes first.

    Why: the database kept every thread's connection in a list until the daemon stopped.
    Threads come and go with connections (an SSH worker's core link, an FTP session), so
    each login from a new thread left two descriptors and a page cache behind: the soak
    ended with the accounts database open 57 times after one minute of attack, and its
    main process at +800 descriptors after ten (bench/README.md "Soak")."""

    __slots__ = ("db", "__weakref__")

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __del__(self) -> None:
        try:
            self.db.close()
        except sqlite3.Error:
            pass


class SqliteDatabase:
    """A SQLite file; one connection per thread, closed when the thread ends."""

    dialect = SQLITE
    errors: tuple[type[BaseException], ...] = (sqlite3.Error,)

    def __init__(self, path: Path) -> None:
        self.path = path
        self.where = str(path)
        self._local = threading.local()
        self._all: weakref.WeakSet[_ThreadConnection] = weakref.WeakSet()  # the live threads' ones
        self._lock = threading.Lock()
        self._connect()  # create the file now: a bad state_dir fails at start, not at first login

    def _connect(self) -> sqlite3.Connection:
        held: _ThreadConnection | None = getattr(self._local, "conn", None)
        if held is None:
            db = open_sqlite(self.path, busy_timeout=10.0, private=True)
            db.execute("PRAGMA foreign_keys=ON")
            held = _ThreadConnection(db)
            self._local.conn = held
            with self._lock:
                self._all.add(held)
        return held.db

    @contextmanager
    def read(self) -> Iterator[Cursor]:
        """A deferred transaction: WAL readers take no lock a writer holds, so a read
        answers from the last commit at once instead of waiting out busy_timeout."""
        db = self._connect()
        db.execute("BEGIN")
        try:
            yield _SqliteCursor(db.cursor())
        finally:
            db.execute("COMMIT")

    @contextmanager
    def transaction(self) -> Iterator[Cursor]:
        db = self._connect()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield _SqliteCursor(db.cursor())
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            for held in list(self._all):
                try:
                    held.db.close()
                except sqlite3.Error:
                    pass
            self._all.clear()
        self._local = threading.local()


class _SqliteCursor:
    def __init__(self, cur: sqlite3.Cursor) -> None:
        self._cur = cur

    def execute(self, sql: str, params: Sequence[Any] = ()) -> "_SqliteCursor":
        self._cur.execute(sql, tuple(params))
        return self

    def fetchone(self) -> Row | None:
        row: Row | None = self._cur.fetchone()
        return row

    def fetchall(self) -> list[Row]:
        return list(self._cur.fetchall())

    @property
    def rowcount(self) -> int:
        return self._cur.rowcount


class SqliteStateDatabase:
    """A state store's SQLite file in ``state_dir``: one connection, one lock, as the stores
    had it before they could be shared (the speed of a single node does not change).
    ``read`` runs its statements in autocommit; ``transaction`` takes the write lock at
    once (``BEGIN IMMEDIATE``), so a read-modify-write stays exact with several processes
    on one file. Not reentrant: a store never nests them."""

    dialect = SQLITE
    errors: tuple[type[BaseException], ...] = (sqlite3.Error,)

    def __init__(self, db: sqlite3.Connection, where: str) -> None:
        self._db = db
        self.where = where
        self._lock = threading.Lock()

    @contextmanager
    def read(self) -> Iterator[Cursor]:
        with self._lock:
            yield _SqliteCursor(self._db.cursor())

    @contextmanager
    def transaction(self) -> Iterator[Cursor]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield _SqliteCursor(self._db.cursor())
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()


class PostgresDatabase:
    """A PostgreSQL database through psycopg 3, connections from a bounded pool."""

    dialect = POSTGRESQL
    errors: tuple[type[BaseException], ...]

    #: seconds a transaction waits for a connection while the server is known to be away
    OUTAGE_TIMEOUT = 1.0

    def __init__(self, url: str, *, max_connections: int = 8, timeout: float = 10.0,
                 name: str = "scriptsftp-accounts") -> None:
        import psycopg
        import psycopg_pool

        self.where = redact_url(url)
        self.errors = (psycopg.Error, psycopg_pool.PoolTimeout)
        self._unreachable = False
        # one plain connection first: an unreachable server or a refused login fails now with
        # the server's own reason, not as a pool timeout some seconds later
        psycopg.connect(url, connect_timeout=max(1, int(timeout))).close()
        # check: a connection is tried (an empty query) before it is lent. A server restart or
        # failover breaks every pooled connection at once, and unchecked the pool would lend
        # them one by one, each failing a login as if its account were gone.
        self._pool = psycopg_pool.ConnectionPool(
            url, min_size=1, max_size=max_connections, timeout=timeout, open=False,
            kwargs={"autocommit": False}, name=name,
            check=psycopg_pool.ConnectionPool.check_connection,
        )
        self._pool.open(wait=True, timeout=timeout)

    @contextmanager
    def transaction(self) -> Iterator[Cursor]:
        """``timeout`` (10 s) is how long a transaction waits for a busy pool. Once a wait has
        failed for want of the server, the next ones wait ``OUTAGE_TIMEOUT`` until one gets a
        connection again: while PostgreSQL is down, a login of a database user (or of a name
        nobody has) is refused in a second instead of holding a login slot for ten."""
        import psycopg
        import psycopg_pool

        try:
            conn = self._pool.getconn(timeout=self.OUTAGE_TIMEOUT if self._unreachable else None)
        except (psycopg_pool.PoolTimeout, psycopg.OperationalError):
            self._unreachable = True
            raise
        self._unreachable = False
        try:
            with conn:  # commits at the end, rolls back on an exception (as pool.connection() does)
                with conn.cursor() as cur:
                    yield _PostgresCursor(cur)
        finally:
            self._pool.putconn(conn)

    def read(self) -> Any:
        """PostgreSQL's readers never wait for writers: a read is a transaction."""
        return self.transaction()

    def close(self) -> None:
        self._pool.close()


class _PostgresCursor:
    def __init__(self, cur: Any) -> None:
        self._cur = cur

    def execute(self, sql: str, params: Sequence[Any] = ()) -> "_PostgresCursor":
        # "?" never appears in our statements except as a placeholder
        self._cur.execute(sql.replace("%", "%%").replace("?", "%s"), tuple(params))
        return self

    def fetchone(self) -> Row | None:
        row = self._cur.fetchone()
        return None if row is None else tuple(row)

    def fetchall(self) -> list[Row]:
        return [tuple(r) for r in self._cur.fetchall()]

    @property
    def rowcount(self) -> int:
        return int(self._cur.rowcount)


def open_database(url: str, sqlite_path: Path) -> SqlDatabase:
    """``url`` empty: the SQLite file; else a ``postgresql://`` URL."""
    if url:
        return PostgresDatabase(url)
    return SqliteDatabase(sqlite_path)

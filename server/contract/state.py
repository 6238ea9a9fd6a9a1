"""Where state that outlives a request is kept: the seam every state store opens its
database through.

Six stores keep state between requests and restarts: the staging records
(``staging``), the audit trail (``audit``), the defender's bans and scores
(``bans``), the scripts' key/value store (``script-store``), the notification
outbox (``outbox``) and the schedule's claims on cron minutes (``schedule``). None of
them opens a file itself: each is handed a
:class:`StateStoreFactory` and asks it for its database by name. The daemon makes
the one factory (``scriptsftp.server.stores.StateStores``) and hands it down, to
scripting/ too, which may import only this contract from server/.

Every store gets its database from :meth:`StateStoreFactory.database`: an
:class:`SqlDatabase`, SQLite in ``state_dir`` on one node or the PostgreSQL database of
``[cluster] database`` that every node shares. The store's statements are one set for both
engines (``?`` placeholders, the few words that differ in braces, filled by its
:class:`Dialect`), and its schema is a list of numbered migrations the factory applies
before handing the database over. :meth:`StateStoreFactory.connect` (this node's SQLite
file, a ``sqlite3.Connection``) is what ``database`` builds on for SQLite.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import Any, Literal, Protocol, Sequence

#: the databases a factory knows, by the name a store asks for
StateName = Literal["staging", "audit", "bans", "script-store", "outbox", "schedule"]

Row = tuple[Any, ...]

@dataclass(frozen=True)
class Migration:
    """One step of a store's schema. ``compatible``: the previous release (which knows
    every step up to ``version - 1``) still runs correctly against the schema this step
    makes, so a cluster can be upgraded one node at a time (docs/cluster.md, "Rolling
    upgrade"). A plain ``(version, statements)`` tuple is a step that is not."""

    version: int
    statements: Sequence[str]
    compatible: bool = False


#: a store's schema, append only; a released step is never edited
Migrations = Sequence[Migration | tuple[int, Sequence[str]]]


class Cursor(Protocol):
    """What a transaction offers: statements with ``?`` placeholders, rows as tuples."""

    def execute(self, sql: str, params: Sequence[Any] = ()) -> "Cursor": ...

    def fetchone(self) -> Row | None: ...

    def fetchall(self) -> list[Row]: ...

    @property
    def rowcount(self) -> int: ...


@dataclass(frozen=True)
class Dialect:
    """The words that differ between the engines, by the name used in braces."""

    name: str
    words: dict[str, str]

    def render(self, sql: str) -> str:
        return sql.format(**self.words)


class SqlDatabase(Protocol):
    dialect: Dialect

    #: for messages: the file, or the URL without its password
    where: str

    #: the exceptions that mean "the database failed" (unreachable, broken, full), whatever
    #: the engine: a store catches these, never a driver's by name
    errors: tuple[type[BaseException], ...]

    def transaction(self) -> Any:
        """A context manager yielding a :class:`Cursor`; commits on success, rolls back on error."""
        ...

    def read(self) -> Any:
        """As :meth:`transaction`, for statements that only read."""
        ...

    def close(self) -> None: ...


class StateStoreFactory(Protocol):
    #: this node's name ([cluster] node, else the host name)
    node: str

    def connect(self, name: StateName) -> sqlite3.Connection:
        """A new connection to this node's SQLite database ``name``, ready to use: created
        if missing, journal, durability and lock wait set as that database needs.
        Autocommit (``BEGIN`` is explicit), not bound to a thread; the caller closes it."""
        ...

    def database(self, name: StateName, migrations: Migrations) -> SqlDatabase:
        """The database ``name``, its schema brought to the last of ``migrations`` (each
        applied once, in its own transaction; nodes starting together wait for each
        other): the shared PostgreSQL database when this server is a cluster and ``name``
        is shared, else this node's SQLite file. Usable from any thread; the caller
        closes it."""
        ...

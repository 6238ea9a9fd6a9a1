"""The state stores' databases: :class:`StateStores`, the one
:class:`~scriptsftp.server.contract.state.StateStoreFactory`.

On one node every state database is a SQLite file in ``state_dir``
(:mod:`.sqlite`). With ``[cluster] database`` the stores in :data:`SHARED` (the
defender's bans and scores, the script store, the audit trail, the notification outbox, the
schedule's claims, the staging records) are the PostgreSQL database every
node shares instead, through the same :class:`~.sql.PostgresDatabase` the account
database uses; the others stay in this node's ``state_dir`` until they are shared
too (docs/cluster.md, "What is shared").

Each shared store's schema is a list of numbered migrations (the store's own),
applied by :func:`migrate` (the one runner, :mod:`.migrations`) in one transaction
each and recorded per store in ``state_schema``; on PostgreSQL an advisory lock makes
nodes that start together apply each step once, and a schema one compatible step
newer than the code is used as it is (rolling upgrades).
"""

from __future__ import annotations

import socket
import sqlite3
from pathlib import Path

from scriptsftp.server.contract.state import Migrations, SqlDatabase, StateName
from scriptsftp.server.stores.migrations import SchemaTooNew, StateBook
from scriptsftp.server.stores.migrations import migrate as run_migrations
from scriptsftp.server.stores.sql import PostgresDatabase, SqliteStateDatabase
from scriptsftp.server.stores.sqlite import DATABASES, open_sqlite
from scriptsftp.server.support.config import LoadedConfig

#: the stores the nodes of a cluster share through PostgreSQL
SHARED: frozenset[StateName] = frozenset({"audit", "bans", "script-store", "outbox", "schedule", "staging"})

#: PostgreSQL advisory lock key (per database): one state-store migration at a time
STATE_UPGRADE_LOCK = 7318851

#: connections per shared store and node; a wait for one is bounded by STATE_TIMEOUT
STATE_POOL_SIZE = 8
#: seconds a store call waits for a connection (a script's call, a ban's write): short, so
#: that an unreachable database costs a script a clear error, not its whole timeout
STATE_TIMEOUT = 3.0


class StateSchemaTooNew(SchemaTooNew):
    """The database was migrated by a newer scriptsftp."""


class StateStores:
    """The state databases of one node: SQLite files in ``state_dir``; with ``database``
    (``[cluster] database``), the shared stores in that PostgreSQL database."""

    def __init__(self, state_dir: Path, *, database: str = "", node: str = "") -> None:
        self.state_dir = Path(state_dir)
        self.url = database
        self.node = node or socket.gethostname()

    @classmethod
    def for_config(cls, cfg: LoadedConfig) -> "StateStores":
        m = cfg.model
        return cls(cfg.resolve(m.server.state_dir), database=m.cluster.database, node=m.cluster.node)

    def shared(self, name: StateName) -> bool:
        """Whether ``name`` is the database every node shares."""
        return bool(self.url) and name in SHARED

    def path(self, name: StateName) -> Path:
        return self.state_dir / DATABASES[name].file

    def connect(self, name: StateName) -> sqlite3.Connection:
        db = DATABASES[name]
        return open_sqlite(self.path(name), busy_timeout=db.busy_timeout, private=db.private,
                           auto_vacuum=db.auto_vacuum)

    def database(self, name: StateName, migrations: Migrations) -> SqlDatabase:
        db: SqlDatabase
        if self.shared(name):
            db = PostgresDatabase(self.url, max_connections=STATE_POOL_SIZE, timeout=STATE_TIMEOUT,
                                  name=f"scriptsftp-{name}")
        else:
            db = SqliteStateDatabase(self.connect(name), str(self.path(name)))
        try:
            migrate(db, name, migrations)
        except BaseException:
            db.close()
            raise
        return db


def migrate(db: SqlDatabase, store: str, migrations: Migrations) -> list[int]:
    """Apply the missing ``migrations`` of ``store``, each in its own transaction (the one
    runner, :mod:`.migrations`, with the store's row of ``state_schema`` as its book)."""
    return run_migrations(db, StateBook(store), migrations, what=f"the {store} store",
                          lock=STATE_UPGRADE_LOCK, too_new=StateSchemaTooNew)


__all__ = ["SHARED", "StateSchemaTooNew", "StateStores", "migrate"]

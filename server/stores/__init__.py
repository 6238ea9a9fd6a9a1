"""The state stores' databases: :class:`StateStores` (SQLite files in ``state_dir``),
the one implementation of :class:`~scriptsftp.server.contract.state.StateStoreFactory`
today, and :func:`open_sqlite`, the one way a state database is opened."""

from scriptsftp.server.stores.sqlite import DATABASES, SQLiteDatabase, StateStores, open_sqlite

__all__ = ["DATABASES", "SQLiteDatabase", "StateStores", "open_sqlite"]

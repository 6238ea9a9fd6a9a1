"""The state stores' databases: :class:`StateStores` (SQLite files in ``state_dir``, the
shared ones in PostgreSQL with ``[cluster] database``), the one implementation of
:class:`~scriptsftp.server.contract.state.StateStoreFactory`, and :func:`open_sqlite`,
the one way a state database file is opened."""

from scriptsftp.server.stores.sqlite import DATABASES, SQLiteDatabase, open_sqlite
from scriptsftp.server.stores.state import SHARED, StateStores

__all__ = ["DATABASES", "SHARED", "SQLiteDatabase", "StateStores", "open_sqlite"]

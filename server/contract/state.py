"""Where state that outlives a request is kept: the seam every state store opens its
database through.

Five stores keep state between requests and restarts: the staging records
(``staging``), the audit trail (``audit``), the defender's bans and scores
(``bans``), the scripts' key/value store (``script-store``) and the notification
outbox (``outbox``). None of them opens a file itself: each is handed a
:class:`StateStoreFactory` and asks it for its database by name. The daemon makes
the one factory (``scriptsftp.server.stores.StateStores``: SQLite files in
``state_dir``) and hands it down, to scripting/ too, which may import only this
contract from server/.

This is where PostgreSQL plugs in when several nodes form one server: a second
factory whose ``connect`` reaches the shared database, chosen by the daemon; the
stores do not change where they get their connection from. Today the connection
is SQLite's (``sqlite3.Connection``, autocommit, usable from any thread under the
store's own lock) and the stores' SQL is SQLite's.
"""

from __future__ import annotations

import sqlite3
from typing import Literal, Protocol

#: the databases a factory knows, by the name a store asks for
StateName = Literal["staging", "audit", "bans", "script-store", "outbox"]


class StateStoreFactory(Protocol):
    def connect(self, name: StateName) -> sqlite3.Connection:
        """A new connection to the database ``name``, ready to use: created if missing,
        journal, durability and lock wait set as that database needs. Autocommit
        (``BEGIN`` is explicit), not bound to a thread; the caller closes it."""
        ...

"""Parent-side persistent key/value store behind the ``store`` capability.

Every script has its own namespace (its name). Values are JSON text, size-capped.
The database comes from the state-store factory: this node's SQLite file in
``state_dir``, or with ``[cluster] database`` the PostgreSQL database every node
shares (docs/architecture.md rule 10; docs/cluster.md). One set of statements
serves both; what differs is in the dialect's words, and ``incr``:

- SQLite (WAL, busy timeout): read-modify-write operations (``incr``, a ``set`` of
  a new key) run in ``BEGIN IMMEDIATE`` transactions, so it stays exact with many
  server threads and with several processes sharing the state directory.
  ``synchronous=NORMAL``: a committed write survives a crash of the server; the last
  transactions may be lost on power failure.
- PostgreSQL: ``incr`` is one statement (``INSERT … ON CONFLICT DO UPDATE …
  RETURNING``), atomic whichever node runs it; a new key takes a per-script advisory
  lock to count the script's keys, so the key quota holds across nodes too. A
  database that cannot be reached makes the call raise in the script
  (:class:`StoreUnavailable`), within ``STATE_TIMEOUT``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any, Callable

from scriptsftp.server.contract.state import Cursor, SqlDatabase, StateStoreFactory

log = logging.getLogger("scriptsftp.scripts")

MAX_KEY_CHARS = 256
MAX_VALUE_BYTES = 64 * 1024
MAX_KEYS_PER_SCRIPT = 10_000
INT_MIN, INT_MAX = -(2**63), 2**63 - 1

#: the store's schema (stores/state.py applies it); append only
MIGRATIONS: list[tuple[int, list[str]]] = [
    (1, ["""CREATE TABLE IF NOT EXISTS script_kv (
        ns      TEXT NOT NULL,
        key     TEXT NOT NULL,
        value   TEXT NOT NULL,
        updated DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (ns, key)
    ) {without_rowid}"""]),
]
#: PostgreSQL advisory lock class (with the script's name): one new key of a script at a time
NEW_KEY_LOCK = 7318853

#: an integer as JSON writes it: what incr may add to on PostgreSQL (no "?": the cursor
#: takes every "?" for a placeholder)
_PG_INT = "^-{0,1}[0-9]{1,19}$"


class StoreError(ValueError):
    """A request the store refuses; the message is meant for the script's author."""


class StoreUnavailable(StoreError):
    """The store's database failed (unreachable, full); the call did nothing."""


def _check_key(key: Any) -> str:
    if type(key) is not str:
        raise StoreError("store keys must be str")
    if not 0 < len(key) <= MAX_KEY_CHARS:
        raise StoreError(f"store keys must be 1 to {MAX_KEY_CHARS} characters")
    return key


def _encode(value: Any) -> str:
    try:
        text = json.dumps(value, allow_nan=False, ensure_ascii=False, separators=(",", ":"))
    except (TypeError, ValueError, RecursionError):
        raise StoreError("store values must be JSON data (str, int, float, bool, None, "
                         "lists and dicts of them)") from None
    if len(text.encode("utf-8", "surrogatepass")) > MAX_VALUE_BYTES:
        raise StoreError(f"store values are limited to {MAX_VALUE_BYTES} bytes of JSON")
    return text


class ScriptStore:
    """Namespaced JSON key/value store. Thread-safe."""

    def __init__(self, stores: StateStoreFactory, *, max_keys_per_script: int = MAX_KEYS_PER_SCRIPT) -> None:
        self.max_keys = max_keys_per_script
        self._lock = threading.Lock()
        self._db: SqlDatabase | None = stores.database("script-store", MIGRATIONS)
        self._pg = self._db.dialect.name == "postgresql"
        self._error_logged = -1e9

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def _conn(self) -> SqlDatabase:
        db = self._db
        if db is None:
            raise StoreError("the script store is closed")
        return db

    def _run(self, write: bool, fn: Callable[[Cursor], Any]) -> Any:
        """``fn(cursor)`` in a transaction (``write``) or a read; the database's failures
        become :class:`StoreUnavailable`, with the detail in the server's log only."""
        db = self._conn()
        try:
            with (db.transaction() if write else db.read()) as cur:
                return fn(cur)
        except db.errors as exc:
            now = time.monotonic()
            if now - self._error_logged > 10:
                self._error_logged = now
                log.warning("script store: %s: %s", db.where, exc)
            raise StoreUnavailable("the script store is unavailable: its database cannot be reached "
                                   "or failed; nothing was changed") from None

    def get(self, ns: str, key: Any) -> tuple[bool, Any]:
        key = _check_key(key)
        row = self._run(False, lambda cur: cur.execute(
            "SELECT value FROM script_kv WHERE ns = ? AND key = ?", (ns, key)).fetchone())
        if row is None:
            return False, None
        return True, json.loads(row[0])

    def _check_room(self, cur: Cursor, ns: str) -> None:
        """Before a new key: refuse it if the script has its quota of keys. On PostgreSQL the
        script's new keys take turns, so two nodes cannot both take the last place."""
        if self._pg:
            cur.execute("SELECT pg_advisory_xact_lock(?, hashtext(?))", (NEW_KEY_LOCK, ns))
        (count,) = cur.execute("SELECT count(*) FROM script_kv WHERE ns = ?", (ns,)).fetchone() or (0,)
        if count >= self.max_keys:
            raise StoreError(f"the store of this script is full "
                             f"({self.max_keys} keys); delete some keys")

    def _write(self, ns: str, key: str, fn: Any) -> Any:
        """Run fn(current_text_or_None) -> (new_text_or_None, result) in a transaction that
        holds the row (SQLite: the write lock; PostgreSQL: ``FOR UPDATE``), enforcing the
        per-script key quota."""
        words = self._conn().dialect.words

        def txn(cur: Cursor) -> Any:
            row = cur.execute(f"SELECT value FROM script_kv WHERE ns = ? AND key = ? {words['for_update']}",
                              (ns, key)).fetchone()
            new_text, result = fn(None if row is None else row[0])
            if new_text is not None:
                if row is None:
                    self._check_room(cur, ns)
                cur.execute(
                    "INSERT INTO script_kv (ns, key, value, updated) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (ns, key) DO UPDATE SET value = excluded.value, "
                    "updated = excluded.updated", (ns, key, new_text, time.time()))
            return result

        return self._run(True, txn)

    def set(self, ns: str, key: Any, value: Any) -> None:
        key = _check_key(key)
        text = _encode(value)
        self._write(ns, key, lambda current: (text, None))

    def incr(self, ns: str, key: Any, n: Any = 1) -> int:
        key = _check_key(key)
        if type(n) is not int:
            raise StoreError("incr(key, n): n must be an int")
        if not INT_MIN <= n <= INT_MAX:
            raise StoreError("incr(): the result does not fit in 64 bits")
        if self._pg:
            return self._incr_pg(ns, key, n)

        def bump(current: str | None) -> tuple[str, int]:
            value = 0 if current is None else json.loads(current)
            if type(value) is not int:
                raise StoreError(f"store key {key!r} does not hold an integer")
            new = value + n
            if not INT_MIN <= new <= INT_MAX:
                raise StoreError("incr(): the result does not fit in 64 bits")
            return str(new), new

        result: int = self._write(ns, key, bump)
        return result

    def _incr_pg(self, ns: str, key: str, n: int) -> int:
        """One atomic upsert on the shared database: the row is locked by the statement
        itself, so increments from every node add up exactly. The sum is computed in
        NUMERIC and kept only if it fits 64 bits; an existing key that holds no integer,
        or a sum that does not fit, updates nothing (then a read says which). A new key
        checks the quota first (rare: once per key)."""
        text = str(n)

        def txn(cur: Cursor) -> int:
            row = cur.execute(
                "INSERT INTO script_kv (ns, key, value, updated) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (ns, key) DO UPDATE SET "
                "value = CAST(CAST(script_kv.value AS NUMERIC) + ? AS TEXT), updated = excluded.updated "
                f"WHERE script_kv.value ~ '{_PG_INT}' "
                "AND CAST(script_kv.value AS NUMERIC) + ? BETWEEN ? AND ? "
                "RETURNING value, (xmax = 0)",
                (ns, key, text, time.time(), n, n, INT_MIN, INT_MAX)).fetchone()
            if row is None:
                current = cur.execute("SELECT value FROM script_kv WHERE ns = ? AND key = ?",
                                      (ns, key)).fetchone()
                value = None if current is None else json.loads(current[0])
                if type(value) is not int:
                    raise StoreError(f"store key {key!r} does not hold an integer")
                raise StoreError("incr(): the result does not fit in 64 bits")
            if row[1]:  # a new key: it must fit the quota (the insert rolls back if not)
                cur.execute("SELECT pg_advisory_xact_lock(?, hashtext(?))", (NEW_KEY_LOCK, ns))
                (count,) = cur.execute("SELECT count(*) FROM script_kv WHERE ns = ?", (ns,)).fetchone() or (0,)
                if count > self.max_keys:
                    raise StoreError(f"the store of this script is full "
                                     f"({self.max_keys} keys); delete some keys")
            return int(row[0])

        result: int = self._run(True, txn)
        return result

    def delete(self, ns: str, key: Any) -> bool:
        key = _check_key(key)
        n: int = self._run(True, lambda cur: cur.execute(
            "DELETE FROM script_kv WHERE ns = ? AND key = ?", (ns, key)).rowcount)
        return n > 0

    def keys(self, ns: str) -> list[str]:
        """All keys of one script (for admin tools and tests)."""
        rows = self._run(False, lambda cur: cur.execute(
            "SELECT key FROM script_kv WHERE ns = ? ORDER BY key", (ns,)).fetchall())
        return [r[0] for r in rows]

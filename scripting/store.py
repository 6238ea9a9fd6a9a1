"""Parent-side persistent key/value store behind the ``store`` capability.

One SQLite database under the server's ``state_dir``; every script has its own
namespace (its name). Values are JSON text, size-capped. The database is in
WAL mode with a busy timeout and read-modify-write operations (``incr``, a
``set`` of a new key) run in ``BEGIN IMMEDIATE`` transactions, so it stays
exact with many server threads in this process and with several server
processes sharing the state directory (docs/architecture.md rule 10).

Durability: ``synchronous=NORMAL`` in WAL mode: a committed write survives a
crash of the server; the last transactions may be lost on power failure.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from typing import Any

from scriptsftp.server.contract.state import StateStoreFactory

MAX_KEY_CHARS = 256
MAX_VALUE_BYTES = 64 * 1024
MAX_KEYS_PER_SCRIPT = 10_000
INT_MIN, INT_MAX = -(2**63), 2**63 - 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS script_kv (
    ns      TEXT NOT NULL,
    key     TEXT NOT NULL,
    value   TEXT NOT NULL,
    updated REAL NOT NULL,
    PRIMARY KEY (ns, key)
) WITHOUT ROWID;
"""


class StoreError(ValueError):
    """A request the store refuses; the message is meant for the script's author."""


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
    """Namespaced JSON key/value store in one SQLite file. Thread-safe."""

    def __init__(self, stores: StateStoreFactory, *, max_keys_per_script: int = MAX_KEYS_PER_SCRIPT) -> None:
        self.max_keys = max_keys_per_script
        self._lock = threading.Lock()
        self._db = stores.connect("script-store")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None  # type: ignore[assignment]

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise StoreError("the script store is closed")
        return self._db

    def get(self, ns: str, key: Any) -> tuple[bool, Any]:
        key = _check_key(key)
        with self._lock:
            row = self._conn().execute(
                "SELECT value FROM script_kv WHERE ns = ? AND key = ?", (ns, key)).fetchone()
        if row is None:
            return False, None
        return True, json.loads(row[0])

    def _write(self, ns: str, key: str, fn: Any) -> Any:
        """Run fn(db, current_text_or_None) -> (new_text_or_None, result) in an
        IMMEDIATE transaction, enforcing the per-script key quota."""
        with self._lock:
            db = self._conn()
            db.execute("BEGIN IMMEDIATE")
            try:
                row = db.execute("SELECT value FROM script_kv WHERE ns = ? AND key = ?",
                                 (ns, key)).fetchone()
                new_text, result = fn(None if row is None else row[0])
                if new_text is not None:
                    if row is None:
                        (count,) = db.execute("SELECT count(*) FROM script_kv WHERE ns = ?",
                                              (ns,)).fetchone()
                        if count >= self.max_keys:
                            raise StoreError(f"the store of this script is full "
                                             f"({self.max_keys} keys); delete some keys")
                    db.execute(
                        "INSERT INTO script_kv (ns, key, value, updated) VALUES (?, ?, ?, ?) "
                        "ON CONFLICT (ns, key) DO UPDATE SET value = excluded.value, "
                        "updated = excluded.updated", (ns, key, new_text, time.time()))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return result

    def set(self, ns: str, key: Any, value: Any) -> None:
        key = _check_key(key)
        text = _encode(value)
        self._write(ns, key, lambda current: (text, None))

    def incr(self, ns: str, key: Any, n: Any = 1) -> int:
        key = _check_key(key)
        if type(n) is not int:
            raise StoreError("incr(key, n): n must be an int")

        def bump(current: str | None) -> tuple[str, int]:
            value = 0 if current is None else json.loads(current)
            if type(value) is not int:
                raise StoreError(f"store key {key!r} does not hold an integer")
            new = value + n
            if not INT_MIN <= new <= INT_MAX:
                raise StoreError("incr(): the result does not fit in 64 bits")
            return str(new), new

        return self._write(ns, key, bump)

    def delete(self, ns: str, key: Any) -> bool:
        key = _check_key(key)
        with self._lock:
            cur = self._conn().execute("DELETE FROM script_kv WHERE ns = ? AND key = ?",
                                       (ns, key))
        return cur.rowcount > 0

    def keys(self, ns: str) -> list[str]:
        """All keys of one script (for admin tools and tests)."""
        with self._lock:
            rows = self._conn().execute(
                "SELECT key FROM script_kv WHERE ns = ? ORDER BY key", (ns,)).fetchall()
        return [r[0] for r in rows]


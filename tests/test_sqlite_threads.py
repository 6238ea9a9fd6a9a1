"""A SQLite state database closes a thread's connection when the thread ends.

The soak found the accounts database open 57 times in the daemon after one minute of
attack: every thread that looked up an account kept its connection until the daemon
stopped. Here, with the real file: 40 short-lived threads each read, and afterwards the
process holds the file open no more than a few times; the database still works, from a
new thread and from this one, and close() closes the connections still live.
"""

from __future__ import annotations

import gc
import os
import threading
from pathlib import Path

from scriptsftp.server.stores.sql import SqliteDatabase


def _open_count(path: Path) -> int:
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == str(path):
                n += 1
        except OSError:
            continue
    return n


def _read(db: SqliteDatabase) -> int:
    with db.read() as cur:
        cur.execute("SELECT 1")
        return cur.fetchone()[0]


def test_a_threads_connection_is_closed_when_the_thread_ends(tmp_path: Path) -> None:
    path = (tmp_path / "state.sqlite3").resolve()
    db = SqliteDatabase(path)
    with db.transaction() as cur:
        cur.execute("CREATE TABLE t (x INTEGER)")
    before = _open_count(path)
    results: list[int] = []
    for _ in range(40):  # one after the other: each thread ends before the next starts
        th = threading.Thread(target=lambda: results.append(_read(db)))
        th.start()
        th.join(30)
    gc.collect()
    assert results == [1] * 40
    assert _open_count(path) <= before + 1, (before, _open_count(path))

    held = threading.Event()
    done = threading.Event()

    def live() -> None:  # a thread still running keeps its connection until close()
        _read(db)
        held.set()
        done.wait(30)

    th = threading.Thread(target=live)
    th.start()
    assert held.wait(30)
    assert _open_count(path) == before + 1
    assert _read(db) == 1
    db.close()
    assert _open_count(path) == 0
    done.set()
    th.join(30)

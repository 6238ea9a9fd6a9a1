"""The daemon's eye on the account database: changes made elsewhere reach open sessions.

The CLI, the REST API and (on PostgreSQL) other nodes write the account database
directly. Logins need no help to see that (each reads its user by primary key), but
open sessions do: a disabled or deleted user's sessions must end, an edited user's
sessions must get the new permissions and limits. So one thread polls the change feed
(``account_changes``, one indexed range read) every ``[accounts] watch_interval``
seconds and hands each changed user to the login core; the same tick writes the
last-login times gathered since the previous one, in one transaction, so a login never
waits for a database write.

A change to a group or folder reaches every open session (their members are not
listed in the feed): rare, and a refresh of the connected users is cheap.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from scriptsftp.server.stores.accounts_db import AccountDb

log = logging.getLogger("scriptsftp.accounts")


class AccountWatcher:
    """Polls the change feed; ``on_user(name)`` for each changed user, ``on_any()`` when a
    group or folder changed. Both run on the watcher's thread."""

    def __init__(self, db: AccountDb, *, interval: Callable[[], float], on_user: Callable[[str], None],
                 on_any: Callable[[], None]) -> None:
        self.db = db
        self.interval = interval
        self.on_user = on_user
        self.on_any = on_any
        self._seen = db.last_change()  # what happened before the start is in the records already
        self._logins: dict[str, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="account-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def note_login(self, name: str) -> None:
        """Date a login (written at the next tick: never on the login path)."""
        with self._lock:
            self._logins[name] = time.time()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5.0)
        self._flush_logins()

    def _run(self) -> None:
        failing = False
        while not self._stop.wait(self.interval()):
            try:
                self.tick()
                if failing:
                    log.info("account database reachable again (%s)", self.db.db.where)
                failing = False
            except Exception as exc:  # a database down must not end the watcher: retry next tick
                if not failing:
                    log.error("account database: cannot read changes (%s): %s", self.db.db.where, exc)
                failing = True

    def tick(self) -> None:
        """One look at the feed (the thread's loop; tests call it to step without waiting)."""
        self._flush_logins()
        while True:
            changes = self.db.changes_since(self._seen)
            if not changes:
                return
            users = []
            others = False
            for change in changes:
                if change.kind == "user":
                    if change.name not in users:
                        users.append(change.name)
                else:
                    others = True
            for name in users:
                self.on_user(name)
            if others:
                self.on_any()
            self._seen = changes[-1].id

    def _flush_logins(self) -> None:
        with self._lock:
            logins, self._logins = self._logins, {}
        if not logins:
            return
        try:
            self.db.record_logins(logins)
        except Exception as exc:
            log.warning("account database: cannot record %d last login(s): %s", len(logins), exc)

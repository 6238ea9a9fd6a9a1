"""Durable records of uploads in progress, so a crash never leaves a staged file behind.

Each staged upload (a hidden ``.scriptsftp-part-*`` file beside its target) is
recorded before the first byte is written and forgotten once it is published or
discarded. A record is in one of two states:

- ``upload``: bytes are still arriving. After a crash the client never finished,
  so the staged file is deleted on the next start (or by the node that takes it over).
- ``check``: every byte arrived and the pre-publish checks are running (in sync
  mode while the client waits, in async mode in the background). The record then
  also holds the ``pre-publish`` event, so that after a crash the file can be
  checked again (``[uploads] on_restart = "recheck"``) or deleted (``"discard"``);
  it is never published unchecked.

Records live in the ``staging`` state database (:mod:`scriptsftp.server.contract.state`):
this node's SQLite file, or with ``[cluster] database`` the PostgreSQL database every node
shares. Each record names the node that owns it and carries a lease (``lease_until``, by
the database's clock) that the owner renews while it lives (:mod:`.staging_lease`). A
record whose lease ran out belongs to a dead node: a surviving node takes it over with a
conditional update (two survivors never both get it) and discards or rechecks it, so an
upload is never published unchecked and never lost with its node (docs/cluster.md,
"Staging on shared storage"). The staging file's name carries the owner's node too, so
anyone looking at a home can tell whose upload a ``.scriptsftp-part-*`` file is.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scriptsftp.server.contract.errors import Failure, NoSpace, NotFound
from scriptsftp.server.contract.paths import STAGING_PREFIX
from scriptsftp.server.contract.state import SqlDatabase, StateStoreFactory
from scriptsftp.server.core.storage import LocalStorage, StorageOpener
from scriptsftp.server.core.vfs import split

UPLOADING = "upload"
CHECKING = "check"

#: seconds a record's lease lasts without renewal ([cluster] staging_lease)
DEFAULT_LEASE = 15.0

#: append only: a released step is never edited (state_dir files of 0.1 already have the
#: table, created by the code before migrations; step 1 leaves them as they are)
MIGRATIONS: list[tuple[int, list[str]]] = [
    (1, [
        """CREATE TABLE IF NOT EXISTS staged (
            id           {id},
            "user"       TEXT,
            home         TEXT,
            directory    TEXT,
            staging_name TEXT,
            final_name   TEXT,
            created      DOUBLE PRECISION,
            state        TEXT NOT NULL DEFAULT 'upload',
            event        TEXT)""",
    ]),
    (2, [
        # '' : a record written before leases, owned by whoever opens this node's file next
        "ALTER TABLE staged ADD COLUMN node TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE staged ADD COLUMN lease_until DOUBLE PRECISION NOT NULL DEFAULT 0",
        "CREATE INDEX IF NOT EXISTS staged_lease ON staged(lease_until)",
    ]),
]

#: words of this store's statements that differ between the engines, besides the Dialect's
_WORDS = {
    # the database's clock in seconds since the epoch: every node's leases on one clock
    "sqlite": {"now": "((julianday('now') - 2440587.5) * 86400.0)", "skip_locked": ""},
    "postgresql": {"now": "CAST(EXTRACT(EPOCH FROM clock_timestamp()) AS DOUBLE PRECISION)",
                   "skip_locked": "FOR UPDATE SKIP LOCKED"},
}

_COLUMNS = 'id, "user", home, directory, staging_name, final_name, created, state, event, node'

_UNSAFE = re.compile(r"[^A-Za-z0-9_.@-]")


@dataclass(frozen=True)
class StagedRecord:
    id: int
    user: str
    home: str
    directory: str  # virtual directory of the target
    staging_name: str
    final_name: str
    created: float
    state: str = UPLOADING
    event: dict[str, Any] | None = None  # the pre-publish event, once state is CHECKING
    node: str = ""  # its owner (for a record just taken over: the node it was taken from)


def _record(row: tuple[Any, ...]) -> StagedRecord:
    return StagedRecord(id=int(row[0]), user=row[1], home=row[2], directory=row[3], staging_name=row[4],
                        final_name=row[5], created=float(row[6] or 0), state=row[7],
                        event=json.loads(row[8]) if row[8] else None, node=row[9] or "")


class StagingRecords:
    """Raises :class:`~.errors.FsError` (never a database error) from the methods a client's
    upload calls (:meth:`add`, :meth:`checking`, :meth:`remove`)."""

    def __init__(self, stores: StateStoreFactory, *, lease: float = DEFAULT_LEASE) -> None:
        self.node = stores.node
        self.lease = lease
        self._db: SqlDatabase = stores.database("staging", MIGRATIONS)
        self.shared = self._db.dialect.name == "postgresql"
        if not self.shared:
            with self._db.transaction() as cur:
                columns = {row[1] for row in cur.execute("PRAGMA table_info(staged)").fetchall()}
                if "state" not in columns:  # state dirs written by 0.1 before async publish
                    cur.execute(f"ALTER TABLE staged ADD COLUMN state TEXT NOT NULL DEFAULT '{UPLOADING}'")
                    cur.execute("ALTER TABLE staged ADD COLUMN event TEXT")

    @property
    def errors(self) -> tuple[type[BaseException], ...]:
        """What a failing database raises from :meth:`renew`, :meth:`take_over`, :meth:`leftovers`."""
        return self._db.errors

    def _sql(self, text: str) -> str:
        return text.format(**self._db.dialect.words, **_WORDS[self._db.dialect.name])

    @contextmanager
    def _as_client_error(self) -> Iterator[None]:
        """A failed record is a failed upload, answered like one: a full state_dir is "no
        space" (FTP 452, HTTP 507, SFTP failure with that text), anything else a plain failure.
        Never a raw database error, which the front ends would answer with a dropped connection."""
        try:
            yield
        except self._db.errors as exc:
            # a failed statement may surface as the failed ROLLBACK after it: look down the chain
            cause: BaseException | None = exc
            while cause is not None:
                if getattr(cause, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "full" in str(cause):
                    raise NoSpace("the server's state storage is full; try again later") from exc
                cause = cause.__context__
            raise Failure("the server could not record the upload") from exc

    def staging_name(self, fresh: str) -> str:
        """``fresh`` (a storage's new staging name) with this node's name in it:
        ``.scriptsftp-part-<node>-<random>``, so a file in a shared home tells whose it is."""
        tag = _UNSAFE.sub("_", self.node)[:64]
        rest = fresh[len(STAGING_PREFIX):] if fresh.startswith(STAGING_PREFIX) else fresh
        return f"{STAGING_PREFIX}{tag}-{rest}"

    def add(self, user: str, home: str, directory: str, staging_name: str, final_name: str) -> int:
        with self._as_client_error(), self._db.transaction() as cur:
            row = cur.execute(self._sql(
                'INSERT INTO staged ("user", home, directory, staging_name, final_name, created, node, lease_until)'
                " VALUES (?, ?, ?, ?, ?, {now}, ?, {now} + ?) RETURNING id"),
                (user, home, directory, staging_name, final_name, self.node, self.lease),
            ).fetchone()
            return int(row[0]) if row else 0

    def checking(self, record_id: int, event: dict[str, Any]) -> None:
        """All bytes arrived: from now on a crash means "check again", not "discard". Raises
        :class:`Failure` when the record is no longer this node's: another node took it over
        (this one was thought dead) and discards or checks it there; this upload must fail."""
        with self._as_client_error(), self._db.transaction() as cur:
            changed = cur.execute(self._sql("UPDATE staged SET state = ?, event = ?, lease_until = {now} + ?"
                                            " WHERE id = ? AND node = ?"),
                                  (CHECKING, json.dumps(event), self.lease, record_id, self.node)).rowcount
        if changed != 1:
            raise Failure("the upload was taken over by another node; send it again")

    def remove(self, record_id: int) -> None:
        with self._as_client_error(), self._db.transaction() as cur:
            # only while it is this node's: one another node took over is its to forget
            cur.execute("DELETE FROM staged WHERE id = ? AND node = ?", (record_id, self.node))

    def leftovers(self) -> list[StagedRecord]:
        """This node's records left by its previous run, now leased again (called at start,
        before any upload): its own by name, those written before leases, and on this node's
        SQLite file every record (nothing else uses it). A record another node is taking over
        right now is left to it."""
        where = "1 = 1" if not self.shared else "node = ? OR node = ''"
        params: tuple[Any, ...] = () if not self.shared else (self.node,)
        with self._db.transaction() as cur:
            ids = [r[0] for r in cur.execute(self._sql(
                f"SELECT id FROM staged WHERE {where} ORDER BY id {{skip_locked}}"), params).fetchall()]
            return self._claim(cur, ids, "")

    def renew(self) -> int:
        """Extend the lease of every record this node owns: all are uploads open or being
        checked here (or leftovers this node keeps for its next start). Returns how many."""
        with self._db.transaction() as cur:
            return int(cur.execute(self._sql("UPDATE staged SET lease_until = {now} + ? WHERE node = ?"),
                                   (self.lease, self.node)).rowcount)

    def take_over(self, limit: int = 100) -> list[StagedRecord]:
        """Claim up to ``limit`` records of other nodes whose lease ran out (their node died
        or lost the database for longer than a lease); each goes to exactly one claimant.
        Each record returned names the node it was taken from."""
        with self._db.transaction() as cur:
            rows = cur.execute(self._sql(
                "SELECT id, node FROM staged WHERE lease_until < {now} AND node <> ? ORDER BY id LIMIT ?"
                " {skip_locked}"), (self.node, limit)).fetchall()
            taken = self._claim(cur, [r[0] for r in rows], " AND lease_until < {now}")
        previous = {r[0]: r[1] for r in rows}
        return [dataclasses.replace(rec, node=previous[rec.id]) for rec in taken]

    def _claim(self, cur: Any, ids: list[int], condition: str) -> list[StagedRecord]:
        """Make the records ``ids`` this node's, each only if ``condition`` still holds when
        its row is written (the conditional update: a concurrent claimant got it otherwise)."""
        taken: list[StagedRecord] = []
        for record_id in ids:
            row = cur.execute(self._sql(
                f"UPDATE staged SET node = ?, lease_until = {{now}} + ? WHERE id = ?{condition}"
                f" RETURNING {_COLUMNS}"), (self.node, self.lease, record_id)).fetchone()
            if row is not None:
                taken.append(_record(row))
        return taken

    def all(self) -> list[StagedRecord]:
        """Every record, whoever owns it (tests, status)."""
        with self._db.read() as cur:
            rows = cur.execute(f"SELECT {_COLUMNS} FROM staged ORDER BY id").fetchall()
        return [_record(row) for row in rows]

    def close(self) -> None:
        self._db.close()


def discard_leftovers(records: StagingRecords, *, keep_checking: bool = False,
                      open_storage: StorageOpener = LocalStorage) -> int:
    """Delete the staged files a crash left behind; return how many were removed.

    With ``keep_checking``, uploads that had fully arrived and were being checked
    are kept for :func:`scriptsftp.server.core.publish.recheck_leftovers`."""
    removed = 0
    for rec in records.leftovers():
        if keep_checking and rec.state == CHECKING and rec.event is not None:
            continue
        if discard_record(records, rec, open_storage):
            removed += 1
    return removed


def discard_record(records: StagingRecords, rec: StagedRecord, open_storage: StorageOpener = LocalStorage) -> bool:
    """Delete one record's staged file and forget the record; True if a file was removed.

    The staging name is looked up relative to the recorded home; a home or directory that
    vanished since simply has nothing to clean. The file goes through the same confined
    walk as client operations (``open_storage`` on the recorded home). A home that cannot
    be opened now keeps the record (this node's: tried again at its next start)."""
    try:
        storage = open_storage(Path(rec.home))
    except OSError:
        return False
    removed = False
    try:
        with storage.resolve(split(rec.directory) + (rec.staging_name,), follow=False) as r:
            storage.unlink(r)
        removed = True
    except (FileNotFoundError, NotFound):
        pass  # already gone
    except Exception:
        return False
    finally:
        storage.close()
    records.remove(rec.id)
    return removed

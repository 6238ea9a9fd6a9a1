"""Claims on cron minutes: each (binding, minute) of the ``schedule`` event runs on one node.

Every node's scheduler sees the same minute come due; before it fires a binding it
*claims* the minute in the ``schedule_claims`` table of the ``schedule`` state store
(``state_dir/schedule.sqlite3`` on one node, the PostgreSQL database every node shares
with ``[cluster] database``). The first insert of ``(binding, minute)`` wins; the
others see the row and do not fire.

A claim is a lease, not a lock held by a connection: ``claimed_by`` (the node),
``lease_until`` (by the database's clock, so the nodes' clocks need not agree on
seconds) and ``state`` (``claimed``, then ``done`` once every run of that firing
ended). The claiming node renews the lease of its claims still running; a node that
dies (SIGKILL, power) stops renewing, and once the lease has expired any node that
has the binding takes the minute over and runs it. A minute first claimed more than
``catch_up`` seconds ago is not taken over any more, and old rows are pruned.

All statements are one set for both engines; only "now" differs (:data:`NOW`).
A claim is either one ``INSERT … ON CONFLICT DO NOTHING`` (a new minute) or one
conditional ``UPDATE`` (a takeover): on PostgreSQL two nodes racing for the same row
serialise on it and the loser's statement changes nothing, so the rowcount says who won.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from scriptsftp.server.contract.state import SqlDatabase, StateStoreFactory

#: the store's schema (stores/state.py applies it); append only
MIGRATIONS: list[tuple[int, list[str]]] = [
    (1, [
        """CREATE TABLE IF NOT EXISTS schedule_claims (
            binding     TEXT NOT NULL,
            minute      TEXT NOT NULL,
            claimed_by  TEXT NOT NULL,
            claimed_at  DOUBLE PRECISION NOT NULL,
            lease_until DOUBLE PRECISION NOT NULL,
            state       TEXT NOT NULL,
            PRIMARY KEY (binding, minute)
        ) {without_rowid}""",
        "CREATE INDEX IF NOT EXISTS schedule_claims_open ON schedule_claims (state, lease_until)",
        "CREATE INDEX IF NOT EXISTS schedule_claims_age ON schedule_claims (claimed_at)",
    ]),
]

#: the database's clock, in epoch seconds: every node's lease is measured against it
NOW = {
    "postgresql": "extract(epoch from clock_timestamp())",
    "sqlite": "((julianday('now') - 2440587.5) * 86400.0)",
}

#: rows older than this (seconds, database clock) are deleted by :meth:`ScheduleClaims.prune`
KEEP_SECONDS = 86400.0


@dataclass(frozen=True)
class Claim:
    """One claimed minute: the binding's key and the minute (``YYYY-MM-DDTHH:MM``)."""

    binding: str
    minute: str


class ScheduleClaims:
    """The claims of one node (``node``) in the ``schedule`` store.

    ``lease``: seconds a claim holds without renewal. ``catch_up``: how long after its
    first claim an unfinished minute may still be taken over. Every call raises one of
    ``errors`` when the database fails; the scheduler decides what that means."""

    def __init__(self, stores: StateStoreFactory, *, lease: float, catch_up: float) -> None:
        self.node = stores.node
        self.lease = lease
        self.catch_up = catch_up
        self.db: SqlDatabase = stores.database("schedule", MIGRATIONS)
        self.errors = self.db.errors
        self._now = NOW[self.db.dialect.name]

    def close(self) -> None:
        self.db.close()

    def claim(self, binding: str, minute: str) -> bool:
        """Claim a minute nobody claimed yet: True if this node got it."""
        now = self._now
        with self.db.transaction() as cur:
            cur.execute(
                "INSERT INTO schedule_claims (binding, minute, claimed_by, claimed_at, lease_until, state) "
                f"VALUES (?, ?, ?, {now}, {now} + ?, 'claimed') ON CONFLICT (binding, minute) DO NOTHING",
                (binding, minute, self.node, self.lease))
            return cur.rowcount == 1

    def take_over(self, bindings: Iterable[str]) -> list[Claim]:
        """Claim the minutes of ``bindings`` whose claim expired unfinished (its node died or
        gave it back) less than ``catch_up`` seconds after it was first claimed."""
        wanted = set(bindings)
        if not wanted:
            return []
        now = self._now
        with self.db.read() as cur:
            rows = cur.execute(
                f"SELECT binding, minute FROM schedule_claims WHERE state = 'claimed' AND lease_until < {now} "
                f"AND claimed_at > {now} - ? ORDER BY minute", (self.catch_up,)).fetchall()
        taken: list[Claim] = []
        for binding, minute in rows:
            if binding not in wanted:
                continue
            with self.db.transaction() as cur:
                cur.execute(
                    f"UPDATE schedule_claims SET claimed_by = ?, lease_until = {now} + ? "
                    f"WHERE binding = ? AND minute = ? AND state = 'claimed' AND lease_until < {now}",
                    (self.node, self.lease, binding, minute))
                if cur.rowcount == 1:
                    taken.append(Claim(str(binding), str(minute)))
        return taken

    def renew(self, claims: Iterable[Claim]) -> None:
        """Extend the lease of this node's claims still running."""
        now = self._now
        items = list(claims)
        if not items:
            return
        with self.db.transaction() as cur:
            for c in items:
                cur.execute(f"UPDATE schedule_claims SET lease_until = {now} + ? "
                            "WHERE binding = ? AND minute = ? AND claimed_by = ? AND state = 'claimed'",
                            (self.lease, c.binding, c.minute, self.node))

    def done(self, claim: Claim) -> None:
        """Every run of the claimed firing ended: the minute is never run again."""
        with self.db.transaction() as cur:
            cur.execute("UPDATE schedule_claims SET state = 'done' WHERE binding = ? AND minute = ? "
                        "AND claimed_by = ?", (claim.binding, claim.minute, self.node))

    def release(self, claim: Claim) -> None:
        """This node could not run the firing (queue full, script not loaded): let any node
        (this one too) take it over at once."""
        now = self._now
        with self.db.transaction() as cur:
            cur.execute(f"UPDATE schedule_claims SET lease_until = {now} - 1 WHERE binding = ? AND minute = ? "
                        "AND claimed_by = ? AND state = 'claimed'", (claim.binding, claim.minute, self.node))

    def prune(self) -> int:
        """Delete claims older than :data:`KEEP_SECONDS`; the number deleted."""
        with self.db.transaction() as cur:
            cur.execute(f"DELETE FROM schedule_claims WHERE claimed_at < {self._now} - ?", (KEEP_SECONDS,))
            return max(0, cur.rowcount)

    def state(self, binding: str, minute: str) -> tuple[str, str] | None:
        """(claimed_by, state) of one minute, or None: for tests and diagnostics."""
        with self.db.read() as cur:
            row = cur.execute("SELECT claimed_by, state FROM schedule_claims WHERE binding = ? AND minute = ?",
                              (binding, minute)).fetchone()
        return None if row is None else (str(row[0]), str(row[1]))


__all__ = ["Claim", "KEEP_SECONDS", "MIGRATIONS", "NOW", "ScheduleClaims"]

"""The cluster's session table: every node's logged-in client connections in the
PostgreSQL database the nodes share (``[cluster] database``), so that the admin session
list shows them all, a kick reaches the node that holds the session, and a user's
``max_sessions`` (or ``[server] max_sessions_per_user``) counts their sessions on every node.

Why a table and polling, not a protocol between nodes (docs/architecture.md rule 10): the
database is already every node's meeting point, and a row per connection is what both the
list and the limit need. The rules:

- A node writes its row at the login (:meth:`ClusterSessions.claim`), changes its weight
  when an SSH channel beyond the first opens or closes, and deletes it at the disconnect.
  The weight is what the local registry counts for the connection: max(1, its open
  sessions), so the limit means the same thing on one node and on several.
- A login's count and its row are one transaction under a per-user advisory lock: two
  nodes racing for a user's last slot are serialised, one sees the other's row.
- Each node beats every :data:`BEAT` seconds (``session_nodes``). The rows of a node whose
  beat is older than :data:`EXPIRY` are ignored (not listed, not counted) and deleted by
  the next node that looks. A node re-writes its rows every :data:`SYNC` seconds (with
  their last activity and bytes), so rows lost meanwhile come back.
- A kick for another node's session is a row of ``session_kicks``; each node takes its own
  every :data:`KICK_POLL` seconds and ends the connection as a local kick does.
- While the database cannot be reached a login is counted on this node only (the local
  registry applies the limit, as without a cluster); the row is written at the next sync.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

from scriptsftp.server.contract.state import Migrations
from scriptsftp.server.core.connections import Connection, kick_soon
from scriptsftp.server.stores.sql import PostgresDatabase
from scriptsftp.server.stores.state import STATE_TIMEOUT, migrate
from scriptsftp.server.support.logs import BoundedLog

log = logging.getLogger("scriptsftp.cluster")

#: seconds between two beats of a node
BEAT = 1.0
#: seconds after its last beat that a node counts as dead: its sessions are no longer listed
#: nor counted against anyone's limit, and the next node that syncs deletes them
EXPIRY = 10.0
#: seconds between two looks for kicks addressed to this node (the delay of a remote kick)
KICK_POLL = 0.25
#: seconds between two re-writes of this node's rows (last activity, bytes, weights)
SYNC = 5.0
#: seconds an admin's kick of another node's session waits to see the session gone
KICK_WAIT = 3.0

#: first key of the per-user advisory lock (the second is the user name's hash)
USER_LOCK = 7318852

MIGRATIONS: Migrations = [
    (1, [
        "CREATE TABLE IF NOT EXISTS session_nodes (node TEXT PRIMARY KEY, beat TIMESTAMPTZ NOT NULL)",
        "CREATE TABLE IF NOT EXISTS cluster_sessions (node TEXT NOT NULL, id TEXT NOT NULL, "
        "user_name TEXT NOT NULL, protocol TEXT NOT NULL, remote_ip TEXT NOT NULL, "
        "started DOUBLE PRECISION NOT NULL, last_activity DOUBLE PRECISION NOT NULL, "
        "weight INTEGER NOT NULL DEFAULT 1, bytes_in BIGINT NOT NULL DEFAULT 0, "
        "bytes_out BIGINT NOT NULL DEFAULT 0, PRIMARY KEY (node, id))",
        "CREATE INDEX IF NOT EXISTS cluster_sessions_user ON cluster_sessions (user_name)",
        "CREATE TABLE IF NOT EXISTS session_kicks (node TEXT NOT NULL, id TEXT NOT NULL, reason TEXT NOT NULL, "
        "asked TIMESTAMPTZ NOT NULL DEFAULT now(), PRIMARY KEY (node, id))",
    ]),
]

#: a node counts as alive in SQL: its beat within EXPIRY (now(): the database's clock, so the
#: nodes' clocks need not agree)
_ALIVE = f"n.beat > now() - interval '{EXPIRY:g} seconds'"

_outage = BoundedLog(logging.WARNING)


def _epoch(conn: Connection) -> float:
    """When ``conn`` started, as Unix time (the registry keeps a monotonic start)."""
    return time.time() - (time.monotonic() - conn.started)


class ClusterSessions:
    """This node's side of the session table (the login core's ``SharedSessionsPort``, and
    what the admin API lists and kicks through)."""

    def __init__(self, url: str, node: str, connections: Callable[[], list[Connection]]) -> None:
        self.node = node
        self._connections = connections
        self.db = PostgresDatabase(url, max_connections=4, timeout=STATE_TIMEOUT, name="scriptsftp-sessions")
        try:
            migrate(self.db, "sessions", MIGRATIONS)
        except BaseException:
            self.db.close()
            raise
        #: the connections this node keeps a row for, with their user: what a sync writes
        #: (the lock guards the dict and is never held while the database works)
        self._rows: dict[str, tuple[Connection, str]] = {}
        self._lock = threading.Lock()
        #: (bytes seen, Unix time they last changed) per connection id: its last activity
        self._activity: dict[str, tuple[int, float]] = {}
        #: the last call failed: logins are counted locally until a beat gets through
        self.down = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        with self.db.transaction() as cur:  # rows a previous run of this node left (kill -9)
            cur.execute("DELETE FROM cluster_sessions WHERE node = ?", (node,))
            cur.execute("DELETE FROM session_kicks WHERE node = ?", (node,))
        self._beat()

    # --- the login core's port ------------------------------------------------------

    def claim(self, conn: Connection, user: str, limit: int) -> bool | None:
        """Count ``conn`` as one session of ``user`` on the cluster unless that passes ``limit``
        (0: none): True admitted (its row written), False refused, None the database cannot
        be reached (the caller applies the limit on this node alone; the row follows)."""
        with self._lock:  # listed before its insert: a sync meanwhile keeps the new row
            self._rows[conn.id] = (conn, user)
        if self.down:
            return None
        try:
            with self.db.transaction() as cur:
                if limit:
                    cur.execute(f"SELECT pg_advisory_xact_lock({USER_LOCK}, hashtext(?))", (user,))
                    if self._count(cur, user, conn.id) + 1 > limit:
                        # a sync may have written the row meanwhile: it goes with the refusal
                        cur.execute("DELETE FROM cluster_sessions WHERE node = ? AND id = ?", (self.node, conn.id))
                        with self._lock:
                            self._rows.pop(conn.id, None)
                        return False
                cur.execute(
                    "INSERT INTO cluster_sessions (node, id, user_name, protocol, remote_ip, started, last_activity) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (node, id) DO UPDATE SET weight = 1",
                    (self.node, conn.id, user, conn.protocol, conn.remote_ip, _epoch(conn), time.time()))
        except self.db.errors as exc:
            self._failed(exc)
            return None
        return True

    def grow(self, conn: Connection, weight: int, limit: int) -> bool | None:
        """``conn`` now weighs ``weight`` sessions (an SSH channel beyond its first opened),
        unless the user's sessions on the cluster would pass ``limit``; as :meth:`claim`."""
        with self._lock:
            held = self._rows.get(conn.id)
        if held is None or self.down:
            return None
        try:
            with self.db.transaction() as cur:
                if limit:
                    cur.execute(f"SELECT pg_advisory_xact_lock({USER_LOCK}, hashtext(?))", (held[1],))
                    if self._count(cur, held[1], conn.id) + weight > limit:
                        return False
                cur.execute("UPDATE cluster_sessions SET weight = ? WHERE node = ? AND id = ?",
                            (weight, self.node, conn.id))
        except self.db.errors as exc:
            self._failed(exc)
            return None
        return True

    def shrink(self, conn: Connection) -> None:
        """A session of ``conn`` ended: its row weighs what the registry counts now."""
        with self._lock:
            held = conn.id in self._rows
        if not held or self.down:
            return
        try:
            with self.db.transaction() as cur:
                cur.execute("UPDATE cluster_sessions SET weight = ? WHERE node = ? AND id = ?",
                            (max(1, conn.open_sessions), self.node, conn.id))
        except self.db.errors as exc:
            self._failed(exc)  # written right when the database is back

    def release(self, conn: Connection) -> None:
        """``conn`` ended: its row goes (at once, so its slot is free on every node)."""
        with self._lock:
            self._activity.pop(conn.id, None)
            held = self._rows.pop(conn.id, None) is not None
        if not held or self.down:
            return
        try:
            with self.db.transaction() as cur:
                cur.execute("DELETE FROM cluster_sessions WHERE node = ? AND id = ?", (self.node, conn.id))
        except self.db.errors as exc:
            self._failed(exc)  # the next sync deletes it

    def _count(self, cur: Any, user: str, but: str) -> int:
        """``user``'s sessions on the live nodes (this node's always count), but the
        connection ``but`` of this node (the one asking)."""
        row = cur.execute(
            "SELECT COALESCE(SUM(s.weight), 0) FROM cluster_sessions s LEFT JOIN session_nodes n ON n.node = s.node "
            f"WHERE s.user_name = ? AND (s.node = ? OR {_ALIVE}) AND NOT (s.node = ? AND s.id = ?)",
            (user, self.node, self.node, but)).fetchone()
        return int(row[0]) if row else 0

    def _failed(self, exc: BaseException) -> None:
        self.down = True
        _outage.log(log, "the cluster's session table cannot be reached (%s): sessions are counted on this node "
                    "only until it is back", " ".join(str(exc).split())[:200])

    # --- the admin API --------------------------------------------------------------

    def others(self) -> list[dict[str, Any]]:
        """The sessions of the other live nodes, oldest first (what /api/sessions adds)."""
        with self.db.read() as cur:
            rows = cur.execute(
                "SELECT s.node, s.id, s.user_name, s.protocol, s.remote_ip, s.started, s.last_activity, "
                "s.bytes_in, s.bytes_out FROM cluster_sessions s JOIN session_nodes n ON n.node = s.node "
                f"WHERE s.node <> ? AND {_ALIVE} ORDER BY s.started", (self.node,)).fetchall()
        now = time.time()
        return [{"id": r[1], "node": r[0], "user": r[2], "protocol": r[3], "remote_ip": r[4],
                 "started": round(float(r[5]), 3), "seconds": round(now - float(r[5]), 1),
                 "last_activity": round(float(r[6]), 3), "channels": [], "bytes_in": int(r[7]),
                 "bytes_out": int(r[8]), "transfers": []} for r in rows]

    def kick(self, sid: str, reason: str) -> tuple[str, str, bool] | None:
        """Ask the node holding session ``sid`` (not this one) to end it: (node, user, whether
        it ended within :data:`KICK_WAIT`), or None if no live node holds it."""
        with self.db.transaction() as cur:
            row = cur.execute(
                "SELECT s.node, s.user_name FROM cluster_sessions s JOIN session_nodes n ON n.node = s.node "
                f"WHERE s.id = ? AND s.node <> ? AND {_ALIVE}", (sid, self.node)).fetchone()
            if row is None:
                return None
            node, user = str(row[0]), str(row[1])
            cur.execute("INSERT INTO session_kicks (node, id, reason) VALUES (?, ?, ?) ON CONFLICT (node, id) "
                        "DO NOTHING", (node, sid, reason))
        deadline = time.monotonic() + KICK_WAIT
        while time.monotonic() < deadline:
            with self.db.read() as cur:
                if cur.execute("SELECT 1 FROM cluster_sessions WHERE node = ? AND id = ?",
                               (node, sid)).fetchone() is None:
                    return node, user, True
            time.sleep(0.05)
        return node, user, False

    # --- the node's own thread: beat, kicks, sync -------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="cluster-sessions", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop beating and delete this node's rows (a clean stop frees its users' slots at
        once; a killed node's wait for :data:`EXPIRY`)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        try:
            with self.db.transaction() as cur:
                cur.execute("DELETE FROM cluster_sessions WHERE node = ?", (self.node,))
                cur.execute("DELETE FROM session_nodes WHERE node = ?", (self.node,))
        except self.db.errors:
            pass
        self.db.close()

    def _run(self) -> None:
        beat_at = sync_at = time.monotonic()
        while not self._stop.wait(KICK_POLL):
            try:
                now = time.monotonic()
                if now >= beat_at:
                    self._beat()
                    beat_at = now + BEAT
                self._take_kicks()
                if now >= sync_at:
                    self._sync()
                    sync_at = now + SYNC
            except self.db.errors as exc:
                self._failed(exc)
            except Exception:
                log.exception("cluster session table: unexpected error")

    def _beat(self) -> None:
        with self.db.transaction() as cur:
            cur.execute("INSERT INTO session_nodes (node, beat) VALUES (?, now()) ON CONFLICT (node) "
                        "DO UPDATE SET beat = now()", (self.node,))
        if self.down:
            self.down = False
            log.info("the cluster's session table is back: this node's sessions are written again")
            self._sync(weights=True)

    def _take_kicks(self) -> None:
        with self.db.transaction() as cur:
            rows = cur.execute("DELETE FROM session_kicks WHERE node = ? RETURNING id, reason",
                               (self.node,)).fetchall()
        if not rows:
            return
        local = {c.id: c for c in self._connections()}
        for sid, reason in rows:
            conn = local.get(str(sid))
            if conn is None:
                continue
            log.info("session closed by an administrator on another node", extra=conn.log_context(user=conn.user))
            kick_soon(conn, str(reason), f"kick-{conn.id}")

    def _sync(self, weights: bool = False) -> None:
        """Write this node's rows as they are (last activity, bytes; the weights too after an
        outage, when :meth:`grow` and :meth:`shrink` could not), delete those it no longer
        holds, and the rows of dead nodes.

        No lock is held while the database works: the rows to keep are read again after the
        write, so a connection released meanwhile (its own delete before or after this
        write) never keeps a row, and one claimed meanwhile (in ``_rows`` before its insert)
        never loses its row."""
        with self._lock:
            now = time.time()
            rows = []
            for sid, (conn, user) in self._rows.items():
                bytes_in = sum(s.bytes_in for s in list(conn.sessions))
                bytes_out = sum(s.bytes_out for s in list(conn.sessions))
                seen, when = self._activity.get(sid, (-1, now))
                if bytes_in + bytes_out != seen:
                    when = now if seen >= 0 else _epoch(conn)
                    self._activity[sid] = (bytes_in + bytes_out, when)
                rows.append((sid, user, conn.protocol, conn.remote_ip, _epoch(conn), when,
                             max(1, conn.open_sessions), bytes_in, bytes_out))
        cols: list[list[Any]] = [list(c) for c in zip(*rows)] if rows else [[] for _ in range(9)]
        weight = ", weight = excluded.weight" if weights else ""
        with self.db.transaction() as cur:
            cur.execute(
                "INSERT INTO cluster_sessions (node, id, user_name, protocol, remote_ip, started, last_activity, "
                "weight, bytes_in, bytes_out) SELECT ?, * FROM unnest(?::text[], ?::text[], ?::text[], "
                "?::text[], ?::float8[], ?::float8[], ?::int[], ?::int8[], ?::int8[]) ON CONFLICT (node, id) DO "
                f"UPDATE SET last_activity = excluded.last_activity, bytes_in = excluded.bytes_in, "
                f"bytes_out = excluded.bytes_out{weight}",
                (self.node, *cols))
            with self._lock:
                keep = list(self._rows)
            cur.execute("DELETE FROM cluster_sessions WHERE node = ? AND NOT (id = ANY(?::text[]))", (self.node, keep))
            cur.execute(f"DELETE FROM session_nodes n WHERE NOT ({_ALIVE})")
            gone = "NOT EXISTS (SELECT 1 FROM session_nodes n WHERE n.node = t.node)"
            cur.execute(f"DELETE FROM cluster_sessions t WHERE {gone}")
            cur.execute(f"DELETE FROM session_kicks t WHERE {gone}")


__all__ = ["BEAT", "EXPIRY", "KICK_POLL", "KICK_WAIT", "SYNC", "ClusterSessions", "MIGRATIONS"]

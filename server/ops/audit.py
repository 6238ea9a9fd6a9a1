"""The audit trail: every scripted event, its decision, and what each script did and said.

"Why was my file rejected last Tuesday?" is answered from here: the event
(name, user, path, session, time), its decision (``allow``, ``veto``,
``error``: denied because a script failed and its binding says
``on_error = "deny"``; ``done`` for events that cannot veto), the reason, and
one row per handler call with the script, function, verdict, duration, error
and the lines it passed to ``api.log``.

Each event gets an id when the engine starts deciding it; the engine's log
lines about that event carry it as ``event_id`` (a field in JSON logs), so a
log line leads to its audit record and back.

Writing never slows a transfer: :meth:`AuditTrail.record` puts the row on a
bounded queue and returns; one background thread writes batches in a single
SQLite transaction each. When the queue is full the row is dropped and
counted (``dropped``, and the ``scriptsftp_audit_dropped_total`` metric).
The store is append-only: rows are never updated; retention deletes whole
rows older than ``[server] audit_retention_days`` and the oldest rows when the
store grows past ``[server] audit_max_mb``.

Where: SQLite in ``state_dir`` (``audit.sqlite3``) on one node; with ``[cluster]
database`` the PostgreSQL database every node shares (docs/cluster.md), so any
node's ``/api/events`` and ``scriptsftp events`` show every node's events, each
with the ``node`` that recorded it. While that database cannot be reached the
writer keeps its batch and tries again every second; what arrives meanwhile waits
in the bounded queue (full: dropped and counted, as always).
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from typing import Any

from scriptsftp.server.contract.scripting import new_event_id
from scriptsftp.server.contract.state import Cursor, SqlDatabase, StateStoreFactory
from scriptsftp.server.support import metrics

log = logging.getLogger("scriptsftp.audit")

MAX_LOG_LINES = 50          # per handler call: api.log lines kept in the trail
MAX_TEXT = 2000             # characters per stored text (reason, log line)
RETENTION_EVERY = 300.0     # seconds between retention passes

#: the audit database's schema (stores/state.py applies it); append only. Version 1 is what
#: the SQLite files held before they were versioned (IF NOT EXISTS; seq_column: PostgreSQL's
#: order of insertion, which SQLite's rowid gives).
MIGRATIONS: list[tuple[int, list[str]]] = [
    (1, [
        """CREATE TABLE IF NOT EXISTS events (
            id         TEXT PRIMARY KEY,
            time       DOUBLE PRECISION NOT NULL,
            name       TEXT NOT NULL,
            session_id TEXT NOT NULL DEFAULT '',
            protocol   TEXT NOT NULL DEFAULT '',
            remote_ip  TEXT NOT NULL DEFAULT '',
            "user"     TEXT NOT NULL DEFAULT '',
            path       TEXT NOT NULL DEFAULT '',
            target     TEXT NOT NULL DEFAULT '',
            size       BIGINT,
            decision   TEXT NOT NULL,
            reason     TEXT NOT NULL DEFAULT '',
            decided_by TEXT NOT NULL DEFAULT ''{seq_column})""",
        "CREATE INDEX IF NOT EXISTS events_time ON events(time)",
        'CREATE INDEX IF NOT EXISTS events_user ON events("user", time)',
        "CREATE INDEX IF NOT EXISTS events_path ON events(path, time)",
        """CREATE TABLE IF NOT EXISTS runs (
            event_id   TEXT NOT NULL,
            time       DOUBLE PRECISION NOT NULL,
            script     TEXT NOT NULL,
            function   TEXT NOT NULL,
            mode       TEXT NOT NULL,
            verdict    TEXT NOT NULL,
            reason     TEXT NOT NULL DEFAULT '',
            duration   DOUBLE PRECISION NOT NULL,
            error_kind TEXT,
            error_line INTEGER,
            logs       TEXT NOT NULL DEFAULT '[]',
            queued     DOUBLE PRECISION NOT NULL DEFAULT 0{seq_column})""",
        "CREATE INDEX IF NOT EXISTS runs_event ON runs(event_id)",
        "CREATE INDEX IF NOT EXISTS runs_time ON runs(time)",
    ]),
    # the node that recorded the event ([cluster] node, else the host name); '' before
    (2, ["ALTER TABLE events ADD COLUMN node TEXT NOT NULL DEFAULT ''"]),
]

EVENT_COLUMNS = ("id", "time", "name", "session_id", "protocol", "remote_ip", "user", "path", "target", "size",
                 "decision", "reason", "decided_by", "node")
RUN_COLUMNS = ("event_id", "time", "script", "function", "mode", "verdict", "reason", "duration", "error_kind",
               "error_line", "logs", "queued")


def _columns(names: tuple[str, ...]) -> str:
    return ", ".join(f'"{n}"' if n == "user" else n for n in names)


def glob_regex(pattern: str) -> str:
    """A path glob (``*``, ``?``, ``[..]``, ``[^..]``: what SQLite's GLOB takes, with its
    meaning) as a regular expression for PostgreSQL's ``~``, anchored at both ends."""
    out = ["^"]
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "*":
            out.append(".*")
        elif c == "?":
            out.append(".")
        elif c == "[":
            j = pattern.find("]", i + 2)
            if j < 0:
                out.append("\\[")
            else:
                body = pattern[i + 1:j]
                out.append("[" + body.replace("\\", "\\\\") + "]")
                i = j
        else:
            out.append("\\" + c if not c.isalnum() else c)
        i += 1
    out.append("$")
    return "".join(out)


DECISIONS = ("allow", "veto", "error", "done", "denied")  # denied: refused by the server itself, no script


def _clip(value: Any) -> str:
    s = "" if value is None else str(value)
    return s if len(s) <= MAX_TEXT else s[:MAX_TEXT] + "…"


class AuditTrail:
    """Append-only store of events and script runs, written from a queue."""

    #: seconds between two tries of a batch the database refused (shared database away)
    RETRY_EVERY = 1.0

    def __init__(self, stores: StateStoreFactory, *, retention_days: float = 90, max_mb: float = 256,
                 queue_size: int = 10000) -> None:
        self.retention_days = retention_days
        self.max_bytes = int(max_mb * 1024 * 1024)
        self.node = stores.node
        self._queue: queue.Queue[tuple[str, tuple[Any, ...]] | None] = queue.Queue(queue_size)
        self._cond = threading.Condition()
        self._enqueued = 0
        self._written = 0
        self.dropped = 0
        self._closed = False
        self._db = self._open(stores)
        try:
            self._reader = self._open(stores)  # a read does not wait for the writer's batch
        except BaseException:
            self._db.close()
            raise
        self._shared = self._db.dialect.name == "postgresql"
        self._thread = threading.Thread(target=self._writer, name="scriptsftp-audit", daemon=True)
        self._thread.start()

    @staticmethod
    def _open(stores: StateStoreFactory) -> SqlDatabase:
        db = stores.database("audit", MIGRATIONS)  # SQLite: auto_vacuum=INCREMENTAL lets retention shrink it
        if db.dialect.name == "sqlite":
            with db.transaction() as cur:
                if "queued" not in {row[1] for row in cur.execute("PRAGMA table_info(runs)").fetchall()}:
                    cur.execute("ALTER TABLE runs ADD COLUMN queued REAL NOT NULL DEFAULT 0")  # a state_dir of 0.1
        return db

    # --- writing (any thread, never blocks) ------------------------------------------------

    def _put(self, table: str, row: tuple[Any, ...]) -> None:
        if self._closed:
            return
        try:
            self._queue.put_nowait((table, row))
        except queue.Full:
            self.dropped += 1
            metrics.AUDIT_DROPPED.inc()
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning("audit queue full: %d record(s) dropped so far", self.dropped)
            return
        with self._cond:
            self._enqueued += 1

    def record_event(self, event_id: str, data: dict[str, Any], decision: str, reason: str = "",
                     decided_by: str = "") -> None:
        size = data.get("size")
        self._put("events", (
            event_id, float(data.get("time") or time.time()), str(data.get("name", "")),
            str(data.get("session_id") or ""), str(data.get("protocol") or ""), str(data.get("remote_ip") or ""),
            str(data.get("user") or ""), str(data.get("path") or ""), str(data.get("target") or ""),
            size if isinstance(size, int) else None, decision, _clip(reason), decided_by, self.node,
        ))

    def record_run(self, event_id: str, script: str, function: str, mode: str, result: Any) -> None:
        logs = [{"message": _clip(line.message), "fields": {k: _clip(v) for k, v in (line.fields or {}).items()}}
                for line in list(result.logs)[:MAX_LOG_LINES]]
        self._put("runs", (
            event_id, time.time(), script, function, mode, result.verdict, _clip(result.reason),
            float(result.duration), result.error_kind, result.error_line, json.dumps(logs),
            float(getattr(result, "queued", 0.0)),
        ))

    # --- the writer thread --------------------------------------------------------------------

    _INSERT = {
        "events": f"INSERT INTO events ({_columns(EVENT_COLUMNS)}) VALUES ({', '.join('?' * len(EVENT_COLUMNS))})"
                  " ON CONFLICT (id) DO NOTHING",
        "runs": f"INSERT INTO runs ({_columns(RUN_COLUMNS)}) VALUES ({', '.join('?' * len(RUN_COLUMNS))})",
    }

    def _writer(self) -> None:
        last_retention = float("-inf")  # a first pass at start
        while True:
            batch: list[tuple[str, tuple[Any, ...]]] = []
            stop = False
            try:
                item = self._queue.get(timeout=5.0)
            except queue.Empty:
                pass  # nothing for 5 s: only the retention pass below
            else:
                stop = item is None
                if item is not None:
                    batch.append(item)
                    while len(batch) < 500:
                        try:
                            nxt = self._queue.get_nowait()
                        except queue.Empty:
                            break
                        if nxt is None:
                            stop = True
                            break
                        batch.append(nxt)
            if batch:
                self._write(batch)
            if time.monotonic() - last_retention > RETENTION_EVERY or stop:
                last_retention = time.monotonic()
                try:
                    self.apply_retention()
                except self._db.errors as exc:
                    log.error("audit retention failed: %s", exc)
            if stop:
                return

    def _write(self, batch: list[tuple[str, tuple[Any, ...]]]) -> None:
        """One transaction. A shared database that fails is tried again every second (the
        queue holds what comes meanwhile) until it takes the batch or the trail closes; a
        SQLite file that fails drops the batch, logged, as a full disk would."""
        warned = False
        while True:
            try:
                with self._db.transaction() as cur:
                    for table, row in batch:
                        cur.execute(self._INSERT[table], row)
                break
            except self._db.errors as exc:
                if not self._shared or self._closed:  # closing: what cannot be written now is lost, logged
                    log.error("audit: %d record(s) not written: %s", len(batch), exc)
                    break
                if not warned:
                    warned = True
                    log.error("audit: the shared database cannot be reached (%s); records wait in the "
                              "queue (%d at most) and are written when it can", exc, self._queue.maxsize)
                time.sleep(self.RETRY_EVERY)
        with self._cond:
            self._written += len(batch)
            self._cond.notify_all()

    def apply_retention(self) -> int:
        """Delete rows past the age limit, then the oldest tenth until under the size limit."""
        removed = 0
        with self._db.transaction() as cur:
            if self.retention_days > 0:
                cutoff = time.time() - self.retention_days * 86400
                removed += cur.execute("DELETE FROM runs WHERE time < ?", (cutoff,)).rowcount
                removed += cur.execute("DELETE FROM events WHERE time < ?", (cutoff,)).rowcount
            for _ in range(20):
                if self._used_bytes(cur) <= self.max_bytes:
                    break
                row = cur.execute("SELECT time FROM events ORDER BY time LIMIT 1 OFFSET "
                                  "(SELECT COUNT(*) / 10 FROM events)").fetchone()
                if row is None:
                    break
                removed += cur.execute("DELETE FROM runs WHERE time <= ?", (row[0],)).rowcount
                removed += cur.execute("DELETE FROM events WHERE time <= ?", (row[0],)).rowcount
        if removed:
            if not self._shared:
                with self._db.read() as cur:
                    cur.execute("PRAGMA incremental_vacuum")
            log.info("audit retention: removed %d old record(s)", removed)
        return removed

    def _used_bytes(self, cur: Cursor | None = None) -> int:
        if cur is None:
            with self._db.read() as cur:
                return self._used_bytes(cur)
        if self._shared:  # what the tables and their indexes hold (the space a DELETE frees is reused)
            row = cur.execute("SELECT pg_total_relation_size('events') + pg_total_relation_size('runs')").fetchone()
            return int(row[0]) if row else 0
        page_size = (cur.execute("PRAGMA page_size").fetchone() or (0,))[0]
        pages = (cur.execute("PRAGMA page_count").fetchone() or (0,))[0]
        free = (cur.execute("PRAGMA freelist_count").fetchone() or (0,))[0]
        return int((pages - free) * page_size)

    def flush(self, timeout: float = 2.0) -> bool:
        """Wait until everything recorded so far is written (the API reads its own writes)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            target = self._enqueued
            while self._written < target:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True

    def stats(self) -> dict[str, int]:
        with self._cond:
            return {"queued": self._queue.qsize(), "written": self._written, "dropped": self.dropped}

    def close(self) -> None:
        """Write what is queued, then stop."""
        if self._closed:
            return
        self._closed = True
        try:
            self._queue.put(None, timeout=5)
        except queue.Full:
            pass
        self._thread.join(timeout=10)
        self._db.close()
        self._reader.close()

    # --- reading --------------------------------------------------------------------------

    def query(self, *, since: float | None = None, until: float | None = None, user: str | None = None,
              path: str | None = None, decision: str | None = None, name: str | None = None,
              event_id: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """Events, newest first, each with its ``runs``. ``path`` may be a glob (``*``, ``?``, ``[..]``)."""
        words = self._reader.dialect.words
        where: list[str] = []
        args: list[Any] = []
        if event_id:
            where.append("id = ?")
            args.append(event_id)
        if since is not None:
            where.append("time >= ?")
            args.append(since)
        if until is not None:
            where.append("time <= ?")
            args.append(until)
        if user:
            where.append('"user" = ?')
            args.append(user)
        if path:
            if any(c in path for c in "*?["):
                where.append(f"(path {words['glob']} ? OR target {words['glob']} ?)")
                pattern = glob_regex(path) if self._shared else path
                args += [pattern, pattern]
            else:
                where.append("(path = ? OR target = ?)")
                args += [path, path]
        if decision:
            where.append("decision = ?")
            args.append(decision)
        if name:
            where.append("name = ?")
            args.append(name)
        order = words["insert_order"]
        sql = f"SELECT {_columns(EVENT_COLUMNS)} FROM events" + (" WHERE " + " AND ".join(where) if where else "")
        sql += f" ORDER BY time DESC, {order} DESC LIMIT ?"
        args.append(max(1, min(int(limit), 1000)))
        with self._reader.read() as cur:
            events = [dict(zip(EVENT_COLUMNS, r)) for r in cur.execute(sql, args).fetchall()]
            ids = [e["id"] for e in events]
            runs: dict[str, list[dict[str, Any]]] = {i: [] for i in ids}
            for i in range(0, len(ids), 500):
                chunk = ids[i:i + 500]
                q = (f"SELECT {_columns(RUN_COLUMNS)} FROM runs WHERE event_id IN ({','.join('?' * len(chunk))})"
                     f" ORDER BY {order}")
                for r in cur.execute(q, chunk).fetchall():
                    run = dict(zip(RUN_COLUMNS, r))
                    run["logs"] = json.loads(run["logs"] or "[]")
                    runs[run.pop("event_id")].append(run)
        for e in events:
            e["runs"] = runs.get(e["id"], [])
        return events


# --- what the scripting engine calls -------------------------------------------------------------


class RefusalRecorder:
    """Where refusals go (the Session's and the login core's ``refusals`` sink): each one an
    ``events`` row with decision ``denied``, the refusal's kind as ``decided_by``."""

    def __init__(self, trail: AuditTrail) -> None:
        self.trail = trail

    def __call__(self, data: dict[str, Any], reason: str, kind: str) -> None:
        self.trail.record_event(new_event_id(), {**data, "time": time.time()}, "denied", reason, decided_by=kind)


class ScriptAuditRecorder:
    """The engine's :class:`~scriptsftp.server.contract.scripting.ScriptAudit` (the daemon
    hands it over): each decision and each handler run counted in the metrics and written
    to the trail, under the event's id."""

    def __init__(self, trail: AuditTrail) -> None:
        self.trail = trail

    def event_decided(self, event_id: str, data: dict[str, Any], verdict: str, reason: str,
                      decided_by: str) -> None:
        metrics.event(str(data.get("name", "")), verdict)
        self.trail.record_event(event_id, data, verdict, reason, decided_by)

    def script_ran(self, event_id: str, script: str, function: str, mode: str, result: Any) -> None:
        metrics.script_run(script, result.duration, result.verdict, result.error_kind)
        self.trail.record_run(event_id, script, function, mode, result)


__all__ = ["AuditTrail", "RefusalRecorder", "ScriptAuditRecorder", "new_event_id", "DECISIONS"]

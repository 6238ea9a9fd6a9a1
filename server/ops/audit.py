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
file grows past ``[server] audit_max_mb``.
"""

from __future__ import annotations

import json
import logging
import queue
import sqlite3
import threading
import time
from typing import Any

from scriptsftp.server.contract.scripting import new_event_id
from scriptsftp.server.contract.state import StateStoreFactory
from scriptsftp.server.support import metrics

log = logging.getLogger("scriptsftp.audit")

MAX_LOG_LINES = 50          # per handler call: api.log lines kept in the trail
MAX_TEXT = 2000             # characters per stored text (reason, log line)
RETENTION_EVERY = 300.0     # seconds between retention passes

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id         TEXT PRIMARY KEY,
    time       REAL NOT NULL,
    name       TEXT NOT NULL,
    session_id TEXT NOT NULL DEFAULT '',
    protocol   TEXT NOT NULL DEFAULT '',
    remote_ip  TEXT NOT NULL DEFAULT '',
    user       TEXT NOT NULL DEFAULT '',
    path       TEXT NOT NULL DEFAULT '',
    target     TEXT NOT NULL DEFAULT '',
    size       INTEGER,
    decision   TEXT NOT NULL,
    reason     TEXT NOT NULL DEFAULT '',
    decided_by TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS events_time ON events(time);
CREATE INDEX IF NOT EXISTS events_user ON events(user, time);
CREATE INDEX IF NOT EXISTS events_path ON events(path, time);
CREATE TABLE IF NOT EXISTS runs (
    event_id   TEXT NOT NULL,
    time       REAL NOT NULL,
    script     TEXT NOT NULL,
    function   TEXT NOT NULL,
    mode       TEXT NOT NULL,
    verdict    TEXT NOT NULL,
    reason     TEXT NOT NULL DEFAULT '',
    duration   REAL NOT NULL,
    error_kind TEXT,
    error_line INTEGER,
    logs       TEXT NOT NULL DEFAULT '[]',
    queued     REAL NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS runs_event ON runs(event_id);
CREATE INDEX IF NOT EXISTS runs_time ON runs(time);
"""

DECISIONS = ("allow", "veto", "error", "done", "denied")  # denied: refused by the server itself, no script


def _clip(value: Any) -> str:
    s = "" if value is None else str(value)
    return s if len(s) <= MAX_TEXT else s[:MAX_TEXT] + "…"


class AuditTrail:
    """Append-only SQLite store of events and script runs, written from a queue."""

    def __init__(self, stores: StateStoreFactory, *, retention_days: float = 90, max_mb: float = 256,
                 queue_size: int = 10000) -> None:
        self.retention_days = retention_days
        self.max_bytes = int(max_mb * 1024 * 1024)
        self._queue: queue.Queue[tuple[str, tuple[Any, ...]] | None] = queue.Queue(queue_size)
        self._cond = threading.Condition()
        self._enqueued = 0
        self._written = 0
        self.dropped = 0
        self._closed = False
        self._db = self._open(stores)
        self._read_lock = threading.Lock()
        self._reader = self._open(stores)
        self._thread = threading.Thread(target=self._writer, name="scriptsftp-audit", daemon=True)
        self._thread.start()

    @staticmethod
    def _open(stores: StateStoreFactory) -> sqlite3.Connection:
        db = stores.connect("audit")  # auto_vacuum=INCREMENTAL on a new file: lets retention shrink it
        db.executescript(_SCHEMA)
        if "queued" not in {row[1] for row in db.execute("PRAGMA table_info(runs)")}:
            db.execute("ALTER TABLE runs ADD COLUMN queued REAL NOT NULL DEFAULT 0")  # a state_dir of 0.1
        db.row_factory = sqlite3.Row
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
            size if isinstance(size, int) else None, decision, _clip(reason), decided_by,
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
        "events": "INSERT OR IGNORE INTO events VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
        "runs": "INSERT INTO runs (event_id, time, script, function, mode, verdict, reason, duration,"
                " error_kind, error_line, logs, queued) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
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
                except sqlite3.Error as exc:
                    log.error("audit retention failed: %s", exc)
            if stop:
                return

    def _write(self, batch: list[tuple[str, tuple[Any, ...]]]) -> None:
        try:
            self._db.execute("BEGIN")
            for table, row in batch:
                self._db.execute(self._INSERT[table], row)
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            log.error("audit: %d record(s) not written: %s", len(batch), exc)
            try:
                self._db.execute("ROLLBACK")
            except sqlite3.Error:
                pass
        with self._cond:
            self._written += len(batch)
            self._cond.notify_all()

    def apply_retention(self) -> int:
        """Delete rows past the age limit, then the oldest tenth until under the size limit."""
        removed = 0
        db = self._db
        if self.retention_days > 0:
            cutoff = time.time() - self.retention_days * 86400
            removed += db.execute("DELETE FROM runs WHERE time < ?", (cutoff,)).rowcount
            removed += db.execute("DELETE FROM events WHERE time < ?", (cutoff,)).rowcount
        for _ in range(20):
            if self._used_bytes() <= self.max_bytes:
                break
            row = db.execute("SELECT time FROM events ORDER BY time LIMIT 1 OFFSET "
                             "(SELECT COUNT(*) / 10 FROM events)").fetchone()
            if row is None:
                break
            removed += db.execute("DELETE FROM runs WHERE time <= ?", (row[0],)).rowcount
            removed += db.execute("DELETE FROM events WHERE time <= ?", (row[0],)).rowcount
        if removed:
            db.execute("PRAGMA incremental_vacuum")
            log.info("audit retention: removed %d old record(s)", removed)
        return removed

    def _used_bytes(self) -> int:
        page_size = self._db.execute("PRAGMA page_size").fetchone()[0]
        pages = self._db.execute("PRAGMA page_count").fetchone()[0]
        free = self._db.execute("PRAGMA freelist_count").fetchone()[0]
        return (pages - free) * page_size

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
        with self._read_lock:
            self._reader.close()

    # --- reading --------------------------------------------------------------------------

    def query(self, *, since: float | None = None, until: float | None = None, user: str | None = None,
              path: str | None = None, decision: str | None = None, name: str | None = None,
              event_id: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """Events, newest first, each with its ``runs``. ``path`` may be a glob (``*``, ``?``, ``[..]``)."""
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
            where.append("user = ?")
            args.append(user)
        if path:
            if any(c in path for c in "*?["):
                where.append("(path GLOB ? OR target GLOB ?)")
            else:
                where.append("(path = ? OR target = ?)")
            args += [path, path]
        if decision:
            where.append("decision = ?")
            args.append(decision)
        if name:
            where.append("name = ?")
            args.append(name)
        sql = "SELECT * FROM events" + (" WHERE " + " AND ".join(where) if where else "")
        sql += " ORDER BY time DESC, rowid DESC LIMIT ?"
        args.append(max(1, min(int(limit), 1000)))
        with self._read_lock:
            events = [dict(r) for r in self._reader.execute(sql, args)]
            ids = [e["id"] for e in events]
            runs: dict[str, list[dict[str, Any]]] = {i: [] for i in ids}
            for i in range(0, len(ids), 500):
                chunk = ids[i:i + 500]
                q = f"SELECT * FROM runs WHERE event_id IN ({','.join('?' * len(chunk))}) ORDER BY rowid"
                for r in self._reader.execute(q, chunk):
                    run = dict(r)
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

"""The audit trail: "why was my file rejected?", ids shared with the JSON log, retention, no blocking."""

from __future__ import annotations

import io
import json
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from adminkit import admin_toml, binding, get, token_hash, write_script  # noqa: F401
from conftest import close_client, paramiko_client
from scriptsftp.server.ops.audit import AuditTrail, ScriptAuditRecorder
from scriptsftp.server.stores import StateStores
from scriptsftp.server.contract.dispatch import Decision
from scriptsftp.server.contract.scripting import EventTrace


def Trace(trail: AuditTrail, data: dict) -> EventTrace:
    """What the engine does for each event, against this trail."""
    return EventTrace(ScriptAuditRecorder(trail), data)


def script_ran(trail: AuditTrail, data: dict, script: str, function: str, mode: str, result) -> None:
    ScriptAuditRecorder(trail).script_ran(data["_event_id"], script, function, mode, result)

NO_EXE = """
def on_pre_publish(event, api):
    head = api.file.read(2)
    api.log("checked magic", magic=head.hex(), size=api.file.size)
    if head == b"MZ":
        api.veto("Windows executable inside " + event.path)
"""


def test_why_was_my_file_rejected(daemons, token_hash, alice_key):
    write_script(daemons, "no_exe.py", NO_EXE)
    d = daemons.start(admin_toml(token_hash, bindings=binding("pre-publish", "no_exe.py", allow='["read"]')),
                      server_extra='log_format = "json"')
    client = paramiko_client(d, key=alice_key)
    try:
        client.putfo(io.BytesIO(b"hello"), "/fine.txt")
        # paramiko ignores errors on CLOSE: the user only sees the file never appear
        client.putfo(io.BytesIO(b"MZ\x90\x00" * 100), "/report.pdf", confirm=False)
    finally:
        close_client(client)
    assert not (d.home() / "report.pdf").exists()

    rows = get(d, "/api/events?user=alice&decision=veto")
    assert len(rows) == 1
    e = rows[0]
    assert (e["name"], e["path"], e["user"], e["protocol"]) == ("pre-publish", "/report.pdf", "alice", "sftp")
    assert e["decision"] == "veto" and e["reason"] == "Windows executable inside /report.pdf"
    assert e["decided_by"] == "no_exe.py" and e["session_id"]
    (run,) = e["runs"]
    assert (run["script"], run["function"], run["verdict"]) == ("no_exe.py", "on_pre_publish", "veto")
    assert run["duration"] > 0
    assert run["logs"] == [{"message": "checked magic", "fields": {"magic": "4d5a", "size": "400"}}]

    # the accepted upload is there too, and the path filter (exact or glob) finds each
    assert [x["decision"] for x in get(d, "/api/events?path=/fine.txt")] == ["allow"]
    assert {x["path"] for x in get(d, "/api/events?path=/*.pdf")} == {"/report.pdf"}
    assert get(d, "/api/events?user=bob") == []
    assert len(get(d, "/api/events?since=10m")) == 2 and get(d, f"/api/events?since={time.time() + 60}") == []

    # the JSON log lines about this event carry the same id
    lines = [json.loads(line) for line in d.log_text().splitlines() if line.startswith("{")]
    vetoed = [x for x in lines if x.get("event_id") == e["id"]]
    assert any("vetoed" in x["msg"] for x in vetoed), vetoed
    assert any(x["logger"] == "scriptsftp.script" and "checked magic" in x["msg"] for x in vetoed)

    # and the trail survives a restart (state_dir/audit.sqlite3)
    assert d.stop() == 0 and "Traceback" not in d.log_text()  # the admin listener stops cleanly too
    d2 = daemons.start(admin_toml(token_hash, bindings=binding("pre-publish", "no_exe.py", allow='["read"]')))
    assert [x["id"] for x in get(d2, "/api/events?decision=veto")] == [e["id"]]


# --- the store on its own ---------------------------------------------------------------


def _result(verdict="allow", reason="", logs=(), duration=0.01, kind=None, line=None):
    return SimpleNamespace(verdict=verdict, reason=reason, logs=list(logs), duration=duration, error_kind=kind,
                           error_line=line)


def _event(i: int, *, t: float | None = None, user="alice", path="/inbox/a.txt") -> dict:
    return {"name": "pre-upload", "time": t or time.time(), "session_id": f"s{i}", "protocol": "sftp",
            "remote_ip": "127.0.0.1", "user": user, "path": path}


def test_store_records_queries_and_is_append_only(tmp_path: Path):
    trail = AuditTrail(StateStores(tmp_path))
    try:
        data = _event(1)
        trace = Trace(trail, data)
        assert data["_event_id"] == trace.id  # scripts never see "_" keys; log context does
        script_ran(trail, data, "a.py", "on_pre_upload", "sync",
                   _result(logs=[SimpleNamespace(message="x" * 5000, fields={"k": 1})]))
        script_ran(trail, data, "b.py", "on_pre_upload", "sync", _result("error", "boom", kind="timeout", line=7))
        assert trace.decided(Decision(False, "server-side check failed"), "b.py", failed=True).allowed is False
        other = _event(2, user="bob", path="/x.bin")
        Trace(trail, other).decided(Decision(True))
        assert trail.flush(5)
        rows = trail.query(user="alice")
        assert len(rows) == 1 and rows[0]["decision"] == "error" and rows[0]["decided_by"] == "b.py"
        runs = rows[0]["runs"]
        assert [r["script"] for r in runs] == ["a.py", "b.py"]
        assert len(runs[0]["logs"][0]["message"]) <= 2001  # clipped
        assert runs[1]["error_kind"] == "timeout" and runs[1]["error_line"] == 7
        assert [r["user"] for r in trail.query()] == ["bob", "alice"]  # newest first
        assert trail.query(path="/inbox/*")[0]["user"] == "alice"
        assert trail.query(decision="allow")[0]["user"] == "bob"
        assert trail.query(limit=1)[0]["user"] == "bob"
        assert trail.stats()["written"] == 4
    finally:
        trail.close()


def test_queue_time_is_recorded_apart_from_the_run_and_shown(tmp_path: Path):
    """Issue 15 item 4: the wait for a free worker is its own column (``queued``, part of
    ``duration``), so a crowded pool is told from a slow script; a state_dir made before
    the column existed gets it at open."""
    import sqlite3
    from scriptsftp.server.ops.admin_client import format_events
    old = sqlite3.connect(tmp_path / "audit.sqlite3")  # the runs table as it was before the column
    old.execute("CREATE TABLE runs (event_id TEXT NOT NULL, time REAL NOT NULL, script TEXT NOT NULL,"
                " function TEXT NOT NULL, mode TEXT NOT NULL, verdict TEXT NOT NULL, reason TEXT NOT NULL"
                " DEFAULT '', duration REAL NOT NULL, error_kind TEXT, error_line INTEGER,"
                " logs TEXT NOT NULL DEFAULT '[]')")
    old.commit()
    old.close()
    trail = AuditTrail(StateStores(tmp_path))
    try:
        data = _event(1)
        trace = Trace(trail, data)
        crowded = _result(duration=2.5)
        crowded.queued = 2.0
        script_ran(trail, data, "slow.py", "on_pre_upload", "sync", crowded)
        script_ran(trail, data, "quick.py", "on_pre_upload", "sync", _result(duration=0.01))  # no queued
        trace.decided(Decision(True))
        assert trail.flush(5)
        runs = trail.query()[0]["runs"]
        assert [(r["script"], r["duration"], r["queued"]) for r in runs] == [
            ("slow.py", 2.5, 2.0), ("quick.py", 0.01, 0.0)]
        lines = format_events(trail.query())
        assert any("slow.py:on_pre_upload allow (2500.0 ms, 2000.0 ms of it waiting for a worker)" in ln
                   for ln in lines), lines
        assert any("quick.py:on_pre_upload allow (10.0 ms)" in ln for ln in lines), lines
    finally:
        trail.close()


def test_retention_by_age_and_size(tmp_path: Path):
    trail = AuditTrail(StateStores(tmp_path), retention_days=1, max_mb=0.25)
    try:
        old = time.time() - 3 * 86400
        for i in range(5):
            Trace(trail, _event(i, t=old)).decided(Decision(True))
        for i in range(3000):
            data = _event(i, path=f"/inbox/{i:05d}-" + "p" * 150)
            Trace(trail, data).decided(Decision(True))
        assert trail.flush(30)
        assert trail.apply_retention() > 0
        rows = trail.query(limit=1000)
        assert all(r["time"] > old + 86400 for r in rows)
        assert trail._used_bytes() <= 0.25 * 1024 * 1024
        newest = trail.query(limit=1)[0]
        assert newest["path"].startswith("/inbox/02999-")  # the newest rows are kept
    finally:
        trail.close()


def test_a_full_queue_drops_and_counts_instead_of_blocking(tmp_path: Path):
    trail = AuditTrail(StateStores(tmp_path), queue_size=10)
    release = threading.Event()
    real_write = trail._write

    def slow_write(batch):  # a writer stuck on a slow disk
        release.wait(30)
        real_write(batch)

    trail._write = slow_write
    try:
        start = time.monotonic()
        for i in range(200):
            Trace(trail, _event(i)).decided(Decision(True))
        assert time.monotonic() - start < 2.0
        assert trail.dropped >= 150
        assert trail.stats()["dropped"] == trail.dropped
        release.set()
        assert trail.flush(10)
        assert len(trail.query(limit=1000)) == 200 - trail.dropped
    finally:
        release.set()
        trail.close()

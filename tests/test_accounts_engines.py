"""The account database under several writing processes, on SQLite and on PostgreSQL.

The CLI, the REST API, the daemon and other nodes each open the database themselves, so
its guarantees must hold between processes, not only between threads of one: a name
taken twice at the same instant is added once and refused once (AccountExists, never the
driver's unique-violation error), usage totals stay exact under concurrent writers, and
a reader polling the change feed sees every change once, in order. Each test runs on both
engines (conftest's ``accounts_database``); the writers are separate processes started
together on a barrier.
"""

from __future__ import annotations

import multiprocessing as mp
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pytest

from scriptsftp.server.stores.accounts_db import AccountDb, AccountExists
from scriptsftp.server.stores.sql import open_database
from scriptsftp.server.support.config import User

WRITERS = 3
NAMES, ROUNDS, EDITS = 15, 100, 20  # per writer: names raced for, usage rounds, users added and disabled


def _open(url: str, sqlite_path: str) -> AccountDb:
    db = AccountDb(open_database(url, Path(sqlite_path)))
    db.upgrade()
    return db


def _writer(job: str, url: str, sqlite_path: str, barrier: Any, index: int, out: Any) -> None:
    """One writing process: waits for the others, runs ``job``, reports what happened."""
    try:
        db = _open(url, sqlite_path)
        try:
            barrier.wait(60)
            out.put((index, JOBS[job](db, index)))
        finally:
            db.close()
    except BaseException:
        out.put((index, {"crashed": traceback.format_exc()}))


def _add_the_same_users(db: AccountDb, index: int) -> dict[str, str]:
    outcome: dict[str, str] = {}
    for i in range(NAMES):
        name = f"racer{i:02d}"
        try:
            db.add_user(User(name=name, home=f"/srv/homes/{name}"), f"writer{index}")
            outcome[name] = "added"
        except AccountExists:
            outcome[name] = "exists"
        except Exception as exc:  # noqa: BLE001  (what the test must never see)
            outcome[name] = f"{type(exc).__module__}.{type(exc).__name__}: {exc}"
    return outcome


def _count_usage(db: AccountDb, index: int) -> dict[str, str]:
    for _ in range(ROUNDS):
        db.add_usage("user:acme", 7, 1)
        db.add_usage("folder:shared", 1000, 2)
        db.add_usage("folder:shared", -1, -1)
        db.add_transfer("acme", "2026-12-07", 3, 5)
    return {}


def _write_many(db: AccountDb, index: int) -> dict[str, str]:
    for i in range(EDITS):
        name = f"w{index}-{i}"
        db.add_user(User(name=name, home=f"/srv/homes/{name}"), f"writer{index}")
        db.set_disabled(name, True, "test", f"writer{index}")
    return {}


JOBS = {"same-users": _add_the_same_users, "usage": _count_usage, "many": _write_many}


def _run_writers(job: str, url: str, sqlite_path: Path, *, during: Any = None) -> list[dict[str, str]]:
    """``WRITERS`` processes run ``job`` at once; ``during()`` is called in this process
    until they are done. Returns each writer's report."""
    ctx = mp.get_context("spawn")  # never fork a process that holds pooled connections
    barrier, out = ctx.Barrier(WRITERS), ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(job, url, str(sqlite_path), barrier, i, out))
             for i in range(WRITERS)]
    for p in procs:
        p.start()
    try:
        reports: dict[int, dict[str, str]] = {}
        while len(reports) < WRITERS:
            if during is not None:
                during()
            try:
                index, report = out.get(timeout=0.05 if during is not None else 120)
            except Exception:  # queue.Empty
                if not any(p.is_alive() for p in procs) and out.empty():
                    raise AssertionError(f"writers died without a report: {reports}") from None
                continue
            assert "crashed" not in report, report["crashed"]
            reports[index] = report
    finally:
        for p in procs:
            p.join(60)
            if p.is_alive():
                p.kill()
    return [reports[i] for i in range(WRITERS)]


@pytest.fixture
def db_url(accounts_database: str, tmp_path: Path) -> tuple[str, Path]:
    """The engine's URL and the SQLite file the writers share (used when the URL is empty);
    the schema is made here first, so the writers race on accounts, not on the migration."""
    sqlite_path = tmp_path / "accounts.sqlite3"
    _open(accounts_database, str(sqlite_path)).close()
    return accounts_database, sqlite_path


def test_a_name_taken_by_two_processes_at_once_is_added_once(db_url: tuple[str, Path]) -> None:
    reports = _run_writers("same-users", *db_url)
    for i in range(NAMES):
        name = f"racer{i:02d}"
        outcomes = sorted(r[name] for r in reports)
        assert outcomes == ["added"] + ["exists"] * (WRITERS - 1), (name, outcomes)
    db = _open(*map(str, db_url))
    try:
        assert len(db.list_users()) == NAMES
        adds = [c for c in db.changes_since(0) if c.action == "add"]
        assert sorted(c.name for c in adds) == [f"racer{i:02d}" for i in range(NAMES)]  # one add each
    finally:
        db.close()


def test_usage_totals_stay_exact_under_writers_in_several_processes(db_url: tuple[str, Path]) -> None:
    _run_writers("usage", *db_url)
    db = _open(*map(str, db_url))
    try:
        assert db.usage("user:acme") == (WRITERS * ROUNDS * 7, WRITERS * ROUNDS)
        assert db.usage("folder:shared") == (WRITERS * ROUNDS * 999, WRITERS * ROUNDS)
        assert db.transfer_usage("acme", "2026-12-07") == (WRITERS * ROUNDS * 3, WRITERS * ROUNDS * 5)
    finally:
        db.close()


def test_a_reader_polling_the_feed_sees_every_change_once_in_order(db_url: tuple[str, Path]) -> None:
    reader = _open(*map(str, db_url))
    seen: list[int] = []
    last = reader.last_change()

    def poll() -> None:
        nonlocal last
        for change in reader.changes_since(last):
            seen.append(change.id)
            last = change.id

    try:
        _run_writers("many", *db_url, during=poll)
        poll()
        everything = [c.id for c in reader.changes_since(0)]
    finally:
        reader.close()
    assert len(everything) == WRITERS * EDITS * 2
    assert seen == everything  # none skipped by a poll that ran while a lower id was uncommitted


# --- lookups never scan ---------------------------------------------------------------------

class _RecordingCursor:
    """The engine's cursor, noting every statement and its parameters on the way through."""

    def __init__(self, cur: Any, seen: list[tuple[str, tuple[Any, ...]]]) -> None:
        self._cur, self._seen = cur, seen

    def execute(self, sql: str, params: Any = ()) -> "_RecordingCursor":
        self._seen.append((sql, tuple(params)))
        self._cur.execute(sql, params)
        return self

    def fetchone(self) -> Any:
        return self._cur.fetchone()

    def fetchall(self) -> Any:
        return self._cur.fetchall()

    @property
    def rowcount(self) -> int:
        return int(self._cur.rowcount)


def _scans(db: AccountDb, sql: str, params: tuple[Any, ...]) -> list[str]:
    """The tables ``sql`` would read whole, by the engine's own plan. PostgreSQL plans with
    sequential scans disabled, so a Seq Scan left in the plan means no index can serve it
    (on a small table the planner would otherwise rightly prefer one)."""
    with db.db.transaction() as cur:
        if db.db.dialect.name == "sqlite":
            rows = cur.execute("EXPLAIN QUERY PLAN " + sql, params).fetchall()
            return [r[3] for r in rows if r[3].startswith("SCAN ") and "CONSTANT ROW" not in r[3]]
        cur.execute("SET LOCAL enable_seqscan = off")
        (plan,) = cur.execute("EXPLAIN (FORMAT JSON) " + sql, params).fetchone()  # type: ignore[misc]
        found: list[str] = []

        def walk(node: dict[str, Any]) -> None:
            if node.get("Node Type") == "Seq Scan":
                found.append(f"Seq Scan on {node.get('Relation Name')}")
            for child in node.get("Plans", []):
                walk(child)

        walk(plan[0]["Plan"])
        return found


def test_lookups_never_scan(tmp_path: Path, accounts_database: str, alice_key) -> None:
    """Every statement a login, a watcher poll, a usage update and a one-account edit runs is
    served by an index, on both engines (the engine's EXPLAIN of each, with its parameters)."""
    from scriptsftp.server.stores.accounts_db import DatabaseAccountSource
    from scriptsftp.server.support.config import load_config

    from conftest import accounts_toml

    config = tmp_path / "conf.toml"
    config.write_text(f'[server]\nstate_dir = "state"\n{accounts_toml(accounts_database)}')
    cfg = load_config(config)
    db = AccountDb.open(cfg)
    try:
        hash_ = "$argon2id$v=19$m=65536,t=3,p=4$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaGhhc2hoYXNoaGFzaA"
        db.import_({"format": "scriptsftp-accounts", "version": 1,
                    "folders": [{"name": "shared", "path": "/srv/shared"}],
                    "groups": [{"name": "staff", "folders": {"/shared": "shared"}}],
                    "users": [{"name": f"u{i:04d}", "home": f"/srv/homes/u{i:04d}", "groups": ["staff"],
                               "password_hash": hash_, "public_keys": [alice_key.public_line]}
                              for i in range(300)]}, "import")
        db.add_usage("user:u0150", 10, 1)
        seen: list[tuple[str, tuple[Any, ...]]] = []
        engine_transaction = db.db.transaction

        @contextmanager
        def recording() -> Iterator[_RecordingCursor]:
            with engine_transaction() as cur:
                yield _RecordingCursor(cur, seen)

        db.db.transaction = recording  # type: ignore[method-assign]
        source = DatabaseAccountSource(db, cfg)
        first = db.last_change()
        # a login (twice: the second takes the kept record), then what follows it
        assert source.get("u0150") is not None and source.get("u0150") is not None
        assert source.get("nobody") is None
        db.record_login("u0150", 1.0)
        db.changes_since(first - 3)
        db.usage("user:u0150")
        db.add_usage("user:u0150", 5, 1)
        db.add_usage("folder:shared", -5, -1)
        db.set_usage("user:u0151", 1, 1)
        db.transfer_usage("u0150", "2026-12-07")
        db.add_transfer("u0150", "2026-12-07", 1, 2)
        # one-account edits by the CLI and the API
        stored = db.get_user("u0150")
        assert stored is not None
        db.update_user(stored.user.model_copy(update={"max_sessions": 3}), "test")
        db.set_password("u0150", hash_, "test")
        db.set_disabled("u0150", True, "why", "test")
        fingerprint = db.add_key("u0150", _other_key_line(), "test")
        db.remove_key("u0150", fingerprint, "test")
        db.get_group("staff")
        db.get_folder("shared")
        with pytest.raises(Exception, match="still used"):
            db.delete_group("staff", "test")
        with pytest.raises(Exception, match="still used"):
            db.delete_folder("shared", "test")
        db.delete_user("u0151", "test")
        db.db.transaction = engine_transaction  # type: ignore[method-assign]

        statements = dict.fromkeys(seen)  # each distinct statement once, in order
        assert len(statements) > 15
        scanning = {sql: scans for (sql, params) in statements if (scans := _scans(db, sql, params))}
        assert scanning == {}
    finally:
        db.close()


def _other_key_line() -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


def test_listings_are_in_the_same_order_on_both_engines(db_url: tuple[str, Path]) -> None:
    """By code point, as SQLite compares text, whatever the PostgreSQL database's collation (the
    test cluster's databases use ICU's en-US, as a server set up in English would): an export
    made on one engine is byte for byte the export of its import on the other."""
    from scriptsftp.server.support.config import Folder, Group

    names = ["a_b", "aB", "Ab", "a-c", "ab", "B", "a.z", "Z0", "a@b"]
    db = _open(*map(str, db_url))
    try:
        for name in names:
            db.add_folder(Folder(name=name, path=f"/srv/{name}"), "test")
            db.add_group(Group(name=name, folders={"/f": name}), "test")
            db.add_user(User(name=name, home=f"/srv/homes/{name}", groups=[name, "a_b"]), "test")
        expected = sorted(names)
        assert [u.user.name for u in db.list_users()] == expected
        assert db.user_names() == expected
        assert [g.group.name for g in db.list_groups()] == expected
        assert [f.folder.name for f in db.list_folders()] == expected
        with pytest.raises(Exception, match="still used by " + ", ".join(f"user '{n}'" for n in expected[:5])):
            db.delete_group("a_b", "test")
    finally:
        db.close()


def test_a_dump_moves_between_sqlite_and_postgresql_unchanged(tmp_path: Path, pg, alice_key) -> None:
    """SQLite -> PostgreSQL -> SQLite (``accounts export``, ``import``): every definition, hash,
    key, stamp and odd character arrives as it left, and the dumps are identical."""
    import json

    from scriptsftp.server.support.config import Folder, Group

    hash_ = "$argon2id$v=19$m=65536,t=3,p=4$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaGhhc2hoYXNoaGFzaA"
    pg_url = pg.new_database()
    first = _open("", str(tmp_path / "first.sqlite3"))
    middle = _open(pg_url, "")
    last = _open("", str(tmp_path / "last.sqlite3"))
    try:
        first.add_folder(Folder(name="shared", path="/srv/shared", quota_size=10**12, quota_files=5,
                                permissions={"/": ["list"], "/in": ["*"]}, description="Ünïcode ✓ 'quotes' \"and\" %s ?"),
                         "cli:root")
        first.add_group(Group(name="Partners", folders={"/shared": "shared"}, quota_files=7,
                              allowed_ips=["10.0.0.0/8"]), "api:ops")
        for name in ["zed", "Anna", "a_b", "x.y@z"]:
            first.add_user(User.model_validate({
                "name": name, "home": f"/srv/homes/{name}", "groups": ["Partners"], "password_hash": hash_,
                "public_keys": [alice_key.public_line], "expires": "2030-01-02T03:04:05Z",
                "disabled": name == "zed", "disabled_reason": "ended – see ticket #7" if name == "zed" else "",
                "home_folders": ["/inbox"], "bandwidth_up": 2**40}, strict=False), "cli:root")
        first.record_login("Anna", 1234567890.123456)
        text = json.dumps(first.export(), sort_keys=True)
        assert middle.import_(json.loads(text), "import") == {"added": 6, "replaced": 0}
        assert json.dumps(middle.export(), sort_keys=True) == text
        assert last.import_(middle.export(), "import") == {"added": 6, "replaced": 0}
        assert json.dumps(last.export(), sort_keys=True) == text
    finally:
        for db in (first, middle, last):
            db.close()
        pg.drop_database(pg_url)

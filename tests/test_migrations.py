"""The one migration runner (server/stores/migrations.py) and rolling upgrades, on SQLite and
PostgreSQL: a node one release older keeps running against a schema one step newer when that
step is marked compatible, and refuses in one line when it is not (docs/cluster.md, "Rolling
upgrade"). "Old code" and "new code" are the same runner given the migration list of each
release, as two releases of a store would hand it; the account database is tested with its
real migrations plus one step of a release that does not exist yet."""

from __future__ import annotations

from pathlib import Path

import pytest

from scriptsftp.server.contract.state import Migration
from scriptsftp.server.stores import migrations
from scriptsftp.server.stores.accounts_db import MIGRATIONS, SCHEMA_VERSION, AccountDb, SchemaTooNew, _AccountBook
from scriptsftp.server.stores.sql import open_database
from scriptsftp.server.stores.state import StateSchemaTooNew, migrate
from scriptsftp.server.support.config import User

V1 = (1, ["CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT NOT NULL)"])
# adds a nullable column: release 1's INSERT (without it) and SELECT (by name) still work
V2_COMPATIBLE = Migration(2, ["ALTER TABLE notes ADD COLUMN author TEXT"], compatible=True)
# renames the column release 1 writes: release 1 would fail on its first INSERT
V2_BREAKING = (2, ["ALTER TABLE notes RENAME COLUMN body TO text"])
V3_COMPATIBLE = Migration(3, ["CREATE INDEX notes_author ON notes (author)"], compatible=True)


@pytest.fixture
def db(accounts_database: str, tmp_path: Path):
    """An empty database, once per engine (conftest's accounts_database)."""
    database = open_database(accounts_database, tmp_path / "m.sqlite3")
    yield database
    database.close()


def old_code_writes(db) -> None:
    """What release 1 does with its table."""
    with db.transaction() as cur:
        cur.execute("INSERT INTO notes (id, body) VALUES (?, ?)", (1, "from the old node"))
    with db.read() as cur:
        assert cur.execute("SELECT body FROM notes WHERE id = 1").fetchone() == ("from the old node",)


def test_old_code_runs_against_a_schema_one_compatible_step_newer(db):
    assert migrate(db, "notes", [V1, V2_COMPATIBLE]) == [1, 2]  # the first node upgraded
    assert migrate(db, "notes", [V1]) == []  # a node still on release 1 starts: nothing applied, no refusal
    old_code_writes(db)
    with db.read() as cur:
        assert cur.execute("SELECT version FROM state_schema WHERE store = 'notes'").fetchone() == (2,)
        assert cur.execute("SELECT min_code FROM schema_compat WHERE name = 'notes'").fetchone() == (1,)


def test_old_code_refuses_a_schema_one_breaking_step_newer_in_one_line(db):
    assert migrate(db, "notes", [V1, V2_BREAKING]) == [1, 2]
    with pytest.raises(StateSchemaTooNew) as refused:
        migrate(db, "notes", [V1])
    message = str(refused.value)
    assert "\n" not in message
    assert message.endswith("the notes store has schema 2 (usable from 2 on), newer than this scriptsftp's 1: "
                            "upgrade scriptsftp")
    assert db.where in message


def test_compatibility_reaches_back_one_release_only(db):
    """Two compatible steps ahead: release 2 runs, release 1 is refused (each step promises
    only that the release just before it works)."""
    assert migrate(db, "notes", [V1, V2_COMPATIBLE, V3_COMPATIBLE]) == [1, 2, 3]
    assert migrate(db, "notes", [V1, V2_COMPATIBLE]) == []
    with pytest.raises(StateSchemaTooNew, match=r"schema 3 \(usable from 2 on\), newer than this scriptsftp's 1"):
        migrate(db, "notes", [V1])


def test_the_old_node_upgraded_later_applies_only_what_is_missing(db):
    migrate(db, "notes", [V1])
    old_code_writes(db)
    assert migrate(db, "notes", [V1, V2_COMPATIBLE]) == [2]
    assert migrate(db, "notes", [V1, V2_COMPATIBLE, V3_COMPATIBLE]) == [3]
    with db.read() as cur:
        assert cur.execute("SELECT body, author FROM notes").fetchall() == [("from the old node", None)]


def test_a_database_from_before_schema_compat_is_not_taken_as_compatible(db):
    """No schema_compat row (a database migrated before it existed): its version is also its
    minimum, so older code is refused as it always was."""
    migrate(db, "notes", [V1, V2_COMPATIBLE])
    with db.transaction() as cur:
        cur.execute("DELETE FROM schema_compat")
    with pytest.raises(StateSchemaTooNew, match=r"schema 2 \(usable from 2 on\)"):
        migrate(db, "notes", [V1])


# --- the account database: its own schema_version table, the same runner ----------------------

NEXT_COMPATIBLE = Migration(SCHEMA_VERSION + 1, ["ALTER TABLE account_users ADD COLUMN nickname TEXT"],
                            compatible=True)
NEXT_BREAKING = (SCHEMA_VERSION + 1, ["ALTER TABLE account_users RENAME COLUMN definition TO spec"])


def test_this_release_runs_against_the_next_releases_compatible_account_schema(db):
    assert migrations.migrate(db, _AccountBook(), [*MIGRATIONS, NEXT_COMPATIBLE], what="the account database",
                              lock=1) == [*range(1, SCHEMA_VERSION + 2)]
    accounts = AccountDb(db)
    assert accounts.upgrade() == []
    accounts.check_schema()
    accounts.add_user(User(name="alice", home="/srv/alice"), "test")
    user = accounts.get_user("alice")
    assert user is not None and user.user.home == "/srv/alice"
    with db.read() as cur:  # the book is still one row per step in schema_version
        assert cur.execute("SELECT max(version) FROM schema_version").fetchone() == (SCHEMA_VERSION + 1,)


def test_this_release_refuses_the_next_releases_breaking_account_schema(db):
    migrations.migrate(db, _AccountBook(), [*MIGRATIONS, NEXT_BREAKING], what="the account database", lock=1)
    accounts = AccountDb(db)
    for call in (accounts.upgrade, accounts.check_schema):
        with pytest.raises(SchemaTooNew) as refused:
            call()
        assert str(refused.value).endswith(
            f"the account database has schema {SCHEMA_VERSION + 1} (usable from {SCHEMA_VERSION + 1} on), "
            f"newer than this scriptsftp's {SCHEMA_VERSION}: upgrade scriptsftp")


# --- a real daemon of this release on a state store one release newer --------------------------


def _newer_audit_schema(daemons, database: str, step) -> None:
    """The audit store as the next release would leave it: every step of this release, then ``step``."""
    from scriptsftp.server.ops.audit import MIGRATIONS as AUDIT_MIGRATIONS
    from scriptsftp.server.stores import StateStores

    stores = StateStores(daemons.root / "state", database=database, node="newer")
    stores.state_dir.mkdir(parents=True, exist_ok=True)
    stores.database("audit", [*AUDIT_MIGRATIONS, step]).close()


def _cluster(database: str) -> str:
    from test_cluster import cluster_toml

    return cluster_toml("node-a", database) if database else ""


def test_a_daemon_runs_on_a_state_store_one_compatible_step_newer(daemons, accounts_database: str, alice_key):
    from conftest import sftp_batch
    from scriptsftp.server.ops.audit import MIGRATIONS as AUDIT_MIGRATIONS

    nxt = migrations.latest(AUDIT_MIGRATIONS) + 1
    _newer_audit_schema(daemons, accounts_database,
                        Migration(nxt, ["CREATE TABLE audit_next (x INTEGER)"], compatible=True))
    d = daemons.start(_cluster(accounts_database))
    sftp_batch(d, "mkdir /still-served\n", alice_key, check=True)
    assert "upgrade scriptsftp" not in d.log_text()


def test_a_daemon_refuses_a_state_store_one_breaking_step_newer_in_one_line(daemons, accounts_database: str):
    import subprocess

    from conftest import BIN
    from scriptsftp.server.ops.audit import MIGRATIONS as AUDIT_MIGRATIONS

    nxt = migrations.latest(AUDIT_MIGRATIONS) + 1
    _newer_audit_schema(daemons, accounts_database, (nxt, ["CREATE TABLE audit_next (x INTEGER)"]))
    path = daemons.write_config(_cluster(accounts_database))
    proc = subprocess.run([str(BIN), "run", "-c", str(path)], capture_output=True, text=True, timeout=120,
                          cwd=daemons.root)
    assert proc.returncode == 2, proc
    (line,) = [x for x in proc.stderr.splitlines() if "upgrade scriptsftp" in x]
    key = "[cluster] database" if accounts_database else "[server] state_dir"
    assert line.startswith(f"{path}:1: {key}: "), line
    assert line.endswith(f"the audit store has schema {nxt} (usable from {nxt} on), newer than this scriptsftp's "
                         f"{nxt - 1}: upgrade scriptsftp"), line
    assert "Traceback" not in proc.stderr

"""The account database (server/stores/accounts_db.py): what every writer relies on.

Every test runs twice, on SQLite and on a real PostgreSQL (conftest's ``accounts_database``:
the session's throwaway cluster, a new database per test); the ``account_db`` fixture and
``_config`` are where the engine is chosen."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from conftest import Keys, accounts_toml
from scriptsftp.server.core.accounts import TomlAccountSource
from scriptsftp.server.stores.accounts_db import (
    SCHEMA_VERSION, AccountDb, AccountExists, AccountInUse, AccountInvalid, DatabaseAccountSource,
    MergedAccountSource, NoSuchAccount, SchemaTooNew, name_conflicts,
)
from scriptsftp.server.stores.sql import open_database
from scriptsftp.server.support.config import Folder, Group, User, load_config

HASH = "$argon2id$v=19$m=65536,t=3,p=4$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaGhhc2hoYXNoaGFzaA"
HASH2 = HASH.replace("aGFz", "bGFz")


@pytest.fixture
def account_db(tmp_path: Path, accounts_database: str):
    """An empty account database, once on SQLite and once on PostgreSQL (conftest's accounts_database)."""
    db = AccountDb(open_database(accounts_database, tmp_path / "accounts.sqlite3"))
    db.upgrade()
    yield db
    db.close()


@pytest.fixture
def new_account_db(tmp_path: Path, accounts_database: str, request: pytest.FixtureRequest):
    """More empty account databases on account_db's engine: ``new_account_db("other")``."""
    made: list[AccountDb] = []

    def make(name: str) -> AccountDb:
        url = ""
        if accounts_database:
            cluster = request.getfixturevalue("pg")
            url = cluster.new_database()
            request.addfinalizer(lambda: cluster.drop_database(url))
        db = AccountDb(open_database(url, tmp_path / f"{name}.sqlite3"))
        made.append(db)
        db.upgrade()
        return db

    yield make
    for db in made:
        db.close()


def user(name: str = "acme", **kw) -> User:
    kw.setdefault("home", f"/srv/homes/{name}")
    return User.model_validate({"name": name, **kw}, strict=False)  # as the CLI and the API read input


def test_a_user_round_trips_with_keys_and_stamps(account_db: AccountDb, alice_key: Keys, bob_key: Keys):
    stored = account_db.add_user(user(password_hash=HASH, public_keys=[alice_key.public_line],
                                      permissions={"/": ["list"], "/inbox": ["*"]}, quota_size=10 * 2**30),
                                 "cli:root")
    assert stored.created_by == stored.updated_by == "cli:root"
    assert stored.password_changed is not None
    got = account_db.get_user("acme")
    assert got is not None and got.user == stored.user
    assert got.user.public_keys == [alice_key.public_line]
    assert got.user.quota_size == 10 * 2**30
    fp = account_db.add_key("acme", bob_key.public_line, "api:helpdesk")
    assert fp.startswith("SHA256:")
    got = account_db.get_user("acme")
    assert got is not None and got.user.public_keys == [alice_key.public_line, bob_key.public_line]
    assert got.updated_by == "api:helpdesk" and got.created_by == "cli:root"
    with pytest.raises(AccountExists):
        account_db.add_key("acme", bob_key.public_line, "x")
    account_db.remove_key("acme", fp, "x")
    with pytest.raises(NoSuchAccount):
        account_db.remove_key("acme", fp, "x")
    with pytest.raises(AccountExists):
        account_db.add_user(user(), "x")
    account_db.delete_user("acme", "x")
    assert account_db.get_user("acme") is None
    with pytest.raises(NoSuchAccount):
        account_db.delete_user("acme", "x")


def test_a_password_change_is_dated_and_disable_keeps_a_reason(account_db: AccountDb):
    account_db.add_user(user(), "a")
    assert account_db.get_user("acme").password_changed is None  # type: ignore[union-attr]
    account_db.set_password("acme", HASH, "a")
    first = account_db.get_user("acme")
    assert first is not None and first.user.password_hash == HASH and first.password_changed
    same = account_db.update_user(first.user.model_copy(update={"max_sessions": 2}), "a")
    assert same.password_changed == first.password_changed  # an edit that keeps the password
    with pytest.raises(AccountInvalid):
        account_db.set_password("acme", "plaintext", "a")
    account_db.set_disabled("acme", True, "contract ended", "a")
    got = account_db.get_user("acme")
    assert got is not None and got.user.disabled and got.user.disabled_reason == "contract ended"
    account_db.set_disabled("acme", False, "", "a")
    got = account_db.get_user("acme")
    assert got is not None and not got.user.disabled and got.user.disabled_reason == ""


def test_references_must_exist_and_block_deletion(account_db: AccountDb):
    with pytest.raises(AccountInvalid, match="unknown group 'partners'"):
        account_db.add_user(user(groups=["partners"]), "a")
    account_db.add_group(Group(name="partners", permissions={"/": ["list"]}), "a")
    account_db.add_folder(Folder(name="shared", path="/srv/shared", quota_files=5), "a")
    with pytest.raises(AccountInvalid, match="unknown folder 'nope'"):
        account_db.add_user(user(folders={"/x": "nope"}), "a")
    account_db.add_user(user(groups=["partners"], folders={"/shared": "shared"}), "a")
    with pytest.raises(AccountInUse, match="user 'acme'"):
        account_db.delete_group("partners", "a")
    with pytest.raises(AccountInUse, match="user 'acme'"):
        account_db.delete_folder("shared", "a")
    account_db.delete_user("acme", "a")
    account_db.delete_group("partners", "a")
    account_db.delete_folder("shared", "a")
    assert account_db.list_groups() == [] and account_db.list_folders() == []


def test_invalid_definitions_are_refused_with_the_field(account_db: AccountDb):
    bad = user().model_copy(update={"permissions": {"/": ["fly"]}})  # model_copy skips validation
    with pytest.raises(AccountInvalid, match="fly"):
        account_db.add_user(bad, "a")
    with pytest.raises(AccountInvalid, match="key"):
        account_db.add_user(user().model_copy(update={"public_keys": ["ssh-ed25519 AAAAnotakey"]}), "a")
    with pytest.raises(AccountInvalid, match="password_hash_file"):
        account_db.add_user(user(password_hash_file="x"), "a")
    assert account_db.list_users() == []


def test_the_change_feed_says_who_changed_what(account_db: AccountDb):
    start = account_db.last_change()
    account_db.add_user(user(), "cli:alice")
    account_db.set_password("acme", HASH, "api:ops")
    account_db.set_disabled("acme", True, "left", "api:ops")
    account_db.delete_user("acme", "cli:bob")
    changes = account_db.changes_since(start)
    assert [(c.actor, c.action, c.name) for c in changes] == [
        ("cli:alice", "add", "acme"), ("api:ops", "password", "acme"), ("api:ops", "disable", "acme"),
        ("cli:bob", "delete", "acme")]
    assert HASH not in json.dumps([c.detail for c in changes])
    assert account_db.changes_since(changes[-1].id) == []


def test_usage_is_exact_under_concurrent_writers_and_never_negative(account_db: AccountDb):
    def work() -> None:
        for _ in range(200):
            account_db.add_usage("user:acme", 10, 1)
            account_db.add_usage("user:acme", -3, 0)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert account_db.usage("user:acme") == (4 * 200 * 7, 800)
    assert account_db.add_usage("folder:new", -5, -1) == (0, 0)
    assert account_db.add_usage("user:acme", -10**9, -10**9) == (0, 0)
    account_db.set_usage("user:acme", 42, 2)
    assert account_db.usage("user:acme") == (42, 2)
    assert account_db.add_transfer("acme", "2026-12-07", 100, 0) == (100, 0)
    assert account_db.add_transfer("acme", "2026-12-07", 5, 7) == (105, 7)
    assert account_db.transfer_usage("acme", "2026-12-08") == (0, 0)


def test_export_import_round_trips(account_db: AccountDb, new_account_db, alice_key: Keys):
    account_db.add_folder(Folder(name="shared", path="/srv/shared", permissions={"/": ["list"]}), "a")
    account_db.add_group(Group(name="partners", folders={"/shared": "shared"}), "a")
    account_db.add_user(user(password_hash=HASH, public_keys=[alice_key.public_line], groups=["partners"],
                             expires="2030-01-01", home_folders=["/inbox"]), "a")
    dump = account_db.export()
    text = json.dumps(dump, sort_keys=True)
    assert "password_hash_file" not in text
    other = new_account_db("other")
    assert other.import_(json.loads(text), "import") == {"added": 3, "replaced": 0}
    assert json.dumps(other.export(), sort_keys=True) == text
    with pytest.raises(AccountExists):
        other.import_(dump, "import")
    assert other.import_(dump, "import", replace=True) == {"added": 0, "replaced": 3}
    broken = json.loads(text)
    broken["users"].append({"name": "x", "home": "/h", "groups": ["nope"]})
    fresh = new_account_db("fresh")
    with pytest.raises(AccountInvalid, match="unknown group 'nope'"):
        fresh.import_(broken, "import")
    assert fresh.list_users() == [] and fresh.list_folders() == []  # all or nothing


def test_the_schema_is_versioned(account_db: AccountDb, tmp_path: Path):
    assert account_db.schema_version() == SCHEMA_VERSION
    assert account_db.upgrade() == []
    with account_db.db.transaction() as cur:
        cur.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION + 1,))
    with pytest.raises(SchemaTooNew, match="newer"):
        account_db.check_schema()
    with pytest.raises(SchemaTooNew):
        account_db.upgrade()


def _config(tmp_path: Path, body: str, database: str = ""):
    path = tmp_path / "conf.toml"
    path.write_text(f'[server]\nstate_dir = "state"\n{accounts_toml(database)}\n{body}')
    return load_config(path)


def test_file_names_are_refused_and_conflicts_name_both_places(tmp_path: Path, accounts_database: str):
    cfg = _config(tmp_path, '[[groups]]\nname = "staff"\n\n[[users]]\nname = "alice"\nhome = "h"\n',
                  accounts_database)
    db = AccountDb.open(cfg)
    try:
        with pytest.raises(AccountExists, match=r"conf.toml:\d+"):
            db.add_user(user("alice"), "a")
        with pytest.raises(AccountExists, match="configuration file"):
            db.add_group(Group(name="staff"), "a")
        db.add_user(user("bob", groups=["staff"]), "a")  # a file group is a known group
        assert name_conflicts(cfg, db) == []
        db.file_names = {"users": {}, "groups": {}, "folders": {}}
        db.add_user(user("alice"), "a")  # as if the file had not had her when it was written
        problems = name_conflicts(cfg, db)
        assert len(problems) == 1 and "conf.toml" in problems[0] and "account database" in problems[0]
    finally:
        db.close()


def test_the_merged_source_builds_database_users_like_file_users(tmp_path: Path, alice_key: Keys,
                                                                 accounts_database: str):
    cfg = _config(tmp_path, '[[folders]]\nname = "shared"\npath = "shared"\nquota_size = 1000\n\n'
                            '[[groups]]\nname = "staff"\npermissions = { "/" = ["list"] }\n'
                            'folders = { "/shared" = "shared" }\nquota_files = 7\n\n'
                            '[[users]]\nname = "alice"\nhome = "h"\n', accounts_database)
    db = AccountDb.open(cfg)
    try:
        db.add_user(user("bob", groups=["staff"], password_hash=HASH, public_keys=[alice_key.public_line],
                         expires="2031-02-03"), "a")
        source = MergedAccountSource(TomlAccountSource.from_config(cfg), DatabaseAccountSource(db, cfg))
        assert source.names() == ["alice", "bob"]
        bob = source.get("bob")
        assert bob is not None and bob.origin == "the account database"
        assert bob.account.quota.files == 7 and bob.password_hash == HASH and bob.password_changed
        assert [(m.vpath, m.folder, m.root, m.quota.size) for m in bob.account.folders] == [
            (("shared",), "shared", tmp_path / "shared", 1000)]
        assert bob.expires is not None and len(bob.keys) == 1
        assert source.get("alice") is not None and source.get("carol") is None
        db.set_disabled("bob", True, "gone", "a")
        bob = source.get("bob")
        assert bob is not None and bob.disabled and bob.disabled_reason == "gone"  # no reload needed
        db.add_user(user("dave"), "a")
        assert source.get("dave") is not None  # absent users are never kept: a new one is there at once
    finally:
        db.close()

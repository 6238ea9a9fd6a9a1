"""Issue 18 under attack: what reaches the server through the account database (the CLI,
the API, an imported dump, SQL typed by hand) where the TOML file's reader never looked,
and changes that race a login.

Fast and in-process: the login core with an account source that answers from a dict and a
dispatcher that lets a test act while ``pre-login`` runs (as a script that takes its time
would let the watcher act), and the account database on a SQLite file in tmp_path.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
from argon2 import PasswordHasher

from scriptsftp.server.contract import events as ev
from scriptsftp.server.contract.credentials import Credentials
from scriptsftp.server.contract.dispatch import ALLOW, Decision, FileOpener
from scriptsftp.server.contract.errors import LoginRefused
from scriptsftp.server.core import account_policy
from scriptsftp.server.core.accounts import UserRecord, build_record
from scriptsftp.server.core.bandwidth import UserBandwidth
from scriptsftp.server.core.login import LoginCore
from scriptsftp.server.core.session import Account, UploadPolicy
from scriptsftp.server.core.vfs import Access
from scriptsftp.server.stores.accounts_db import AccountDb, AccountInvalid
from scriptsftp.server.stores.sql import SqliteDatabase
from scriptsftp.server.support.config import AccountsSection, Folder, User

PASSWORD = "Right-Horse-Battery-7"


@pytest.fixture(scope="module")
def password_hash() -> str:
    return PasswordHasher(time_cost=1, memory_cost=256, parallelism=1).hash(PASSWORD)


@pytest.fixture
def account_db(tmp_path: Path):
    db = AccountDb(SqliteDatabase(tmp_path / "accounts.sqlite3"))
    db.upgrade()
    yield db
    db.close()


def _dump(**sections: list[dict]) -> dict:
    return {"format": "scriptsftp-accounts", "version": 1, **sections}


# --- names ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["alice\n", "alice\nlogin ok (password) user=root", "shared\n"])
def test_a_name_with_a_trailing_newline_is_refused_on_import(account_db: AccountDb, name: str):
    """``$`` matches before a final newline: "alice\\n" passed the name rule, so an import
    (or the API) could add a second "alice" that logs, listings and the dashboard show as
    the first, and that forges a log line of its own."""
    with pytest.raises(AccountInvalid, match="not a valid"):
        account_db.import_(_dump(users=[{"name": name, "home": "/srv/h"}]), "import")
    with pytest.raises(AccountInvalid, match="not a valid"):
        account_db.import_(_dump(folders=[{"name": name, "path": "/srv/f"}]), "import")
    assert account_db.list_users() == [] and account_db.list_folders() == []


def test_the_dump_format_is_what_export_writes(account_db: AccountDb):
    """The dumps above are refused for their names, not their header."""
    assert account_db.import_(_dump(users=[{"name": "alice", "home": "/srv/h"}]), "import")["added"] == 1
    assert {k: v for k, v in account_db.export().items() if k in ("format", "version")} == {
        "format": "scriptsftp-accounts", "version": 1}


# --- numbers no login can use -----------------------------------------------------------------


HUGE = 10 ** 400  # JSON carries it; Python's int takes it; a float does not


@pytest.mark.parametrize("key", ["bandwidth_up", "bandwidth_down", "quota_size", "transfer_up_daily",
                                 "password_max_age", "quota_files", "max_sessions"])
def test_a_number_past_what_the_server_computes_with_is_refused_on_import(account_db: AccountDb, key: str):
    """A rate of 10**400 bytes/s made the user's token bucket raise OverflowError at every
    login (int * float), and a password_max_age of 10**400 days made the dashboard's
    accounts page fail for everyone: refused when it is written, naming the key."""
    with pytest.raises(AccountInvalid, match=key):
        account_db.import_(_dump(users=[{"name": "alice", "home": "/srv/h", key: HUGE}]), "import")
    assert account_db.list_users() == []


def test_the_largest_numbers_accepted_still_work(tmp_path: Path):
    """At the bound: the bucket takes the rate, the policy computes the password's end."""
    big = 2 ** 63 - 1
    user = User.model_validate({"name": "alice", "home": "h", "bandwidth_up": big, "bandwidth_down": big,
                                "quota_size": big, "password_max_age": 10 ** 6}, strict=False)
    rec = build_record(user, {}, {}, lambda p: tmp_path / p, AccountsSection(), password_hash="$argon2id$x",
                       password_changed=0.0, origin="test")
    UserBandwidth(rec.account.rates)
    assert account_policy.status(rec, 1e9) == ("active", "")


# --- paths ------------------------------------------------------------------------------------


def test_an_empty_home_or_folder_path_is_refused(account_db: AccountDb):
    """An empty path resolves to the configuration file's directory (TLS keys, password
    files, the config itself): a home or a folder there is a typo, never a wish."""
    with pytest.raises(AccountInvalid, match="home"):
        account_db.import_(_dump(users=[{"name": "alice", "home": ""}]), "import")
    with pytest.raises(AccountInvalid, match="path"):
        account_db.import_(_dump(folders=[{"name": "shared", "path": ""}]), "import")
    with pytest.raises(AccountInvalid, match="home"):
        account_db.import_(_dump(users=[{"name": "alice", "home": "/srv/\x00h"}]), "import")


@pytest.mark.parametrize("mounts", [{"/..": "shared"}, {"//": "shared"}, {"/a/..": "shared"}, {"/./": "shared"}])
def test_a_mount_point_that_normalizes_to_the_root_is_refused(account_db: AccountDb, mounts):
    """The rule was "not '/'" on the raw string: "/.." passed and build_record normalized it
    to "/", a folder mounted over the whole home."""
    account_db.add_folder(Folder(name="shared", path="/srv/shared"), "a")
    with pytest.raises(AccountInvalid, match="cannot be mounted at '/'"):
        account_db.import_(_dump(users=[{"name": "alice", "home": "/srv/h", "folders": mounts}]), "import")


@pytest.mark.parametrize("key, value", [
    ("folders", {"/in\x01box": "shared"}),
    ("home_folders", ["/in\x1bbox"]),
    ("home_folders", ["/.scriptsftp-part-x"]),
    ("permissions", {"/in\x7fbox": ["list"]}),
    ("filters", [{"path": "/a\nb", "denied": ["*.exe"]}]),
    ("home_folders", ["/" + "a/" * 3000]),
    ("home_folders", ["/" + "a" * 300]),
])
def test_a_virtual_path_no_client_could_use_is_refused(account_db: AccountDb, tmp_path: Path, key, value):
    """Control characters, staging names and lengths past the Session's bounds: the TOML
    reader let them through too, and build_record raised InvalidPath at every login of the
    user (from the database: "account database unavailable" in the log, for one row)."""
    account_db.add_folder(Folder(name="shared", path="/srv/shared"), "a")
    with pytest.raises(AccountInvalid, match=key):
        account_db.import_(_dump(users=[{"name": "alice", "home": "/srv/h", key: value}]), "import")
    assert account_db.list_users() == []


def test_a_dump_is_read_as_json_of_bounded_depth(account_db: AccountDb):
    """A dump is JSON the CLI parses before import: a name of a million characters is one
    refusal, not a row."""
    with pytest.raises(AccountInvalid, match="not a valid"):
        account_db.import_(json.loads(json.dumps(_dump(users=[{"name": "a" * 1_000_000, "home": "/h"}]))), "i")


# --- a change racing a login ------------------------------------------------------------------


class Accounts:
    def __init__(self, records: dict[str, UserRecord]) -> None:
        self.records = records

    def get(self, name: str) -> UserRecord | None:
        return self.records.get(name)

    def names(self) -> list[str]:
        return list(self.records)


@dataclass
class SlowPreLogin:
    """A dispatcher whose pre-login runs ``meanwhile`` (what happens while a script thinks)."""

    meanwhile: Callable[[], None] = lambda: None
    seen: list[str] = field(default_factory=list)

    def wants(self, event_name: str) -> bool:
        return True

    def pre(self, event: ev.Event, file: FileOpener | None = None, mode: str | None = None) -> Decision:
        self.seen.append(event.name)
        if isinstance(event, ev.PreLogin):
            self.meanwhile()
        return ALLOW

    def has_async(self, event: ev.Event) -> bool:
        return False

    def post(self, event: ev.Event, file: FileOpener | None = None) -> None:
        self.seen.append(event.name)

    def names(self) -> list[str]:
        return []


def _record(home: Path, password_hash: str, **state: object) -> UserRecord:
    acct = Account(name="alice", home=home, access=Access.build({"/": ["*"]}, [], []),
                   protocols=frozenset({"ftp", "http", "sftp", "scp"}))
    state.setdefault("disabled", False)
    return UserRecord(account=acct, password_hash=password_hash, keys=[], **state)  # type: ignore[arg-type]


@pytest.mark.parametrize("change, reason", [
    ({"disabled": True, "disabled_reason": "left the company"}, "account disabled: left the company"),
    ({"expires": 1.0}, "account expired on 1970-01-01"),
])
def test_an_account_disabled_while_pre_login_runs_is_refused(tmp_path: Path, password_hash: str, change, reason):
    """The watcher ends the sessions of a disabled user, but a login still in pre-login has
    no user yet, so it is not among them; the decision read the account again after the
    scripts and took the disabled one as good: the session lived on, disabled."""
    accounts = Accounts({"alice": _record(tmp_path, password_hash)})
    events = SlowPreLogin()
    core = LoginCore(accounts, events, staging=None, uploads=UploadPolicy(atomic=False), failure_delay=0,
                     password_cache=0)  # type: ignore[arg-type]

    def disable() -> None:
        accounts.records["alice"] = _record(tmp_path, password_hash, **change)
        assert core.account_changed("alice") == []  # the watcher's turn: nobody to kick yet
    events.meanwhile = disable
    conn, _ = core.connect("ftp", "192.0.2.5")
    with pytest.raises(LoginRefused) as caught:
        core.login(conn, Credentials("alice", PASSWORD))
    assert caught.value.reason == reason
    assert conn.user == "" and conn.sessions == [] and not conn.login_counted
    assert events.seen[-1] == "login-failed"


# --- a writer holding the database ------------------------------------------------------------


def test_a_login_read_never_waits_for_a_writer(tmp_path: Path):
    """Every read took SQLite's write lock (BEGIN IMMEDIATE): while an import of many
    users (one transaction) or any writer held it, each login of a database user waited
    up to the 10 s busy timeout and then was refused as "database unavailable", and
    logins queued behind each other. WAL lets readers read the last commit meanwhile."""
    import sqlite3
    import time

    from scriptsftp.server.stores.accounts_db import DatabaseAccountSource
    from scriptsftp.server.support.config import load_config

    conf = tmp_path / "conf.toml"
    conf.write_text('[server]\nstate_dir = "state"\n')
    cfg = load_config(conf)
    db = AccountDb.open(cfg)
    try:
        db.add_user(User.model_validate({"name": "bob", "home": "/srv/bob"}, strict=False), "a")
        source = DatabaseAccountSource(db, cfg)
        writer = sqlite3.connect(str(db.db.path), isolation_level=None)  # type: ignore[attr-defined]
        writer.execute("BEGIN IMMEDIATE")  # an import in progress
        writer.execute("INSERT INTO account_users (name, definition, created_at, created_by, updated_at, "
                       "updated_by) VALUES ('carol', '{\"home\": \"/srv/carol\"}', 0, 'x', 0, 'x')")
        try:
            started = time.monotonic()
            bob = source.get("bob")
            assert source.get("carol") is None  # not committed: not seen
            assert db.changes_since(0) and db.user_names() == ["bob"]  # the watcher and the names
            elapsed = time.monotonic() - started
        finally:
            writer.execute("ROLLBACK")
            writer.close()
        assert bob is not None and bob.account.name == "bob"
        assert elapsed < 1.0, f"reads waited {elapsed:.1f}s for a writer"
    finally:
        db.close()

"""Accounts in the database reach a running daemon without SIGHUP (issue 18, item 2).

The daemon and the writer are separate processes sharing the database, as the CLI, the
REST API and a second node are: the test writes with its own AccountDb on the same database.
Each test runs with the daemon on SQLite and on PostgreSQL (conftest's accounts_database)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from conftest import DaemonFactory, Keys, accounts_toml, paramiko_client, sftp_batch
from scriptsftp.server.stores.accounts_db import AccountDb
from scriptsftp.server.stores.sql import open_database
from scriptsftp.server.support.config import Group, User


def _db(daemon_root: Path, database: str) -> AccountDb:
    """The daemon's account database (``database``: its [accounts] database), opened apart."""
    return AccountDb(open_database(database, daemon_root / "state" / "accounts.sqlite3"))


def _carol(home: Path, key: Keys, **kw) -> User:
    return User.model_validate({"name": "carol", "home": str(home), "public_keys": [key.public_line],
                                "permissions": {"/": ["*"]}, **kw}, strict=False)


def test_a_user_added_while_the_daemon_runs_logs_in_at_once(daemons: DaemonFactory, alice_key: Keys,
                                                            accounts_database: str):
    daemon = daemons.start(accounts_toml(accounts_database))
    home = daemon.root / "homes" / "carol"
    home.mkdir(parents=True)
    db = _db(daemon.root, accounts_database)
    try:
        refused = sftp_batch(daemon, "ls\n", alice_key, user="carol")
        assert refused.returncode != 0
        db.add_user(_carol(home, alice_key), "test")
        added = time.monotonic()
        proc = sftp_batch(daemon, "put /etc/hostname h.txt\nls\n", alice_key, user="carol", check=True)
        assert time.monotonic() - added < 1.0 + 1.0  # the login itself, a process start: no reload needed
        assert (home / "h.txt").read_bytes() == Path("/etc/hostname").read_bytes()
        assert "configuration reloaded" not in daemon.log_text()
        assert "h.txt" in proc.stdout
    finally:
        db.close()


def test_disabling_a_user_ends_their_open_session_and_edits_apply_to_it(daemons: DaemonFactory, alice_key: Keys,
                                                                        accounts_database: str):
    daemon = daemons.start(accounts_toml(accounts_database))
    home = daemon.root / "homes" / "carol"
    home.mkdir(parents=True)
    db = _db(daemon.root, accounts_database)
    try:
        db.add_group(Group(name="readers"), "test")
        db.add_user(_carol(home, alice_key), "test")
        sftp = paramiko_client(daemon, "carol", key=alice_key)
        transport = sftp.get_channel().get_transport()
        with sftp.open("/a.txt", "w") as f:
            f.write(b"one")
        # an edit reaches the open session: uploads refused from now on
        stored = db.get_user("carol")
        assert stored is not None
        db.update_user(stored.user.model_copy(update={"permissions": {"/": ["list", "download"]}}), "test")
        deadline = time.monotonic() + 5
        refused = False
        while time.monotonic() < deadline and not refused:
            try:
                with sftp.open(f"/b{time.monotonic_ns()}.txt", "w") as f:
                    f.write(b"x")
                time.sleep(0.05)
            except PermissionError:
                refused = True
        assert refused, "the permission change did not reach the open session"
        start = len(daemon.lines)
        db.set_disabled("carol", True, "contract ended", "test")
        daemon.wait_log(r"closing session of carol: account disabled: contract ended", timeout=5, start=start)
        deadline = time.monotonic() + 5
        while transport.is_active() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not transport.is_active()
        assert sftp_batch(daemon, "ls\n", alice_key, user="carol").returncode != 0
        db.set_disabled("carol", False, "", "test")
        sftp_batch(daemon, "ls\n", alice_key, user="carol", check=True)
    finally:
        db.close()


def test_a_name_in_the_file_and_the_database_refuses_the_start(daemons: DaemonFactory, alice_key: Keys,
                                                               accounts_database: str):
    daemon = daemons.start(accounts_toml(accounts_database))
    daemon.stop()
    db = _db(daemon.root, accounts_database)
    try:
        db.add_user(_carol(daemon.root / "homes" / "carol", alice_key), "test")
    finally:
        db.close()
    users = daemons.default_users() + '\n[[users]]\nname = "carol"\nhome = "homes/carol"\n'
    config = daemons.write_config(accounts_toml(accounts_database), users=users)
    failed = daemons.start(config=config, wait=False)
    assert failed.proc.wait(timeout=30) == 2
    failed.wait_log(r"scriptsftp\.toml:\d+: users: user 'carol' is defined both here and in the account database")


@pytest.mark.parametrize("bad", ["postgresql://nobody@127.0.0.1:1/none"])
def test_an_unreachable_database_stops_the_start_with_one_line(daemons: DaemonFactory, bad: str):
    config = daemons.write_config(f'\n[accounts]\ndatabase = "{bad}"\n')
    failed = daemons.start(config=config, wait=False)
    assert failed.proc.wait(timeout=60) == 2
    failed.wait_log(r"\[accounts\] database: cannot open postgresql://nobody@127\.0\.0\.1:1/none")

"""What only PostgreSQL has: a server apart from the daemon, which restarts and fails over.

The daemon keeps pooled connections to it; a restart breaks every one of them at once. The
next login must not be refused for it (a broken connection handed out by the pool would make
the account look absent): the pool checks a connection before lending it. While the server
is away, its users are refused quickly and the file's users go on.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import paramiko
import pytest

from conftest import DaemonFactory, Keys, accounts_toml, paramiko_client, close_client, sftp_batch
from scriptsftp.server.stores.accounts_db import AccountDb
from scriptsftp.server.stores.sql import open_database
from scriptsftp.server.support.config import User


def _add_carol(dsn: str, home: Path, key: Keys) -> None:
    db = AccountDb(open_database(dsn, Path("/nonexistent")))
    try:
        db.add_user(User.model_validate({"name": "carol", "home": str(home), "public_keys": [key.public_line],
                                         "permissions": {"/": ["*"]}}), "test")
    finally:
        db.close()


def test_logins_go_on_across_a_postgresql_restart(daemons: DaemonFactory, pg, pg_dsn: str, alice_key: Keys):
    # the watcher polls rarely here: its failed polls would otherwise drain broken connections
    # from the pool before the login comes, and the test would pass by luck of timing
    daemon = daemons.start(accounts_toml(pg_dsn) + "watch_interval = 30\n")
    home = daemon.root / "homes" / "carol"
    home.mkdir(parents=True)
    _add_carol(pg_dsn, home, alice_key)
    # logins at once, so the daemon's pool holds several connections
    with ThreadPoolExecutor(6) as pool:
        clients = list(pool.map(lambda _: paramiko_client(daemon, "carol", key=alice_key), range(6)))
    for client in clients:
        assert client.listdir("/") == []
        close_client(client)
    start = len(daemon.lines)
    pg.restart()
    for _ in range(3):
        sftp_batch(daemon, "ls\n", alice_key, user="carol", check=True)  # the first try, every time
    client = paramiko_client(daemon, "carol", key=alice_key)
    close_client(client)
    log = "\n".join(daemon.lines[start:])
    assert "account database unavailable" not in log
    assert "Traceback" not in log


def test_while_postgresql_is_down_its_users_are_refused_quickly_and_the_files_go_on(
        daemons: DaemonFactory, pg, pg_dsn: str, alice_key: Keys):
    """The pool waits 10 s for a connection when it is busy; once the server is known to be
    away a login waits at most about a second, then is refused as of an unknown user. The
    file's users are not asked of the database at all. When it is back, logins work again."""
    daemon = daemons.start(accounts_toml(pg_dsn))
    home = daemon.root / "homes" / "carol"
    home.mkdir(parents=True)
    _add_carol(pg_dsn, home, alice_key)
    close_client(paramiko_client(daemon, "carol", key=alice_key))
    pg.stop_server()
    try:
        start = len(daemon.lines)
        daemon.wait_log(r"account database(: cannot read changes| unavailable)", timeout=30, start=start)
        for who in ["carol", "nobody", "carol"]:
            began = time.monotonic()
            with pytest.raises(paramiko.AuthenticationException):
                paramiko_client(daemon, who, key=alice_key)
            assert time.monotonic() - began < 5.0, who
        close_client(paramiko_client(daemon, "alice", key=alice_key))
    finally:
        pg.start_server()
    deadline = time.monotonic() + 30
    while True:  # the pool reconnects in the background; a bounded wait for it
        try:
            close_client(paramiko_client(daemon, "carol", key=alice_key))
            break
        except paramiko.AuthenticationException:
            assert time.monotonic() < deadline, "database users still refused 30 s after PostgreSQL came back"
            time.sleep(0.2)
    daemon.wait_log(r"account database available again", timeout=10)

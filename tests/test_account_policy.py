"""Expiry and ``disabled`` with a reason, through the real daemon and real clients.

What each client sees of a refused login:

- FTP (ftplib): ``530 account disabled: REASON`` / ``530 account expired on YYYY-MM-DD``;
- HTTP (http.client): ``403`` with the same text as the body;
- OpenSSH ``sftp``: the SSH disconnect message, printed as
  ``Received disconnect from 127.0.0.1 port N:14: account expired on ...``;

and every refusal leaves the one ``login failed for 'NAME' (METHOD): REASON`` line of any
policy refusal. An account that expires while connected is ended within the daemon's half
second tick (FTP reads ``421 session ended: account expired on ...``).

A password past its max age needs a recorded password change, which only the account
database keeps (TOML users have none: never expired); the core tier covers it
(tests/core/test_login_policy.py).
"""

from __future__ import annotations

import datetime
import ftplib
import signal
import time

import paramiko
import pytest

from conftest import (
    ALICE_PASSWORD, BOB_PASSWORD, close_client, paramiko_client, sftp_batch, toml_str, user_toml,
)
from httpkit import HTTP_EXTRA, request

FTP_EXTRA = '[ftp]\nenabled = true\nlisten = "127.0.0.1:0"\npassive_ports = ""\n'


def _users(daemons, alice: str = "", bob: str = "") -> str:
    return (user_toml("alice", keys=[daemons.alice_key], password_hash=daemons.hashes["alice"]) + alice
            + user_toml("bob", keys=[daemons.bob_key], password_hash=daemons.hashes["bob"]) + bob)


def _ftp_refusal(d, user: str, password: str) -> str:
    c = ftplib.FTP()
    c.connect("127.0.0.1", d.ports["ftp"], timeout=30)
    try:
        with pytest.raises(ftplib.error_perm) as caught:
            c.login(user, password)
        return str(caught.value)
    finally:
        c.close()


def test_disabled_and_expired_accounts_are_refused_with_the_reason_on_every_protocol(daemons):
    reason = "contract ended; call +1 555 0100"
    d = daemons.start(FTP_EXTRA + HTTP_EXTRA, users=_users(
        daemons,
        alice=f"disabled = true\ndisabled_reason = {toml_str(reason)}\n",
        bob="expires = 2020-01-01\n",
    ))
    # FTP: the reason in the 530 line
    assert _ftp_refusal(d, "alice", ALICE_PASSWORD) == f"530 account disabled: {reason}"
    assert _ftp_refusal(d, "bob", BOB_PASSWORD) == "530 account expired on 2020-01-01"
    # a wrong password still says only that it failed: the state is told to the account's owner only
    assert _ftp_refusal(d, "bob", "wrong") == "530 Authentication failed."
    # HTTP: 403 with the reason as the body
    got = request(d, "GET", "/", user="alice", password=ALICE_PASSWORD)
    assert got.status == 403 and reason in got.text
    got = request(d, "GET", "/", user="bob", password=BOB_PASSWORD)
    assert got.status == 403 and "account expired on 2020-01-01" in got.text
    # OpenSSH sftp: the disconnect message
    proc = sftp_batch(d, "pwd\n", daemons.alice_key, "alice")
    assert proc.returncode != 0 and f"account disabled: {reason}" in proc.stderr, proc.stderr
    proc = sftp_batch(d, "pwd\n", daemons.bob_key, "bob")
    assert proc.returncode != 0 and "account expired on 2020-01-01" in proc.stderr, proc.stderr
    # the same log line as every policy refusal, per protocol and method
    for proto, method in (("ftp", "password"), ("http", "password"), ("sftp", "publickey")):
        d.wait_log(rf"proto={proto} .*login failed for 'alice' \({method}\): account disabled: contract ended")
        d.wait_log(rf"proto={proto} .*login failed for 'bob' \({method}\): account expired on 2020-01-01")
    assert not d.home("alice").exists() and not d.home("bob").exists()  # a refused login makes no home


def test_an_account_that_expires_while_connected_is_ended(daemons):
    d = daemons.start(FTP_EXTRA, users=_users(daemons))
    sftp = paramiko_client(d, "alice", key=daemons.alice_key)
    ftp = ftplib.FTP()
    ftp.connect("127.0.0.1", d.ports["ftp"], timeout=30)
    ftp.login("alice", ALICE_PASSWORD)
    bob = paramiko_client(d, "bob", key=daemons.bob_key)
    try:
        assert sftp.listdir("/") == [] and ftp.nlst("/") == []
        # the account gets an expiry two seconds ahead while both are connected
        at = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0) + datetime.timedelta(seconds=2)
        daemons.write_config(FTP_EXTRA, users=_users(daemons, alice=f"expires = {at.isoformat()}\n"))
        mark = len(d.lines)
        d.signal(signal.SIGHUP)
        d.wait_log(r"configuration reloaded", start=mark)
        assert sftp.listdir("/") == []  # not yet
        day = at.strftime("%Y-%m-%d")
        d.wait_log(rf"proto=ftp .*closing session of alice: account expired on {day}", start=mark, timeout=10)
        d.wait_log(rf"proto=sftp .*closing session of alice: account expired on {day}", start=mark, timeout=10)
        assert time.time() >= at.timestamp()  # not before its time
        ftp.sock.settimeout(10)
        assert ftp.getline() == f"421 session ended: account expired on {day}"
        with pytest.raises((IOError, EOFError, paramiko.SSHException)):
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                sftp.listdir("/")
        assert bob.listdir("/") == []  # others untouched
        assert _ftp_refusal(d, "alice", ALICE_PASSWORD) == f"530 account expired on {day}"
    finally:
        ftp.close()
        sftp.get_channel().get_transport().close()
        close_client(bob)


# --- accounts of the database: a recorded password change, a change feed ---------------------


def _db(d):
    from scriptsftp.server.stores.accounts_db import AccountDb
    from scriptsftp.server.stores.sql import SqliteDatabase

    return AccountDb(SqliteDatabase(d.root / "state" / "accounts.sqlite3"))


def _carol(daemons, d, *, password_changed: float, **extra) -> dict:
    return {"format": "scriptsftp-accounts", "version": 1, "users": [{
        "name": "carol", "home": str(d.root / "homes" / "carol"), "permissions": {"/": ["*"]},
        "password_hash": daemons.hashes["alice"], "public_keys": [daemons.alice_key.public_line], **extra,
        "_meta": {"password_changed": password_changed}}]}


def test_a_password_past_its_max_age_refuses_password_logins_until_it_is_changed(daemons):
    d = daemons.start(FTP_EXTRA + HTTP_EXTRA, users=_users(daemons))
    db = _db(d)
    try:
        changed = time.time() - 31 * 86400
        db.import_(_carol(daemons, d, password_changed=changed, password_max_age=30), "test")
        day = time.strftime("%Y-%m-%d", time.gmtime(changed + 30 * 86400))
        expected = f"password expired on {day}: ask your administrator for a new one"
        assert _ftp_refusal(d, "carol", ALICE_PASSWORD) == f"530 {expected}"
        got = request(d, "GET", "/", user="carol", password=ALICE_PASSWORD)
        assert got.status == 403 and expected in got.text
        d.wait_log(rf"proto=ftp .*login failed for 'carol' \(password\): {expected}")
        # a key still opens the account
        sftp_batch(d, "pwd\n", daemons.alice_key, "carol", check=True)
        # a new password (the CLI's `user passwd`) is good again at once
        db.set_password("carol", daemons.hashes["bob"], "test")
        deadline = time.monotonic() + 5
        while True:
            c = ftplib.FTP()
            c.connect("127.0.0.1", d.ports["ftp"], timeout=30)
            try:
                c.login("carol", BOB_PASSWORD)
                break
            except ftplib.error_perm:
                assert time.monotonic() < deadline, "the new password did not reach the daemon"
            finally:
                c.close()
    finally:
        db.close()


def test_disabling_a_database_user_ends_their_sessions_with_the_reason(daemons):
    d = daemons.start(FTP_EXTRA, users=_users(daemons))
    db = _db(d)
    try:
        db.import_(_carol(daemons, d, password_changed=time.time()), "test")
        ftp = ftplib.FTP()
        ftp.connect("127.0.0.1", d.ports["ftp"], timeout=30)
        ftp.login("carol", ALICE_PASSWORD)
        sftp = paramiko_client(d, "carol", key=daemons.alice_key)
        transport = sftp.get_channel().get_transport()
        mark = len(d.lines)
        db.set_disabled("carol", True, "invoice unpaid", "test")
        d.wait_log(r"proto=ftp .*closing session of carol: account disabled: invoice unpaid", start=mark)
        ftp.sock.settimeout(10)
        assert ftp.getline() == "421 session ended: account disabled: invoice unpaid"
        deadline = time.monotonic() + 10
        while transport.is_active() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not transport.is_active()
        assert _ftp_refusal(d, "carol", ALICE_PASSWORD) == "530 account disabled: invoice unpaid"
        ftp.close()
    finally:
        db.close()

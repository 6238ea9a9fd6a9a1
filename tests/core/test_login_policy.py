"""The account's own state in the login decision, and the end of sessions whose account
changed: expiry, password max age, ``disabled`` with its reason, ``account_changed`` and
``end_expired``, in-process on the fake source of test_login.py, with the core's clock
moved instead of waiting for a date.

Pinned here: each refusal comes after the proof (a wrong password still says only
"failed") and leaves what every policy refusal leaves (the log line, an audit record of
kind "policy", ``login-failed``, no score); a password past its age refuses password
logins only; a change ends the sessions of an account gone, disabled or expired, only
those, only with ``kick_on_disable``, and gives the others their new settings."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest

from scriptsftp.server.contract.credentials import Credentials
from scriptsftp.server.contract.errors import BadCredentials, LoginRefused
from scriptsftp.server.core import account_policy
from scriptsftp.server.core.connections import Connection

from .test_login import PASSWORD, World, _record, _refused, password_hash, world  # noqa: F401

NOW = 1_900_000_000.0  # 2030-03-17 17:46:40 UTC
DAY = 86400.0


@pytest.fixture
def at_now(world: World) -> World:
    world.core.clock = lambda: NOW
    return world


def _policy_refusal(world: World, reason: str) -> None:
    conn = world.conn()
    err = _refused(world, conn)
    assert type(err) is LoginRefused and err.reason == reason
    assert world.core.verifications == 1  # proven first
    assert world.events.names() == ["login-failed"]
    assert world.refusals == [(reason, "policy")] and world.defender.scored == []
    assert not conn.login_counted and conn.user == ""


def test_an_expired_account_is_refused_with_its_date(at_now, tmp_path, password_hash):
    rec = _record(tmp_path, password_hash)
    rec.expires = NOW - 1
    at_now.accounts.records["alice"] = rec
    _policy_refusal(at_now, "account expired on 2030-03-17")


def test_an_account_expiring_later_logs_in(at_now, tmp_path, password_hash):
    rec = _record(tmp_path, password_hash)
    rec.expires = NOW + 1
    at_now.accounts.records["alice"] = rec
    conn = at_now.conn()
    at_now.core.login(conn, Credentials("alice", PASSWORD)).close()
    assert conn.expires == NOW + 1  # what end_expired looks at


def test_a_disabled_account_says_why(at_now, tmp_path, password_hash):
    rec = _record(tmp_path, password_hash)
    rec.disabled, rec.disabled_reason = True, "contract ended\r\n530 forged line\x00"
    at_now.accounts.records["alice"] = rec
    _policy_refusal(at_now, "account disabled: contract ended 530 forged line")  # one printable line


def test_an_expired_account_with_a_wrong_password_says_only_failed(at_now, tmp_path, password_hash):
    rec = _record(tmp_path, password_hash)
    rec.expires = NOW - DAY
    at_now.accounts.records["alice"] = rec
    assert type(_refused(at_now, at_now.conn(), password="wrong")) is BadCredentials


def test_a_password_past_its_max_age_is_refused_and_says_what_to_do(at_now, tmp_path, password_hash):
    rec = _record(tmp_path, password_hash)
    rec.password_changed, rec.password_max_age = NOW - 30 * DAY, 30
    at_now.accounts.records["alice"] = rec
    _policy_refusal(at_now, "password expired on 2030-03-17: ask your administrator for a new one")


def test_a_password_within_its_max_age_or_of_unknown_age_logs_in(at_now, tmp_path, password_hash):
    rec = _record(tmp_path, password_hash)
    rec.password_changed, rec.password_max_age = NOW - 29 * DAY, 30
    at_now.accounts.records["alice"] = rec
    at_now.core.login(at_now.conn(), Credentials("alice", PASSWORD)).close()
    rec.password_changed = None  # a TOML user: when it was set is unknown, so never expired
    at_now.core.login(at_now.conn(), Credentials("alice", PASSWORD)).close()


def test_a_key_still_opens_an_account_whose_password_expired(at_now, tmp_path, password_hash):
    rec = _record(tmp_path, password_hash)
    rec.password_changed, rec.password_max_age = NOW - 90 * DAY, 30
    at_now.accounts.records["alice"] = rec
    conn = at_now.conn("sftp")
    assert at_now.core.finish_login(conn, "alice", "publickey").allowed
    assert conn.user == "alice"
    refused = at_now.core.finish_login(at_now.conn("sftp"), "alice", "password")
    assert not refused.allowed and refused.reason.startswith("password expired on ")


@pytest.mark.parametrize("rec_state, expected", [
    ({}, ("active", "")),
    ({"disabled": True, "disabled_reason": "left"}, ("disabled", "left")),
    ({"expires": NOW}, ("expired", "2030-03-17")),
    ({"password_changed": NOW - 31 * DAY, "password_max_age": 30}, ("password expired", "2030-03-16")),
])
def test_status_for_listings(tmp_path, password_hash, rec_state, expected):
    rec = _record(tmp_path, password_hash)
    for k, v in rec_state.items():
        setattr(rec, k, v)
    assert account_policy.status(rec, NOW) == expected


# --- the account changes while its user is connected ------------------------------------------


class Kicks:
    """Stands in for a front end's ``on_kick``: remembers each reason, from any thread."""

    def __init__(self) -> None:
        self.reasons: list[str] = []
        self.done = threading.Event()

    def __call__(self, reason: str) -> None:
        self.reasons.append(reason)
        self.done.set()


def _logged_in(world: World, user: str = "alice") -> tuple[Connection, Kicks]:
    conn, kicks = world.conn(), Kicks()
    conn.on_kick = kicks
    world.core.login(conn, Credentials(user, PASSWORD))
    return conn, kicks


@pytest.mark.parametrize("change, reason", [
    ("disable", "account disabled: left the company"),
    ("delete", "account removed"),
    ("expire", "account expired on 2030-03-17"),
])
def test_a_changed_account_ends_its_sessions(at_now, tmp_path, password_hash, caplog, change, reason):
    caplog.set_level(logging.INFO, logger="scriptsftp.login")
    at_now.accounts.records["bob"] = _record(tmp_path, password_hash, name="bob")
    conn, kicks = _logged_in(at_now)
    other, other_kicks = _logged_in(at_now, "bob")
    rec = at_now.accounts.records["alice"]
    if change == "disable":
        rec.disabled, rec.disabled_reason = True, "left the company"
    elif change == "delete":
        del at_now.accounts.records["alice"]
    else:
        rec.expires = NOW
    assert at_now.core.account_changed("alice") == [conn]
    assert kicks.done.wait(5) and kicks.reasons == [f"session ended: {reason}"]
    assert f"closing session of alice: {reason}" in caplog.text
    assert at_now.core.account_changed("bob") == [] and other_kicks.reasons == []


def test_without_kick_on_disable_sessions_stay(at_now):
    at_now.core.kick_on_disable = False
    conn, kicks = _logged_in(at_now)
    at_now.accounts.records["alice"].disabled = True
    assert at_now.core.account_changed("alice") == []
    assert kicks.reasons == [] and conn.expires is None


def test_an_edited_account_gives_open_sessions_its_new_settings(at_now, tmp_path, password_hash):
    conn, kicks = _logged_in(at_now)
    at_now.accounts.records["alice"] = _record(tmp_path, password_hash, max_sessions=9)
    assert at_now.core.account_changed("alice") == []
    assert conn.account.max_sessions == 9 and all(s.account.max_sessions == 9 for s in conn.sessions)
    assert kicks.reasons == []


def test_a_password_that_ages_while_connected_ends_nothing(at_now):
    conn, kicks = _logged_in(at_now)
    rec = at_now.accounts.records["alice"]
    rec.password_changed, rec.password_max_age = NOW - 365 * DAY, 30
    assert at_now.core.account_changed("alice") == []


def test_end_expired_ends_only_accounts_whose_time_came(at_now, tmp_path, password_hash):
    at_now.accounts.records["alice"].expires = NOW + 60
    at_now.accounts.records["bob"] = _record(tmp_path, password_hash, name="bob")
    conn, kicks = _logged_in(at_now)
    _, bob_kicks = _logged_in(at_now, "bob")
    asked = len(at_now.accounts.asked)
    assert at_now.core.end_expired() == []
    assert len(at_now.accounts.asked) == asked  # nobody due: no lookup at all
    at_now.core.clock = lambda: NOW + 60
    assert at_now.core.end_expired() == [conn]
    assert kicks.done.wait(5) and kicks.reasons == ["session ended: account expired on 2030-03-17"]
    assert at_now.core.end_expired() == []  # ended once
    assert bob_kicks.reasons == []


def test_end_expired_rereads_an_extended_account(at_now):
    at_now.accounts.records["alice"].expires = NOW + 60
    conn, kicks = _logged_in(at_now)
    at_now.accounts.records["alice"].expires = NOW + 3600  # extended meanwhile (e.g. by the CLI)
    at_now.core.clock = lambda: NOW + 61
    assert at_now.core.end_expired() == [] and kicks.reasons == []
    assert conn.expires == NOW + 3600

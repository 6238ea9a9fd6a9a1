"""``LoginCore.login``: the one login call of FTP and HTTP, in-process, no daemon.

The login sees accounts only through an account source (here a fake that records
what it is asked), the defender through the calls it makes (a fake that records
them), and scripts through a recording dispatcher. Pinned here: the order of the
checks (TLS before any password, the password before any policy, policy before
``pre-login``, the session before ``post-login``) and each kind of refusal, with
what it leaves behind (events, the defender's score, the failure delay as ``wait``).
"""

from __future__ import annotations

import ipaddress
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
from argon2 import PasswordHasher

from scriptsftp.server.contract import events as ev
from scriptsftp.server.contract.credentials import Credentials
from scriptsftp.server.contract.dispatch import ALLOW, Decision, FileOpener
from scriptsftp.server.contract.errors import BadCredentials, LoginRefused, TlsRequired
from scriptsftp.server.core.accounts import UserRecord
from scriptsftp.server.core.connections import Connection
from scriptsftp.server.core.login import LoginCore
from scriptsftp.server.core.session import Account, UploadPolicy
from scriptsftp.server.core.vfs import Access

PASSWORD = "Right-Horse-Battery-7"
DELAY = 0.25  # never slept: login() hands it back as the refusal's wait


@pytest.fixture(scope="module")
def password_hash() -> str:
    """A cheap argon2id hash (verification reads the cost from the hash): the unit tier
    runs in seconds, and what is under test is the order of the checks, not argon2."""
    return PasswordHasher(time_cost=1, memory_cost=256, parallelism=1).hash(PASSWORD)


class FakeAccounts:
    """An account source with nothing but the interface; remembers which names were asked."""

    def __init__(self, records: dict[str, UserRecord]) -> None:
        self.records = records
        self.asked: list[str] = []

    def get(self, name: str) -> UserRecord | None:
        self.asked.append(name)
        return self.records.get(name)

    def names(self) -> list[str]:
        return list(self.records)


@dataclass
class Settings:
    max_preauth_connections: int = 0
    user_max_failures: int = 3


@dataclass
class HostInfo:
    score: int = 0
    banned_before: bool = False


@dataclass
class FakeDefender:
    """What the login core asks of the defender, answered from fields and recorded."""

    banned: bool = False
    locked_until: float = 0.0
    scored: list[str] = field(default_factory=list)
    user_failures: list[str] = field(default_factory=list)
    settings: Settings = field(default_factory=Settings)

    def admit(self, ip: str) -> None:
        return None

    def release(self, ip: str) -> None:
        pass

    def host_info(self, ip: str) -> HostInfo:
        return HostInfo()

    def is_banned(self, ip: str) -> bool:
        return self.banned

    def user_locked_until(self, user: str, ip: str) -> float:
        return self.locked_until

    def record_user_failure(self, user: str, ip: str) -> float:
        self.user_failures.append(user)
        return 0.0

    def record(self, ip: str, kind: str, detail: str = "") -> bool:
        self.scored.append(kind)
        return False


@dataclass
class Events:
    """Every event, in order; ``veto`` answers pre-login."""

    seen: list[ev.Event] = field(default_factory=list)
    veto: Callable[[ev.Event], Decision] = lambda e: ALLOW

    def wants(self, event_name: str) -> bool:
        return True

    def pre(self, event: ev.Event, file: FileOpener | None = None, mode: str | None = None) -> Decision:
        self.seen.append(event)
        return self.veto(event) if isinstance(event, ev.PreLogin) else ALLOW

    def has_async(self, event: ev.Event) -> bool:
        return False

    def post(self, event: ev.Event, file: FileOpener | None = None) -> None:
        self.seen.append(event)

    def names(self) -> list[str]:
        return [e.name for e in self.seen]


@dataclass
class World:
    core: LoginCore
    accounts: FakeAccounts
    defender: FakeDefender
    events: Events
    refusals: list[tuple[str, str]]

    def conn(self, protocol: str = "ftp", ip: str = "192.0.2.5", *, tls: bool = False) -> Connection:
        conn, decision = self.core.connect(protocol, ip)
        assert decision.allowed
        conn.tls = tls
        self.events.seen.clear()
        return conn


def _record(tmp_path: Path, password_hash: str, name: str = "alice", **account: object) -> UserRecord:
    acct = Account(name=name, home=tmp_path, access=Access.build({"/": ["*"]}, [], []),
                   protocols=frozenset(account.pop("protocols", {"ftp", "http", "sftp", "scp"})),
                   **account)  # type: ignore[arg-type]
    return UserRecord(account=acct, password_hash=password_hash, keys=[], disabled=False)


@pytest.fixture
def world(tmp_path: Path, password_hash: str) -> World:
    accounts = FakeAccounts({"alice": _record(tmp_path, password_hash)})
    defender, events = FakeDefender(), Events()
    core = LoginCore(accounts, events, staging=None, uploads=UploadPolicy(atomic=False), failure_delay=DELAY,
                     password_cache=60, defender=defender)  # type: ignore[arg-type]
    refusals: list[tuple[str, str]] = []
    core.refusals = lambda record, reason, kind: refusals.append((reason, kind))
    return World(core, accounts, defender, events, refusals)


def _refused(world: World, conn: Connection, password: str = PASSWORD, user: str = "alice") -> LoginRefused:
    with pytest.raises(LoginRefused) as caught:
        world.core.login(conn, Credentials(user, password))
    return caught.value


# --- the way in ------------------------------------------------------------------------------


def test_a_login_proves_decides_opens_the_session_then_announces(world, caplog):
    caplog.set_level(logging.INFO, logger="scriptsftp.login")
    conn = world.conn("http")
    session = world.core.login(conn, Credentials("alice", PASSWORD))
    assert session.user == "alice" and session.protocol == "http" and conn.sessions == [session]
    assert conn.user == "alice" and conn.login_counted and not conn.preauth
    assert world.events.names() == ["pre-login", "post-login"]
    assert [e.login_method for e in world.events.seen] == ["password", "password"]  # type: ignore[attr-defined]
    assert "login ok (password)" in caplog.text
    assert world.defender.scored == [] and world.refusals == []
    session.close()


def test_the_login_core_asks_the_source_and_nothing_else(world):
    """The next account source (a database) needs only get(); the decision never sees a dict."""
    conn = world.conn()
    world.core.login(conn, Credentials("alice", PASSWORD)).close()
    assert set(world.accounts.asked) == {"alice"}


def test_credentials_never_show_the_password():
    assert PASSWORD not in repr(Credentials("alice", PASSWORD))


# --- 1. TLS, before any password ------------------------------------------------------------


def test_require_tls_refuses_a_clear_ftp_login_before_the_password_is_checked(world, tmp_path, password_hash):
    world.accounts.records["alice"] = _record(tmp_path, password_hash, require_tls=True)
    err = _refused(world, world.conn("ftp"), password="not even checked")
    assert type(err) is TlsRequired and err.wait == 0
    assert world.core.verifications == 0 and world.events.seen == [] and world.defender.scored == []
    world.core.login(world.conn("ftp", tls=True), Credentials("alice", PASSWORD)).close()


def test_require_tls_is_for_protocols_where_tls_is_optional(world, tmp_path, password_hash):
    """An HTTP listener is TLS or not for everyone and SSH always encrypts: FTP's rule only."""
    world.accounts.records["alice"] = _record(tmp_path, password_hash, require_tls=True)
    world.core.login(world.conn("http"), Credentials("alice", PASSWORD)).close()


def test_check_tls_answers_before_a_password_exists(world, tmp_path, password_hash):
    world.accounts.records["alice"] = _record(tmp_path, password_hash, require_tls=True)
    with pytest.raises(TlsRequired):
        world.core.check_tls(world.conn("ftp"), "alice")
    world.core.check_tls(world.conn("ftp", tls=True), "alice")
    world.core.check_tls(world.conn("ftp"), "nosuchuser")  # says nothing about unknown names


# --- 2. prove ------------------------------------------------------------------------------


def test_a_wrong_password_is_bad_credentials_with_the_failure_delay(world):
    err = _refused(world, world.conn(), password="wrong")
    assert type(err) is BadCredentials and err.wait == pytest.approx(DELAY)
    assert world.events.names() == ["login-failed"]  # no pre-login: nothing was proven
    assert world.events.seen[0].reason == "wrong password"  # type: ignore[attr-defined]
    assert world.defender.scored == ["login_failed"] and world.defender.user_failures == ["alice"]
    assert world.refusals == []  # a failed proof is scored, not audited as a policy refusal


def test_an_unknown_user_costs_what_a_verification_would(world):
    err = _refused(world, world.conn(), user="mallory")
    assert type(err) is BadCredentials and err.wait == pytest.approx(DELAY + 0.15)
    assert world.core.verifications == 0
    assert world.defender.scored == ["unknown_user"] and world.defender.user_failures == []


def test_a_banned_address_is_refused_without_a_hash_and_kicked(world):
    conn = world.conn()
    kicked: list[str] = []
    conn.on_kick = kicked.append
    world.defender.banned = True
    err = _refused(world, conn)
    assert type(err) is BadCredentials and err.wait == 0
    assert world.core.verifications == 0 and world.events.seen == []
    deadline = time.monotonic() + 5
    while not kicked and time.monotonic() < deadline:
        time.sleep(0.01)  # the kick runs on a thread of its own
    assert kicked == ["address banned after repeated failures"]


def test_a_locked_user_is_refused_like_a_wrong_password_without_a_hash(world):
    world.defender.locked_until = 2_000_000_000.0
    err = _refused(world, world.conn())
    assert type(err) is BadCredentials and err.wait == pytest.approx(DELAY)
    assert world.core.verifications == 0
    assert "locked until" in world.events.seen[0].reason  # type: ignore[attr-defined]


def test_the_password_comes_before_policy(world, tmp_path, password_hash):
    """A disabled account with a wrong password says 'failed', never 'disabled'."""
    record = _record(tmp_path, password_hash)
    record.disabled = True
    world.accounts.records["alice"] = record
    assert type(_refused(world, world.conn(), password="wrong")) is BadCredentials


# --- 3. decide -------------------------------------------------------------------------------


@pytest.mark.parametrize("change, reason", [
    ({"disabled": True}, "account disabled"),
    ({"protocols": {"sftp"}}, "protocol ftp not allowed for this user"),
    ({"allowed_ips": ("198.51.100.0/24",)}, "address 192.0.2.5 not allowed for this user"),
])
def test_policy_refusals_carry_their_reason_and_come_before_pre_login(world, tmp_path, password_hash, change, reason):
    disabled = change.pop("disabled", False)
    if "allowed_ips" in change:
        change["allowed_ips"] = tuple(ipaddress.ip_network(n) for n in change["allowed_ips"])
    record = _record(tmp_path, password_hash, **change)
    record.disabled = disabled
    world.accounts.records["alice"] = record
    conn = world.conn()
    err = _refused(world, conn)
    assert type(err) is LoginRefused and err.reason == reason and err.wait == pytest.approx(DELAY)
    assert world.core.verifications == 1  # proven first
    assert world.events.names() == ["login-failed"]  # no pre-login for a refused policy
    assert world.refusals == [(reason, "policy")] and world.defender.scored == []  # proven: not scored
    assert not conn.login_counted and conn.user == ""


def test_a_ban_landing_after_the_proof_refuses_the_decision(world, monkeypatch):
    conn = world.conn()
    verify = world.core.passwords.verify

    def verify_then_ban(*args: str) -> bool:
        ok = verify(*args)
        world.defender.banned = True  # banned by another connection's failures meanwhile
        return ok
    monkeypatch.setattr(world.core.passwords, "verify", verify_then_ban)
    err = _refused(world, conn)
    assert type(err) is LoginRefused and err.reason == "address banned after repeated failures"


def test_a_pre_login_veto_refuses_with_the_scripts_reason(world):
    world.events.veto = lambda e: Decision(False, "not on sundays")
    conn = world.conn()
    err = _refused(world, conn)
    assert type(err) is LoginRefused and err.reason == "not on sundays"
    assert world.events.names() == ["pre-login", "login-failed"]
    assert world.refusals == []  # the engine audits a script's veto itself
    assert not conn.login_counted and conn.sessions == []


def test_max_sessions_counts_logins_after_the_scripts_allowed(world, tmp_path, password_hash):
    world.accounts.records["alice"] = _record(tmp_path, password_hash, max_sessions=1)
    first = world.core.login(world.conn(), Credentials("alice", PASSWORD))
    err = _refused(world, world.conn())
    assert type(err) is LoginRefused and err.reason == "too many sessions for this user (limit 1)"
    assert world.events.names() == ["pre-login", "login-failed"]
    first.close()


# --- reload ---------------------------------------------------------------------------------


def test_replacing_the_source_returns_the_connections_of_removed_users(world, tmp_path, password_hash):
    conn = world.conn()
    session = world.core.login(conn, Credentials("alice", PASSWORD))
    stays = FakeAccounts({"alice": _record(tmp_path, password_hash, max_sessions=7)})
    assert world.core.replace_accounts(stays) == []
    assert session.account.max_sessions == 7  # live sessions get the new account at once
    assert world.core.replace_accounts(FakeAccounts({})) == [conn]
    assert type(_refused(world, world.conn())) is BadCredentials  # the new source decides
    session.close()


def test_a_session_stands_on_the_storage_the_core_is_handed(world, tmp_path):
    """The Storage seam: the login core opens each home through its ``open_storage`` (the
    daemon's choice of backend); the session's file operations go through what it returned."""
    from scriptsftp.server.core.storage import LocalStorage

    opened: list[Path] = []

    class CountingStorage(LocalStorage):
        calls = 0

        def resolve(self, parts, **kw):  # type: ignore[no-untyped-def]
            CountingStorage.calls += 1
            return super().resolve(parts, **kw)

    def open_storage(home: Path) -> LocalStorage:
        opened.append(home)
        return CountingStorage(home)

    world.core.open_storage = open_storage
    (tmp_path / "hello.txt").write_text("hi\n")
    session = world.core.login(world.conn(), Credentials("alice", PASSWORD))
    try:
        assert opened == [tmp_path] and isinstance(session.storage, CountingStorage)
        assert [e.name for e in session.listdir("/")] == ["hello.txt"]
        assert CountingStorage.calls > 0
    finally:
        session.close()

"""The login core remembers verified passwords for ``[server] password_cache`` seconds.

Unit checks of what the cache may and may not answer, and one end-to-end check
that a password changed by a reload is not let in by the cache.
"""

from __future__ import annotations

import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import paramiko

from conftest import ALICE_PASSWORD, toml_str, user_toml
from scriptsftp.server.core.passwords import PasswordCache, hash_password


def test_hit_only_for_the_same_user_password_and_hash():
    cache = PasswordCache(60)
    cache.remember("alice", "pw", "$hash1")
    assert cache.hit("alice", "pw", "$hash1")
    assert not cache.hit("alice", "other", "$hash1")  # a wrong password never matches
    assert not cache.hit("bob", "pw", "$hash1")
    assert not cache.hit("alice", "pw", "$hash2")  # the password was changed: verify again
    assert not cache.hit("alice", "pw", "$hash1")  # ... and the stale entry is gone


def test_entries_expire_and_zero_disables():
    cache = PasswordCache(0.05)
    cache.remember("alice", "pw", "$h")
    assert cache.hit("alice", "pw", "$h")
    time.sleep(0.1)  # the expiry is the behaviour under test
    assert not cache.hit("alice", "pw", "$h")
    off = PasswordCache(0)
    off.remember("alice", "pw", "$h")
    assert not off.hit("alice", "pw", "$h")


def test_size_is_bounded():
    cache = PasswordCache(60)
    for i in range(PasswordCache.MAX_ENTRIES + 5):
        cache.remember(f"u{i}", "pw", "$h")
    assert len(cache._entries) <= PasswordCache.MAX_ENTRIES


def _login(d, password: str) -> bool:
    t = paramiko.Transport(("127.0.0.1", d.port))
    try:
        t.connect(username="alice", password=password)
        return True
    except paramiko.AuthenticationException:
        return False
    finally:
        t.close()


def test_a_password_changed_by_reload_is_not_let_in_from_the_cache(daemons):
    d = daemons.start(users=user_toml("alice", password_hash=hash_password(ALICE_PASSWORD)))
    assert _login(d, ALICE_PASSWORD)
    assert _login(d, ALICE_PASSWORD)  # from the cache now
    new = "alice-New-Secret-9"
    d.config.write_text(d.config.read_text().replace(
        d.config.read_text().split("password_hash = ")[1].split("\n")[0], toml_str(hash_password(new))))
    mark = len(d.lines)
    d.signal(signal.SIGHUP)
    d.wait_log(r"configuration reloaded", start=mark)
    assert not _login(d, ALICE_PASSWORD)
    assert _login(d, new)


# --- single flight: a burst of identical logins runs argon2 once ----------------------------


class _CountingHasher:
    """Stands in for passwords._hasher: counts verifications and holds each one until released,
    so that every concurrent check has arrived while the first is still running."""

    def __init__(self, real, release: threading.Event) -> None:
        self.real = real
        self.release = release
        self.calls: list[str] = []
        self.started = threading.Event()
        self._lock = threading.Lock()

    def verify(self, password_hash: str, password: str) -> bool:
        with self._lock:
            self.calls.append(password)
        self.started.set()
        self.release.wait(10)
        return self.real.verify(password_hash, password)


def _core(password_hashes, cache_seconds: float = 60.0):
    from scriptsftp.server.contract.dispatch import NullDispatcher
    from scriptsftp.server.core.accounts import TomlAccountSource, UserRecord
    from scriptsftp.server.core.connections import Connection
    from scriptsftp.server.core.login import LoginCore
    from scriptsftp.server.core.session import Account, UploadPolicy
    from scriptsftp.server.core.vfs import Access

    account = Account(name="alice", home=Path("/nonexistent"), access=Access.build({}, [], []))
    users = {"alice": UserRecord(account=account, password_hash=password_hashes["alice"], keys=[], disabled=False)}
    core = LoginCore(TomlAccountSource(users), NullDispatcher(), staging=None, uploads=UploadPolicy(atomic=False),
                     failure_delay=0, password_cache=cache_seconds)
    return core, lambda: Connection("c", "sftp", "192.0.2.1")


def _burst(core, conn, passwords: list[str], counting: _CountingHasher, release: threading.Event) -> list[bool]:
    """Run one check per password at once; release the held verifications only once every
    thread is either verifying or waiting for another's verification."""
    results: list[bool | None] = [None] * len(passwords)

    def one(i: int) -> None:
        results[i] = core.check_password(conn(), "alice", passwords[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(passwords))]
    for t in threads:
        t.start()
    assert counting.started.wait(10)
    deadline = time.monotonic() + 10
    # every thread is parked: in a verification (held) or on a flight's event
    while _parked(core, counting) < len(passwords) and time.monotonic() < deadline:
        time.sleep(0.01)  # polling a count the threads raise, not waiting for time to pass
    release.set()
    for t in threads:
        t.join(20)
    return results  # type: ignore[return-value]


def _parked(core, counting: _CountingHasher) -> int:
    flights = getattr(core.passwords, "_flights", None)  # (None before single flight: then all verify)
    if flights is None:
        return len(counting.calls)
    with flights._lock:
        waiting = sum(f.waiting for f in flights._flights.values())
    return waiting + len(counting.calls)


def test_concurrent_logins_of_one_user_run_argon2_once(password_hashes, monkeypatch):
    from scriptsftp.server.core import passwords

    release = threading.Event()
    counting = _CountingHasher(passwords._hasher, release)
    monkeypatch.setattr(passwords, "_hasher", counting)
    core, conn = _core(password_hashes)
    results = _burst(core, conn, [ALICE_PASSWORD] * 20, counting, release)
    assert results == [True] * 20
    assert len(counting.calls) == 1  # 19 served by the one verification in flight
    assert core.check_password(conn(), "alice", ALICE_PASSWORD)
    assert len(counting.calls) == 1  # and now by the cache


def test_a_wrong_password_never_rides_on_a_right_ones_verification(password_hashes, monkeypatch):
    from scriptsftp.server.core import passwords

    release = threading.Event()
    counting = _CountingHasher(passwords._hasher, release)
    monkeypatch.setattr(passwords, "_hasher", counting)
    core, conn = _core(password_hashes)
    passwords = [ALICE_PASSWORD] * 10 + ["wrong-one"] * 5 + ["wrong-two"]
    results = _burst(core, conn, passwords, counting, release)
    assert results == [True] * 10 + [False] * 6
    assert sorted(counting.calls) == sorted([ALICE_PASSWORD, "wrong-one", "wrong-two"])  # one per candidate
    assert not core.password_cache.hit("alice", "wrong-one", password_hashes["alice"])
    assert not core.check_password(conn(), "alice", "wrong-one")
    assert len(counting.calls) == 4  # a failure is not remembered: verified again


def test_a_burst_of_logins_through_the_daemon_verifies_once(daemons):
    path = daemons.write_config(users=user_toml("alice", password_hash=hash_password(ALICE_PASSWORD)))
    path.write_text(path.read_text().replace('log_level = "info"', 'log_level = "debug"'))
    d = daemons.start(config=path)
    n = 12
    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(lambda _: _login(d, ALICE_PASSWORD), range(n)))
    assert results == [True] * n
    d.wait_log(r"login ok", timeout=10)
    assert len(re.findall(r"argon2 verification for 'alice'", d.log_text())) == 1, d.log_text()[-3000:]


# --- a link to the core that closes under a login: one warning line, no traceback -------------


def test_a_closed_core_link_is_one_warning_line_not_a_traceback(caplog):
    import logging
    import socket

    from paramiko import util
    from scriptsftp.server.support import logs
    from scriptsftp.server.frontends.ssh.paramiko_ext import transport as ssh
    from scriptsftp.server.contract.errors import CoreGone
    from scriptsftp.server.frontends.ssh.remote_core import RemoteCore

    ours, theirs = socket.socketpair()
    core = RemoteCore(ours)
    theirs.close()  # the core ended the link (shutdown, or the login grace ran out)
    a, b = socket.socketpair()
    transport = ssh.ServerTransport(a)
    monkey = logs.BoundedLog(logging.WARNING)
    ssh._core_gone_log, saved = monkey, ssh._core_gone_log
    caplog.set_level(logging.DEBUG)
    try:
        for _ in range(3):  # what paramiko's Transport.run does with an exception it did not expect
            try:
                core.value("finish_login", "alice", "password")
            except Exception as e:
                assert isinstance(e, CoreGone)
                transport._log(logging.ERROR, "Unknown exception: " + str(e))
                transport._log(logging.ERROR, util.tb_strings())
    finally:
        ssh._core_gone_log = saved
        transport.sock.release()
        b.close()
    records = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.levelname for r in records] == ["WARNING"], [r.getMessage() for r in records]
    text = records[0].getMessage()
    assert "link to the core closed" in text and "\n" not in text and len(text) < 300
    assert "Traceback" not in caplog.text

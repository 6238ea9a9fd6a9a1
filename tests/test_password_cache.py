"""The login core remembers verified passwords for ``[server] password_cache`` seconds.

Unit checks of what the cache may and may not answer, and one end-to-end check
that a password changed by a reload is not let in by the cache.
"""

from __future__ import annotations

import signal
import time

import paramiko

from conftest import ALICE_PASSWORD, toml_str, user_toml
from scriptsftp.server.login import PasswordCache, hash_password


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

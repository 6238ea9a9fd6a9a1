"""Passwords: hashing, first-start generated passwords, and verifying them cheaply.

Password checks cost ~150 ms of CPU and 64 MiB each (argon2id), so at most a
few run at once (:class:`PasswordVerifier`'s hash slots). A verified password
is remembered for a while (:class:`PasswordCache`), and concurrent checks of
the same one share a single verification (:class:`VerifyFlights`), so a client
opening many connections at once costs one check. Passwords are never logged
and never written anywhere; only their hashes are.

What a check *means* for a login (failure accounting, the defender, the delay)
is the login core's business (:mod:`.login`); this module only answers
"is this the password that hash was made from".
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import threading
import time
from pathlib import Path
from typing import Callable

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from scriptsftp.server.support.config import LoadedConfig

log = logging.getLogger("scriptsftp.login")

_hasher = PasswordHasher()  # argon2id, RFC 9106 low-memory profile


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def ensure_generated_passwords(cfg: LoadedConfig, announce: Callable[[str, str, Path], None]) -> None:
    """For users with ``generate_password``: create the password on first start.

    Only the hash is stored (0600); the password itself is handed to
    ``announce`` once and never written anywhere."""
    for user in cfg.model.users:
        if not user.generate_password:
            continue
        path = cfg.resolve(user.password_hash_file)
        if path.exists():
            continue
        password = secrets.token_urlsafe(15)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(hash_password(password) + "\n")
        announce(user.name, password, path)


class PasswordCache:
    """Passwords verified in the last ``seconds``, so a client that logs in again and
    again (an FTP script per file, curl or rclone opening connections) costs one
    argon2 verification per period instead of one per login (~0.2 s of CPU and
    64 MiB each; SFTPGo caches the same way).

    Only a keyed SHA-256 of user and password is kept, under a secret made at start
    and never written anywhere; an entry holds for the password hash it was
    verified against, so a changed password invalidates it. A wrong password never
    matches an entry: failures always cost the full check and the failure delay."""

    MAX_ENTRIES = 10000

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._secret = secrets.token_bytes(32)
        self._entries: dict[bytes, tuple[str, float]] = {}
        self._lock = threading.Lock()

    def key(self, name: str, password: str) -> bytes:
        """The keyed hash that stands for (user, password) here and in :class:`VerifyFlights`."""
        msg = name.encode("utf-8", "surrogatepass") + b"\0" + password.encode("utf-8", "surrogatepass")
        return hmac.new(self._secret, msg, hashlib.sha256).digest()

    def hit(self, name: str, password: str, password_hash: str) -> bool:
        if self.seconds <= 0:
            return False
        key = self.key(name, password)
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return False
            if entry[0] != password_hash or entry[1] < time.monotonic():
                del self._entries[key]
                return False
        return True

    def remember(self, name: str, password: str, password_hash: str) -> None:
        if self.seconds <= 0:
            return
        key, now = self.key(name, password), time.monotonic()
        with self._lock:
            if len(self._entries) >= self.MAX_ENTRIES:
                for k in [k for k, (_, exp) in self._entries.items() if exp < now]:
                    del self._entries[k]
                if len(self._entries) >= self.MAX_ENTRIES:
                    self._entries.clear()
            self._entries[key] = (password_hash, now + self.seconds)


class _Flight:
    """One argon2 verification in progress; ``ok`` is None until it is done (and stays
    None if it failed with an exception: the waiters then verify for themselves)."""

    __slots__ = ("done", "ok", "waiting")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.ok: bool | None = None
        self.waiting = 0  # checks sharing this verification besides its leader


class VerifyFlights:
    """Single flight for password verifications: concurrent checks of the same user,
    candidate password and stored hash wait for one argon2 run and share its verdict.

    Why: the password cache answers only once a verification has finished, so a burst
    of N concurrent logins of one user (a client opening many connections at once)
    otherwise runs argon2 N times, queued on the few hash slots, and the last ones miss
    their login grace. The key is the password cache's keyed hash of (user, password)
    plus the stored hash, so a wrong password never shares a right one's verdict: it
    has its own flight, and is verified. Identical attempts share either verdict (the
    same input gives the same answer); only a success is remembered afterwards."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._flights: dict[tuple[bytes, str], _Flight] = {}

    def join(self, key: tuple[bytes, str]) -> tuple[_Flight, bool]:
        """The flight for ``key`` and whether the caller leads it (runs the verification)."""
        with self._lock:
            flight = self._flights.get(key)
            if flight is not None:
                flight.waiting += 1
                return flight, False
            flight = self._flights[key] = _Flight()
            return flight, True

    def land(self, key: tuple[bytes, str], flight: _Flight, ok: bool | None) -> None:
        """The leader's verdict (None: it failed): waiters wake, later checks start afresh."""
        with self._lock:
            if self._flights.get(key) is flight:
                del self._flights[key]
        flight.ok = ok
        flight.done.set()

    def __len__(self) -> int:
        with self._lock:
            return len(self._flights)


class PasswordVerifier:
    """Is ``password`` the one ``password_hash`` was made from: the cache, else one shared
    argon2 run for all concurrent identical checks, at most ``max_parallel`` at once."""

    def __init__(self, cache_seconds: float = 0.0, max_parallel: int | None = None) -> None:
        self.cache = PasswordCache(cache_seconds)
        self._slots = threading.BoundedSemaphore(max_parallel or max(2, os.cpu_count() or 2))
        self._flights = VerifyFlights()
        self._lock = threading.Lock()
        #: argon2 verifications run since start (what the cache and single flight save)
        self.verifications = 0

    def verify(self, name: str, password: str, password_hash: str) -> bool:
        if self.cache.hit(name, password, password_hash):
            return True
        key = (self.cache.key(name, password), password_hash)
        while True:
            flight, leader = self._flights.join(key)
            if leader:
                return self._lead(name, password, password_hash, key, flight)
            flight.done.wait()
            if flight.ok is not None:
                return flight.ok

    def _lead(self, name: str, password: str, password_hash: str, key: tuple[bytes, str], flight: _Flight) -> bool:
        """Verify once for the flight. The cache is asked again once a hash slot is ours:
        a flight that landed while we queued for the slot may have just proven it."""
        ok: bool | None = None
        try:
            with self._slots:
                if self.cache.hit(name, password, password_hash):
                    ok = True
                else:
                    ok = self._argon2(name, password, password_hash)
            if ok:
                self.cache.remember(name, password, password_hash)
            return ok
        finally:
            self._flights.land(key, flight, ok)

    def _argon2(self, name: str, password: str, password_hash: str) -> bool:
        """One argon2 verification (a hash slot held). Counted and logged at debug level,
        without the password, so a test or an operator can see what logins cost."""
        started = time.monotonic()
        try:
            return _hasher.verify(password_hash, password)
        except VerifyMismatchError:
            return False
        except (VerificationError, InvalidHashError):
            log.error("user %s: stored password hash is invalid", name)
            return False
        finally:
            with self._lock:
                self.verifications += 1
            log.debug("argon2 verification for %r took %.0f ms", name, (time.monotonic() - started) * 1000)

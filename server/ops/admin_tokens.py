"""Who is calling the admin API: the named, scoped bearer tokens of ``[admin]``.

Each token is configured by name, argon2id hash and scope (``[[admin.tokens]]``; ``[admin]
token_hash`` is the write token named "admin"). A request proves a token; the :class:`Grant`
it earns says what it may do (a read token: GET only) and who it is (the actor recorded for
every account change made with it: ``api:NAME``).

Verifying costs ~150 ms of CPU per configured hash, so a verified token is remembered as
:class:`~scriptsftp.server.core.passwords.PasswordCache` remembers passwords (a keyed hash
of name and token, valid only for the hash it was verified against: a changed or removed
token stops working at the next request). New tokens are verified one at a time off the
event loop, at most ``MAX_PENDING_VERIFY`` waiting; a wrong one is remembered too and costs
nothing the second time, and the verifier rests after each, so a flood of guesses takes a
fraction of one core.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Literal

from aiohttp import web
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from scriptsftp.server.core.passwords import PasswordCache
from scriptsftp.server.support.config import AdminToken

MAX_PENDING_VERIFY = 8        # new tokens waiting for an argon2 verify; more are refused at once
FAILED_VERIFY_PAUSE = 0.35    # seconds the verifier rests after a wrong token
TOKEN_CACHE_SECONDS = 3600.0  # a verified token is verified again after this
MAX_WRONG_REMEMBERED = 1024
READ_METHODS = frozenset({"GET", "HEAD"})

_hasher = PasswordHasher()


@dataclass(frozen=True)
class Grant:
    """What a proven token may do, and the name it acts under."""

    name: str
    scope: Literal["read", "write"]

    @property
    def actor(self) -> str:
        """Who the account database records as having made a change: ``api:NAME``."""
        return f"api:{self.name}"

    def allows(self, method: str) -> bool:
        return self.scope == "write" or method.upper() in READ_METHODS


#: the grant a request's token earned (the admin middleware sets it on every /api request it lets through)
GRANT = web.RequestKey("grant", Grant)

#: Without any token configured the API listens on loopback only and trusts this host.
LOOPBACK_GRANT = Grant("loopback", "write")


class TokenChecker:
    """Which configured token is this bearer token? Cached, one verification at a time."""

    def __init__(self, get_tokens: Callable[[], list[AdminToken]], loopback: bool) -> None:
        self._get_tokens = get_tokens
        self._loopback = loopback
        self._cache = PasswordCache(TOKEN_CACHE_SECONDS)
        self._wrong: OrderedDict[bytes, None] = OrderedDict()
        self._lock = threading.Lock()
        self._pending = 0
        self._verifier = ThreadPoolExecutor(1, thread_name_prefix="scriptsftp-admin-verify")

    @property
    def required(self) -> bool:
        return bool(self._get_tokens())

    async def check(self, token: str | None) -> Grant | None:
        """The grant of ``token``, or None (no token, a wrong one, or too many being verified)."""
        tokens = self._get_tokens()
        if not tokens:
            return LOOPBACK_GRANT if self._loopback else None
        if not token:
            return None
        for t in tokens:
            if self._cache.hit(t.name, token, t.token_hash):
                return Grant(t.name, t.scope)
        # a wrong token is wrong for this set of hashes; a new set verifies it afresh
        wrong_key = hashlib.sha256("\0".join(t.token_hash for t in tokens).encode() + b"\0"
                                   + token.encode("utf-8", "replace")).digest()
        with self._lock:
            if wrong_key in self._wrong or self._pending >= MAX_PENDING_VERIFY:
                return None  # known wrong, or a flood of new tokens: refuse without spending CPU
            self._pending += 1
        try:
            found = await asyncio.get_running_loop().run_in_executor(self._verifier, _verify_any, tokens, token)
        finally:
            with self._lock:
                self._pending -= 1
        if found is None:
            with self._lock:
                self._wrong[wrong_key] = None
                while len(self._wrong) > MAX_WRONG_REMEMBERED:
                    self._wrong.popitem(last=False)
            return None
        self._cache.remember(found.name, token, found.token_hash)
        return Grant(found.name, found.scope)

    def close(self) -> None:
        self._verifier.shutdown(wait=False, cancel_futures=True)


def _verify_any(tokens: list[AdminToken], token: str) -> AdminToken | None:
    for t in tokens:
        try:
            if _hasher.verify(t.token_hash, token):
                return t
        except (VerificationError, InvalidHashError):
            continue
    # Runs on the one verifier thread: pausing here caps wrong-token guesses at a few per
    # second, so a flood costs a fraction of one core instead of all of it.
    time.sleep(FAILED_VERIFY_PAUSE)
    return None


__all__ = ["GRANT", "Grant", "LOOPBACK_GRANT", "TokenChecker", "READ_METHODS"]

"""Bandwidth limits per user: one token bucket per user and direction, over all their
sessions and protocols together (``bandwidth_up``/``bandwidth_down``, issue 18).

A per-session limit is what pyftpdlib's ``ThrottledDTPHandler`` gives; it lets a user
multiply their share by opening more connections, or by mixing SFTP, FTP and HTTP. So
the bucket is the user's: :class:`BandwidthLimits` hands every session of a user the
same :class:`UserBandwidth`, and the front ends pace their transfers on it through the
contract's ``ThrottlePort`` (server/contract/ports.py), each in the way its concurrency
allows (a blocking :meth:`TokenBucket.take` in SSH channel threads; :meth:`~TokenBucket.charge`
and :meth:`~TokenBucket.wait_for` on FTP's I/O loop and HTTP's event loop). SSH workers
buy their tokens from the same bucket over their link to the core.

The bucket counts in bytes, never in time slots: ``charged`` is every byte its takers
asked for, ``allowed`` every byte the rate has let through (plus a burst of a quarter
second's worth, the most it saves up while idle). A taker charges n bytes, gets the
total after its charge as its mark, and moves its bytes once ``allowed`` reaches that
mark: takers are served in the order they charged, whatever their protocol, and a rate
change applies to every waiter at once (the wait is recomputed from the bytes still
owed, at the new rate). A rate of 0 is no limit: nothing is charged and nobody waits.

Accuracy: over any interval of t seconds a user moves at most ``rate * t`` plus the
burst plus one chunk per running transfer (FTP and HTTP charge what they have just
received); docs/accounts.md "Bandwidth" states it for users.
"""

from __future__ import annotations

import threading
import time
import weakref
from typing import Callable

from scriptsftp.server.contract.errors import LimitExceeded
from scriptsftp.server.contract.ports import throttle_chunk
from scriptsftp.server.core.limits import Rates

#: seconds of the rate a bucket saves up while idle (the burst a transfer starts with)
BURST_SECONDS = 0.25


class TokenBucket:
    """One user's bandwidth in one direction (a ``ThrottlePort``). Thread-safe.

    ``rate`` is a plain attribute (bytes/s, 0: no limit), read per chunk by the front ends
    without a lock: an unlimited user's transfers pay one attribute read per chunk."""

    def __init__(self, rate: int = 0, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._changed = threading.Condition(threading.Lock())
        self.rate = 0
        self._charged = 0.0  # bytes asked for since the bucket was made
        self._allowed = 0.0  # bytes the rate has let through (never more than charged + burst)
        self._stamp = clock()
        self.set_rate(rate)

    @property
    def chunk(self) -> int:
        return throttle_chunk(self.rate)

    def set_rate(self, rate: int) -> None:
        """A new rate from the account (login, reload, database change); waiters see it now.

        The bytes already owed stay owed and are paid at the new rate; a bucket that becomes
        limited starts full (one burst), as a new one does."""
        rate = max(0, int(rate))
        with self._changed:
            if rate == self.rate:
                return
            now = self._clock()
            if self.rate:
                self._refill(now)
            else:
                self._allowed = self._charged + rate * BURST_SECONDS
            self.rate = rate
            self._stamp = now
            if rate:
                self._allowed = min(self._allowed, self._charged + rate * BURST_SECONDS)
            self._changed.notify_all()

    def _refill(self, now: float) -> None:
        """What the rate let through since the last look (holding the lock; rate > 0)."""
        elapsed = now - self._stamp
        if elapsed > 0:
            self._allowed = min(self._allowed + elapsed * self.rate, self._charged + self.rate * BURST_SECONDS)
        self._stamp = now

    def charge(self, n: int) -> float:
        """Ask for ``n`` bytes; the mark to give :meth:`wait_for`. Never waits."""
        with self._changed:
            if not self.rate:
                return 0.0
            self._refill(self._clock())  # first: what idle time saved is capped by what was owed before
            self._charged += max(0, n)
            return self._charged

    def wait_for(self, mark: float) -> float:
        """Seconds until the bytes charged up to ``mark`` may move, at the current rate (0: now)."""
        with self._changed:
            return self._owed(mark, self._clock())

    def _owed(self, mark: float, now: float) -> float:
        if not self.rate:
            return 0.0
        self._refill(now)
        short = mark - self._allowed
        return short / self.rate if short > 0 else 0.0

    def take(self, n: int, deadline: float | None) -> None:
        """Charge ``n`` bytes and return when they may move. Past ``deadline`` (a
        ``time.monotonic()`` instant, the caller's stall timeout; None: none) the wait is
        given up with :class:`LimitExceeded`: a transfer that cannot move one chunk in
        the stall timeout fails as a stalled one would (its bytes stay charged)."""
        if not self.rate:
            return
        mark = self.charge(n)
        with self._changed:
            while True:
                now = self._clock()
                wait = self._owed(mark, now)
                if wait <= 0:
                    return
                if deadline is not None:
                    if now >= deadline:
                        raise LimitExceeded(
                            f"bandwidth limit of {self.rate} bytes/s: the transfer could not move "
                            f"{n} bytes within the stall timeout")
                    wait = min(wait, deadline - now)
                self._changed.wait(wait)


class UserBandwidth:
    """A user's two buckets (a ``BandwidthPort``), shared by all their sessions."""

    def __init__(self, rates: Rates | None = None, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.up = TokenBucket(clock=clock)
        self.down = TokenBucket(clock=clock)
        if rates is not None:
            self.set(rates)

    def set(self, rates: Rates) -> None:
        self.up.set_rate(rates.up)
        self.down.set_rate(rates.down)

    @property
    def limited(self) -> bool:
        return bool(self.up.rate or self.down.rate)


class BandwidthLimits:
    """The buckets of the users who have sessions now: one :class:`UserBandwidth` per
    user name, whichever protocol or SSH worker their sessions run on. A user's buckets
    live while one of their sessions holds them (weak references), so the table never
    outgrows the sessions and a user who comes back starts with a full bucket."""

    def __init__(self) -> None:
        self._users: weakref.WeakValueDictionary[str, UserBandwidth] = weakref.WeakValueDictionary()
        self._lock = threading.Lock()

    def of(self, user: str) -> UserBandwidth:
        """The user's buckets (unlimited until a session sets the account's rates on them)."""
        with self._lock:
            found = self._users.get(user)
            if found is None:
                found = self._users[user] = UserBandwidth()
            return found

    def __len__(self) -> int:
        return len(self._users)


__all__ = ["BURST_SECONDS", "BandwidthLimits", "TokenBucket", "UserBandwidth"]

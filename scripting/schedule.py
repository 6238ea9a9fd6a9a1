"""The ``schedule`` event: bindings with ``cron = "..."`` fire on the minute, once.

One thread. For each schedule binding it keeps the next time its cron
expression matches (cronsim, 5 fields, the server's local time, minute
granularity) and sleeps until the soonest one. When a minute comes due it claims
``(binding, minute)`` in the ``schedule`` store (:mod:`.schedule_claims`) and fires
only if it got the claim: on one node that changes nothing, in a cluster every node
claims and exactly one fires. A binding is named across nodes by :func:`binding_key`
(its script, function, cron and users), never by its place in one node's config.

- A minute is fired late rather than skipped: a scheduler woken late (a loaded or
  suspended machine) fires each minute it missed, up to ``catch_up`` real seconds old.
  A minute missed while the daemon (every node) was down is not replayed: the
  bindings' first due minute is the one after the scheduler starts.
- The claiming node renews the lease of each firing until its runs end, then marks the
  minute done. A node that dies meanwhile stops renewing; once the lease expired
  another node takes the minute over and runs it (:meth:`ScheduleClaims.take_over`).
- While the database cannot be reached, no minute is fired (a claim is needed); each
  is retried at every wake until it is ``catch_up`` seconds old.

Reloaded bindings are picked up at the next wake (at most 30 scheduler seconds later).

For tests, ``[scripts] schedule_tick`` sets how many real seconds one scheduler minute
lasts: below 60 the scheduler runs a virtual clock, ``wall time / tick`` minutes after
2000-01-01 (modulo 400 years, which repeat the calendar exactly), so every process on
the machine agrees on the minute, and ``*/5 * * * *`` fires every five ticks without
waiting for the wall clock.
"""

from __future__ import annotations

import fnmatch
import logging
import threading
import time
from datetime import datetime, timedelta
from typing import Any, Callable, Iterable, Protocol

from cronsim import CronSim

from .schedule_claims import Claim

log = logging.getLogger("scriptsftp.scripting.schedule")

MAX_WAIT_MINUTES = 0.5   # re-read the clock and the bindings at least this often

#: the virtual clock's origin and period (400 Gregorian years: weekdays and leap days repeat)
VIRTUAL_EPOCH = datetime(2000, 1, 1)
VIRTUAL_PERIOD_MINUTES = 146097 * 1440

#: real seconds a claim's lease lasts without renewal (the takeover delay after a node dies),
#: and how often the leases are renewed and expired claims looked for
LEASE_SECONDS = 30.0
#: with a virtual clock (tests): shorter, so a takeover is seen within a test
TEST_LEASE_SECONDS = 10.0
#: how many real seconds late a minute may still be fired, or taken over from a dead node
CATCH_UP_SECONDS = 600.0
#: prune claims older than a day this often (real seconds)
PRUNE_EVERY = 3600.0

MINUTE_FORMAT = "%Y-%m-%dT%H:%M"


def next_fire(cron: str, after: datetime) -> datetime:
    return next(CronSim(cron, after))


def lease_seconds(tick: float) -> float:
    return LEASE_SECONDS if tick >= 60 else TEST_LEASE_SECONDS


def virtual_now(tick: float, wall: float | None = None) -> datetime:
    """The virtual clock's time at ``wall`` (epoch seconds, default now): the same on every node."""
    minutes = ((time.time() if wall is None else wall) / tick) % VIRTUAL_PERIOD_MINUTES
    return VIRTUAL_EPOCH + timedelta(minutes=minutes)


def schedule_users(users: list[str], configured: Iterable[str]) -> list[str]:
    """Whom one firing runs for: ``[""]`` (no user) for the default ``["*"]``;
    otherwise each listed name, globs expanded over the configured users."""
    if not users or users == ["*"]:
        return [""]
    names = list(configured)
    out: list[str] = []
    for u in users:
        matched = [n for n in names if fnmatch.fnmatchcase(n, u)] if any(c in u for c in "*?[") else [u]
        out.extend(m for m in matched if m not in out)
    return out


def binding_key(spec: Any) -> str:
    """A schedule binding's name on every node: script, function, cron and users. Nodes
    whose configs list the binding identically agree on it whatever else they bind."""
    return f"{spec.script}:{spec.handler} [{spec.cron}] users={','.join(spec.users)}"


def binding_keys(bindings: list[Any]) -> dict[str, Any]:
    """Each binding by its key; a second identical binding gets ``#2`` (and so on), so it
    still fires once per minute of its own, as on one node."""
    out: dict[str, Any] = {}
    for b in bindings:
        key = base = binding_key(b.spec)
        n = 1
        while key in out:
            n += 1
            key = f"{base}#{n}"
        out[key] = b
    return out


class Claims(Protocol):
    """What the scheduler needs of :class:`~.schedule_claims.ScheduleClaims`."""

    errors: tuple[type[BaseException], ...]
    lease: float

    def claim(self, binding: str, minute: str) -> bool: ...

    def take_over(self, bindings: Iterable[str]) -> list[Claim]: ...

    def renew(self, claims: Iterable[Claim]) -> None: ...

    def done(self, claim: Claim) -> None: ...

    def release(self, claim: Claim) -> None: ...

    def prune(self) -> int: ...


#: ``fire(binding, when, finished)``: queue the binding's runs for minute ``when``; calls
#: ``finished()`` once they all ended; False if nothing could be queued
Fire = Callable[[Any, datetime, Callable[[], None]], bool]


class Scheduler:
    """Calls ``fire(binding, when, finished)`` for each schedule binding whose cron matches
    and whose minute this node claimed.

    ``bindings()`` returns the current schedule bindings (objects with ``.spec``: script,
    handler, cron, users); ``tick()`` the real seconds per scheduler minute; ``claims`` the
    claim store."""

    def __init__(self, bindings: Callable[[], list[Any]], fire: Fire, tick: Callable[[], float],
                 claims: Claims) -> None:
        self.bindings = bindings
        self.fire = fire
        self.tick = tick
        self.claims = claims
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._running: set[Claim] = set()     # claimed by this node, runs not ended yet
        self._lock = threading.Lock()
        self._last_upkeep = 0.0
        self._last_prune = 0.0
        self._last_error = 0.0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="script-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def now(self) -> datetime:
        tick = self.tick()
        return datetime.now() if tick >= 60 else virtual_now(tick)

    def running(self) -> set[Claim]:
        with self._lock:
            return set(self._running)

    # --- the loop -------------------------------------------------------------------------

    def _loop(self) -> None:
        due: dict[str, datetime] = {}
        while not self._stop.is_set():
            tick = self.tick()
            self.claims.lease = lease_seconds(tick)  # schedule_tick may have been reloaded
            now = self.now()
            try:
                current = binding_keys(self.bindings())
            except Exception:  # noqa: BLE001 - never let the scheduler die
                log.exception("scheduler: cannot read the bindings")
                current = {}
            for key in list(due):
                if key not in current:
                    del due[key]
            earliest = now - timedelta(minutes=CATCH_UP_SECONDS / tick)
            for key, b in current.items():
                if key not in due:
                    due[key] = next_fire(b.spec.cron, now)
                    continue
                if due[key] < earliest:
                    log.warning("scheduler: %s is more than %.0fs late: minutes before %s skipped", b.spec.script,
                                CATCH_UP_SECONDS, earliest.strftime(MINUTE_FORMAT))
                    due[key] = next_fire(b.spec.cron, earliest)
                while due[key] <= now and not self._stop.is_set():
                    when = due[key]
                    if not self._claim_and_fire(key, b, when):
                        break  # the database failed: this minute again at the next wake
                    due[key] = next_fire(b.spec.cron, when)
            self._upkeep(current, tick)
            soonest = min(due.values(), default=now + timedelta(minutes=1))
            minutes = min(MAX_WAIT_MINUTES, max(0.0, (soonest - now).total_seconds() / 60))
            # leases are renewed and expired claims looked for every lease/5 real seconds
            wait = min(minutes * tick, lease_seconds(tick) / 5)
            self._stop.wait(max(0.01, wait))

    def _claim_and_fire(self, key: str, b: Any, when: datetime) -> bool:
        """Claim ``when`` for ``key`` and fire it if this node got it; False if the database failed."""
        claim = Claim(key, when.strftime(MINUTE_FORMAT))
        try:
            if not self.claims.claim(claim.binding, claim.minute):
                log.debug("scheduler: %s %s claimed by another node", key, claim.minute)
                return True
        except self.claims.errors as exc:
            self._db_failed(f"cannot claim {claim.minute} of {b.spec.script}", exc)
            return False
        self._fire(b, when, claim)
        return True

    def _fire(self, b: Any, when: datetime, claim: Claim) -> None:
        with self._lock:
            self._running.add(claim)
        try:
            queued = self.fire(b, when, lambda: self._finished(claim))
        except Exception:  # noqa: BLE001
            log.exception("scheduler: firing %s failed", b.spec.script)
            queued = False
        if not queued:
            with self._lock:
                self._running.discard(claim)
            try:
                self.claims.release(claim)
            except self.claims.errors as exc:
                self._db_failed(f"cannot release {claim.minute} of {b.spec.script}", exc)

    def _finished(self, claim: Claim) -> None:
        """Every run of a firing ended (called from a worker thread): the minute is done."""
        try:
            self.claims.done(claim)
        except self.claims.errors as exc:
            # the lease runs out and another node runs it again: say so
            self._db_failed(f"cannot mark {claim.minute} of {claim.binding} done (it may run again)", exc)
        finally:
            with self._lock:
                self._running.discard(claim)

    def _upkeep(self, current: dict[str, Any], tick: float) -> None:
        """Every lease/5 real seconds: renew this node's running claims, take over expired ones."""
        mono = time.monotonic()
        if mono - self._last_upkeep < lease_seconds(tick) / 5:
            return
        self._last_upkeep = mono
        try:
            self.claims.renew(self.running())
            for claim in self.claims.take_over(current):
                b = current.get(claim.binding)
                if b is None:
                    continue
                when = datetime.strptime(claim.minute, MINUTE_FORMAT)
                log.warning("scheduler: %s %s was claimed by a node that did not finish it: running it here",
                            b.spec.script, claim.minute)
                self._fire(b, when, claim)
            if mono - self._last_prune >= PRUNE_EVERY:
                self._last_prune = mono
                self.claims.prune()
        except self.claims.errors as exc:
            self._db_failed("cannot renew or take over claims", exc)
        except Exception:  # noqa: BLE001 - never let the scheduler die
            log.exception("scheduler: renewing or taking over claims failed")

    def _db_failed(self, what: str, exc: BaseException) -> None:
        """Log a database failure, at most once every 10 s."""
        mono = time.monotonic()
        if mono - self._last_error >= 10:
            self._last_error = mono
            log.error("scheduler: %s: the schedule database failed: %s", what, exc)

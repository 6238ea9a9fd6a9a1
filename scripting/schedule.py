"""The ``schedule`` event: bindings with ``cron = "..."`` fire on the minute.

One thread. For each schedule binding it keeps the next time its cron
expression matches (cronsim, 5 fields, the server's local time, minute
granularity) and sleeps until the soonest one; a binding fires at most once
per matching minute, and a minute missed while the daemon was down is not
replayed. Reloaded bindings are picked up at the next wake (at most 30
scheduler seconds later).

For tests, ``[scripts] schedule_tick`` sets how many real seconds one
scheduler minute lasts: below 60 the scheduler runs a virtual clock that
starts at the current minute and advances one minute per tick, so
``*/5 * * * *`` fires every five ticks without waiting for the wall clock.
"""

from __future__ import annotations

import fnmatch
import logging
import threading
import time
from datetime import datetime, timedelta
from typing import Any, Callable, Iterable

from cronsim import CronSim

log = logging.getLogger("scriptsftp.scripting.schedule")

MAX_WAIT_MINUTES = 0.5   # re-read the clock and the bindings at least this often


def next_fire(cron: str, after: datetime) -> datetime:
    return next(CronSim(cron, after))


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


class Scheduler:
    """Calls ``fire(binding, when)`` for each schedule binding whose cron matches.

    ``bindings()`` returns the current schedule bindings (objects with ``.index``
    and ``.spec.cron``); ``tick()`` the real seconds per scheduler minute."""

    def __init__(self, bindings: Callable[[], list[Any]], fire: Callable[[Any, datetime], None],
                 tick: Callable[[], float]) -> None:
        self.bindings = bindings
        self.fire = fire
        self.tick = tick
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._virtual: tuple[float, datetime, float] | None = None  # (monotonic start, start time, tick)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="script-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def now(self) -> datetime:
        tick = self.tick()
        if tick >= 60:
            self._virtual = None
            return datetime.now()
        if self._virtual is None or self._virtual[2] != tick:
            start = datetime.now().replace(second=0, microsecond=0)
            self._virtual = (time.monotonic(), start, tick)
        t0, start, tick = self._virtual
        return start + timedelta(minutes=(time.monotonic() - t0) / tick)

    def _loop(self) -> None:
        due: dict[tuple[Any, ...], datetime] = {}
        while not self._stop.is_set():
            now = self.now()
            try:
                current = {(b.index, b.spec.cron, b.spec.script, b.spec.handler): b for b in self.bindings()}
            except Exception:  # noqa: BLE001 - never let the scheduler die
                log.exception("scheduler: cannot read the bindings")
                current = {}
            for key in list(due):
                if key not in current:
                    del due[key]
            for key, b in current.items():
                if key not in due:
                    due[key] = next_fire(b.spec.cron, now)
                elif due[key] <= now:
                    when = due[key]
                    due[key] = next_fire(b.spec.cron, now)
                    try:
                        self.fire(b, when)
                    except Exception:  # noqa: BLE001
                        log.exception("scheduler: firing %s failed", b.spec.script)
            soonest = min(due.values(), default=now + timedelta(minutes=1))
            minutes = min(MAX_WAIT_MINUTES, max(0.0, (soonest - now).total_seconds() / 60))
            self._stop.wait(max(0.01, minutes * self.tick()))

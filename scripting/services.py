"""The engine's capability services: ``api.fs``, ``api.notify``, ``api.run``
and the ``schedule`` event, wired in one place so engine.py stays small.

``EngineServices`` registers the parent-side handlers with the worker pool's
:class:`~.capabilities.CapabilityRegistry` when the engine is built, opens the
notification outbox and starts its delivery thread and the scheduler when the
engine starts, and stops them when it closes. Every handler reads the
engine's *current* config on each call, so a reload (SIGHUP) applies to the
next call.

It gets what it needs from the engine as arguments (the current config, the
current registry, the async queue as one ``enqueue`` call), never the engine
itself: the engine builds the services, the services know nothing of it.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Protocol

from scriptsftp.server.contract import events as ev
from scriptsftp.server.contract.script_settings import ScriptConfig
from scriptsftp.server.contract.scripting import ScriptFiles
from scriptsftp.server.contract.state import StateStoreFactory

from .capabilities import CapabilityRegistry
from .commands import CallInfo, RunCapability
from .fs_cap import FsCapability
from .outbox import NotifyCapability, Notifier, Outbox
from .registry import ActiveBinding, LoadedScript, Registry
from .schedule import CATCH_UP_SECONDS, Scheduler, lease_seconds, schedule_users
from .schedule_claims import ScheduleClaims


class Enqueue(Protocol):
    """Queues one async handler call (binding, script, event data, pinned fd); False when the
    queue is full (the call is dropped and counted by the engine). ``done`` is called once
    the call ended, whatever its result (the scheduler marks its minute done)."""

    def __call__(self, binding: ActiveBinding, script: LoadedScript, data: dict[str, Any], fd: int | None,
                 done: Callable[[], None] | None = None) -> bool: ...


log = logging.getLogger("scriptsftp.scripting")


class _LazyNotify:
    """The notify handler exists from the start; the outbox opens with the engine."""

    def __init__(self) -> None:
        self.handler: NotifyCapability | None = None

    def __call__(self, call: Any, op: str, args: list) -> Any:
        if self.handler is None:
            from .capabilities import CapabilityError

            raise CapabilityError("api.notify is not available here (no outbox: the engine is not running)",
                                  "NotImplementedError")
        return self.handler(call, op, args)


class EngineServices:
    def __init__(self, capabilities: CapabilityRegistry, state_dir: Path, *, config: Callable[[], ScriptConfig],
                 registry: Callable[[], Registry], enqueue: Enqueue, files: ScriptFiles | None = None,
                 stores: StateStoreFactory | None = None) -> None:
        self.state_dir = state_dir
        self.stores = stores        # the outbox's database (None: no outbox, the engine cannot start)
        self.config = config        # the engine's current config
        self.registry = registry    # the engine's current registry
        self.enqueue = enqueue
        self.files = files          # api.fs: sessions on users' files (None: no server here)
        self.outbox: Outbox | None = None
        self.notifier: Notifier | None = None
        self.scheduler: Scheduler | None = None
        self.claims: ScheduleClaims | None = None
        self._notify = _LazyNotify()
        for name, handler in (
            ("fs", FsCapability(lambda: self.files, self._admin_root)),
            ("notify", self._notify),
            ("run", RunCapability(lambda: self.config().model.commands,
                                  lambda: self.config().model.scripts.nice)),
        ):
            if capabilities.handler(name) is None:
                capabilities.register(name, handler)

    # --- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        if self.stores is None:
            raise RuntimeError("the engine was built without state stores: it cannot start")
        self.outbox = Outbox(self.stores)
        self.notifier = Notifier(self.outbox, lambda: self.config().model.notify,
                                 lambda p: self.config().resolve(p))
        self._notify.handler = NotifyCapability(self.outbox, self.notifier, lambda: self.config().model.notify)
        self.notifier.start()
        tick = lambda: self.config().model.scripts.schedule_tick  # noqa: E731
        self.claims = ScheduleClaims(self.stores, lease=lease_seconds(tick()), catch_up=CATCH_UP_SECONDS)
        self.scheduler = Scheduler(self._schedule_bindings, self._fire, tick, self.claims)
        self.scheduler.start()

    def close(self) -> None:
        if self.scheduler is not None:
            self.scheduler.stop()
        if self.notifier is not None:
            self.notifier.stop()
        self._notify.handler = None
        if self.outbox is not None:
            self.outbox.close()

    def close_claims(self) -> None:
        """After the async calls ended: their firings are marked done before the store closes
        (an unmarked one would run again on another node once its lease expired)."""
        if self.claims is not None:
            self.claims.close()
            self.claims = None

    # --- per call ---------------------------------------------------------------------

    def context(self, data: dict[str, Any], file: Callable[[], int] | None, timeout: float) -> CallInfo:
        """``CallRequest.context``: the deadline and the event's file, for api.run's {path}."""
        return CallInfo(deadline=time.monotonic() + timeout, file=file, event=data)

    def _admin_root(self) -> Path | None:
        cfg = self.config()
        root = cfg.model.scripts.fs_admin_root
        return cfg.resolve(root) if root else None

    # --- schedule -------------------------------------------------------------------------

    def _schedule_bindings(self) -> list[ActiveBinding]:
        return list(self.registry().by_event.get("schedule", ()))

    def _fire(self, binding: ActiveBinding, when: datetime, finished: Callable[[], None]) -> bool:
        """Queue one run per user of ``binding`` for minute ``when``; ``finished()`` once every
        queued run ended. False when none could be queued (the scheduler gives the minute back)."""
        script = self.registry().scripts.get(binding.script)
        if script is None:
            return False
        users = schedule_users(list(binding.spec.users), (u.name for u in self.config().model.users))
        queued = 0
        # when every run ended; not when none could be queued (the minute is given back)
        left = _Countdown(len(users), lambda: finished() if queued else None)
        for user in users:
            event = ev.Schedule(user=user, cron=binding.spec.cron, scheduled=when.timestamp())
            data = event.to_dict()
            log.info("schedule: %s fires (%s)%s", binding.script, binding.spec.cron,
                     f" for {user}" if user else "", extra={"user": user})
            if self.enqueue(binding, script, data, None, left.one_done):
                queued += 1
            else:
                log.error("async queue full: schedule %s not run", binding.script)
                left.one_done()
        return queued > 0


class _Countdown:
    """Calls ``then()`` once ``n`` runs have each called :meth:`one_done` (from any thread)."""

    def __init__(self, n: int, then: Callable[[], None]) -> None:
        self._left = n
        self._then = then
        self._lock = threading.Lock()

    def one_done(self) -> None:
        with self._lock:
            self._left -= 1
            last = self._left == 0
        if last:
            self._then()

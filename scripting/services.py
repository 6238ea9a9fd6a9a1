"""The engine's capability services: ``api.fs``, ``api.notify``, ``api.run``
and the ``schedule`` event, wired in one place so engine.py stays small.

``EngineServices`` registers the parent-side handlers with the worker pool's
:class:`~.capabilities.CapabilityRegistry` when the engine is built, opens the
notification outbox and starts its delivery thread and the scheduler when the
engine starts, and stops them when it closes. Every handler reads the
engine's *current* config on each call, so a reload (SIGHUP) applies to the
next call.
"""

from __future__ import annotations

import logging
import queue
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from scriptsftp.server.contract import events as ev

from .commands import CallInfo, RunCapability
from .fs_cap import FsCapability, ServerLink
from .outbox import NotifyCapability, Notifier, Outbox
from .schedule import Scheduler, schedule_users

if TYPE_CHECKING:
    from .engine import ScriptEngine

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
    def __init__(self, engine: "ScriptEngine", state_dir: Path) -> None:
        self.engine = engine
        self.state_dir = state_dir
        self.link: ServerLink | None = None
        self.outbox: Outbox | None = None
        self.notifier: Notifier | None = None
        self.scheduler: Scheduler | None = None
        self._notify = _LazyNotify()
        caps = engine.pool.capabilities
        for name, handler in (
            ("fs", FsCapability(lambda: self.link, self._admin_root)),
            ("notify", self._notify),
            ("run", RunCapability(lambda: self.engine.cfg.model.commands)),
        ):
            if caps.handler(name) is None:
                caps.register(name, handler)

    # --- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        self.outbox = Outbox(self.state_dir / "outbox.sqlite3")
        self.notifier = Notifier(self.outbox, lambda: self.engine.cfg.model.notify,
                                 lambda p: self.engine.cfg.resolve(p))
        self._notify.handler = NotifyCapability(self.outbox, self.notifier, lambda: self.engine.cfg.model.notify)
        self.notifier.start()
        self.scheduler = Scheduler(self._schedule_bindings, self._fire,
                                   lambda: self.engine.cfg.model.scripts.schedule_tick)
        self.scheduler.start()

    def close(self) -> None:
        if self.scheduler is not None:
            self.scheduler.stop()
        if self.notifier is not None:
            self.notifier.stop()
        self._notify.handler = None
        if self.outbox is not None:
            self.outbox.close()

    def attach_server(self, core: Any) -> None:
        """Called by the daemon with its LoginCore: users (current after a reload),
        staging records and upload policy for the Sessions ``api.fs`` opens."""

        def account(name: str) -> Any:
            rec = core.users.get(name)
            return None if rec is None or rec.disabled else rec.account

        publisher = getattr(core, "publisher", None)
        self.link = ServerLink(account, staging=core.staging, uploads=core.uploads,
                               pending=publisher.pending if publisher is not None else None)

    # --- per call ---------------------------------------------------------------------

    def context(self, data: dict[str, Any], file: Callable[[], int] | None, timeout: float) -> CallInfo:
        """``CallRequest.context``: the deadline and the event's file, for api.run's {path}."""
        return CallInfo(deadline=time.monotonic() + timeout, file=file, event=data)

    def _admin_root(self) -> Path | None:
        root = self.engine.cfg.model.scripts.fs_admin_root
        return self.engine.cfg.resolve(root) if root else None

    # --- schedule -------------------------------------------------------------------------

    def _schedule_bindings(self) -> list[Any]:
        return list(self.engine._registry.by_event.get("schedule", ()))

    def _fire(self, binding: Any, when: datetime) -> None:
        reg = self.engine._registry
        script = reg.scripts.get(binding.script)
        if script is None:
            return
        users = schedule_users(list(binding.spec.users), (u.name for u in self.engine.cfg.model.users))
        for user in users:
            event = ev.Schedule(user=user, cron=binding.spec.cron, scheduled=when.timestamp())
            data = event.to_dict()
            log.info("schedule: %s fires (%s)%s", binding.script, binding.spec.cron,
                     f" for {user}" if user else "", extra={"user": user})
            try:
                self.engine._queue.put_nowait((binding, script, data, None))
            except queue.Full:
                self.engine.dropped += 1
                log.error("async queue full: schedule %s not run", binding.script)

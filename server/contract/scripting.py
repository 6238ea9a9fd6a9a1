"""What the daemon and the script engine hand each other, besides the :class:`Dispatcher`.

``scriptsftp.scripting`` imports nothing from ``server/`` but the contract; everything it
needs from the running server comes in through the types declared here, built by the
composition root (``server/daemon.py``, ``server/cli.py``):

* :class:`ScriptEngineLifecycle`: how the daemon drives an engine (start, prepare a
  reload, close); :class:`NullEngine` is the one it runs while nothing is bound.
* :class:`ScriptAudit`: where the engine records each decision and each handler run
  (the audit trail and the metrics, ``server/ops/audit.py`` ``ScriptAuditRecorder``);
  :class:`EventTrace` gives an event its id and records its decision.
* :class:`ScriptFiles`: opens a session (the core's ``SessionPort``, contract/ports.py)
  on a user's files (or on the ``fs_admin`` root) for ``api.fs``, so a script goes
  through the same door as a client (``server/core/script_files.py`` builds Sessions).
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

from scriptsftp.server.contract.dispatch import Decision, Dispatcher, NullDispatcher
from scriptsftp.server.contract.ports import CopyingWriteHandle, SessionPort
from scriptsftp.server.contract.script_settings import ScriptConfig

# --- audit -------------------------------------------------------------------------------------


def new_event_id() -> str:
    """Sortable enough to read (time first), unique enough to key on."""
    return f"{int(time.time() * 1000):x}-{secrets.token_hex(4)}"


class ScriptLogLine(Protocol):
    @property
    def message(self) -> str: ...

    @property
    def fields(self) -> Mapping[str, Any]: ...


class ScriptRunRecord(Protocol):
    """One finished handler call, as the audit trail stores it (the pool's CallResult)."""

    @property
    def verdict(self) -> str: ...

    @property
    def reason(self) -> str: ...

    @property
    def logs(self) -> Sequence[ScriptLogLine]: ...

    @property
    def error_kind(self) -> str | None: ...

    @property
    def error_line(self) -> int | None: ...

    @property
    def duration(self) -> float: ...


class ScriptAudit(Protocol):
    """Where the engine's decisions and handler runs go (audit trail, metrics)."""

    def event_decided(self, event_id: str, data: dict[str, Any], verdict: str, reason: str,
                      decided_by: str) -> None:
        """``verdict``: allow, veto, error (a failing script denied) or done (a post-event)."""
        ...

    def script_ran(self, event_id: str, script: str, function: str, mode: str, result: ScriptRunRecord) -> None:
        ...


class NullScriptAudit:
    """Records nothing: an engine outside a daemon (tests, ``scriptsftp check``)."""

    def event_decided(self, event_id: str, data: dict[str, Any], verdict: str, reason: str,
                      decided_by: str) -> None:
        return None

    def script_ran(self, event_id: str, script: str, function: str, mode: str, result: ScriptRunRecord) -> None:
        return None


class EventTrace:
    """One event being decided by the engine: gives it an id, then records the decision.

    The id is stored in the event dict under ``_event_id``: scripts never see keys that
    start with ``_``, and the engine's log context picks it up from there, also for async
    handlers that run later from a queue."""

    __slots__ = ("audit", "data", "id")

    def __init__(self, audit: ScriptAudit, data: dict[str, Any]) -> None:
        self.audit = audit
        self.data = data
        self.id = data.get("_event_id") or new_event_id()
        data["_event_id"] = self.id

    def decided(self, decision: Decision | None, decided_by: str = "", *, failed: bool = False) -> Any:
        """Record a pre-event's :class:`Decision` (or None for post-events) and hand it back.

        ``failed``: the denial comes from a script that failed (``on_error = "deny"``), not a veto."""
        if decision is None:
            verdict, reason = "done", ""
        elif decision.allowed:
            verdict, reason = "allow", ""
        else:
            verdict, reason = ("error" if failed else "veto"), decision.reason
        self.audit.event_decided(self.id, self.data, verdict, reason, decided_by)
        return decision


# --- files (api.fs) ----------------------------------------------------------------------------


#: The session ``api.fs`` works through: the core's :class:`SessionPort`, whose uploads are
#: :class:`CopyingWriteHandle` (``Any`` here: the port is invariant in its handle type, and
#: the core's Session is a ``SessionPort[WriteHandle]``).
ScriptFileSession = SessionPort[Any]


class ScriptFiles(Protocol):
    """Opens file sessions for ``api.fs`` (the daemon builds it on its login core).

    Every session is tagged with the script's name in its log lines and raises no events:
    what a script does never triggers scripts."""

    def normalize(self, vpath: str) -> str:
        """The canonical virtual path (``..`` stops at ``/``); InvalidPath if it cannot be one."""
        ...

    def user_session(self, user: str, *, every_permission: bool, session_id: str, protocol: str,
                     remote_ip: str, script: str) -> ScriptFileSession | None:
        """A session on ``user``'s home with the user's rights (``every_permission``: all of
        them, the filters kept); None when the user does not exist or is disabled."""
        ...

    def root_session(self, root: Path, *, session_id: str, protocol: str, remote_ip: str,
                     script: str) -> ScriptFileSession:
        """A session with every permission on ``root`` (``[scripts] fs_admin_root``)."""
        ...


# --- the engine's lifecycle ------------------------------------------------------------------


class PreparedReload(Protocol):
    """A reload the engine has checked; exactly one of these is called, once."""

    def commit(self) -> None: ...

    def abandon(self) -> None: ...


class ScriptEngineLifecycle(Dispatcher, Protocol):
    """How the daemon drives the dispatcher behind its seam, whatever it is."""

    def start(self) -> None:
        """Start workers and load every bound script; ConfigError listing every problem."""
        ...

    def prepare(self, cfg: ScriptConfig) -> PreparedReload:
        """Load what ``cfg`` binds without swapping it in; ConfigError if it cannot run."""
        ...

    def close(self) -> None: ...

    # --- what the admin API and /metrics read (docs/architecture.md, "The ports") ---

    def scripts_info(self) -> list[dict[str, Any]]:
        """Each bound script: sha256 of the running version, when it was loaded, its
        bindings, its status (ok / error / missing) and its last error."""
        ...

    def worker_health(self) -> dict[str, Any] | None:
        """The script pool's counts (alive, idle, busy, starting, restarts, closed), or None."""
        ...

    def outbox_stats(self) -> dict[str, int] | None:
        """The notification outbox's pending / failed / delivered counts, or None."""
        ...

    def dropped_calls(self) -> int:
        """Async calls refused because the queue was full, since start."""
        ...


class _NothingToReload:
    def commit(self) -> None:
        return None

    def abandon(self) -> None:
        return None


class NullEngine(NullDispatcher):
    """The engine of a config with no bindings: nothing to start, reload or close. A reload
    that adds the first binding replaces it by a real engine (the daemon builds it)."""

    def start(self) -> None:
        return None

    def prepare(self, cfg: ScriptConfig) -> PreparedReload:
        return _NothingToReload()

    def close(self) -> None:
        return None

    def scripts_info(self) -> list[dict[str, Any]]:
        return []

    def worker_health(self) -> dict[str, Any] | None:
        return None

    def outbox_stats(self) -> dict[str, int] | None:
        return None

    def dropped_calls(self) -> int:
        return 0


__all__ = [
    "CopyingWriteHandle", "EventTrace", "NullEngine", "NullScriptAudit", "PreparedReload", "ScriptAudit",
    "ScriptEngineLifecycle", "ScriptFileSession", "ScriptFiles", "ScriptRunRecord", "new_event_id",
]

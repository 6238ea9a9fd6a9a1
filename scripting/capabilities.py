"""Parent-side capability handlers: how ``api.store`` (and later ``api.fs``,
``api.notify``, ``api.run``) are served.

While a handler runs, its worker may send ``{"t": "rpc", "cap": "store",
"op": "get", "args": [...]}``. The pool passes each such request to
:meth:`CapabilityRegistry.serve` together with a :class:`CapabilityCall`
describing the call (script, function, event, the capabilities the binding
was granted, an opaque context from the engine). ``serve`` first checks that
the capability was granted to this call and only then looks up the handler;
a worker, even a compromised one, gets nothing its binding was not given.

Adding a capability = a handler here (a callable ``handler(call, op, args)``
registered under the capability name) + a stub in scripting/api.py. Handlers
run in the server thread that made the call; they receive JSON data only and
return JSON data. They raise :class:`CapabilityError` for errors meant for the
script; any other exception is logged and reported to the script as an
internal error.

``read`` is served in the worker itself (the parent passes a read-only file
descriptor with the call), so it has no handler here.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from .store import ScriptStore, StoreError, StoreUnavailable

log = logging.getLogger("scriptsftp.scripting.capabilities")

#: Every capability a binding can be granted (``allow = [...]``).
KNOWN_CAPABILITIES: frozenset[str] = frozenset({"read", "fs", "fs_admin", "own_file", "store", "notify", "run"})
#: Capabilities served inside the worker, without RPC.
LOCAL_CAPABILITIES: frozenset[str] = frozenset({"read"})
#: Grants that widen another capability instead of being served themselves
#: (``fs_admin``: ``api.fs`` may also use ``admin:`` paths; ``own_file``: ``api.fs`` may move,
#: copy and remove the event's own file whatever the user's rights; see fs_cap.py).
MODIFIER_CAPABILITIES: frozenset[str] = frozenset({"fs_admin", "own_file"})

_MAX_OP_CHARS = 64
_MAX_ARGS = 16


def not_granted_message(cap: str) -> str:
    return f"capability {cap!r} is not granted to this binding (add it to allow = [...])"


class CapabilityError(Exception):
    """An error reported to the script, raised there as ``etype`` (a builtin
    exception name: PermissionError, ValueError, TypeError, KeyError,
    FileNotFoundError, OSError, RuntimeError, NotImplementedError, ...)."""

    def __init__(self, message: str, etype: str = "RuntimeError") -> None:
        super().__init__(message)
        self.etype = etype


@dataclass(frozen=True)
class CapabilityCall:
    """What a handler knows about the handler call it serves."""

    script: str                      # script name: also the store namespace
    function: str
    event: Mapping[str, Any]
    granted: frozenset[str]
    context: Any = None              # CallRequest.context from the engine (e.g. the user's home)
    extra: dict[str, Any] = field(default_factory=dict)


Handler = Callable[[CapabilityCall, str, list], Any]


def _error(etype: str, message: str) -> dict[str, Any]:
    return {"t": "rpc-reply", "ok": False, "etype": etype, "error": message}


class CapabilityRegistry:
    """Capability name -> parent-side handler."""

    def __init__(self) -> None:
        self._handlers: dict[str, Handler] = {}
        self._lock = threading.Lock()

    def register(self, cap: str, handler: Handler) -> None:
        if cap not in KNOWN_CAPABILITIES or cap in LOCAL_CAPABILITIES or cap in MODIFIER_CAPABILITIES:
            raise ValueError(f"unknown or local capability {cap!r}")
        with self._lock:
            self._handlers[cap] = handler

    def handler(self, cap: str) -> Handler | None:
        return self._handlers.get(cap)

    def serve(self, call: CapabilityCall, msg: Mapping[str, Any]) -> dict[str, Any]:
        """Answer one RPC request from a worker (never raises)."""
        cap, op, args = msg.get("cap"), msg.get("op"), msg.get("args")
        if type(cap) is not str or type(op) is not str or type(args) is not list \
                or len(op) > _MAX_OP_CHARS or len(args) > _MAX_ARGS:
            return _error("TypeError", "malformed capability request")
        if cap not in call.granted:
            return _error("PermissionError", not_granted_message(cap[:40]))
        handler = self._handlers.get(cap)
        if handler is None:
            return _error("NotImplementedError",
                          f"api.{cap} is not available here: `scriptsftp script test` runs the script "
                          "offline, with no home, mail server or command to reach (api.store works, on a "
                          "throwaway store); test it through a running daemon")
        try:
            value = handler(call, op, args)
        except CapabilityError as e:
            return _error(e.etype, str(e))
        except Exception:  # noqa: BLE001 - a bug or an I/O failure in the server
            log.exception("capability %s.%s failed for script %s", cap, op, call.script)
            return _error("RuntimeError", f"internal error while serving api.{cap}.{op}()")
        return {"t": "rpc-reply", "ok": True, "value": value}


class StoreCapability:
    """``api.store``: get / set / incr / delete in the script's own namespace."""

    def __init__(self, store: ScriptStore) -> None:
        self.store = store

    def __call__(self, call: CapabilityCall, op: str, args: list) -> Any:
        ns = call.script
        try:
            if op == "get" and len(args) == 1:
                found, value = self.store.get(ns, args[0])
                return {"found": found, "value": value}
            if op == "set" and len(args) == 2:
                self.store.set(ns, args[0], args[1])
                return None
            if op == "incr" and len(args) == 2:
                return self.store.incr(ns, args[0], args[1])
            if op == "delete" and len(args) == 1:
                return self.store.delete(ns, args[0])
        except StoreUnavailable as e:
            raise CapabilityError(str(e), "RuntimeError") from None
        except StoreError as e:
            raise CapabilityError(str(e), "ValueError") from None
        raise CapabilityError(f"api.store has no operation {op!r} taking {len(args)} argument(s)",
                              "TypeError")

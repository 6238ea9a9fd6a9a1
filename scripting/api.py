"""What a script sees in its worker: the read-only ``event`` and the ``api``.

Imported by the worker process only. The objects here hold no reference to
anything of the server: the event is a frozen copy of ``Event.to_dict()``,
``api.file`` is a read-only file descriptor the parent opened for this call,
and every other capability (``store``, later ``fs``, ``notify``, ``run``) is a
thin RPC stub: the request goes to the parent over the worker's socket as
JSON, and the parent checks that the binding was granted the capability
before serving it (scripting/capabilities.py).

Every attribute scripts can read on these objects is registered with
:func:`sandbox.register_attrs`; the ``_getattr_`` guard refuses the rest.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import math
import os
from types import MappingProxyType
from typing import Any, Callable, Iterator

from . import sandbox

# --- limits ------------------------------------------------------------------

MAX_LOG_LINES = 100            # per handler call
MAX_LOG_BYTES = 64 * 1024      # per handler call (messages + fields, UTF-8)
MAX_LOG_LINE_CHARS = 8 * 1024  # one message
MAX_VETO_REASON = 1000         # characters
MAX_READ_BYTES = 16 * 1024 * 1024   # api.file.read() per call
HASH_CHUNK = 1024 * 1024
MAX_LINES = 1_000_000          # api.file.lines(max_lines) upper bound
MAX_LINE_BYTES = 1024 * 1024   # one line in api.file.lines()
MAX_STORE_KEY_CHARS = 256
MAX_STORE_VALUE_BYTES = 64 * 1024
MAX_ERROR_CHARS = 2000

#: Exception types a capability error may be raised as in the script.
RPC_EXCEPTIONS: dict[str, type[BaseException]] = {
    e.__name__: e for e in (
        PermissionError, ValueError, TypeError, KeyError, LookupError, OSError,
        FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError,
        RuntimeError, NotImplementedError, TimeoutError, OverflowError,
    )
}

_CONTROL = {i: " " for i in list(range(32)) + [127]}


def clean_text(text: str, limit: int) -> str:
    """Control characters to spaces (a reason may end up in an FTP reply line)
    and at most *limit* characters."""
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text.translate(_CONTROL)


def not_granted_message(cap: str) -> str:
    return (f"capability {cap!r} is not granted to this binding "
            f"(add it to allow = [...])")


class CallFinished(RuntimeError):
    pass


class VetoStop(BaseException):
    """Raised by api.veto() to end the handler. Scripts cannot name it; if one
    swallows it (bare ``except:``), the veto recorded before still stands."""


def _safe_str(value: Any, limit: int) -> str:
    try:
        if type(value) is str:
            return value[:limit]
        return str(value)[:limit]
    except BaseException:  # noqa: BLE001 - huge ints, deep recursion...
        return f"<unprintable {type(value).__name__}>"


def to_json_data(value: Any, depth: int = 0) -> Any:
    """A JSON-able copy of *value* for log fields (lossy: repr for the rest)."""
    t = type(value)
    if value is None or t is bool or t is str:
        return value if t is not str else value[:MAX_LOG_LINE_CHARS]
    if t is int:
        return value if -(2**63) <= value < 2**63 else _safe_str(value, 100)
    if t is float:
        return value if math.isfinite(value) else str(value)
    if depth >= 8:
        return "<nested too deep>"
    if t in (list, tuple):
        return [to_json_data(v, depth + 1) for v in value[:200]]
    if t is dict or t is MappingProxyType:
        out = {}
        for i, (k, v) in enumerate(value.items()):
            if i >= 200:
                break
            out[k if type(k) is str else _safe_str(k, 200)] = to_json_data(v, depth + 1)
        return out
    return _safe_str(value, 1000)


# --- per-call context ---------------------------------------------------------


class CallContext:
    """Worker-side state of one handler call (never visible to scripts)."""

    def __init__(self, *, script: str, function: str, granted: frozenset[str],
                 rpc: Callable[[dict], dict], fd: int | None, file_error: str | None) -> None:
        self.script = script
        self.function = function
        self.granted = granted
        self._rpc = rpc
        self.fd = fd
        self.file_error = file_error
        self.closed = False
        self.veto_reason: str | None = None
        self.logs: list[list[Any]] = []
        self.log_bytes = 0
        self.dropped = 0
        self._file: ScriptFile | None = None

    # logs
    def add_log(self, message: Any, fields: dict[str, Any]) -> None:
        if self.dropped or len(self.logs) >= MAX_LOG_LINES:
            self.dropped += 1
            return
        text = _safe_str(message, MAX_LOG_LINE_CHARS + 1)
        if len(text) > MAX_LOG_LINE_CHARS:
            text = text[:MAX_LOG_LINE_CHARS] + "…[truncated]"
        data = {k: to_json_data(v) for k, v in fields.items()} if fields else {}
        try:
            encoded = json.dumps(data, ensure_ascii=False) if data else ""
        except (ValueError, TypeError, RecursionError):
            data, encoded = {"fields": "<unserialisable>"}, ""
        if len(encoded) > MAX_LOG_LINE_CHARS:
            data = {"fields": "<too large, dropped>"}
        size = len(text.encode("utf-8", "replace")) + len(encoded.encode("utf-8", "replace"))
        if self.log_bytes + size > MAX_LOG_BYTES:
            self.dropped += 1
            return
        self.log_bytes += size
        self.logs.append([text, data])

    def finish_logs(self) -> list[list[Any]]:
        if self.dropped:
            self.logs.append([f"log truncated: {self.dropped} more line(s) dropped "
                              f"(limit: {MAX_LOG_LINES} lines, {MAX_LOG_BYTES} bytes per call)",
                              {"truncated": self.dropped}])
            self.dropped = 0
        return self.logs

    def check_open(self) -> None:
        if self.closed:
            raise CallFinished("this handler call has finished")

    def require(self, cap: str) -> None:
        self.check_open()
        if cap not in self.granted:
            raise PermissionError(not_granted_message(cap))

    def rpc(self, cap: str, op: str, args: list[Any]) -> Any:
        self.require(cap)
        reply = self._rpc({"t": "rpc", "cap": cap, "op": op, "args": args})
        if reply.get("ok") is True:
            return reply.get("value")
        exc = RPC_EXCEPTIONS.get(str(reply.get("etype")), RuntimeError)
        raise exc(_safe_str(reply.get("error", "capability call failed"), MAX_ERROR_CHARS))

    def file(self) -> "ScriptFile":
        self.require("read")
        if self._file is None:
            if self.fd is None:
                if self.file_error:
                    raise OSError(f"the event's file could not be opened: {self.file_error}")
                raise ValueError("this event has no file (api.file is available for "
                                 "events about a file, e.g. pre-publish, post-upload, "
                                 "pre-download)")
            self._file = ScriptFile(self, self.fd)
        return self._file


# --- the event -----------------------------------------------------------------


def _freeze(value: Any) -> Any:
    if type(value) is list:
        return tuple(_freeze(v) for v in value)
    if type(value) is dict:
        return MappingProxyType({k: _freeze(v) for k, v in value.items()})
    return value


class ScriptEvent:
    """The read-only ``event``: its fields as attributes, nothing else."""

    __slots__ = ("_fields",)
    _script_label = "event"

    def __init__(self, data: dict[str, Any]) -> None:
        fields = {k: _freeze(v) for k, v in data.items()
                  if type(k) is str and k.isidentifier() and not k.startswith("_")}
        object.__setattr__(self, "_fields", fields)

    def __getattr__(self, name: str) -> Any:
        fields = self._fields
        try:
            return fields[name]
        except KeyError:
            raise AttributeError(
                f"event {fields.get('name', '?')!r} has no field {name!r} "
                f"(fields: {', '.join(sorted(fields))})") from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise TypeError("event is read-only")

    def __delattr__(self, name: str) -> None:
        raise TypeError("event is read-only")

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self._fields.items())
        return f"event({inner})"


# --- the api ------------------------------------------------------------------


class ScriptApi:
    """The ``api`` argument of every handler."""

    __slots__ = ("_ctx",)
    _ctx: CallContext  # set once in __init__ (object.__setattr__: the façade refuses assignment)
    _script_label = "api"

    def __init__(self, ctx: CallContext) -> None:
        object.__setattr__(self, "_ctx", ctx)

    def __setattr__(self, name: str, value: Any) -> None:
        raise TypeError("api is read-only")

    def __delattr__(self, name: str) -> None:
        raise TypeError("api is read-only")

    def __repr__(self) -> str:
        return "<scriptsftp api>"

    def veto(self, reason: Any) -> None:
        """Deny the operation; the client sees *reason*. The handler stops
        here; the first veto of a call wins."""
        ctx = self._ctx
        ctx.check_open()
        if type(reason) is not str:
            raise TypeError("api.veto(reason): reason must be a str")
        reason = clean_text(reason.strip(), MAX_VETO_REASON)
        if not reason.strip():
            raise ValueError("api.veto(reason): the reason must not be empty")
        if ctx.veto_reason is None:
            ctx.veto_reason = reason
        raise VetoStop()

    def log(self, message: Any, **fields: Any) -> None:
        """One line for the server log, with the event's context."""
        self._ctx.check_open()
        self._ctx.add_log(message, fields)

    @property
    def file(self) -> "ScriptFile":
        return self._ctx.file()

    @property
    def store(self) -> "StoreStub":
        self._ctx.require("store")
        return StoreStub(self._ctx)

    @property
    def fs(self) -> "FsStub":
        self._ctx.require("fs")
        return FsStub(self._ctx)

    @property
    def notify(self) -> "NotifyStub":
        self._ctx.require("notify")
        return NotifyStub(self._ctx)

    def run(self, name: Any, *args: Any) -> Any:
        """Run a command named in [commands] (capability ``run``)."""
        self._ctx.require("run")
        if type(name) is not str:
            raise TypeError("api.run(name, *args): name must be a str")
        for i, a in enumerate(args):
            if type(a) is not str:
                raise TypeError(f"api.run({name!r}, ...): argument {i} must be a str, "
                                f"not {type(a).__name__} (convert it with str())")
        reply = self._ctx.rpc("run", "run", [name, *args])
        if type(reply) is not dict:
            raise RuntimeError("api.run(): unexpected reply")
        return _make_record(RunResult, reply)


def _json_arg(value: Any) -> Any:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        raise TypeError("capability arguments must be JSON data (str, int, float, bool, "
                        "None, lists and dicts of them)") from None
    return value


# --- capability "read" (local: the fd the parent passed) -------------------------


class ScriptFile:
    """``api.file``: the event's file, read-only, streamed."""

    __slots__ = ("_ctx", "_fd")
    _ctx: CallContext
    _fd: int
    _script_label = "api.file"

    def __init__(self, ctx: CallContext, fd: int) -> None:
        object.__setattr__(self, "_ctx", ctx)
        object.__setattr__(self, "_fd", fd)

    def __setattr__(self, name: str, value: Any) -> None:
        raise TypeError("api.file is read-only")

    def __repr__(self) -> str:
        return "<api.file>"

    def _check(self) -> int:
        self._ctx.check_open()
        return self._fd

    @property
    def size(self) -> int:
        """Size of the file in bytes."""
        return os.fstat(self._check()).st_size

    def read(self, n: int = -1, offset: int = 0) -> bytes:
        """Up to *n* bytes from *offset* (n=-1: to the end). At most 16 MiB per call."""
        fd = self._check()
        if type(n) is not int or type(offset) is not int:
            raise TypeError("api.file.read(n=-1, offset=0): n and offset must be ints")
        if offset < 0:
            raise ValueError("api.file.read(): offset must be >= 0")
        if n < 0:
            n = max(0, os.fstat(fd).st_size - offset)
            if n > MAX_READ_BYTES:
                raise ValueError(
                    f"api.file.read() reads at most {MAX_READ_BYTES} bytes per call and "
                    f"{n} remain: pass n and offset to read in pieces, or use "
                    f"api.file.hash() / api.file.lines()")
        elif n > MAX_READ_BYTES:
            raise ValueError(f"api.file.read(n): n is limited to {MAX_READ_BYTES} bytes")
        parts = []
        while n > 0:
            chunk = os.pread(fd, min(n, HASH_CHUNK * 4), offset)
            if not chunk:
                break
            parts.append(chunk)
            n -= len(chunk)
            offset += len(chunk)
        return b"".join(parts)

    def hash(self, algo: str = "sha256") -> str:
        """Hex digest of the whole file, streamed in 1 MiB chunks (memory stays
        flat; CPU time counts against the handler's cpu_time)."""
        fd = self._check()
        if type(algo) is not str or algo.lower() not in sandbox.HASH_ALGORITHMS \
                or algo.lower().startswith("shake"):
            raise ValueError(f"unsupported hash algorithm {algo!r} (available: "
                             f"{', '.join(sorted(a for a in sandbox.HASH_ALGORITHMS if not a.startswith('shake')))})")
        h = hashlib.new(algo.lower())
        buf = bytearray(HASH_CHUNK)
        view = memoryview(buf)
        offset = 0
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        except (AttributeError, OSError):
            pass
        while True:
            got = os.preadv(fd, [buf], offset)
            if got <= 0:
                break
            h.update(view[:got])
            offset += got
        view.release()
        return h.hexdigest()

    def lines(self, max_lines: int = 10_000, encoding: str = "utf-8",
              errors: str = "replace") -> Iterator[str]:
        """Yield up to *max_lines* decoded lines (without their line ending).

        The encoding must be ASCII-compatible (utf-8, latin-1, cp1252...). A
        line longer than 1 MiB raises ValueError."""
        fd = self._check()
        if type(max_lines) is not int or not 0 <= max_lines <= MAX_LINES:
            raise ValueError(f"api.file.lines(max_lines): max_lines must be an int "
                             f"between 0 and {MAX_LINES}")
        if type(encoding) is not str or type(errors) is not str:
            raise TypeError("api.file.lines(): encoding and errors must be str")
        try:
            codecs.lookup(encoding)
            ok = "\n".encode(encoding) == b"\n" and b"a\n".decode(encoding) == "a\n"
        except (LookupError, ValueError, UnicodeError):
            ok = False
        if not ok:
            raise ValueError(f"api.file.lines(): encoding {encoding!r} is unknown or not "
                             "ASCII-compatible")
        codecs.lookup_error(errors)
        return self._lines(fd, max_lines, encoding, errors)

    def _lines(self, fd: int, max_lines: int, encoding: str, errors: str) -> Iterator[str]:
        ctx = self._ctx
        offset = 0
        pending = b""
        count = 0
        while count < max_lines:
            ctx.check_open()
            chunk = os.pread(fd, 64 * 1024, offset)
            if not chunk:
                if pending:
                    yield pending.rstrip(b"\r").decode(encoding, errors)
                return
            offset += len(chunk)
            data = pending + chunk if pending else chunk
            start = 0
            while count < max_lines:
                nl = data.find(b"\n", start)
                if nl < 0:
                    break
                end = nl - 1 if nl > start and data[nl - 1] == 13 else nl
                yield data[start:end].decode(encoding, errors)
                count += 1
                start = nl + 1
            pending = data[start:]
            if len(pending) > MAX_LINE_BYTES:
                raise ValueError(f"api.file.lines(): line {count + 1} is longer than "
                                 f"{MAX_LINE_BYTES} bytes")


# --- RPC capabilities --------------------------------------------------------------


def _store_key(key: Any) -> str:
    if type(key) is not str:
        raise TypeError("store keys must be str")
    if not 0 < len(key) <= MAX_STORE_KEY_CHARS:
        raise ValueError(f"store keys must be 1 to {MAX_STORE_KEY_CHARS} characters")
    return key


class StoreStub:
    """``api.store``: persistent per-script key/value (capability ``store``)."""

    __slots__ = ("_ctx",)
    _ctx: CallContext
    _script_label = "api.store"

    def __init__(self, ctx: CallContext) -> None:
        object.__setattr__(self, "_ctx", ctx)

    def __setattr__(self, name: str, value: Any) -> None:
        raise TypeError("api.store is read-only (use api.store.set(key, value))")

    def __repr__(self) -> str:
        return "<api.store>"

    def get(self, key: Any, default: Any = None) -> Any:
        reply = self._ctx.rpc("store", "get", [_store_key(key)])
        if type(reply) is dict and reply.get("found"):
            return reply.get("value")
        return default

    def set(self, key: Any, value: Any) -> None:
        key = _store_key(key)
        try:
            encoded = json.dumps(value, allow_nan=False)
        except (TypeError, ValueError, RecursionError):
            raise TypeError("store values must be JSON data (str, int, float, bool, None, "
                            "lists and dicts of them)") from None
        if len(encoded.encode("utf-8", "surrogatepass")) > MAX_STORE_VALUE_BYTES:
            raise ValueError(f"store values are limited to {MAX_STORE_VALUE_BYTES} bytes of JSON")
        self._ctx.rpc("store", "set", [key, value])

    def incr(self, key: Any, n: Any = 1) -> int:
        key = _store_key(key)
        if type(n) is not int:
            raise TypeError("api.store.incr(key, n=1): n must be an int")
        value = self._ctx.rpc("store", "incr", [key, n])
        if type(value) is not int:
            raise RuntimeError("api.store.incr(): unexpected reply")
        return value

    def delete(self, key: Any) -> bool:
        return bool(self._ctx.rpc("store", "delete", [_store_key(key)]))


class _RemoteStub:
    __slots__ = ("_ctx",)
    _ctx: CallContext
    _cap = ""

    def __init__(self, ctx: CallContext) -> None:
        object.__setattr__(self, "_ctx", ctx)

    def __setattr__(self, name: str, value: Any) -> None:
        raise TypeError(f"api.{self._cap} is read-only")

    def __repr__(self) -> str:
        return f"<api.{self._cap}>"

    def _call(self, op: str, *args: Any) -> Any:
        return _freeze(self._ctx.rpc(self._cap, op, [_json_arg(a) for a in args]))


class _Record:
    """A read-only result with attributes (``api.run`` result, ``api.fs.stat``)."""

    __slots__ = ("_fields",)
    _fields_names: tuple[str, ...] = ()
    _script_label = "result"

    def __init__(self, fields: dict[str, Any]) -> None:
        object.__setattr__(self, "_fields", {k: fields.get(k) for k in self._fields_names})

    def __getattr__(self, name: str) -> Any:
        try:
            return self._fields[name]
        except KeyError:
            raise AttributeError(f"{self._script_label} has no attribute {name!r} "
                                 f"(fields: {', '.join(self._fields_names)})") from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise TypeError(f"{self._script_label} is read-only")

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self._fields.items())
        return f"{self._script_label}({inner})"


class RunResult(_Record):
    """What ``api.run()`` returns: exit ``code`` (negative: killed by that signal),
    ``stdout`` and ``stderr`` as text, ``truncated`` when output passed max_output."""

    __slots__ = ()
    _fields_names = ("code", "stdout", "stderr", "truncated", "duration")
    _script_label = "run result"


class FsStat(_Record):
    """What ``api.fs.stat()`` returns."""

    __slots__ = ()
    _fields_names = ("name", "size", "mtime", "mode", "is_dir", "is_file", "is_link")
    _script_label = "fs stat"


def _make_record(cls: type[_Record], fields: Any) -> _Record:
    if type(fields) is not dict:
        raise RuntimeError(f"unexpected reply for a {cls._script_label}")
    return cls(fields)


class FsStub(_RemoteStub):
    """``api.fs`` (capability ``fs``): the event user's files. Served by the parent."""

    __slots__ = ()
    _cap = "fs"
    _script_label = "api.fs"

    def exists(self, path): return self._call("exists", path)
    def stat(self, path): return _make_record(FsStat, self._ctx.rpc("fs", "stat", [_json_arg(path)]))
    def listdir(self, path="/"): return self._call("listdir", path)
    def move(self, src, dst): return self._call("move", src, dst)
    def copy(self, src, dst): return self._call("copy", src, dst)
    def remove(self, path): return self._call("remove", path)
    def mkdir(self, path): return self._call("mkdir", path)
    def read_text(self, path, max_bytes=1024 * 1024): return self._call("read_text", path, max_bytes)
    def write_text(self, path, text): return self._call("write_text", path, text)


class NotifyStub(_RemoteStub):
    """``api.notify`` (capability ``notify``). Served by the parent."""

    __slots__ = ()
    _cap = "notify"
    _script_label = "api.notify"

    def email(self, to, subject, body): return self._call("email", to, subject, body)
    def webhook(self, name, payload): return self._call("webhook", name, payload)


sandbox.register_attrs(ScriptApi, ("veto", "log", "file", "store", "fs", "notify", "run"))
sandbox.register_attrs(ScriptFile, ("size", "read", "hash", "lines"))
sandbox.register_attrs(StoreStub, ("get", "set", "incr", "delete"))
sandbox.register_attrs(FsStub, ("exists", "stat", "listdir", "move", "copy", "remove",
                                "mkdir", "read_text", "write_text"))
sandbox.register_attrs(NotifyStub, ("email", "webhook"))
sandbox.register_attrs(RunResult, RunResult._fields_names)
sandbox.register_attrs(FsStat, FsStat._fields_names)

"""Script worker process: the child side of scripting/workers.py.

A worker is a fresh interpreter (``python -I -c BOOTSTRAP FD PATHS CONFIG``)
started by the pool with one end of a Unix socketpair. It first lowers its own CPU
priority (``[scripts] nice``, :func:`lower_priority`; before its heavy imports, so
even its start yields to the daemon), then imports the sandbox,
lowers its own limits (address space, core dumps, files, processes, file
size), says hello, then serves one request at a time:

* ``compile``: compile a script with the restricted policy (untrusted source is
  only ever parsed here) and cache the code object per (name, sha256);
* ``call``: run a handler: fresh globals, fresh module façades, CPU limit armed
  (``RLIMIT_CPU`` soft limit at CPU-used + budget, rounded up to a whole
  second, plus an ``ITIMER_PROF`` timer for sub-second precision; no Python
  handler is installed for SIGXCPU or SIGPROF, so the kernel kills the
  process and nothing in the script can catch it), the event's file
  descriptor received with SCM_RIGHTS, capability requests relayed to the
  parent while the handler runs.

Messages both ways are length-prefixed JSON (4-byte big-endian length), framed by
``server/contract/framing.py`` (strict: ASCII JSON objects, no NaN); the parent never
unpickles anything a worker sends. The limits at the top of this module are shared
with the parent, so importing it is cheap and has no side effects; the heavy imports
happen in :func:`main`.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from typing import Any

from scriptsftp.server.contract import framing

#: Largest frame the parent sends (script source + event, JSON-escaped).
MAX_TO_WORKER = 16 * 1024 * 1024
#: Largest frame a worker may send; the parent treats anything bigger as garbage.
MAX_FROM_WORKER = 1024 * 1024
#: Compiled scripts cached per worker, at most this many...
CODE_CACHE_SIZE = 256
#: ...and at most this much source text in total (code objects are a few times bigger).
CODE_CACHE_BYTES = 8 * 1024 * 1024
#: CPU seconds a worker may spend between calls (stray finalizers, compile
#: bookkeeping) before the kernel kills it.
IDLE_CPU_ALLOWANCE = 2.0

EXIT_PROTOCOL = 70
EXIT_SETUP = 71


#: A frame or message that is not a well-formed protocol message (the framing's own
#: error, so a bad frame and a bad field are caught alike).
ProtocolError = framing.MalformedMessage


# ---------------------------------------------------------------------------
# Worker side
# ---------------------------------------------------------------------------


class ParentChannel:
    """The worker's blocking channel to the pool; collects the descriptors passed with
    messages. Any trouble on it ends the process: the pool replaces a worker, it never
    repairs one."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.frames = framing.FrameReader(MAX_TO_WORKER)
        self.fds: list[int] = []

    def send(self, obj: dict[str, Any]) -> None:
        try:
            self.sock.sendall(framing.encode(obj, strict=True))
        except OSError:
            os._exit(0)  # the parent is gone

    def recv(self) -> dict[str, Any]:
        while True:
            try:
                payload = self.frames.next_frame()
                if payload is not None:
                    return framing.decode_object(payload)
            except ProtocolError:
                os._exit(EXIT_PROTOCOL)
            try:
                data, fds, _flags, _addr = socket.recv_fds(self.sock, 65536, framing.MAX_FDS,
                                                           socket.MSG_CMSG_CLOEXEC)
            except OSError:
                os._exit(0)
            self.fds.extend(fds)
            if not data:
                os._exit(0)  # EOF: the pool closed or retired us
            self.frames.feed(data)

    def take_fds(self) -> list[int]:
        fds, self.fds = self.fds, []
        return fds


class _Limits:
    """Per-call CPU limits: RLIMIT_CPU (whole seconds) + ITIMER_PROF (precise)."""

    def __init__(self) -> None:
        import resource
        import signal
        self.resource = resource
        self.signal = signal
        self.hard = resource.getrlimit(resource.RLIMIT_CPU)[1]

    def arm(self, cpu_seconds: float) -> None:
        r = self.resource
        ru = r.getrusage(r.RUSAGE_SELF)
        used = ru.ru_utime + ru.ru_stime
        soft = int(used + cpu_seconds) + 1   # ceil, whole seconds
        if self.hard != r.RLIM_INFINITY:
            soft = min(soft, self.hard)
        r.setrlimit(r.RLIMIT_CPU, (soft, self.hard))
        self.signal.setitimer(self.signal.ITIMER_PROF, max(cpu_seconds, 0.001))


def lower_priority(steps: Any) -> dict[str, Any]:
    """Run *steps* (0-19) nice levels below the process that started us (raising one's own
    nice value needs no privilege). The pool keeps workers in the daemon's session, so with
    the kernel's autogroups they share the daemon's group, where the nice value ranks them
    below its threads and its SSH workers. Returns what was applied, for the hello."""
    n = steps if type(steps) is int and 0 < steps <= 19 else 0
    return {"nice": os.nice(n)}


def _setup(config: dict[str, Any]) -> dict[str, Any]:
    import gc
    import resource
    import signal

    # The kernel must be the one that acts on these: default dispositions,
    # even if the server process ignored them (ignored dispositions survive exec).
    for sig in (signal.SIGXCPU, signal.SIGPROF, signal.SIGXFSZ, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C on the server's terminal

    # Everything scripts may use is imported now, before the limits apply.
    from . import api, sandbox  # noqa: F401
    import _strptime  # type: ignore[import-not-found]  # noqa: F401
    import time
    import datetime
    time.strptime("2024-01-02", "%Y-%m-%d")
    datetime.datetime.strptime("2024", "%Y")
    for enc in ("utf-8", "latin-1", "ascii", "cp1252", "iso8859-15"):
        "\n".encode(enc)

    _prctl_hardening()

    # The kernel jail, now that every import is done and before any script source is read:
    # read-only access to the Python installation and nothing else, no new sockets or
    # processes (server/contract/jail.py). Before the rlimits: libseccomp allocates.
    from scriptsftp.server.contract import jail
    status_fd = os.open("/proc/self/status", os.O_RDONLY | os.O_CLOEXEC) \
        if os.path.exists("/proc/self/status") else -1   # unreadable once jailed: opened now
    # as the unprivileged account from here on, if one is configured (before any script)
    jail_report = jail.apply(config.get("deny_under") or (), config.get("account"))

    baseline_kb = _vm_size_kb(status_fd)
    memory_mb = int(config.get("memory_mb", 256))
    limit = (baseline_kb * 1024) + memory_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NOFILE, (32, 32))
    try:
        resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
    except (ValueError, OSError):
        pass
    if config.get("no_file_writes", True):
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))

    gc.collect()
    gc.freeze()
    return {"baseline_kb": baseline_kb, "limit_bytes": limit, "jail": jail_report}


def _prctl_hardening() -> None:
    """No new privileges; not dumpable (no ptrace/proc-mem access between
    same-uid workers). Best effort."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(38, 1, 0, 0, 0)   # PR_SET_NO_NEW_PRIVS
        libc.prctl(4, 0, 0, 0, 0)    # PR_SET_DUMPABLE = 0
    except Exception:  # noqa: BLE001
        pass


def _vm_size_kb(fd: int = -1) -> int:
    """VmSize from /proc/self/status, read through *fd* (opened before the jail)."""
    if fd < 0:
        return 64 * 1024
    try:
        data = b""
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            data += chunk
        for line in data.splitlines():
            if line.startswith(b"VmSize:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    finally:
        os.close(fd)
    return 64 * 1024


class HandlerRunner:
    """The worker's request loop: compiles scripts and runs their handlers, one request
    at a time, under the call's CPU limit."""

    def __init__(self, chan: ParentChannel) -> None:
        import collections
        import gc
        import types
        from . import api, sandbox
        self.chan = chan
        self.api = api
        self.sandbox = sandbox
        self.gc = gc
        self.FunctionType = types.FunctionType
        self.cache: collections.OrderedDict[tuple[str, str], tuple[Any, int]] = \
            collections.OrderedDict()
        self.cache_bytes = 0
        self.limits = _Limits()
        self.limits.arm(IDLE_CPU_ALLOWANCE)

    def serve(self) -> None:
        chan = self.chan
        while True:
            msg = chan.recv()
            fds = chan.take_fds()
            try:
                kind = msg.get("t")
                if kind == "call":
                    self.call(msg, fds)
                elif kind == "compile":
                    self.compile(msg)
                elif kind == "ping":
                    chan.send({"t": "pong"})
                elif kind == "exit":
                    os._exit(0)
                else:
                    os._exit(EXIT_PROTOCOL)
            finally:
                framing.close_fds(fds)
                self.limits.arm(IDLE_CPU_ALLOWANCE)

    # --- compile ----------------------------------------------------------------

    def _compile(self, name: str, digest: str, source: Any) -> tuple[Any, list[str]]:
        import hashlib
        if type(source) is not str:
            return None, [f"{name}:1: script source missing"]
        actual = hashlib.sha256(source.encode("utf-8", "surrogatepass")).hexdigest()
        if actual != digest:
            return None, [f"{name}:1: script digest does not match its text"]
        compiled, errors = self.sandbox.compile_script(name, source)
        if compiled is not None:
            key = (name, digest)
            if key not in self.cache:
                self.cache_bytes += len(source)
            self.cache[key] = (compiled, len(source))
            while len(self.cache) > CODE_CACHE_SIZE or (
                    self.cache_bytes > CODE_CACHE_BYTES and len(self.cache) > 1):
                _, (_, size) = self.cache.popitem(last=False)
                self.cache_bytes -= size
        return compiled, errors

    def compile(self, msg: dict[str, Any]) -> None:
        name, digest = str(msg.get("name")), str(msg.get("digest"))
        self.limits.arm(_cpu(msg.get("cpu"), 10.0))
        compiled, errors = self._compile(name, digest, msg.get("source"))
        self.chan.send({"t": "compiled", "ok": compiled is not None, "errors": errors[:100],
                        "functions": list(compiled.functions) if compiled else []})

    # --- call ---------------------------------------------------------------------

    def _rpc(self, request: dict[str, Any]) -> dict[str, Any]:
        self.chan.send(request)
        reply = self.chan.recv()
        if reply.get("t") != "rpc-reply":
            os._exit(EXIT_PROTOCOL)
        return reply

    def call(self, msg: dict[str, Any], fds: list[int]) -> None:
        api, sandbox = self.api, self.sandbox
        name, digest = str(msg.get("name")), str(msg.get("digest"))
        function = str(msg.get("function"))
        self.limits.arm(_cpu(msg.get("cpu"), 2.0))

        cached = self.cache.get((name, digest))
        if cached is not None:
            compiled = cached[0]
            self.cache.move_to_end((name, digest))
        else:
            source = msg.get("source")
            if source is None:
                self.chan.send({"t": "need-source"})
                reply = self.chan.recv()
                if reply.get("t") != "source":
                    os._exit(EXIT_PROTOCOL)
                source = reply.get("text")
            compiled, errors = self._compile(name, digest, source)
            if compiled is None:
                first = errors[0] if errors else f"{name}:1: compile error"
                self.chan.send(_result("error", first, [], "compile", _line_of(first)))
                return

        fd = fds[0] if msg.get("fd") and fds else None
        ctx = api.CallContext(script=name, function=function,
                              granted=frozenset(str(c) for c in msg.get("caps") or ()),
                              rpc=self._rpc, fd=fd, file_error=msg.get("file_error"))
        verdict, reason, kind, line = "allow", "", None, None
        filename = sandbox.script_filename(name)
        g: dict[str, Any] = {}
        try:
            g = sandbox.make_globals(_printer_factory(ctx), name)
            exec(compiled.code, g)
            fn = g.get(function)
            if not isinstance(fn, self.FunctionType):
                kind = "missing-function"
                reason = f"{name}: function {function!r} is not defined"
                if function not in compiled.functions:
                    defined = ", ".join(compiled.functions) or "none"
                    reason += f" (top-level functions: {defined})"
            else:
                event = api.ScriptEvent(msg.get("event") or {})
                returned = fn(event, api.ScriptApi(ctx))
                if returned is not None:
                    ctx.add_log("handler returned a value; return values are ignored "
                                "(use api.veto(reason) to deny)", {})
        except api.VetoStop as e:   # api.veto() ends the handler
            e.__traceback__ = None
            del e
        except BaseException as e:  # noqa: BLE001 - SystemExit/KeyboardInterrupt too
            kind = "memory" if isinstance(e, MemoryError) else "exception"
            line = _script_line(e.__traceback__, filename)
            reason = _format_error(name, line, e)
            e.__traceback__ = None
            del e
        finally:
            # Release everything the script made while its CPU budget is still
            # armed, so finalizers (e.g. a suspended generator's finally:) run
            # now and are charged to this call, not to the next script's.
            g.clear()
            g = {}
            fn = None  # noqa: F841
            self.gc.collect()
            ctx.closed = True

        if ctx.veto_reason is not None:
            if kind is not None:
                ctx.add_log(f"handler failed after its veto: {reason}", {})
            verdict, reason, kind, line = "veto", ctx.veto_reason, None, None
        elif kind is not None:
            verdict = "error"
        self.chan.send(_result(verdict, reason, ctx.finish_logs(), kind, line))


def _cpu(value: Any, default: float) -> float:
    if type(value) in (int, float) and 0 < value < 1e6:
        return float(value)
    return default


def _result(verdict: str, reason: str, logs: list, kind: str | None,
            line: int | None) -> dict[str, Any]:
    return {"t": "result", "verdict": verdict, "reason": reason, "logs": logs,
            "error_kind": kind, "error_line": line}


def _line_of(error: str) -> int | None:
    parts = error.split(":", 2)
    if len(parts) >= 2 and parts[1].isdigit():
        return int(parts[1])
    return None


def _script_line(tb: Any, filename: str) -> int | None:
    """Line of the innermost frame of the script in a traceback (trusted code)."""
    line = None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == filename:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def _format_error(name: str, line: int | None, exc: BaseException) -> str:
    from .api import MAX_ERROR_CHARS, clean_text
    try:
        args = exc.args
        if len(args) == 1 and type(args[0]) is str and type(exc) is not KeyError:
            text = args[0][:MAX_ERROR_CHARS]
        else:
            text = str(exc)[:MAX_ERROR_CHARS]
    except BaseException:  # noqa: BLE001
        text = "<unprintable error>"
    where = f"{name}:{line}" if line is not None else name
    head = f"{where}: {type(exc).__name__}"
    return clean_text(f"{head}: {text}" if text else head, MAX_ERROR_CHARS + 200)


class _Printer:
    """What ``print`` compiles to in a script scope: output goes to the call's
    log (one line per print() call); ``printed`` returns this scope's text."""

    __slots__ = ("_ctx", "_parts", "_size")

    def __init__(self, ctx: Any) -> None:
        self._ctx = ctx
        self._parts: list[str] = []
        self._size = 0

    def _call_print(self, *objects: Any, sep: Any = " ", end: Any = "\n",
                    file: Any = None, flush: bool = False) -> None:
        if file is not None:
            raise TypeError("print(file=...) is not available in scripts; "
                            "print() output goes to the script log")
        if sep is None:
            sep = " "
        if end is None:
            end = "\n"
        if type(sep) is not str or type(end) is not str:
            raise TypeError("print(): sep and end must be str")
        ctx = self._ctx
        ctx.check_open()
        text = sep.join([str(o) for o in objects])
        ctx.add_log(text if end == "\n" else text + end, {"source": "print"})
        if self._size < 65536:
            piece = (text + end)[: 65536 - self._size]
            self._parts.append(piece)
            self._size += len(piece)

    def __call__(self) -> str:   # the ``printed`` name
        return "".join(self._parts)


def _printer_factory(ctx: Any) -> Any:
    """The ``_print_`` hook for one call (RestrictedPython calls it with
    ``_getattr_`` in every scope that uses print)."""

    def factory(_getattr_: Any = None) -> _Printer:
        return _Printer(ctx)

    return factory


def main(fd: int, config: dict[str, Any]) -> None:
    sock = socket.socket(fileno=fd)
    chan = ParentChannel(sock)
    try:
        priority = lower_priority(config.get("nice"))
        info = {**_setup(config), "priority": priority}
    except BaseException as e:  # noqa: BLE001
        try:
            chan.send({"t": "fatal", "error": f"{type(e).__name__}: {e}"[:2000]})
        finally:
            os._exit(EXIT_SETUP)
    chan.send({"t": "hello", "pid": os.getpid(), **info})
    try:
        HandlerRunner(chan).serve()
    except BaseException:  # noqa: BLE001 - an internal failure: let the pool replace us
        os._exit(EXIT_PROTOCOL)


#: What the pool runs with ``python -I -c``: argv = [fd, json(sys.path extras), json(config)].
BOOTSTRAP = (
    "import sys, json\n"
    "sys.path.extend(p for p in json.loads(sys.argv[2]) if p not in sys.path)\n"
    "try:\n"
    "    from scriptsftp.scripting.worker_main import main\n"
    "except BaseException as e:\n"
    "    import os, socket, struct\n"
    "    s = socket.socket(fileno=int(sys.argv[1]))\n"
    "    d = json.dumps({'t': 'fatal', 'error': '%s: %s' % (type(e).__name__, e)}).encode()\n"
    "    s.sendall(struct.pack('>I', len(d)) + d)\n"
    "    os._exit(71)\n"
    "main(int(sys.argv[1]), json.loads(sys.argv[3]))\n"
)


if __name__ == "__main__":  # pragma: no cover - manual debugging
    main(int(sys.argv[1]), json.loads(sys.argv[2]) if len(sys.argv) > 2 else {})

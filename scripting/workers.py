"""The pool of sandboxed script worker processes (server side).

Scripts never run in the server process (docs/architecture.md rule 4). The pool keeps N
worker processes, each a fresh interpreter started with ``subprocess`` (no
``fork()`` of the multi-threaded server) and one end of a Unix socketpair
passed with ``pass_fds``. A call takes an idle worker, sends it the request
(and, for the ``read`` capability, a read-only file descriptor with
SCM_RIGHTS), relays the worker's capability requests to the
:class:`~scriptsftp.scripting.capabilities.CapabilityRegistry`, and waits for
the result until the call's wall-clock deadline; past it the worker is
SIGKILLed. A worker that dies, overruns, sends something malformed, hits its
memory limit or has served ``max_calls_per_worker`` calls is replaced at once
by a background thread, so the next caller normally finds a worker waiting.

Security notes (docs/sandbox.md has the whole model):

* Worker -> server messages are length-prefixed JSON (``server/contract/framing.py``,
  strict), parsed with ``json`` and validated field by field; nothing from a worker is
  ever unpickled or evaluated, and file descriptors a worker might send are dropped by
  the kernel (the server reads with plain ``recv``).
* Frames from a worker are capped at 1 MiB; logs, reasons and errors are
  capped again here, whatever the worker claims.
* The worker's environment is empty but for PATH, LANG and TZ; its cwd is /;
  it runs in its own session; optionally as another account (``user=``/``group=``), to
  which it drops itself after its imports and before it reads any script; then it jails
  itself (server/contract/jail.py).
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from scriptsftp.server.contract import framing
from scriptsftp.server.contract.state import StateStoreFactory

from scriptsftp.server.contract import jail
from . import worker_main as proto
from .capabilities import KNOWN_CAPABILITIES, CapabilityCall, CapabilityRegistry, StoreCapability
from .sandbox import MAX_SOURCE_BYTES
from .store import ScriptStore

__all__ = [
    "ScriptSource", "CompileResult", "CallRequest", "LogLine", "CallResult",
    "WorkerPool", "WorkerStartError", "ERROR_KINDS",
]

log = logging.getLogger("scriptsftp.scripting.workers")

#: Every value of ``CallResult.error_kind`` besides None.
ERROR_KINDS = frozenset({"exception", "timeout", "cpu", "memory", "crash", "garbage",
                         "missing-function", "compile"})
_WORKER_REPORTED_KINDS = frozenset({"exception", "memory", "missing-function", "compile"})

#: CPU priority steps below the daemon the workers run at unless told ([scripts] nice).
DEFAULT_NICE = 10
MAX_VETO_REASON = 1000
MAX_ERROR_CHARS = 4000
MAX_LOG_LINES = 100
MAX_LOG_BYTES = 64 * 1024
MAX_LOG_LINE_CHARS = 8 * 1024 + 32
_MAX_COMPILE_ERRORS = 100

_CONTROL = {i: " " for i in list(range(32)) + [127]}
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_HEX64 = re.compile(r"[0-9a-f]{64}\Z")


def _clean(text: str, limit: int) -> str:
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text.translate(_CONTROL)


# --- public data types ----------------------------------------------------------


@dataclass(frozen=True)
class ScriptSource:
    name: str          # e.g. "reject_exe.py" (used in error messages and as store namespace)
    text: str
    digest: str        # sha256 hex of text (UTF-8)


@dataclass(frozen=True)
class CompileResult:
    ok: bool
    errors: list[str]        # "NAME:LINE: message"
    functions: list[str]     # top-level function names defined by the script


@dataclass(frozen=True)
class CallRequest:
    script: ScriptSource
    function: str                    # e.g. "on_pre_upload"
    event: dict                      # Event.to_dict()
    capabilities: frozenset[str]     # e.g. {"read", "store"}
    timeout: float                   # wall clock seconds (includes waiting for a worker and RPCs)
    cpu_time: float                  # CPU seconds for this call
    file: Callable[[], int] | None = None   # FileOpener from server/contract/dispatch.py
    context: Any = None              # opaque, for capability handlers; never sent to the worker


@dataclass(frozen=True)
class LogLine:
    message: str
    fields: dict             # JSON data from the script (untrusted content)


@dataclass(frozen=True)
class CallResult:
    verdict: str                 # "allow" | "veto" | "error"
    reason: str                  # veto reason, or error text
    logs: list[LogLine]
    error_kind: str | None       # None | one of ERROR_KINDS
    error_line: int | None
    duration: float              # seconds, including the wait for a worker
    queued: float = 0.0          # of which seconds waiting for a worker (the rest is the run)


#: Events a client's login waits on: they go first, and a share of the pool is kept for them.
LOGIN_EVENTS = frozenset({"connect", "pre-login"})


@dataclass(eq=False)
class _Waiter:
    """A call waiting for a worker: whose, of which class, for which binding (script and
    function), and since when (for FIFO ties)."""

    user: str
    login: bool
    seq: int
    binding: str = ""


class WorkerStartError(RuntimeError):
    """Worker processes could not be started (bad install, limits too low...)."""


# --- one worker (server side) ------------------------------------------------------


class _Deadline(Exception):
    pass


class _Gone(Exception):
    pass


class _BadRequest(Exception):
    pass


class WorkerProcess:
    """The pool's handle on one worker process: its process, its end of the socketpair, the
    scripts it has compiled, how many calls it served and for whom it works now."""

    __slots__ = ("proc", "sock", "pid", "frames", "calls", "known", "killed", "info", "holder", "nice")

    def __init__(self, proc: subprocess.Popen, sock: socket.socket) -> None:
        self.proc = proc
        self.sock = sock
        self.pid = proc.pid
        self.frames = framing.FrameReader(proto.MAX_FROM_WORKER)
        self.calls = 0
        self.known: set[tuple[str, str]] = set()
        self.killed = False
        self.info: dict[str, Any] = {}
        self.holder: tuple[str, bool, str] = ("", False, "")  # (user, login, binding) of the call it serves
        self.nice = 0   # the [scripts] nice it was started with (0: a login worker, or nice = 0)

    def send(self, obj: dict[str, Any], deadline: float, fd: int | None = None) -> None:
        data = framing.encode(obj, strict=True)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _Deadline
        try:
            self.sock.settimeout(remaining)
            framing.send_frame(self.sock, data, () if fd is None else (fd,))
        except TimeoutError:
            raise _Deadline from None
        except OSError:
            raise _Gone from None

    def recv(self, deadline: float) -> dict[str, Any]:
        frames = self.frames
        while True:
            payload = frames.next_frame()  # ProtocolError: a frame over the limit
            if payload is not None:
                return framing.decode_object(payload)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _Deadline
            try:
                self.sock.settimeout(remaining)
                # Plain recv: any SCM_RIGHTS a worker sends are discarded by the kernel.
                data = self.sock.recv(65536)
            except TimeoutError:
                raise _Deadline from None
            except OSError:
                raise _Gone from None
            if not data:
                raise _Gone
            frames.feed(data)

    def kill(self) -> None:
        self.killed = True
        try:
            if self.proc.returncode is None:
                self.proc.kill()
        except (ProcessLookupError, OSError):
            pass

    def close_socket(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


# --- the pool ---------------------------------------------------------------------


class WorkerPool:
    """N sandboxed worker processes; :meth:`call` is thread-safe and blocking.

    ``memory_mb`` is the address space each worker may add to its baseline
    (about 25 MiB of interpreter and libraries) before allocations fail with
    MemoryError. ``stores`` opens the script store behind ``api.store`` (without it,
    ``api.store`` is not available); workers are denied ``state_dir``. ``nice``: how many
    CPU priority steps below this process the workers run (0-19; 0: the same), so that when
    CPU is short a CPU-bound script yields it to the daemon's transfers and logins.
    """

    def __init__(self, workers: int, *, memory_mb: int, state_dir: Path, stores: StateStoreFactory | None = None,
                 max_calls_per_worker: int = 1000,
                 capabilities: CapabilityRegistry | None = None,
                 user: str | int | None = None, group: str | int | None = None,
                 start_timeout: float = 30.0, max_rpc_per_call: int = 10_000,
                 worker_stderr: int | None = subprocess.DEVNULL, login_reserve: int = 1,
                 nice: int = DEFAULT_NICE) -> None:
        if workers < 1:
            raise ValueError("workers must be >= 1")
        if memory_mb < 16:
            raise ValueError("memory_mb must be >= 16")
        self.size = workers
        # workers only connect/pre-login may take: a slow binding another user triggers can
        # then never make a login wait (one worker can serve nothing but logins)
        self.login_reserve = max(0, min(int(login_reserve), workers - 1))
        self.memory_mb = int(memory_mb)
        # CPU priority steps below this process each new worker takes (set_nice), except the
        # login_reserve workers: they keep full priority, so logins never wait for CPU behind
        # the scripts they are kept apart from (_nice_for_replacement, _take)
        self.nice = _check_nice(nice)
        self._full_pending = 0          # full-priority replacements being started
        self.state_dir = Path(state_dir)
        self.stores = stores
        self.max_calls_per_worker = max(1, int(max_calls_per_worker))
        self.capabilities = capabilities if capabilities is not None else CapabilityRegistry()
        self.start_timeout = start_timeout
        self.max_rpc_per_call = max_rpc_per_call
        self.store: ScriptStore | None = None
        self._stderr = worker_stderr
        # The worker starts as this process's account (it can then import from wherever the
        # interpreter lives), and drops to user/group itself after its imports, before it
        # reads any script (worker_main._setup, jail.drop_privileges).
        self._account: tuple[int, int] | None = _resolve_account(user, group)
        env = {"PATH": os.defpath, "LANG": "C.UTF-8"}
        if "TZ" in os.environ:
            env["TZ"] = os.environ["TZ"]
        if os.environ.get(jail.TEST_ESCAPE_ENV) == "1":   # tests: workers report an escape attempt
            env[jail.TEST_ESCAPE_ENV] = "1"
        self._jail_logged = False
        self._env = env

        self._cond = threading.Condition()
        self._all: set[WorkerProcess] = set()
        self._idle: deque[WorkerProcess] = deque()
        self._waiters: list[_Waiter] = []
        self._seq = 0
        self._held_by_user: dict[str, int] = {}
        self._held_by_binding: dict[str, int] = {}
        self._held_other = 0  # workers held by calls that are not logins
        self._starting: dict[int, subprocess.Popen] = {}
        self._pending = 0
        self._threads: set[threading.Thread] = set()
        self._closed = False
        self._started = False
        self._closed_event = threading.Event()
        self._restarts = 0
        self._calls = 0
        self._spawn_failures = 0
        self._last_error: str | None = None

    # --- lifecycle ------------------------------------------------------------------

    def start(self) -> None:
        """Open the store and start the workers; raise WorkerStartError if a
        worker cannot start (the pool is then closed)."""
        if self._started:
            raise RuntimeError("pool already started")
        self._started = True
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if self.stores is not None:
            self.store = ScriptStore(self.stores)
        if self.store is not None and self.capabilities.handler("store") is None:
            self.capabilities.register("store", StoreCapability(self.store))
        errors: list[BaseException] = []
        workers: list[WorkerProcess] = []
        lock = threading.Lock()

        def one(nice: int) -> None:
            try:
                w = self._spawn(nice)
            except BaseException as e:  # noqa: BLE001
                with lock:
                    errors.append(e)
            else:
                with lock:
                    workers.append(w)

        full = self.login_reserve if self.nice else 0
        threads = [threading.Thread(target=one, args=(0 if i < full else self.nice,), daemon=True)
                   for i in range(self.size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        with self._cond:
            for w in workers:
                self._all.add(w)
                self._idle.append(w)
            self._cond.notify_all()
        if errors:
            self.close()
            raise WorkerStartError(f"could not start script workers: {errors[0]}") from errors[0]

    def close(self) -> None:
        """Kill every worker, reap them, close the store. Idempotent."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            workers = list(self._all)
            idle = list(self._idle)
            self._all.clear()
            self._idle.clear()
            starting = list(self._starting.values())
            threads = list(self._threads)
            self._cond.notify_all()
        self._closed_event.set()
        for w in workers:
            w.kill()
        for proc in starting:
            try:
                proc.kill()
            except OSError:
                pass
        for w in idle:
            w.close_socket()
        for w in workers:
            try:
                w.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:  # pragma: no cover - D-state
                log.warning("script worker %d did not die", w.pid)
        for t in threads:
            t.join(timeout=15)
        if self.store is not None:
            self.store.close()

    def __enter__(self) -> "WorkerPool":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def health(self) -> dict[str, Any]:
        with self._cond:
            return {
                "workers": self.size,
                "alive": len(self._all),
                "idle": len(self._idle),
                "busy": len(self._all) - len(self._idle),
                "waiting": len(self._waiters),
                "login_reserve": self.login_reserve,
                "starting": self._pending,
                "restarts": self._restarts,
                "calls": self._calls,
                "spawn_failures": self._spawn_failures,
                "last_error": self._last_error,
                "pids": sorted(w.pid for w in self._all),
                "closed": self._closed,
            }

    def worker_pids(self) -> list[int]:
        return self.health()["pids"]

    # --- spawning -----------------------------------------------------------------------

    def _worker_command(self, fd: int, nice: int) -> list[str]:
        """argv of a worker process whose channel is *fd* (tests override this)."""
        extra_paths = [p for p in sys.path if p and os.path.isdir(p)]
        config = {"memory_mb": self.memory_mb,
                  "no_file_writes": self._stderr == subprocess.DEVNULL,
                  # never readable from the jail, even if it sits under sys.path
                  "deny_under": [str(self.state_dir.resolve())],
                  "account": list(self._account) if self._account else None,
                  "nice": nice}
        return [sys.executable, "-I", "-c", proto.BOOTSTRAP, str(fd),
                json.dumps(extra_paths), json.dumps(config)]

    def _spawn(self, nice: int) -> WorkerProcess:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            proc = subprocess.Popen(
                self._worker_command(child.fileno(), nice), pass_fds=(child.fileno(),),
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._stderr,
                # a process group of its own (the terminal's Ctrl-C does not reach it) in
                # the daemon's session: with the kernel's autogroups, a session of its own
                # would share CPU with the daemon and its SSH workers as an equal, whatever
                # its nice value
                env=self._env, cwd="/", close_fds=True, process_group=0)
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        with self._cond:
            self._starting[proc.pid] = proc
            closed = self._closed
        w = WorkerProcess(proc, parent)
        w.nice = nice
        try:
            if closed:
                raise WorkerStartError("pool closed")
            hello = w.recv(time.monotonic() + self.start_timeout)
            if hello.get("t") == "fatal":
                raise WorkerStartError(f"worker failed to start: {str(hello.get('error'))[:500]}")
            if hello.get("t") != "hello":
                raise WorkerStartError("worker sent an unexpected greeting")
            w.info = {k: v for k, v in hello.items() if k in ("baseline_kb", "limit_bytes", "jail", "priority")}
            self._log_jail(w)
        except BaseException as e:
            w.kill()
            w.close_socket()
            proc.wait()
            if isinstance(e, _Deadline):
                detail = f"no greeting within {self.start_timeout:g} s"
            elif isinstance(e, _Gone):
                detail = f"exited with status {proc.returncode}"
            elif isinstance(e, proto.ProtocolError):
                detail = str(e)
            else:
                raise
            raise WorkerStartError(f"worker failed to start: {detail}") from None
        finally:
            with self._cond:
                self._starting.pop(proc.pid, None)
        return w

    def _log_jail(self, w: WorkerProcess) -> None:
        """Say once what the workers' jail is (and what it lacks); every escape probe (tests)."""
        report = w.info.get("jail")
        if type(report) is not dict:
            return
        report = {k: _clean(str(v), 500) if k != "escape" else v for k, v in report.items()}
        if type(report.get("escape")) is dict:
            log.warning("script worker %d jail: %s", w.pid, jail.describe(report))
            return
        with self._cond:
            first, self._jail_logged = not self._jail_logged, True
        if first:
            off = [k for k in ("landlock", "seccomp") if not str(report.get(k, "")).startswith("on")]
            (log.warning if off else log.info)(
                "script workers: %s%s", jail.describe(report),
                f" ({' and '.join(off)} missing: that layer is not applied)" if off else "")

    def jail_reports(self) -> dict[int, dict[str, Any]]:
        """Each live worker's jail report, by pid (what the worker said in its greeting)."""
        with self._cond:
            return {w.pid: dict(w.info.get("jail") or {}) for w in self._all}

    def _discard(self, w: WorkerProcess, *, kill: bool) -> None:
        """Take *w* out of the pool for good: end and reap its process, and
        start a replacement right away (in the background)."""
        if kill:
            w.kill()
        w.close_socket()
        with self._cond:
            self._all.discard(w)
            replace = not self._closed
            if replace:
                self._restarts += 1
                self._pending += 1
            t = threading.Thread(target=self._replace, args=(w, replace),
                                 name=f"scriptsftp-worker-replace-{w.pid}", daemon=True)
            self._threads.add(t)
            t.start()   # under the lock: close() never sees an unstarted thread

    def _replace(self, old: WorkerProcess, replace: bool) -> None:
        try:
            if replace:
                self._spawn_into_pool()
        finally:
            try:
                old.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                old.kill()
                old.proc.wait()
            with self._cond:
                self._threads.discard(threading.current_thread())

    def _nice_for_replacement(self) -> int:
        """(lock held) Full priority while fewer than ``login_reserve`` workers have it."""
        if not self.nice:
            return 0
        full = sum(1 for w in self._all if w.nice == 0) + self._full_pending
        return 0 if full < self.login_reserve else self.nice

    def _spawn_into_pool(self) -> None:
        with self._cond:
            nice = self._nice_for_replacement()
            self._full_pending += 0 if nice else 1
        try:
            self._spawn_into_pool_as(nice)
        finally:
            with self._cond:
                self._full_pending -= 0 if nice else 1

    def _spawn_into_pool_as(self, nice: int) -> None:
        delay = 0.05
        while True:
            with self._cond:
                if self._closed:
                    self._pending -= 1
                    return
            try:
                w = self._spawn(nice)
            except Exception as e:  # noqa: BLE001 - keep trying, with backoff
                with self._cond:
                    closed = self._closed
                    if not closed:
                        self._spawn_failures += 1
                        self._last_error = str(e)
                if not closed:
                    log.warning("script worker failed to start: %s", e)
                if self._closed_event.wait(delay):
                    with self._cond:
                        self._pending -= 1
                    return
                delay = min(delay * 2, 5.0)
                continue
            with self._cond:
                self._pending -= 1
                if not self._closed:
                    self._all.add(w)
                    self._idle.append(w)
                    self._cond.notify_all()  # waiters decide among themselves who takes it
                    return
            w.kill()
            w.close_socket()
            w.proc.wait()
            return

    # --- taking and giving back workers ------------------------------------------------------

    def _acquire(self, deadline: float, user: str = "", login: bool = False,
                 binding: str = "") -> WorkerProcess | None:
        """A worker for one call, in fair order rather than whoever wakes first: logins first;
        then the user holding the fewest workers (ten slow checks of one user do not queue
        ahead of another user's one); among those, the binding holding the fewest (a user's
        slow pre-upload checks do not queue ahead of their other events, nor one slow
        scheduled script ahead of another); FIFO among equals. Non-login calls leave
        ``login_reserve`` workers free."""
        with self._cond:
            self._seq += 1
            me = _Waiter(user, login, self._seq, binding)
            self._waiters.append(me)
            try:
                while True:
                    if self._closed:
                        return None
                    w = self._take(login) if self._idle and self._next_waiter() is me else None
                    if w is not None:
                        w.holder = (user, login, binding)
                        self._held_by_user[user] = self._held_by_user.get(user, 0) + 1
                        self._held_by_binding[binding] = self._held_by_binding.get(binding, 0) + 1
                        self._held_other += 0 if login else 1
                        return w
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return None
                    self._cond.wait(remaining)
            finally:
                self._waiters.remove(me)
                self._cond.notify_all()  # the next in line may go now

    def _take(self, login: bool) -> WorkerProcess | None:
        """(lock held) The idle worker a call gets: a login takes a full-priority one if one is
        idle, else any; another call takes a lowered one, or a full-priority one only if more
        of those exist than ``login_reserve`` (after a reload lowered it), so no script another
        user triggers gets a login's priority."""
        if not self.nice:
            return self._idle.pop()
        full = [w for w in self._idle if w.nice == 0]
        lowered = [w for w in self._idle if w.nice != 0]
        if login:
            w = (full or lowered)[-1]
        elif lowered:
            w = lowered[-1]
        elif full and sum(1 for other in self._all if other.nice == 0) > self.login_reserve:
            w = full[-1]
        else:
            return None
        self._idle.remove(w)
        return w

    def set_login_reserve(self, workers: int) -> None:
        """The engine keeps a reserve only while connect/pre-login bindings exist."""
        with self._cond:
            self.login_reserve = max(0, min(int(workers), self.size - 1))
            self._cond.notify_all()

    def set_nice(self, nice: int) -> None:
        """Workers started from now on (replacements, recycled workers) run *nice* steps below
        this process; running workers keep theirs: a process that is not root may lower a
        priority but never raise it back."""
        self.nice = _check_nice(nice)

    def _next_waiter(self) -> _Waiter | None:
        """(lock held) Who gets the next free worker."""
        logins = [w for w in self._waiters if w.login]
        if logins:
            return logins[0]
        if self._held_other >= self.size - self.login_reserve:
            return None
        return min(self._waiters, default=None, key=lambda w: (
            self._held_by_user.get(w.user, 0), self._held_by_binding.get(w.binding, 0), w.seq))

    def _release(self, w: WorkerProcess, disposition: str) -> None:
        with self._cond:
            user, login, binding = w.holder
            for held, key in ((self._held_by_user, user), (self._held_by_binding, binding)):
                n = held.get(key, 0) - 1
                if n > 0:
                    held[key] = n
                else:
                    held.pop(key, None)
            self._held_other -= 0 if login else 1
            self._cond.notify_all()
            self._calls += 1
            w.calls += 1
            keep = (disposition == "keep" and w.calls < self.max_calls_per_worker
                    and not self._closed)
            if keep:
                self._idle.append(w)
                return
        self._discard(w, kill=disposition == "kill" or self._closed)

    def _death_cause(self, w: WorkerProcess) -> tuple[str, str]:
        """Why a worker's channel closed: (error_kind, detail). Reaps it."""
        try:
            rc = w.proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            w.kill()
            w.proc.wait()
            return "garbage", "the worker closed its channel but did not exit"
        if self._closed:
            return "crash", "the script worker pool was closed during the call"
        if rc < 0:
            sig = -rc
            if sig in (signal.SIGXCPU, signal.SIGPROF):
                return "cpu", "CPU limit"
            try:
                name = signal.Signals(sig).name
            except ValueError:
                name = f"signal {sig}"
            return "crash", f"the script worker died ({name})"
        return "crash", f"the script worker exited with status {rc}"

    # --- compile ------------------------------------------------------------------------------

    def compile(self, script: ScriptSource, timeout: float = 10.0) -> CompileResult:
        """Compile *script* in a worker (never in this process)."""
        _check_script(script)
        name = script.name
        size = len(script.text.encode("utf-8", "surrogatepass"))
        if size > MAX_SOURCE_BYTES:
            return CompileResult(False, [f"{name}:1: script is too large ({size} bytes; the "
                                         f"limit is {MAX_SOURCE_BYTES} bytes)"], [])
        deadline = time.monotonic() + timeout
        w = self._acquire(deadline)
        if w is None:
            return CompileResult(False, [f"{name}:1: no script worker became free within "
                                         f"{timeout:g} s"], [])
        disposition = "keep"
        try:
            w.send({"t": "compile", "name": name, "digest": script.digest,
                    "source": script.text, "cpu": timeout}, deadline)
            reply = w.recv(deadline)
            ok, errors, functions = _parse_compiled(reply)
            if ok:
                w.known.add((name, script.digest))
            return CompileResult(ok, errors, functions)
        except _Deadline:
            disposition = "kill"
            return CompileResult(False, [f"{name}:1: compiling took longer than {timeout:g} s"], [])
        except _Gone:
            disposition = "dead"
            kind, detail = self._death_cause(w)
            msg = (f"compiling exceeded the CPU limit ({timeout:g} s)" if kind == "cpu"
                   else f"compiling failed: {detail}")
            return CompileResult(False, [f"{name}:1: {msg}"], [])
        except proto.ProtocolError as e:
            disposition = "kill"
            return CompileResult(False, [f"{name}:1: the script worker sent an invalid reply ({e})"], [])
        finally:
            self._release(w, disposition)

    # --- call -----------------------------------------------------------------------------------

    def call(self, req: CallRequest) -> CallResult:
        """Run one handler in a worker. Thread-safe; blocks up to req.timeout.

        Never raises for anything the script does; raises TypeError or
        ValueError for a malformed request (a bug in the caller)."""
        t0 = time.monotonic()
        _check_request(req)
        name = req.script.name
        deadline = t0 + req.timeout
        caps = sorted(req.capabilities)
        msg: dict[str, Any] = {
            "t": "call", "name": name, "digest": req.script.digest, "function": req.function,
            "event": req.event, "caps": caps, "cpu": req.cpu_time, "fd": False,
        }

        event_name = str(req.event.get("name", ""))
        w = self._acquire(deadline, str(req.event.get("user") or ""), event_name in LOGIN_EVENTS,
                          f"{name}:{req.function}")
        queued = time.monotonic() - t0
        if w is None:
            with self._cond:
                closed, last = self._closed, self._last_error
            if closed:
                return _error(t0, "crash", f"{name}: the script worker pool is closed")
            detail = f" (last worker start error: {last})" if last and not self._all else ""
            return replace(_error(t0, "timeout", f"{name}: no script worker became free within "
                                                 f"{req.timeout:g} s{detail}"), queued=queued)
        fd: int | None = None
        disposition = "dead"
        try:
            if req.file is not None and "read" in req.capabilities:
                try:
                    fd = req.file()
                    if type(fd) is not int or fd < 0:
                        raise TypeError(f"the file opener returned {fd!r}, not a file descriptor")
                except Exception as e:  # noqa: BLE001 - reported to the script on use
                    fd = None
                    # No filename: the server's real paths are none of the script's business.
                    detail = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
                    msg["file_error"] = f"{type(e).__name__}: {detail}"[:300]
                    log.warning("script %s: opening the event's file failed: %s", name, e)
            msg["fd"] = fd is not None
            if (name, req.script.digest) not in w.known:
                msg["source"] = req.script.text
            try:
                result, disposition = self._exchange(w, req, msg, fd, deadline, t0)
                result = replace(result, queued=queued)
            except _BadRequest as e:
                disposition = "keep"
                raise TypeError(f"CallRequest.event is not JSON data ({e})") from None
            return result
        finally:
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
            self._release(w, disposition)

    def _exchange(self, w: WorkerProcess, req: CallRequest, msg: dict[str, Any], fd: int | None,
                  deadline: float, t0: float) -> tuple[CallResult, str]:
        name = req.script.name
        ccall: CapabilityCall | None = None
        rpcs = 0
        sent_source = "source" in msg
        try:
            try:
                w.send(msg, deadline, fd)
            except (TypeError, ValueError) as e:   # not encodable: nothing was sent
                raise _BadRequest(str(e)) from None
            while True:
                reply = w.recv(deadline)
                kind = reply.get("t")
                if kind == "result":
                    result = self._parse_result(reply, req, t0)
                    if result.error_kind != "compile":
                        w.known.add((name, req.script.digest))
                        if len(w.known) > proto.CODE_CACHE_SIZE:
                            w.known.clear()
                    return result, ("retire" if result.error_kind == "memory" else "keep")
                if kind == "rpc":
                    rpcs += 1
                    if rpcs > self.max_rpc_per_call:
                        return _error(t0, "exception",
                                      f"{name}: more than {self.max_rpc_per_call} capability "
                                      f"calls in one handler call (worker stopped)"), "kill"
                    if ccall is None:
                        ccall = CapabilityCall(script=name, function=req.function,
                                               event=req.event,
                                               granted=frozenset(req.capabilities),
                                               context=req.context)
                    answer = self.capabilities.serve(ccall, reply)
                    try:
                        w.send(answer, deadline)
                    except (TypeError, ValueError):   # a handler returned non-JSON data
                        log.error("capability %r returned non-JSON data", reply.get("cap"))
                        w.send({"t": "rpc-reply", "ok": False, "etype": "RuntimeError",
                                "error": "internal error in a capability"}, deadline)
                elif kind == "need-source" and not sent_source:
                    sent_source = True
                    w.send({"t": "source", "text": req.script.text}, deadline)
                else:
                    raise proto.ProtocolError(f"unexpected message type {str(kind)[:40]!r}")
        except _Deadline:
            return _error(t0, "timeout", f"{name}: {req.function} exceeded its "
                                         f"{req.timeout:g} s wall-clock limit (worker killed)"), "kill"
        except _Gone:
            kind, detail = self._death_cause(w)
            if kind == "cpu":
                text = f"{name}: {req.function} exceeded its {req.cpu_time:g} s CPU limit (worker killed)"
            else:
                text = f"{name}: {req.function}: {detail}"
            return _error(t0, kind, text), "dead"
        except proto.ProtocolError as e:
            return _error(t0, "garbage", f"{name}: the script worker sent an invalid "
                                         f"reply ({e}); worker replaced"), "kill"

    def _parse_result(self, reply: dict[str, Any], req: CallRequest, t0: float) -> CallResult:
        """Validate a worker's result field by field (the worker is untrusted)."""
        verdict = reply.get("verdict")
        reason = reply.get("reason")
        kind = reply.get("error_kind")
        line = reply.get("error_line")
        raw_logs = reply.get("logs")
        if verdict not in ("allow", "veto", "error") or type(reason) is not str \
                or type(raw_logs) is not list:
            raise proto.ProtocolError("malformed result")
        if verdict == "error":
            if kind not in _WORKER_REPORTED_KINDS:
                raise proto.ProtocolError("malformed error kind")
        elif kind is not None:
            raise proto.ProtocolError("error kind on a non-error verdict")
        if line is not None and (type(line) is not int or not 0 <= line < 10**7):
            raise proto.ProtocolError("malformed error line")
        logs = _parse_logs(raw_logs)
        if verdict == "veto":
            reason = _clean(reason.strip(), MAX_VETO_REASON).strip() \
                or f"denied by script {req.script.name}"
            line = None
        elif verdict == "error":
            reason = _clean(reason, MAX_ERROR_CHARS)
        else:
            reason, line = "", None
        return CallResult(verdict, reason, logs, kind, line, time.monotonic() - t0)


# --- helpers ---------------------------------------------------------------------------


def _resolve_account(user: str | int | None, group: str | int | None) -> tuple[int, int] | None:
    """(uid, gid) workers drop to, or None (they stay this process's account)."""
    if user is None and group is None:
        return None
    import grp
    import pwd
    if user is None:
        uid = os.getuid()
        default_gid = os.getgid()
    elif isinstance(user, int):
        uid = user
        try:
            default_gid = pwd.getpwuid(user).pw_gid
        except KeyError:
            default_gid = user
    else:
        pw = pwd.getpwnam(user)
        uid, default_gid = pw.pw_uid, pw.pw_gid
    if group is None:
        gid = default_gid
    elif isinstance(group, int):
        gid = group
    else:
        gid = grp.getgrnam(group).gr_gid
    return uid, gid


def _check_nice(nice: int) -> int:
    if type(nice) is not int or not 0 <= nice <= 19:
        raise ValueError("nice must be an int from 0 to 19")
    return nice


def _error(t0: float, kind: str, reason: str) -> CallResult:
    return CallResult("error", _clean(reason, MAX_ERROR_CHARS), [], kind, None,
                      time.monotonic() - t0)


def _parse_logs(raw: list[Any]) -> list[LogLine]:
    out: list[LogLine] = []
    total = 0
    dropped = 0
    for item in raw:
        if type(item) is not list or len(item) != 2 or type(item[0]) is not str \
                or type(item[1]) is not dict:
            raise proto.ProtocolError("malformed log line")
        message = _clean(item[0], MAX_LOG_LINE_CHARS)
        fields = _clean_fields(item[1], 0)
        size = len(message) + (len(json.dumps(fields)) if fields else 0)
        if len(out) >= MAX_LOG_LINES + 1 or total + size > MAX_LOG_BYTES + 1024:
            dropped += 1
            continue
        total += size
        out.append(LogLine(message, fields))
    if dropped:
        out.append(LogLine(f"log truncated by the server: {dropped} line(s) dropped", {}))
    return out


def _clean_fields(value: Any, depth: int) -> Any:
    """Log fields with control characters removed from every string (they end
    up in text log lines), and a bounded depth. Raises ProtocolError if deeper."""
    if depth > 16:
        raise proto.ProtocolError("log fields nested too deeply")
    t = type(value)
    if t is str:
        return value.translate(_CONTROL)
    if t is dict:
        return {k.translate(_CONTROL): _clean_fields(v, depth + 1) for k, v in value.items()}
    if t is list:
        return [_clean_fields(v, depth + 1) for v in value]
    return value


def _parse_compiled(reply: dict[str, Any]) -> tuple[bool, list[str], list[str]]:
    if reply.get("t") != "compiled":
        raise proto.ProtocolError("unexpected reply to compile")
    ok, errors, functions = reply.get("ok"), reply.get("errors"), reply.get("functions")
    if type(ok) is not bool or type(errors) is not list or type(functions) is not list \
            or any(type(e) is not str for e in errors) \
            or any(type(f) is not str or not _IDENT.match(f) for f in functions):
        raise proto.ProtocolError("malformed compile result")
    errors = [_clean(e, 1000) for e in errors[:_MAX_COMPILE_ERRORS]]
    if ok == bool(errors):
        raise proto.ProtocolError("inconsistent compile result")
    return ok, errors, functions[:10_000] if ok else []


def _check_script(script: Any) -> None:
    if not isinstance(script, ScriptSource):
        raise TypeError("script must be a ScriptSource")
    if type(script.name) is not str or not script.name or type(script.text) is not str:
        raise TypeError("ScriptSource.name and .text must be non-empty str")
    if type(script.digest) is not str or not _HEX64.match(script.digest):
        raise ValueError("ScriptSource.digest must be the sha256 hex digest of the text")


def _check_request(req: Any) -> None:
    if not isinstance(req, CallRequest):
        raise TypeError("req must be a CallRequest")
    _check_script(req.script)
    if type(req.function) is not str or not _IDENT.match(req.function):
        raise ValueError(f"invalid handler function name {req.function!r}")
    if not isinstance(req.event, dict):
        raise TypeError("CallRequest.event must be a dict (Event.to_dict())")
    unknown = set(req.capabilities) - KNOWN_CAPABILITIES
    if unknown:
        raise ValueError(f"unknown capabilities: {', '.join(sorted(map(str, unknown)))}")
    for attr in ("timeout", "cpu_time"):
        value = getattr(req, attr)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1e6:
            raise ValueError(f"CallRequest.{attr} must be a positive number of seconds")
    if req.file is not None and not callable(req.file):
        raise TypeError("CallRequest.file must be a FileOpener or None")

"""``api.run(name, *args)``: run a command named in ``[commands]``, never a shell.

A script can only pick a command the admin named in the config and fill the
placeholders of its argv template; it never chooses the program. The command
runs:

* from an argv list (``shell=False`` always; ``;``, ``$(...)``, quotes and
  globs in arguments are plain characters),
* in a new process group that is killed (SIGKILL) on timeout,
* ``[scripts] nice`` steps below the daemon's CPU priority, like the script
  workers (set the moment it has started: see :func:`lower_priority`),
* with a clean environment (``PATH`` only) and stdin from /dev/null (or the
  event's open file, ``stdin = "file"``), in ``/``,
* with stdout and stderr each capped at ``max_output`` bytes (the rest is
  read and dropped, so the command never blocks on a full pipe).

Placeholders (see docs/scripting.md): ``{path}`` the event's file as
``/dev/fd/N``, opened by the server and inherited by the command (never a path
to look up again: a user could swap a moved relative symlink into it),
``{vpath}`` the event's virtual path, ``{user}`` the event's user,
``{0}``, ``{1}``... the script's arguments, and an argv element that is exactly
``{args}`` expands to all of them. ``{{`` and ``}}`` are literal braces.
"""

from __future__ import annotations

import logging
import os
import re
import selectors
import signal
import subprocess
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from scriptsftp.server.contract.script_settings import COMMAND_PLACEHOLDER

from .capabilities import CapabilityCall, CapabilityError

log = logging.getLogger("scriptsftp.scripting.run")

CLEAN_PATH = "/usr/local/bin:/usr/bin:/bin"
MAX_ARG_CHARS = 64 * 1024
#: Seconds kept back from the handler's own deadline, so the reply still gets to the worker.
DEADLINE_MARGIN = 0.25
#: Seconds the output is still read after the command exited (a child may hold the pipes).
EXIT_GRACE = 0.5

_PLACEHOLDER = COMMAND_PLACEHOLDER
# The template rules are checked at config load (server/contract/script_settings.py command_template_problems).


@dataclass(frozen=True)
class CallInfo:
    """What the engine tells capability handlers about the call being served
    (``CallRequest.context``)."""

    deadline: float                                # time.monotonic() when the handler is killed
    file: Callable[[], int] | None = None          # opens the event's file read-only (fd)
    event: dict[str, Any] | None = None


def expand(argv: list[str], args: list[str], named: dict[str, Callable[[], str]]) -> list[str]:
    """Fill an argv template; raise CapabilityError for a missing or unused argument."""
    used: set[int] = set()
    out: list[str] = []
    for item in argv:
        if item == "{args}":
            out.extend(args)
            used.update(range(len(args)))
            continue

        def repl(m: re.Match[str]) -> str:
            text = m.group(0)
            if text == "{{":
                return "{"
            if text == "}}":
                return "}"
            key = m.group(1)
            if key.isdigit():
                n = int(key)
                if n >= len(args):
                    raise CapabilityError(f"this command needs argument {{{n}}} but {len(args)} "
                                          f"argument(s) were given", "TypeError")
                used.add(n)
                return args[n]
            return named[key]()

        out.append(_PLACEHOLDER.sub(repl, item))
    unused = set(range(len(args))) - used
    if unused:
        raise CapabilityError(f"this command takes {len(used)} argument(s) but {len(args)} were given",
                              "TypeError")
    return out


class RunCapability:
    """Parent-side handler of ``api.run``. ``commands`` returns the current
    ``[commands]`` table (so a reload applies to the next call)."""

    def __init__(self, commands: Callable[[], Mapping[str, Any]], nice: Callable[[], int] = lambda: 0) -> None:
        self.commands = commands
        self.nice = nice   # [scripts] nice, read at each call (a reload applies to the next one)

    def __call__(self, call: CapabilityCall, op: str, args: list) -> Any:
        if op != "run" or not args:
            raise CapabilityError("api.run(name, *args)", "TypeError")
        name, rest = args[0], args[1:]
        if type(name) is not str:
            raise CapabilityError("api.run(name, *args): name must be a str", "TypeError")
        spec = self.commands().get(name)
        if spec is None:
            known = ", ".join(sorted(self.commands())) or "none"
            raise CapabilityError(f"no command named {name[:80]!r} in [commands] (configured: {known})",
                                  "PermissionError")
        for i, a in enumerate(rest):
            if type(a) is not str:
                raise CapabilityError(f"api.run({name!r}, ...): argument {i} must be a str, "
                                      f"not {type(a).__name__}", "TypeError")
            if "\x00" in a:
                raise CapabilityError(f"api.run({name!r}, ...): argument {i} contains a NUL byte",
                                      "ValueError")
            if len(a) > MAX_ARG_CHARS:
                raise CapabilityError(f"api.run({name!r}, ...): argument {i} is longer than "
                                      f"{MAX_ARG_CHARS} characters", "ValueError")
            if a.startswith("-") and not spec.allow_dash_args:
                raise CapabilityError(f"api.run({name!r}, ...): argument {i} starts with '-' and the program "
                                      f"would read it as an option; [commands.{name}] allow_dash_args = true "
                                      "permits it", "ValueError")
        info = call.context if isinstance(call.context, CallInfo) else None
        event = call.event or {}
        fds: list[int] = []

        def open_event_file(what: str) -> int:
            opener = info.file if info is not None else None
            if opener is None:
                raise CapabilityError(f"{what} is only available for events about a file "
                                      "(e.g. pre-publish, post-upload)", "ValueError")
            return opener()

        def real_path() -> str:
            fd = open_event_file("{path}")
            fds.append(fd)
            # The opener went through the Session's confinement. The command gets that open
            # file, not a path to look up again: between a lookup and the command's open, a
            # user could rename a relative symlink into the path and point it outside the home.
            return f"/dev/fd/{fd}"

        named = {"path": real_path, "vpath": lambda: str(event.get("path") or ""),
                 "user": lambda: str(event.get("user") or "")}
        try:
            stdin_fd = None
            if spec.stdin == "file":
                stdin_fd = open_event_file('stdin = "file"')
                fds.append(stdin_fd)
            argv = expand(list(spec.argv), rest, named)
            if any("\x00" in a for a in argv):
                raise CapabilityError("the expanded command line contains a NUL byte", "ValueError")
            timeout = spec.timeout
            if info is not None:
                timeout = min(timeout, info.deadline - time.monotonic() - DEADLINE_MARGIN)
            if timeout <= 0:
                raise CapabilityError(f"no time left to run {name!r} within the handler's timeout",
                                      "TimeoutError")
            return run_command(name, argv, timeout=timeout, max_output=spec.max_output, script=call.script,
                               pass_fds=tuple(fds), stdin=stdin_fd, nice=self.nice())
        finally:
            for fd in fds:
                os.close(fd)


def run_command(name: str, argv: list[str], *, timeout: float, max_output: int, script: str = "",
                pass_fds: tuple[int, ...] = (), stdin: int | None = None, nice: int = 0) -> dict[str, Any]:
    """Run argv; return code/stdout/stderr/truncated, or raise CapabilityError on timeout.
    ``nice``: CPU priority steps below this thread's the command runs at."""
    t0 = time.monotonic()
    try:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL if stdin is None else stdin,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            # its own process group (killed as one), in the daemon's session: with the kernel's
            # autogroups a session of its own would be ranked apart and its nice value ignored
            env={"PATH": CLEAN_PATH}, cwd="/", close_fds=True, pass_fds=pass_fds, process_group=0,
            shell=False,
        )
        lower_priority(proc.pid, nice)
    except OSError as exc:
        log.error("script %s: command %s could not start: %s", script, name, exc.strerror or exc)
        raise CapabilityError(f"command {name!r} could not start: {exc.strerror or exc}", "OSError") from None
    out: dict[Any, bytearray] = {proc.stdout: bytearray(), proc.stderr: bytearray()}  # both pipes
    truncated = False
    timed_out = False
    sel = selectors.DefaultSelector()
    for f in out:
        sel.register(f, selectors.EVENT_READ)
    deadline = t0 + timeout
    exited_at: float | None = None
    try:
        while sel.get_map():
            now = time.monotonic()
            remaining = deadline - now
            if remaining <= 0:
                timed_out = True
                break
            if exited_at is None and proc.poll() is not None:
                exited_at = now
            if exited_at is not None and now - exited_at > EXIT_GRACE:
                break  # the command ended; a background child still holds its output open
            for key, _ in sel.select(min(remaining, 0.2 if exited_at is None else EXIT_GRACE)):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                buf = out[key.fileobj]
                room = max_output - len(buf)
                if room < len(chunk):
                    truncated = True
                buf += chunk[:max(room, 0)]
        if not timed_out:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                timed_out = True
    finally:
        sel.close()
        _kill_group(proc)  # the timed-out command, or what it left running in the background
        for f in out:
            f.close()
        proc.wait()
    secs = time.monotonic() - t0
    if timed_out:
        log.warning("script %s: command %s killed after %.1fs (timeout)", script, name, secs)
        raise CapabilityError(f"command {name!r} timed out after {timeout:.3g} s (killed)", "TimeoutError")
    log.info("script %s: command %s exited %s in %.2fs", script, name, proc.returncode, secs,
             extra={"script": script})
    return {"code": proc.returncode, "stdout": out[proc.stdout].decode("utf-8", "replace"),
            "stderr": out[proc.stderr].decode("utf-8", "replace"), "truncated": truncated,
            "duration": round(secs, 3)}


def lower_priority(pid: int, steps: int) -> None:
    """Set *pid* *steps* nice levels below the calling thread, just after it started.

    The command has begun by then (Popen returns after its exec), so its first instant runs
    at the daemon's priority, and a child it forks within that instant keeps it; what it
    forks later inherits the lower one. Raising a nice value needs no privilege; the
    command may already have exited (nothing to do)."""
    if steps <= 0:
        return
    try:
        os.setpriority(os.PRIO_PROCESS, pid, min(19, os.getpriority(os.PRIO_PROCESS, 0) + steps))
    except (ProcessLookupError, PermissionError):
        pass


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass

"""The SSH workers' template process: it forks every worker started after the daemon's first.

Why: a worker forked from the daemon shares the daemon's imported code (Python,
paramiko, OpenSSL) until it writes to it, so about 3 MB of its 45 MB RSS is its
own. The daemon may fork only while it has a single thread (a child of a threaded
process can inherit a lock some other thread held), which is true only at start.
A worker started later (the replacement of one that died, or of one retired
because it grew) was therefore a new program, with all of its 40 MB its own.
The template is forked once, at start, never starts a thread, and forks each
later worker from itself: those share the same pages as the first ones.

It holds what the daemon held when it was forked, like the first workers, and
reads nothing from clients. It exits when the daemon closes its socket or dies.
If it is gone, the pool falls back to starting new programs (worker_pool.py).
"""

from __future__ import annotations

import gc
import logging
import os
import select
import signal
import socket
import subprocess
import threading
import time
from typing import Any

from scriptsftp.server.contract import framing

log = logging.getLogger("scriptsftp.ssh")

MAX_MESSAGE = 1 << 20
SPAWN_TIMEOUT = 10.0


class Zygote:
    """The daemon's end: ask for a worker (:meth:`spawn`), learn how workers ended."""

    def __init__(self, close: list[socket.socket]) -> None:
        """Fork the template now: the caller must have no other thread. ``close``: the
        daemon's sockets the template must not hold (listening sockets, workers' ends)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        # imported before the fork, as for the first workers: its children share these pages
        from scriptsftp.server.frontends.ssh import remote_core, scp, sftp, worker_process  # noqa: F401

        gc.freeze()
        pid = os.fork()
        if pid == 0:
            code = 70
            try:
                ours.close()
                for s in close:
                    s.close()
                code = _serve(theirs)
            except BaseException:
                log.exception("ssh worker template failed")
            finally:
                os._exit(code)
        theirs.close()
        self.pid = pid
        self.control = ours
        self._cond = threading.Condition()
        self._spawned: list[int] = []
        self._exits: dict[int, int] = {}
        self._alive = True
        self._stopped = False
        self._spawn_lock = threading.Lock()

    @property
    def alive(self) -> bool:
        with self._cond:
            return self._alive

    def start(self) -> None:
        """Read the template's messages from now on (a thread: call once threads are allowed)."""
        threading.Thread(target=self._read, name="ssh-template", daemon=True).start()

    def spawn(self, setup: dict, control: socket.socket) -> "TemplateChild":
        """A new worker forked from the template, served on ``control`` (its end of the
        pair), with ``setup`` as a new program would get it. OSError if the template
        cannot do it (gone, or no answer within SPAWN_TIMEOUT)."""
        with self._spawn_lock:  # one request at a time: answers come in order
            with self._cond:
                if not self._alive:
                    raise OSError("the ssh worker template is gone")
                self._spawned.clear()
            framing.send(self.control, {"kind": "spawn", "setup": setup}, [control.fileno()])
            deadline = time.monotonic() + SPAWN_TIMEOUT
            with self._cond:
                while not self._spawned and self._alive:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        self._alive = False  # a template that hangs is not asked again
                        self.stop()
                        raise OSError("the ssh worker template did not answer")
                    self._cond.wait(left)
                if not self._spawned:
                    raise OSError("the ssh worker template is gone")
                return TemplateChild(self._spawned.pop(), self)

    def exit_code(self, pid: int) -> int | None:
        with self._cond:
            return self._exits.get(pid)

    def wait_exit_code(self, pid: int, timeout: float) -> int | None:
        """The code the template reported for ``pid``, waiting up to ``timeout`` for it."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while pid not in self._exits and self._alive:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            return self._exits.get(pid)

    def forget(self, pid: int) -> None:
        with self._cond:
            self._exits.pop(pid, None)

    def _read(self) -> None:
        try:
            while True:
                message, fds = framing.receive(self.control, MAX_MESSAGE)
                framing.close_fds(fds)
                with self._cond:
                    if message.get("kind") == "spawned":
                        self._spawned.append(int(message["pid"]))
                    elif message.get("kind") == "exited":
                        self._exits[int(message["pid"])] = int(message["code"])
                    self._cond.notify_all()
        except (framing.LinkClosed, OSError, ValueError, KeyError, TypeError):
            pass
        with self._cond:
            self._alive = False
            stopped = self._stopped
            self._cond.notify_all()
        try:
            _, status = os.waitpid(self.pid, 0)
        except ChildProcessError:
            status = 0
        if not stopped:
            log.warning("ssh worker template (pid %d) exited with code %s; later workers start as new programs",
                        self.pid, os.waitstatus_to_exitcode(status))

    def stop(self) -> None:
        """The template exits (the workers it started go on until they are told to stop)."""
        with self._cond:  # reentrant: spawn() calls this holding it
            self._stopped = True
        try:
            self.control.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class TemplateChild:
    """What the pool needs of a worker process (as of subprocess.Popen) for one the
    template forked: it is the template's child, so the daemon watches it through a
    pidfd and learns its exit code from the template."""

    def __init__(self, pid: int, template: Zygote) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._template = template
        self._lock = threading.Lock()
        try:
            self._pidfd: int | None = os.pidfd_open(pid)
        except ProcessLookupError:
            self._pidfd = None  # already gone (and reaped): its code is on its way

    def poll(self) -> int | None:
        with self._lock:
            if self.returncode is None:
                code = self._template.exit_code(self.pid)
                if code is None and self._exited():
                    code = -1  # it has ended; its code may still be on its way (wait() waits for it)
                self.returncode = code
            return self.returncode

    def _exited(self) -> bool:
        return self._pidfd is None or _readable(self._pidfd, 0.0)

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            left = 0.5 if deadline is None else min(0.5, deadline - time.monotonic())
            if left <= 0:
                raise subprocess.TimeoutExpired(f"ssh worker {self.pid}", timeout or 0)
            pidfd = self._pidfd
            if pidfd is not None:
                _readable(pidfd, left)  # (closed by another waiter meanwhile: poll() says it ended)
        with self._lock:
            if self.returncode == -1:
                code = self._template.wait_exit_code(self.pid, 1.0)
                self.returncode = -1 if code is None else code
            if self._pidfd is not None:
                os.close(self._pidfd)
                self._pidfd = None
        self._template.forget(self.pid)
        return -1 if self.returncode is None else self.returncode

    def kill(self) -> None:
        with self._lock:
            if self.returncode is not None or self._pidfd is None:
                return
            try:
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _readable(fd: int, timeout: float) -> bool:
    """Whether ``fd`` (a pidfd: readable once the process ended) is readable within ``timeout``
    s. poll(2), not select(2): the daemon's descriptors run past 1024 under load (2,000 in
    the soak bench), and select() refuses those."""
    poller = select.poll()
    try:
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(max(0, int(timeout * 1000))))
    except (OSError, ValueError):
        return True  # closed under us: only once it has ended


def _serve(control: socket.socket) -> int:
    """The template's loop: fork a worker per request, report each worker's end."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.set_wakeup_fd(wake_w)
    poller = select.poll()
    poller.register(control.fileno(), select.POLLIN)
    poller.register(wake_r, select.POLLIN)
    while True:
        readable = [fd for fd, _ in poller.poll(5000)]
        if wake_r in readable:
            try:
                while os.read(wake_r, 512):
                    pass
            except BlockingIOError:
                pass
        _report_exits(control)
        if control.fileno() not in readable:
            continue
        try:
            message, fds = framing.receive(control, MAX_MESSAGE)
        except (framing.LinkClosed, OSError, ValueError):
            return 0  # the daemon is gone or done: its workers notice on their own sockets
        if message.get("kind") != "spawn" or len(fds) != 1 or type(message.get("setup")) is not dict:
            framing.close_fds(fds)
            continue
        pid = os.fork()
        if pid == 0:
            code = 70
            try:
                signal.set_wakeup_fd(-1)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                os.close(wake_r)
                os.close(wake_w)
                control.close()
                code = _run_worker(fds[0], message["setup"])
            except BaseException:
                log.exception("ssh worker failed")
            finally:
                os._exit(code)
        os.close(fds[0])
        framing.send(control, {"kind": "spawned", "pid": pid})


def _report_exits(control: socket.socket) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        try:
            framing.send(control, {"kind": "exited", "pid": pid, "code": os.waitstatus_to_exitcode(status)})
        except OSError:
            return


def _run_worker(fd: int, setup: dict[str, Any]) -> int:
    from scriptsftp.server.frontends.ssh import worker_process
    from scriptsftp.server.support import logs

    logs.setup(setup["log_format"], setup["log_level"])
    return worker_process.serve(socket.socket(fileno=fd), setup)

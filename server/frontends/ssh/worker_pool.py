"""SSH served by several worker processes: the listener of ``[sftp] processes`` > 1.

Why: one Python process runs one thread at a time. Measured on 2 cores with 20
parallel curl uploads, one process reached 71-78 MB/s with a fifth of the CPU
idle and 13 CPU-s per GiB (20 transport threads contending for one GIL); two
processes reached 123-150 MB/s at 7.5 CPU-s per GiB (docs/architecture.md rule 10).

How: the core accepts, so that the defender, the connection caps and the client
address stay its own, and hands each connection to the worker serving the fewest,
with a socket pair that links it to a CoreLink thread here (core_link.py). A
worker that dies is replaced; its connections end as dropped ones do (their
uploads are aborted here). Workers are started at once but not waited for: a
connection handed to a worker still starting waits in its socket.
"""

from __future__ import annotations

import gc
import itertools
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from scriptsftp.server.contract import framing
from scriptsftp.server.contract.ports import CorePort
from scriptsftp.server.support.worker_accounts import Account
from scriptsftp.server.frontends.ssh.core_link import CoreLink
from scriptsftp.server.support.keys import read_host_key
from scriptsftp.server.frontends.ssh.server import (
    SSHLimits, accept_forever, bind_sockets, bound_names, close_listening, proxied_address,
)
from scriptsftp.server.support.proxy_protocol import TrustedProxies
from scriptsftp.server.frontends.ssh.zygote import TemplateChild, Zygote

log = logging.getLogger("scriptsftp.ssh")

RESTART_DELAY = (0.5, 30.0)  # first and longest wait before replacing a worker that died young
RECYCLE_CHECK_SECONDS = 2.0  # how often the workers' heap size is read (one small /proc file each)
RECYCLE_MIN_INTERVAL = 60.0  # a slot retires its worker at most this often (unless it is idle)
RECYCLE_IDLE_AGE = 10.0  # an idle worker is retired at a quarter of the growth once this old
RECYCLE_SETTLE = 3.0  # a new worker's size is taken this long after its start (its own start-up grows it)
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


class _Forked:
    """The part of subprocess.Popen the pool uses, for a worker forked from the daemon."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._lock = threading.Lock()  # the watcher and shutdown both wait: one reaps, both learn

    def poll(self) -> int | None:
        with self._lock:
            if self.returncode is None:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
                if pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
            return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(f"ssh worker {self.pid}", timeout or 0)
            time.sleep(0.02)
        return self.returncode  # type: ignore[return-value]

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class SSHWorkerProcess:
    """One worker process and the socket the core commands it through.

    ``fork``: the first workers are forked from the daemon while it has no other
    thread yet, and share its already imported code (no second start-up, and
    memory shared until written). A replacement, started while threads run, is a
    new program instead: forking a threaded process can copy a lock some thread
    holds."""

    def __init__(self, index: int, setup: dict, *, fork: bool, inherited: list[socket.socket] | None = None,
                 template: Zygote | None = None) -> None:
        """``inherited``: the daemon's sockets a forked child must close (other workers'
        control ends, the listening sockets: accepting is the core's job). ``template``:
        where a worker started later is forked from (zygote.py); without it, or if it
        fails, the worker is a new program."""
        self.index = index
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.control = ours
        self.started = time.monotonic()
        self.process: _Forked | TemplateChild | subprocess.Popen
        self.base_heap: int | None = None  # its heap size once settled after its start (recycling)
        self.retiring = False  # told to stop once its connections are over; takes no new ones
        program = False
        try:
            if fork:
                self.process = _fork(theirs, setup, close=[ours, *(inherited or [])])
            else:
                spawned: TemplateChild | subprocess.Popen | None = _from_template(template, setup, theirs)
                if spawned is None:
                    program = True
                    if template is not None:  # it may have the old pair's end: a new pair, so it reads EOF
                        ours.close()
                        theirs.close()
                        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                        self.control = ours
                    spawned = subprocess.Popen(
                        [sys.executable, "-m", "scriptsftp.server.frontends.ssh.worker_process",
                         str(theirs.fileno())],
                        pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, close_fds=True, cwd="/",
                    )
                self.process = spawned
        finally:
            theirs.close()
        self._send_lock = threading.Lock()
        self.links = 0  # connections handed to it and not ended yet
        if program:
            self.send(setup)

    def send(self, message: dict, fds: list[int] | tuple[int, ...] = ()) -> None:
        with self._send_lock:
            framing.send(self.control, message, fds)

    def wait_for_exit(self) -> int:
        """Block until the process ends (its control socket reads EOF first)."""
        try:
            while True:
                _, fds = framing.receive(self.control, 1024)
                framing.close_fds(fds)  # a worker sends nothing; stray data is ignored
        except (framing.LinkClosed, OSError, ValueError):
            pass
        code = self.process.wait()
        self.control.close()
        return code


def _from_template(template: Zygote | None, setup: dict, control: socket.socket) -> TemplateChild | None:
    if template is None or not template.alive:
        return None
    try:
        return template.spawn(setup, control)
    except OSError as exc:
        log.warning("ssh worker template: %s; starting the worker as a new program", exc)
        return None


def _fork(control: socket.socket, setup: dict, close: list[socket.socket]) -> _Forked:
    from scriptsftp.server.frontends.ssh import worker_process
    # imported here once, before the fork: the children share these pages instead of importing
    from scriptsftp.server.frontends.ssh import remote_core, scp, sftp  # noqa: F401

    gc.freeze()  # what exists now is never collected in the child: its pages stay shared
    pid = os.fork()
    if pid:
        return _Forked(pid)
    code = 70
    try:
        for s in close:  # the daemon's: a held control end would hide the daemon's death
            s.close()
        code = worker_process.serve(control, setup)
    except BaseException:
        log.exception("ssh worker failed")
    finally:
        os._exit(code)


class SSHWorkerPool:
    """The daemon's SSH listener when SSH runs in ``processes`` worker processes."""

    name = "sftp"

    def __init__(self, addresses: list[tuple[str, int]], host_keys: list[Path], limits: SSHLimits,
                 processes: int, log_format: str, log_level: str, *, account: Account | None = None,
                 state_dir: Path | None = None, proxies: TrustedProxies | None = None,
                 max_growth: int = 0) -> None:
        """Binds and forks the workers at once: build it before anything starts a thread.
        Connections are accepted from :meth:`start` on, once :attr:`core` is set.

        ``max_growth``: bytes of heap a worker may gain over its size once settled before it is
        retired (:meth:`_recycle`); 0: never.
        ``account``: the unprivileged account the workers run as (None: this process's).
        They cannot read the host key files (0600, the daemon's): the key text is read here
        and handed over in the setup message; ``state_dir`` is kept out of their jail."""
        self.core: CorePort[Any, Any] | None = None
        self.account = account
        self.proxies = proxies or TrustedProxies()
        self.limits = limits
        self.sockets = bind_sockets(addresses)
        self._setup = {"kind": "setup", "host_keys": [read_host_key(p) for p in host_keys],
                       "limits": asdict(limits), "log_format": log_format, "log_level": log_level,
                       "deny_under": [str(state_dir.resolve())] if state_dir is not None else [],
                       # the worker drops to it itself, after its imports (jail.drop_privileges)
                       "account": [account.uid, account.gid] if account is not None else None}
        self._workers: list[SSHWorkerProcess] = []
        self._links: set[CoreLink] = set()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._keys = itertools.count(1)
        self.max_growth = max_growth
        self._retired_at: dict[int, float] = {}  # index -> when its last worker was retired
        self.template: Zygote | None = None
        fork = threading.active_count() == 1  # else (a daemon built inside a test, say) start programs
        try:
            if fork:  # first, so that it holds none of the workers' control ends
                self.template = Zygote(close=self.sockets)
            for index in range(processes):
                inherited = [*(w.control for w in self._workers), *self.sockets]
                self._workers.append(SSHWorkerProcess(index, self._setup, fork=fork, inherited=inherited))
        except BaseException:
            self.stop_accepting()
            if self.template is not None:
                self.template.stop()
            raise

    @property
    def bound(self) -> list[str]:
        return bound_names(self.sockets)

    def start(self) -> None:
        assert self.core is not None, "SSHWorkerPool.core not set"
        if self.template is not None:
            log.info("ssh worker template started (pid %d): later workers are forked from it",
                     self.template.pid)
            self.template.start()
        if self.max_growth > 0:
            threading.Thread(target=self._recycle_forever, name="ssh-recycle", daemon=True).start()
        for worker in self._workers:
            log.info("ssh worker %d started (pid %d)", worker.index, worker.process.pid)
            threading.Thread(target=self._watch, args=(worker, 0.0), name=f"ssh-worker-{worker.index}",
                             daemon=True).start()
        for s in self.sockets:
            threading.Thread(target=accept_forever, args=(s, self._stopping, self._accepted), name="ssh-accept",
                             daemon=True).start()

    def _recycle_forever(self) -> None:
        while not self._stopping.wait(RECYCLE_CHECK_SECONDS):
            try:
                self._recycle()
            except Exception:  # a bad sample must not end the check for good
                log.exception("ssh worker memory check failed")

    def _recycle(self) -> None:
        """Retire each worker whose heap grew by more than ``max_growth`` since it settled.

        Why: what a worker's heap has grown to stays with it (glibc and Python keep
        freed memory, fragmented, for reuse): measured after a 10-minute attack, each
        worker stayed 13-16 MB above its size before, for good. A retired worker takes
        no new connection and exits once its last one ends, so no client notices; its
        replacement is forked from the template and starts small. At most one worker per
        slot drains at a time, and a slot retires at most once per RECYCLE_MIN_INTERVAL,
        so a load under which every worker grows fast costs a fork a minute, not a storm.

        A worker with no connection has nothing to drain: one that grew by a quarter of
        ``max_growth`` and is RECYCLE_IDLE_AGE old is retired then, so a pause in the
        traffic gives back what a burst (an attack) left behind."""
        if self.template is None or not self.template.alive:
            return  # a replacement would be a new program: 40 MB of its own for a few MB saved
        now = time.monotonic()
        with self._lock:
            workers = list(self._workers)
        draining = {w.index for w in workers if w.retiring}
        for w in workers:
            if w.retiring or w.process.poll() is not None:
                continue
            heap = _heap_bytes(w.process.pid)
            if heap is None:
                continue
            if w.base_heap is None:
                if now - w.started >= RECYCLE_SETTLE:
                    w.base_heap = heap
                    log.info("ssh worker %d (pid %d) settled at %.1f MB of anonymous memory: retired past +%.1f MB",
                             w.index, w.process.pid, heap / 2**20, self.max_growth / 2**20)
                continue
            grown = heap - w.base_heap
            if w.links == 0 and grown > self.max_growth // 4 and now - w.started >= RECYCLE_IDLE_AGE:
                self._retire(w, grown, idle=True)
            elif (grown > self.max_growth and w.index not in draining
                    and now - self._retired_at.get(w.index, -RECYCLE_MIN_INTERVAL) >= RECYCLE_MIN_INTERVAL):
                self._retire(w, grown)

    def _retire(self, worker: SSHWorkerProcess, grown: int, idle: bool = False) -> None:
        with self._lock:
            if self._stopping.is_set() or worker not in self._workers or idle and worker.links:
                return  # (a connection came to the idle one meanwhile: it is not idle)
            worker.retiring = True
            self._retired_at[worker.index] = time.monotonic()
            links = worker.links
        log.info("ssh worker %d (pid %d) grew by %.1f MB since it settled ([sftp] worker_max_growth%s): "
                 "retiring it once its %d connection(s) end; starting another", worker.index,
                 worker.process.pid, grown / 2**20, ", and has no connection" if idle else "", links)
        try:
            self._start_worker(worker.index, 0.0)
        except Exception:
            log.exception("could not start a worker in place of ssh worker %d; it serves on", worker.index)
            with self._lock:
                worker.retiring = False
            return
        try:
            worker.send({"kind": "stop"})
        except OSError:
            pass  # gone already: its watcher sees it

    def _start_worker(self, index: int, delay: float) -> None:
        with self._lock:
            worker = SSHWorkerProcess(index, self._setup, fork=False, template=self.template)
            self._workers.append(worker)
        log.info("ssh worker %d started (pid %d)", index, worker.process.pid)
        threading.Thread(target=self._watch, args=(worker, delay), name=f"ssh-worker-{index}", daemon=True).start()

    def _watch(self, worker: SSHWorkerProcess, delay: float) -> None:
        code = worker.wait_for_exit()
        with self._lock:
            self._workers.remove(worker)
        if worker.retiring:
            log.info("ssh worker %d (pid %d) retired: its last connection ended", worker.index, worker.process.pid)
            return
        if self._stopping.is_set():
            return
        log.error("ssh worker %d (pid %d) exited with code %s; its connections were dropped; starting another",
                  worker.index, worker.process.pid, code)
        # one that died young may die again at once (e.g. it cannot import): do not spin
        young = time.monotonic() - worker.started < 10
        delay = min(max(delay * 2, RESTART_DELAY[0]), RESTART_DELAY[1]) if young else 0.0
        if self._stopping.wait(delay):
            return
        self._start_worker(worker.index, delay)

    def _accepted(self, client: socket.socket, addr: tuple) -> None:
        if self.proxies.trusts(addr[0]):
            # its PROXY header is read here (the client's address is the core's to know), in a
            # thread of its own: a slow proxy must not hold up the accepting thread
            threading.Thread(target=self._proxied, args=(client, addr), name=f"ssh-proxy-{addr[0]}",
                             daemon=True).start()
            return
        self._accept_from(client, addr)

    def _proxied(self, client: socket.socket, addr: tuple) -> None:
        # the header's share of the login grace is not given back: the worker's grace starts anew
        proxied = proxied_address(client, addr, self.proxies, time.monotonic() + self.limits.login_grace)
        if proxied is None:
            client.close()
            return
        self._accept_from(client, proxied)

    def _accept_from(self, client: socket.socket, addr: tuple) -> None:
        try:
            self._hand_over(client, addr)
        except OSError as exc:
            log.error("could not hand a connection from %s to an ssh worker: %s", addr[0], exc)
        finally:
            client.close()  # the worker has its own copy

    def _hand_over(self, client: socket.socket, addr: tuple) -> None:
        with self._lock:
            alive = [w for w in self._workers if w.process.poll() is None]
            # a retiring worker still serves if it is all there is (its replacement is starting)
            workers = [w for w in alive if not w.retiring] or alive
            if not workers:
                raise OSError("no ssh worker is running")
            worker = min(workers, key=lambda w: w.links)
            worker.links += 1
        key = next(self._keys)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        assert self.core is not None
        link = CoreLink(self.core, ours, addr, client.getsockname()[1],
                        kick=lambda reason: self._kick(worker, key, reason))
        with self._lock:
            self._links.add(link)
        try:
            worker.send({"kind": "conn", "key": key, "addr": list(addr[:2])}, [client.fileno(), theirs.fileno()])
        except OSError:
            ours.close()  # the link thread below is never started: undo
            with self._lock:
                self._links.discard(link)
                worker.links -= 1
            raise
        finally:
            theirs.close()
        threading.Thread(target=self._serve_link, args=(worker, link), name=f"ssh-link-{addr[0]}",
                         daemon=True).start()

    def _serve_link(self, worker: SSHWorkerProcess, link: CoreLink) -> None:
        try:
            link.serve()
        finally:
            link.sock.close()
            with self._lock:
                self._links.discard(link)
                worker.links -= 1

    def _kick(self, worker: SSHWorkerProcess, key: int, reason: str) -> None:
        try:
            worker.send({"kind": "kick", "key": key, "reason": reason})
        except OSError:
            pass  # the worker is gone, and the connection with it

    def _tell_all(self, message: dict) -> None:
        with self._lock:
            workers = list(self._workers)
        for w in workers:
            try:
                w.send(message)
            except OSError:
                pass

    def set_logging(self, log_format: str, log_level: str) -> None:
        """A reload changed ``[server] log_format``/``log_level``: the workers switch now,
        and a replacement worker starts with the new values."""
        self._setup["log_format"], self._setup["log_level"] = log_format, log_level
        self._tell_all({"kind": "logs", "log_format": log_format, "log_level": log_level})

    def stop_accepting(self) -> None:
        """No new connections; each worker exits once its connections are over."""
        self._stopping.set()
        close_listening(self.sockets)
        self._tell_all({"kind": "stop"})

    def active(self) -> int:
        with self._lock:
            return len(self._links)

    def close_all(self, reason: str) -> None:
        self._tell_all({"kind": "close_all", "reason": reason})

    def join(self, timeout: float) -> None:
        """Wait for the workers to exit (after close_all); kill those that do not."""
        deadline = time.monotonic() + timeout
        with self._lock:
            workers = list(self._workers)
        for w in workers:
            try:
                w.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("ssh worker %d (pid %d) did not exit; killing it", w.index, w.process.pid)
                w.process.kill()
                w.process.wait()
        if self.template is not None:
            self.template.stop()


def _heap_bytes(pid: int) -> int | None:
    """Anonymous resident memory (RSS less file-backed pages) from /proc/PID/statm, readable
    whatever account the worker runs as. The file-backed part is code and libraries, shared
    with the daemon, which a fresh fork faults in as it runs (~7 MB in its first seconds,
    with no client): counting it would retire workers that only warmed up."""
    try:
        fields = Path(f"/proc/{pid}/statm").read_text().split()
    except OSError:
        return None
    return (int(fields[1]) - int(fields[2])) * PAGE_SIZE


def worker_count(setting: int | str) -> int:
    """``processes``: a number, or "auto" (one per CPU this process may run on)."""
    if setting == "auto":
        try:
            return len(os.sched_getaffinity(0))
        except AttributeError:
            return os.cpu_count() or 1
    return int(setting)

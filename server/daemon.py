"""Wiring: build the server from a validated config, run it, reload it, stop it.

Signals: SIGTERM/SIGINT stop accepting, give running transfers
``[server] grace_period`` seconds, then close what is left; SIGHUP reloads
the config without dropping sessions; SIGUSR2 drains (as ``scriptsftp drain``
does through the admin API): stop accepting, answer ``/healthz`` "draining",
let open sessions end by themselves for ``[server] drain_timeout`` seconds,
end those left (their unfinished uploads discarded), stop, exit status 0.

A reload applies every changed key that
can change live and logs, per key, those that need a restart (reload_plan.py);
a config that fails validation, or a reload any step of which fails (a bound
script that does not compile, say), is refused as a whole and the running
config stays.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from scriptsftp.server import __version__

from scriptsftp.server.support import memory
from scriptsftp.server.support.proxy_protocol import TrustedProxies
from scriptsftp.server.support.worker_accounts import WORKER_ACCOUNT, Account, script_worker_account, worker_account
from scriptsftp.server.ops.audit import AuditTrail, RefusalRecorder, ScriptAuditRecorder
from scriptsftp.server.support.config import AdminSection, ConfigError, LoadedConfig, load_config
from scriptsftp.server.ops.defender import Defender
from scriptsftp.server.contract.dispatch import SwappableDispatcher
from scriptsftp.server.contract.scripting import NullEngine, ScriptEngineLifecycle
from scriptsftp.server.contract.state import StateName
from scriptsftp.server.core.script_files import ScriptSessions
from scriptsftp.server.support.keys import ensure_host_keys, fingerprint, load_host_key
from scriptsftp.server.core.accounts import TomlAccountSource, UserRecord
from scriptsftp.server.core.homes import HomePolicy, ensure_home
from scriptsftp.server.core.login import LoginCore
from scriptsftp.server.core.passwords import ensure_generated_passwords
from scriptsftp.server.core.publish import UploadPolicy
from scriptsftp.server.support.listen import Listener, Reconfigurable, listen_addresses
from scriptsftp.server.support.listen_check import check_listen_addresses
from scriptsftp.server.frontends.ssh import paramiko_ext
from scriptsftp.server.frontends.ssh.server import SSHLimits, SSHListener
from scriptsftp.server.frontends.ssh.worker_pool import SSHWorkerPool, worker_count
from scriptsftp.server.core.publish import Publisher
from scriptsftp.server.core.quota import QuotaHolder, Quotas
from scriptsftp.server.ops.node_registry import Heartbeat, NodeRegistry, NodeReport, cluster_view
from scriptsftp.server.ops.reload_plan import ReloadPlan, config_hash, key_label, plan_reload, write_running
from scriptsftp.server.core.staging import CHECKING, StagingRecords, discard_leftovers
from scriptsftp.server.core.staging_lease import LeaseKeeper
from scriptsftp.server.core.storage import LocalStorage, StorageOpener
from scriptsftp.server.stores import StateStores
from scriptsftp.server.stores.cluster_sessions import ClusterSessions
from scriptsftp.server.stores.migrations import SchemaTooNew
from scriptsftp.server.stores.accounts_db import (
    AccountDb, AccountError, StoredUser, DatabaseAccountSource, MergedAccountSource, file_names_of, name_conflicts,
)
from scriptsftp.server.stores.sql import redact_url
from scriptsftp.server.ops.account_watch import AccountWatcher

log = logging.getLogger("scriptsftp.daemon")


# Listeners beside SSH, by config section: each module has a ``make_listener`` that takes its
# port and its section (never the daemon; see Daemon._front_end_listener) and is imported only
# when its section is enabled (so pyftpdlib/aiohttp are not loaded by an SFTP-only server).
FRONT_ENDS = {
    "ftp": "scriptsftp.server.frontends.ftp.listener",
    "http": "scriptsftp.server.frontends.http.server",
    "admin": "scriptsftp.server.ops.admin",
}


def _front_end(name: str):  # -> module with make_listener
    import importlib

    return importlib.import_module(FRONT_ENDS[name])


def enabled_listen_addresses(m: Any) -> dict[str, list[tuple[str, int]]]:
    """Every enabled listener's addresses, by config section."""
    out = {"sftp": listen_addresses(m.sftp.listen)} if m.sftp.enabled else {}
    for name in FRONT_ENDS:
        section = getattr(m, name)
        if section.enabled:
            out[name] = listen_addresses(section.listen)
    return out


def _password_announcer(state_dir: Path) -> Callable[[str, str, Path], None]:
    """How a generated password reaches the admin, once; only its hash is kept.

    On a terminal: printed there. Otherwise (systemd, a pipe, a JSON log collector) a
    banner would put the plaintext into the journal or Loki and break a JSON log: it is
    written to a 0600 file under state_dir instead, and the log says where."""

    def announce(user: str, password: str, path: Path) -> None:
        if sys.stderr.isatty():
            bar = "=" * 64
            print(f"\n{bar}\n  First start: generated a password for user '{user}':\n\n      {password}\n\n"
                  f"  It is shown only this once; its argon2id hash is in {path}.\n"
                  f"  Delete that file and restart to generate a new one.\n{bar}\n", file=sys.stderr, flush=True)
            return
        note = state_dir / "generated-passwords" / f"{user}.txt"
        note.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(note, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(password + "\n")
        log.warning("generated a password for user %r (its hash is in %s): read it from %s, then delete "
                    "that file", user, path, note)

    return announce


#: seconds between two chances for the main loop to return freed heap to the system
TRIM_INTERVAL = 10.0
#: seconds between two "draining:" progress lines while nothing changes
DRAIN_REPORT_INTERVAL = 10.0


@dataclass
class DrainState:
    """A drain under way: since when, and when what is left gets ended."""

    started: float      # Unix time
    deadline: float     # Unix time
    sessions_at_start: int


class Daemon:
    def __init__(self, cfg: LoadedConfig, engine: ScriptEngineLifecycle | None = None) -> None:
        """``engine``: the dispatcher behind the seam (tests); default: a ScriptEngine for the
        config's bindings, or a NullEngine when there are none."""
        self.cfg = cfg
        m = cfg.model
        check_listen_addresses(enabled_listen_addresses(m))  # before keys, passwords, workers are made
        self.state_dir = cfg.resolve(m.server.state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.started = time.time()
        self.stopping = threading.Event()
        # SIGHUP puts here. Not a threading.Event: its set() takes a lock that the main thread
        # holds inside Event.wait() at times, and a signal handler runs on that thread, so a
        # SIGHUP landing there deadlocked the loop for good. SimpleQueue.put is reentrant.
        self._reload_requested: queue.SimpleQueue[bool] = queue.SimpleQueue()
        self._drain_signalled: queue.SimpleQueue[bool] = queue.SimpleQueue()  # SIGUSR2, the same way
        self._drain_lock = threading.Lock()
        self.draining: DrainState | None = None

        if m.sftp.enabled:
            # paramiko's process-wide patches, after checking its version (a clear error, not a
            # traceback); before the SSH worker processes fork, so that they inherit them
            paramiko_ext.install()
        # first: the SSH worker processes are forked from this one while it has no other thread
        self._ssh_pool = self._ssh_worker_pool() if m.sftp.enabled else None
        ensure_generated_passwords(cfg, _password_announcer(self.state_dir))
        # the state databases (staging, audit, bans, script store, outbox): SQLite in state_dir;
        # with [cluster] database, the bans and the script store in the PostgreSQL database
        # every node shares (opened by the stores, after the SSH workers forked)
        self.stores = StateStores.for_config(cfg)
        # accounts beyond the file's [[users]]: SQLite in state_dir, or PostgreSQL (after the
        # SSH workers forked: a PostgreSQL pool runs threads)
        self.account_db = _open_account_db(cfg)
        # with [cluster] database in the shared database, each record leased to this node
        self.staging = _open_shared(cfg, self.stores, "staging",
                                    lambda: StagingRecords(self.stores, lease=m.cluster.staging_lease))
        # what a home is made of: a local directory (the one Storage there is); the core, the
        # publisher and the restart's cleanup all open homes through this one opener
        self.open_storage: StorageOpener = LocalStorage
        # uploads caught mid-check are checked again once the engine runs (start()), unless told otherwise
        removed = discard_leftovers(self.staging, keep_checking=m.uploads.on_restart == "recheck",
                                    open_storage=self.open_storage)
        if removed:
            log.warning("removed %d partial upload(s) left by an interrupted run", removed)
        # an unusable [scripts] user stops the start here, before the audit trail, the defender, the core
        script_account = (script_worker_account(m.scripts.user, allow_root=m.server.allow_root_workers)
                          if engine is None and m.bindings else None)
        # the core, the publisher and every session hold this one object; a reload may swap
        # what is behind it (the first binding added by SIGHUP starts the engine). The engine
        # goes behind it once the core its api.fs sessions come from exists (below).
        self._engine: ScriptEngineLifecycle = NullEngine()
        self.dispatch = SwappableDispatcher(self._engine)
        self.pending_restart: list[str] = []  # keys changed in the file that wait for a restart
        self.audit = _open_shared(cfg, self.stores, "audit", lambda: AuditTrail(
            self.stores, retention_days=m.server.audit_retention_days, max_mb=m.server.audit_max_mb))
        # bans, scores, connection caps: shared by every front end through the login core
        self.defender = _open_shared(cfg, self.stores, "bans", lambda: Defender(self.stores, m.defender))
        # with [cluster] database: this node's row in the node registry, beating once started
        self.registry = _open_registry(cfg) if m.cluster.database else None
        self.heartbeat: Heartbeat | None = None
        # usage and daily transfers, counted at publish and delete against [accounts] quotas
        # (the account database keeps them, so the CLI's quota scan and other nodes share them)
        self.quotas = Quotas(self.account_db, m.accounts.quota_thresholds)
        self.publisher = Publisher(self.dispatch, self.staging, self._upload_policy(cfg), workers=m.scripts.workers,
                                   open_storage=self.open_storage, quotas=self.quotas)
        # a cluster node renews its staging leases and settles those of dead nodes (start())
        self.leases = (LeaseKeeper(self.staging, self.publisher, self.open_storage,
                                   recheck=m.uploads.on_restart == "recheck") if self.staging.shared else None)
        self.core = LoginCore(
            self._account_source(cfg),
            self.dispatch,
            staging=self.staging,
            publisher=self.publisher,
            open_storage=self.open_storage,
            uploads=self._upload_policy(cfg),
            max_handles=m.sftp.max_handles,
            max_handles_per_user=m.server.max_handles_per_user,
            max_sessions_per_user=m.server.max_sessions_per_user,
            failure_delay=m.server.login_failure_delay,
            password_cache=m.server.password_cache,
            preauth_timeout=m.server.preauth_timeout,
            defender=self.defender,
        )
        self.core.refusals = RefusalRecorder(self.audit)  # every refusal: an audit record
        # with [cluster] database: every node's sessions in one table, which the session list,
        # kicks and max_sessions use (docs/cluster.md "Sessions and per-user limits")
        self.cluster_sessions = _open_cluster_sessions(cfg, self.stores, self.core)
        self.core.shared_sessions = self.cluster_sessions
        # changes made by the CLI, the API or another node reach open sessions within a tick
        self.account_watch = AccountWatcher(
            self.account_db, interval=lambda: self.cfg.model.accounts.watch_interval,
            on_user=self._account_changed, on_any=self._accounts_changed)
        self.core.on_login = self.account_watch.note_login
        self._apply_account_policy(cfg)
        self.quotas.accounts = self._account_of  # uploads rechecked after a restart count too
        self._set_engine(engine if engine is not None else self._make_engine(cfg, script_account))
        self.listeners: list[Listener] = []
        if m.sftp.enabled:
            self.listeners.append(self._ssh_listener())
        for name in FRONT_ENDS:
            if getattr(m, name).enabled:
                self.listeners.append(self._front_end_listener(name))

    def _account_source(self, cfg: LoadedConfig) -> MergedAccountSource:
        """The file's users, then the database's; a name in both refuses the start or reload."""
        conflicts = name_conflicts(cfg, self.account_db)
        if conflicts:
            raise ConfigError(conflicts)
        return MergedAccountSource(TomlAccountSource.from_config(cfg), DatabaseAccountSource(self.account_db, cfg))

    def _account_changed(self, name: str) -> None:
        """The change feed named ``name``: the core reads it again and ends its sessions if
        it is gone, disabled or expired (``[accounts] kick_on_disable``)."""
        self._accounts.forget(name)
        self.core.account_changed(name)

    def _accounts_changed(self) -> None:
        """A group or folder changed: every connected user is read again."""
        self._accounts.forget()
        self.core.accounts_changed()

    @property
    def _accounts(self) -> MergedAccountSource:
        accounts = self.core.accounts
        assert isinstance(accounts, MergedAccountSource)  # what _account_source made
        return accounts

    def _front_end_listener(self, name: str) -> Listener:
        """FTP and HTTP get the login core (their port) and their section; the admin API its
        own port onto this daemon (:class:`AdminView`)."""
        module, m = _front_end(name), self.cfg.model
        if name == "admin":
            return module.make_listener(AdminView(self), m.admin, self.cfg)
        return module.make_listener(self.core, getattr(m, name), m.server, self.cfg, proxies=self._proxies())

    @property
    def engine(self) -> ScriptEngineLifecycle:
        """The dispatcher in use now: a ScriptEngine, or a NullEngine while nothing is bound."""
        return self._engine

    def _set_engine(self, engine: ScriptEngineLifecycle) -> None:
        self._engine = engine
        self.dispatch.target = engine

    def _make_engine(self, cfg: LoadedConfig, account: Account | None) -> ScriptEngineLifecycle:
        """The engine for ``cfg``'s bindings, wired to this daemon: its workers run as
        ``account``, its decisions go to the audit trail, api.fs opens sessions on the core."""
        if not cfg.model.bindings:
            return NullEngine()
        from scriptsftp.scripting.engine import ScriptEngine

        return ScriptEngine(cfg, self.state_dir, user=account.uid if account else None,
                            group=account.gid if account else None,
                            audit=ScriptAuditRecorder(self.audit), files=self._script_files(), stores=self.stores)

    def _account_of(self, name: str) -> QuotaHolder | None:
        rec = self.core.accounts.get(name)
        return None if rec is None else rec.account

    def _script_files(self) -> ScriptSessions:
        """api.fs: sessions for the event's user, with the users of the moment (after a reload
        too), the staging records, the upload policy and the uploads pending a check."""
        core = self.core

        def account(name: str) -> Any:
            rec = core.accounts.get(name)
            return None if rec is None or rec.disabled else rec.account

        return ScriptSessions(account, staging=core.staging, uploads=core.uploads, pending=self.publisher.pending,
                              open_storage=self.open_storage, quotas=self.quotas)

    def _upload_policy(self, cfg: LoadedConfig) -> UploadPolicy:
        u = cfg.model.uploads
        return UploadPolicy(atomic=u.atomic, quarantine=cfg.resolve(u.quarantine) if u.quarantine else None,
                            fsync=u.fsync, min_free_space=int(u.min_free_space), state_dir=self.state_dir)

    def _ssh_limits(self) -> SSHLimits:
        m = self.cfg.model
        return SSHLimits(
            max_read=m.sftp.max_packet - 1024, max_handles=m.sftp.max_handles,
            idle_timeout=m.sftp.idle_timeout, login_grace=m.sftp.login_grace or m.server.preauth_timeout,
            window_size=m.sftp.window_size, max_packet=min(m.sftp.max_packet, 262144),
            stall_timeout=m.server.stall_timeout, max_channels=m.sftp.max_channels_per_connection,
            max_queued=int(m.sftp.max_queued_bytes),
        )

    def _host_key_paths(self) -> list[Path]:
        m = self.cfg.model
        return [self.cfg.resolve(p) for p in m.sftp.host_keys] or ensure_host_keys(self.state_dir / "host_keys")

    def _ssh_worker_pool(self) -> SSHWorkerPool | None:
        m = self.cfg.model
        processes = worker_count(m.sftp.processes)
        if processes < 2:
            if hasattr(os, "geteuid") and os.geteuid() == 0:
                log.warning("[sftp] processes = 1: SSH is served in the daemon itself, as root; "
                            "processes >= 2 serves it in jailed worker processes as [sftp] worker_user")
            return None
        for path in self._host_key_paths():
            load_host_key(path)  # a bad key file stops the start here, not in every worker
        account = worker_account(m.sftp.worker_user, WORKER_ACCOUNT, "[sftp] worker_user",
                                 allow_root=m.server.allow_root_workers)
        return SSHWorkerPool(listen_addresses(m.sftp.listen), self._host_key_paths(), self._ssh_limits(),
                             processes, m.server.log_format, m.server.log_level, account=account,
                             state_dir=self.state_dir, proxies=self._proxies(),
                             max_growth=int(m.sftp.worker_max_growth))

    def _ssh_listener(self) -> Listener:
        keys = [load_host_key(p) for p in self._host_key_paths()]
        for k in keys:
            log.info("host key %s %s", k.get_name(), fingerprint(k))
        if self._ssh_pool is not None:
            self._ssh_pool.core = self.core
            return self._ssh_pool
        from scriptsftp.server.frontends.ssh.scp import run_scp

        return SSHListener(listen_addresses(self.cfg.model.sftp.listen), keys, self.core, self._ssh_limits(),
                           scp_runner=run_scp, proxies=self._proxies())

    def _proxies(self) -> TrustedProxies:
        """``[cluster] trusted_proxies``: whose PROXY headers (and, on HTTP, X-Forwarded-For)
        the listeners believe (a restart key: read once, at start)."""
        return TrustedProxies(self.cfg.model.cluster.trusted_proxies)

    # --- running ------------------------------------------------------------

    def start(self) -> None:
        # Handlers first: a SIGHUP or SIGTERM sent as soon as we say "ready" must find
        # them (the default action of both kills the process, a reload included).
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, lambda *_: self.stopping.set())
            signal.signal(signal.SIGINT, lambda *_: self.stopping.set())
            signal.signal(signal.SIGHUP, lambda *_: self._reload_requested.put(True))
            signal.signal(signal.SIGUSR2, lambda *_: self._drain_signalled.put(True))
        self.engine.start()
        self.account_watch.start()
        if self.cluster_sessions is not None:
            self.cluster_sessions.start()
        write_running(self.state_dir, self.cfg, self.pending_restart)
        rechecking = self.publisher.recheck([r for r in self.staging.leftovers() if r.state == CHECKING])
        if rechecking:
            log.warning("checking again %d upload(s) an interrupted run left unchecked", rechecking)
        if self.leases is not None:
            self.leases.start()
        for listener in self.listeners:
            listener.start()
            for addr in listener.bound:
                log.info("listening %s on %s", listener.name, addr)
        if self.registry is not None:
            self.heartbeat = Heartbeat(self.registry, self.node_report)
            self.heartbeat.start()
        log.info("scriptsftp %s ready", __version__)

    def node_report(self) -> NodeReport:
        """What this node publishes in the node registry (its heartbeat), read live."""
        m = self.cfg.model
        return NodeReport(
            name=m.cluster.node or socket.gethostname(), version=__version__, config_hash=config_hash(m),
            script_hashes={s["name"]: s["sha256"] for s in self.engine.scripts_info() if s["sha256"]},
            started_at=self.started, draining=self.draining is not None,
            listeners=[{"name": lst.name, "bound": lst.bound} for lst in self.listeners])

    def serve_forever(self) -> None:
        """Block until SIGTERM/SIGINT or the end of a drain (call :meth:`start` first, which
        installs the handlers); SIGHUP reloads."""
        while not self.stopping.is_set() and self.draining is None:
            self._tick(0.5)
        if self.draining is not None and not self.stopping.is_set():
            self._wait_drained()
        if self.stopping.is_set():  # SIGTERM, also in the middle of a drain: the usual grace
            self.shutdown()
        else:
            self.shutdown(grace=0.0, reason="server drained: connect again")

    def _tick(self, wait: float) -> None:
        """One turn of the main loop: trim, end expired accounts, a drain or a reload asked for by signal."""
        self._trim_tick()
        self.core.end_expired()  # an account that expires while connected is ended within 0.5 s
        if not self._drain_signalled.empty():
            while not self._drain_signalled.empty():
                self._drain_signalled.get_nowait()
            self.drain(None, by="SIGUSR2")
        try:
            self._reload_requested.get(timeout=wait)
        except queue.Empty:
            return
        while not self._reload_requested.empty():  # several SIGHUPs meanwhile: one reload
            self._reload_requested.get_nowait()
        self.reload()

    # --- draining -------------------------------------------------------------

    def drain(self, timeout: float | None, by: str = "admin API") -> DrainState:
        """Start draining (from any thread): every client listener stops accepting at once,
        ``/healthz`` answers "draining", and :meth:`serve_forever` waits for the open sessions
        to end, for ``timeout`` seconds at most (None: ``[server] drain_timeout``). Asked
        again while draining, a shorter timeout brings the deadline closer; nothing else changes."""
        if timeout is None:
            timeout = self.cfg.model.server.drain_timeout
        with self._drain_lock:
            now = time.time()
            current = self.draining
            if current is not None:
                if now + timeout < current.deadline:
                    current.deadline = now + timeout
                    log.info("drain: deadline brought forward to %.0fs from now (%s)", timeout, by)
                return current
            for listener in self._client_listeners():
                listener.stop_accepting()
            n = self._client_sessions()
            state = self.draining = DrainState(started=now, deadline=now + timeout, sessions_at_start=n)
        # logged once it is true: from here no listener accepts (the admin API stays up)
        log.info("draining (%s): no new connections; %d session(s) open, waiting up to %.0fs for them to end",
                 by, n, timeout)
        return state

    def drain_info(self) -> dict[str, Any] | None:
        """The drain under way for the admin API (``/healthz``, ``/api/status``), or None."""
        d = self.draining
        if d is None:
            return None
        return {"started": d.started, "deadline": d.deadline, "sessions_at_start": d.sessions_at_start,
                "sessions": self._client_sessions(), "checks": self.publisher.busy_count()}

    def _wait_drained(self) -> None:
        """The drain's wait: until no client connection is open and no upload check runs, or
        the deadline, or SIGTERM. Progress is logged when it changes, else every 10 s."""
        d = self.draining
        assert d is not None
        reported: tuple[int, int] | None = None
        report_at = 0.0
        while not self.stopping.is_set():
            sessions, checks = self._client_sessions(), self.publisher.busy_count()
            now = time.time()
            if sessions == 0 and checks == 0:
                log.info("drained: every session ended after %.1fs; stopping", now - d.started)
                return
            if now >= d.deadline:
                log.warning("drain timeout: ending %d session(s) still open after %.1fs; their unfinished "
                            "uploads are discarded%s", sessions, now - d.started,
                            f", {checks} upload check(s) left are done again at the next start" if checks else "")
                return
            if (sessions, checks) != reported or time.monotonic() >= report_at:
                log.info("draining: %d session(s) open, %d upload check(s) running, %.0fs left",
                         sessions, checks, d.deadline - now)
                reported, report_at = (sessions, checks), time.monotonic() + DRAIN_REPORT_INTERVAL
            self._tick(0.2)

    def _client_listeners(self) -> list[Listener]:
        """Every listener but the admin API's, which stays up while draining (to be watched)."""
        return [lst for lst in self.listeners if lst.name != "admin"]

    def _client_sessions(self) -> int:
        return sum(listener.active() for listener in self._client_listeners())

    _trim_at = 0.0
    _trim_peak = 0

    def _trim_tick(self) -> None:
        """Hand the heap a burst of connections freed back to the system (server/support/memory.py).

        ssh.py trims when a process's last SSH connection ends, but this process also serves
        FTP, HTTP and the SSH workers' core requests and is seldom without any connection:
        after 20 hostile clients left, 5 honest ones kept it at +56 MB for good. So every
        TRIM_INTERVAL s, if fewer connections are open than at the busiest moment since the
        last trim, trim (milliseconds, at most once per interval)."""
        n = len(self.core.connections()) if getattr(self, "core", None) is not None else 0
        self._trim_peak = max(self._trim_peak, n)
        now = time.monotonic()
        if now < self._trim_at:
            return
        self._trim_at = now + TRIM_INTERVAL
        if n < self._trim_peak:
            memory.release_free_memory()
        self._trim_peak = n

    def reload(self) -> bool:
        """Re-read the config and apply it all, or nothing (docs/architecture.md rule 8).

        Live keys take effect now; each changed key that needs a restart is logged and
        kept at its running value (reload_plan.py). Every step that can fail (reading
        and validating the file, compiling bound scripts, starting the engine for a first
        binding) runs before anything is swapped; a failure refuses the whole reload."""
        try:
            cfg = load_config(self.cfg.path)
            plan = plan_reload(self.cfg, cfg)
            engine_commit = self._prepare_engine(plan.effective)
        except ConfigError as exc:
            for line in exc.problems:
                log.error("reload refused: %s", line)
            log.error("configuration not reloaded: the running configuration stays")
            return False
        try:
            ensure_generated_passwords(plan.effective, _password_announcer(self.state_dir))
            accounts = self._account_source(plan.effective)
        except ConfigError as exc:
            engine_commit(False)
            for line in exc.problems:
                log.error("reload refused: %s", line)
            log.error("configuration not reloaded: the running configuration stays")
            return False
        except BaseException:
            engine_commit(False)
            raise
        engine_commit(True)
        self._apply(plan, accounts)
        return True

    def _prepare_engine(self, cfg: LoadedConfig) -> Callable[[bool], None]:
        """Ready the scripting side of ``cfg`` without swapping anything in; return the
        step that commits it (True) or drops it (False). ConfigError if it cannot run."""
        current = self.engine
        if not (isinstance(current, NullEngine) and cfg.model.bindings):
            pending = current.prepare(cfg)
            return lambda ok: pending.commit() if ok else pending.abandon()
        # the first binding: a new engine, started now, swapped in if the rest of the reload holds
        account = script_worker_account(cfg.model.scripts.user, allow_root=cfg.model.server.allow_root_workers)
        engine = self._make_engine(cfg, account)
        try:
            engine.start()  # ConfigError (closing its workers) when a bound script is unusable
        except ConfigError:
            raise
        except Exception as exc:  # e.g. worker processes that cannot be spawned
            engine.close()
            raise ConfigError([f"the scripting engine cannot start: {exc}"]) from None
        log.info("scripting engine started: the configuration now has bindings")

        def commit(ok: bool) -> None:
            if ok:
                self._set_engine(engine)
            else:
                engine.close()
        return commit

    def _apply(self, plan: ReloadPlan, accounts: MergedAccountSource) -> None:
        """Swap in a prepared reload: nothing here can refuse it any more."""
        cfg = plan.effective
        self.account_db.file_names = file_names_of(cfg)
        gone = self.core.replace_accounts(accounts)
        for conn in gone:  # a reload that removes a user from the file ends their sessions, always
            log.info("closing session of removed or disabled user %s", conn.user, extra={"sid": conn.id})
            if conn.on_kick:
                conn.on_kick("your account was removed or disabled")
        self._apply_settings(cfg)
        old_logging = self.cfg.model.server.log_format, self.cfg.model.server.log_level
        self.cfg = cfg
        self.pending_restart = plan.pending_restart
        for key in plan.applied:
            log.info("%s changed: applied", key_label(key))
        for key in plan.pending_restart:
            log.warning("%s changed: takes effect after a restart", key_label(key))
        try:
            write_running(self.state_dir, cfg, self.pending_restart)
        except OSError as exc:
            log.warning("cannot write %s/running.json (check --against-running): %s", self.state_dir, exc)
        pending = f"; {len(plan.pending_restart)} key(s) wait for a restart" if plan.pending_restart else ""
        log.info("configuration reloaded (%d users%s)", len(cfg.model.users), pending)
        # last, so the lines above announce a quieter level or another format in the old one
        self._apply_logging(old_logging, (cfg.model.server.log_format, cfg.model.server.log_level))

    def _apply_logging(self, old: tuple[str, str], new: tuple[str, str]) -> None:
        """``[server] log_format``/``log_level``: here and in the SSH worker processes."""
        if new == old:
            return
        from scriptsftp.server.support import logs

        logs.setup(*new)
        if self._ssh_pool is not None:
            self._ssh_pool.set_logging(*new)

    def _apply_settings(self, cfg: LoadedConfig) -> None:
        """The live keys held outside the config object (reload_plan.LIVE lists them all;
        the rest are read from ``self.cfg`` where they are used)."""
        m = cfg.model
        self.defender.configure(m.defender)
        self.core.password_cache.seconds = m.server.password_cache
        self.core.failure_delay = m.server.login_failure_delay
        self.core.preauth_timeout = m.server.preauth_timeout  # FTP, HTTP: new connections on
        self.core.max_handles_per_user = m.server.max_handles_per_user
        self.core.max_sessions_per_user = m.server.max_sessions_per_user  # the next login or channel
        self._apply_account_policy(cfg)
        self.quotas.thresholds = tuple(sorted(set(m.accounts.quota_thresholds)))
        self.audit.retention_days = m.server.audit_retention_days
        self.audit.max_bytes = int(m.server.audit_max_mb * 1024 * 1024)
        for listener in self.listeners:
            if isinstance(listener, Reconfigurable):
                listener.reconfigure(getattr(m, listener.name))

    def _apply_account_policy(self, cfg: LoadedConfig) -> None:
        """``[accounts] kick_on_disable``, ``create_homes``, ``home_mode``, ``home_owner``."""
        a = cfg.model.accounts
        self.core.kick_on_disable = a.kick_on_disable
        self.core.homes = HomePolicy.of(a, fenced=(self.state_dir,))

    def shutdown(self, grace: float | None = None, reason: str = "server shutting down") -> None:
        """Stop accepting, give running transfers ``grace`` seconds (None: ``[server]
        grace_period``), close what is left, stop."""
        if grace is None:
            grace = self.cfg.model.server.grace_period
        for listener in self.listeners:
            if self.draining is None or listener.name == "admin":  # a drain stopped the others already
                listener.stop_accepting()
        # logged once it is true: tests (and operators) take this line as "the ports are closed"
        log.info("stopping: no new connections; %d open, waiting up to %.0fs", self._active(), grace)
        deadline = time.monotonic() + grace
        while self._busy() and time.monotonic() < deadline:
            time.sleep(0.1)
        for listener in self.listeners:
            listener.close_all(reason)
        # give transports a moment to run their cleanup (aborting unfinished uploads)
        deadline = time.monotonic() + 5
        while self._active() and time.monotonic() < deadline:
            time.sleep(0.05)
        for listener in self.listeners:
            if isinstance(listener, SSHWorkerPool):
                listener.join(max(0.5, deadline - time.monotonic()))
        # background (async) upload checks: what does not finish in time is rechecked at the next start
        self.publisher.close(1.0)
        self.account_watch.stop()
        self.account_db.close()
        self.engine.close()
        if self.leases is not None:  # after the checks: their records stay leased until they end
            self.leases.stop()
        self.staging.close()
        self.audit.close()
        self.defender.close()
        if self.heartbeat is not None:
            self.heartbeat.stop()
        if self.registry is not None:
            self.registry.close()
        if self.cluster_sessions is not None:
            self.cluster_sessions.close()
        log.info("stopped")

    def _active(self) -> int:
        return sum(listener.active() for listener in self.listeners)

    def _busy(self) -> bool:
        """True while any session has a file open (a transfer is running)."""
        return self.publisher.busy() or any(s.open_handles() for c in self.core.connections() for s in c.sessions)


def _open_account_db(cfg: LoadedConfig) -> AccountDb:
    """The account database, its schema brought up to date; a database that cannot be
    opened stops the start with one line, as a bad configuration does."""
    try:
        return AccountDb.open(cfg)
    except AccountError as exc:
        raise ConfigError([f"{cfg.path}:1: [accounts] database: {exc}"]) from None
    except Exception as exc:  # sqlite3.Error, psycopg's OperationalError, a pool timeout
        where = cfg.model.accounts.database and redact_url(cfg.model.accounts.database) or "state_dir"
        raise ConfigError([f"{cfg.path}:1: [accounts] database: cannot open {where}: {exc}"]) from None


def _cluster_unreachable(cfg: LoadedConfig, exc: BaseException) -> ConfigError:
    """The one line a node that cannot open ``[cluster] database`` stops with (password hidden)."""
    return ConfigError([f"{cfg.path}:1: [cluster] database: cannot open {redact_url(cfg.model.cluster.database)}: "
                        f"{redact_url(' '.join(str(exc).split()))}"])


def _open_registry(cfg: LoadedConfig) -> NodeRegistry:
    """The node registry in ``[cluster] database``; one line when it cannot be opened."""
    try:
        return NodeRegistry(cfg.model.cluster.database)
    except Exception as exc:  # psycopg's OperationalError, a pool timeout, a schema too new
        raise _cluster_unreachable(cfg, exc) from None


T = TypeVar("T")


def _open_shared(cfg: LoadedConfig, stores: StateStores, name: StateName, open_store: Callable[[], T]) -> T:
    """A state store on its database; a shared database that cannot be opened stops the
    start with one line (the URL's password hidden)."""
    try:
        return open_store()
    except SchemaTooNew as exc:  # migrated by a newer scriptsftp whose steps this one cannot run against
        key = "[cluster] database" if stores.shared(name) else "[server] state_dir"
        raise ConfigError([f"{cfg.path}:1: {key}: {' '.join(str(exc).split())}"]) from None
    except Exception as exc:  # psycopg's OperationalError, a pool timeout, sqlite3.Error
        if not stores.shared(name):
            raise
        raise _cluster_unreachable(cfg, exc) from None


def _open_cluster_sessions(cfg: LoadedConfig, stores: StateStores, core: LoginCore) -> ClusterSessions | None:
    """The cluster's session table (None without ``[cluster] database``); one that cannot be
    opened stops the start with one line, as the other shared stores do."""
    if not stores.url:
        return None
    try:
        return ClusterSessions(stores.url, stores.node, core.connections)
    except Exception as exc:  # psycopg's OperationalError, a pool timeout
        raise _cluster_unreachable(cfg, exc) from None


class AdminView:
    """The admin API's port onto the daemon (ops/admin.py AdminPort): what it may read, read
    live (a reload swaps the config and the engine), and the reload and the drain it may ask for."""

    def __init__(self, daemon: Daemon) -> None:
        self._daemon = daemon

    @property
    def started(self) -> float:
        return self._daemon.started

    @property
    def config_path(self) -> Path:
        return self._daemon.cfg.path

    @property
    def admin(self) -> AdminSection:
        return self._daemon.cfg.model.admin

    @property
    def preauth_timeout(self) -> float:
        return self._daemon.cfg.model.server.preauth_timeout

    @property
    def pending_restart(self) -> list[str]:
        return self._daemon.pending_restart

    @property
    def listeners(self) -> list[Listener]:
        return self._daemon.listeners

    @property
    def core(self) -> LoginCore:
        return self._daemon.core

    @property
    def engine(self) -> ScriptEngineLifecycle:
        return self._daemon.engine

    @property
    def audit(self) -> AuditTrail:
        return self._daemon.audit

    @property
    def defender(self) -> Defender:
        return self._daemon.defender

    @property
    def accounts(self) -> "AccountsOfDaemon":
        return AccountsOfDaemon(self._daemon)

    @property
    def account_db(self) -> AccountDb:
        return self._daemon.account_db

    def make_home(self, name: str) -> None:
        """An account just created: its home and home_folders as a login would make them."""
        rec = self._daemon.core.accounts.get(name)
        if rec is not None:
            ensure_home(rec.account, self._daemon.core.homes)

    def reload(self) -> bool:
        return self._daemon.reload()

    def drain(self, timeout: float | None) -> dict[str, Any]:
        self._daemon.drain(timeout)
        info = self._daemon.drain_info()
        assert info is not None
        return info

    @property
    def draining(self) -> dict[str, Any] | None:
        return self._daemon.drain_info()

    @property
    def node(self) -> str:
        return self._daemon.cfg.model.cluster.node or socket.gethostname()

    @property
    def config_hash(self) -> str:
        return config_hash(self._daemon.cfg.model)

    @property
    def cluster(self) -> dict[str, Any] | None:
        registry = self._daemon.registry
        if registry is None:
            return None
        try:
            return cluster_view(registry.nodes())
        except registry.db.errors as exc:
            return {"error": f"the node registry cannot be read: {' '.join(str(exc).split())}"}

    @property
    def cluster_sessions(self) -> ClusterSessions | None:
        return self._daemon.cluster_sessions


class AccountsOfDaemon:
    """The accounts page's lookup (ops/accounts_page.py AccountLookup): the running
    config's users, the database's, each read by primary key."""

    def __init__(self, daemon: Daemon) -> None:
        self._daemon = daemon

    def file_user_names(self) -> list[str]:
        return [u.name for u in self._daemon.cfg.model.users]

    def database_user_names(self) -> list[str]:
        return self._daemon.account_db.user_names()

    def record(self, name: str) -> UserRecord | None:
        return self._daemon.core.accounts.get(name)

    def stored_user(self, name: str) -> StoredUser | None:
        return self._daemon.account_db.get_user(name)

    def usage(self, scope: str) -> tuple[int, int] | None:
        return self._daemon.account_db.usage(scope)


if TYPE_CHECKING:  # the view fits the admin API's port
    from scriptsftp.server.ops.admin import AdminPort

    def _admin_port(view: AdminView) -> AdminPort:
        return view


def refuse_root(cfg: LoadedConfig) -> str | None:
    if hasattr(os, "geteuid") and os.geteuid() == 0 and not cfg.model.server.allow_root:
        return ("refusing to run as root: run as a dedicated user (see docs/deploy.md), "
                "or set [server] allow_root = true")
    return None

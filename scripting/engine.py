"""The scripting engine: the :class:`~scriptsftp.server.contract.dispatch.Dispatcher` the server calls.

For each event it finds the matching bindings (in order), runs each handler in
a sandboxed worker and turns the results into one decision: the first veto
wins; a script that fails applies its binding's ``on_error``. Post-event
handlers run inline (``mode = "sync"``) or from a bounded queue (``async``)
that never delays the client; what does not fit the queue is logged.

Scripts are compiled only in workers. A changed script replaces the running
version only once it compiled and defines the bound functions; an event already
being dispatched finishes on the registry it started with.

The engine imports nothing from ``server/`` but the contract. The daemon builds it with
what it needs from the running server: the OS account its workers run as (``user``,
``group``), where decisions and runs are recorded (``audit``, a ``ScriptAudit``) and how
``api.fs`` opens sessions (``files``, a ``ScriptFiles``); it then drives it as a
``ScriptEngineLifecycle`` (start, prepare a reload, close).
"""

from __future__ import annotations

import logging
import os
import queue
import re
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

from scriptsftp.server.contract import events as ev
from scriptsftp.server.contract.dispatch import ALLOW, Decision, FileOpener
from scriptsftp.server.contract.script_settings import ConfigError, ScriptConfig
from scriptsftp.server.contract.scripting import EventTrace, NullScriptAudit, ScriptAudit, ScriptFiles
from scriptsftp.server.contract.state import StateStoreFactory

from .registry import ActiveBinding, LoadedScript, Registry, read_script, referenced_scripts
from .services import EngineServices
from .workers import LOGIN_EVENTS, CallRequest, CallResult, ScriptSource, WorkerPool

log = logging.getLogger("scriptsftp.scripting")
_ERROR_LINE = re.compile(r":(\d+):")  # "script.py:12: ..." in a compile error
script_log = logging.getLogger("scriptsftp.script")

ERROR_DENIAL = "server-side check failed"

#: one async call in the queue: binding, script, event data, pinned fd, called when it ended
_Queued = tuple[ActiveBinding, LoadedScript, dict[str, Any], int | None, Callable[[], None] | None]


class ScriptEngine:
    """The :class:`~scriptsftp.server.contract.scripting.ScriptEngineLifecycle` of a config
    with bindings.

    ``user``/``group``: the OS account the workers drop to (the daemon resolves ``[scripts]
    user``; None: this process's own). ``audit``: where decisions and handler runs are
    recorded. ``files``: sessions for ``api.fs`` (None: api.fs says it is not available).
    ``stores``: the databases of the script store and the outbox (None, as in ``scriptsftp
    check``: the engine compiles and loads scripts but cannot start)."""

    def __init__(self, cfg: ScriptConfig, state_dir: Path, *, user: int | None = None, group: int | None = None,
                 audit: ScriptAudit | None = None, files: ScriptFiles | None = None,
                 stores: StateStoreFactory | None = None, pool: WorkerPool | None = None) -> None:
        sc = cfg.model.scripts
        self.cfg = cfg
        self.scripts_dir = cfg.resolve(sc.dir)
        if pool is None:
            pool = WorkerPool(sc.workers, memory_mb=sc.memory_mb, state_dir=state_dir, stores=stores,
                              login_reserve=sc.login_reserve, nice=sc.nice, user=user, group=group)
        self.pool = pool
        self._registry = Registry.from_config(cfg, {})
        self._swap = threading.Lock()
        self._queue: queue.Queue[_Queued | None] = queue.Queue(sc.async_queue)
        self._async_threads: list[threading.Thread] = []
        self.watcher: Any = None
        self.last_errors: dict[str, str] = {}
        # content (sha256, or the read error) of each script file that failed to load, so a
        # broken file is reported once per distinct content, not at every look at it
        self._failed: dict[str, str] = {}
        # api.fs/notify/run handlers, outbox, scheduler
        self.services = EngineServices(pool.capabilities, state_dir, config=lambda: self.cfg,
                                       registry=lambda: self._registry, enqueue=self._enqueue, files=files,
                                       stores=stores)
        self.last_error_details: dict[str, dict[str, Any]] = {}  # runtime errors: time, line, kind, event
        self.audit: ScriptAudit = audit if audit is not None else NullScriptAudit()  # every decision, every run
        self.dropped = 0  # async calls the full queue refused

    # --- lifecycle ------------------------------------------------------------

    def start(self) -> None:
        """Start workers and load every bound script; raise ConfigError listing every problem."""
        self._keep_login_reserve()   # before the workers start: it decides how many get full priority
        self.pool.start()
        scripts, problems = self._load(self.cfg, {})
        if problems:
            self.pool.close()
            raise ConfigError(problems)
        self._registry = Registry.from_config(self.cfg, scripts)
        self._keep_login_reserve()
        for i in range(max(1, self.cfg.model.scripts.workers)):
            t = threading.Thread(target=self._async_loop, name=f"script-async-{i}", daemon=True)
            t.start()
            self._async_threads.append(t)
        self.services.start()
        if self.cfg.model.scripts.reload:
            from .reload import ScriptWatcher

            self.watcher = ScriptWatcher(self.scripts_dir, self.script_changed, self._watched_names)
            self.watcher.start()
        log.info("%d scripts loaded, %d workers", len(scripts), self.cfg.model.scripts.workers)

    def close(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()
        self.services.close()
        for _ in self._async_threads:
            try:
                self._queue.put(None, timeout=1)
            except queue.Full:
                break
        for t in self._async_threads:
            t.join(timeout=5)
        self.services.close_claims()
        self.pool.close()

    @property
    def outbox(self) -> Any:
        """The notification outbox (``outbox.stats()`` -> pending/failed/delivered), or None."""
        return self.services.outbox

    # --- status (what the admin API and /metrics read, through the lifecycle Protocol) ---

    def scripts_info(self) -> list[dict[str, Any]]:
        """Each bound script: sha256 of the running version, when it was loaded, its bindings,
        its status and its last error (a reload's compile error or a handler's runtime error)."""
        reg = self._registry
        last_errors = dict(self.last_errors)
        details = dict(self.last_error_details)
        bindings: dict[str, list[dict[str, Any]]] = {}
        for bs in reg.by_event.values():
            for b in bs:
                spec = b.spec
                bindings.setdefault(b.script, []).append({
                    "event": spec.event, "function": spec.handler, "order": spec.order, "mode": spec.mode,
                    "paths": list(spec.paths), "users": list(spec.users)})
        out = []
        for name in sorted(set(bindings) | set(reg.scripts)):
            loaded = reg.scripts.get(name)
            err = last_errors.get(name)
            last_error = None
            if err:
                d = details.get(name, {})
                line = d.get("line")
                if line is None:
                    m = _ERROR_LINE.search(err)
                    line = int(m.group(1)) if m else None
                last_error = {"message": err, "line": line, "time": d.get("time"), "kind": d.get("kind"),
                              "event": d.get("event")}
            out.append({
                "name": name,
                "status": "missing" if loaded is None else ("error" if err else "ok"),
                "sha256": loaded.source.digest if loaded else None,
                "loaded_at": loaded.loaded_at if loaded else None,
                "functions": sorted(loaded.functions) if loaded else [],
                "bindings": bindings.get(name, []),
                "last_error": last_error,
            })
        return out

    def worker_health(self) -> dict[str, Any] | None:
        return self.pool.health()

    def outbox_stats(self) -> dict[str, int] | None:
        """None also while the outbox's database cannot be reached (a shared outbox): the
        status page must answer through a PostgreSQL outage."""
        outbox = self.services.outbox
        if outbox is None:
            return None
        try:
            return outbox.stats()
        except outbox.errors as exc:
            log.warning("outbox: cannot count the messages: %s", exc)
            return None

    def dropped_calls(self) -> int:
        return self.dropped

    def _watched_names(self) -> set[str]:
        return self._registry.script_names()

    # --- loading ---------------------------------------------------------------

    def _load(self, cfg: ScriptConfig, known: dict[str, LoadedScript]) -> tuple[dict[str, LoadedScript], list[str]]:
        """Compile every script the bindings name (reusing unchanged ones); check bound functions exist."""
        scripts_dir = cfg.resolve(cfg.model.scripts.dir)
        scripts: dict[str, LoadedScript] = {}
        problems: list[str] = []
        for name in referenced_scripts(cfg.model.bindings):
            path = scripts_dir / name
            try:
                source = read_script(path, name)
            except FileNotFoundError:
                problems.append(f"{path}:1: script not found (bound in {cfg.path.name})")
                continue
            except (OSError, ValueError) as exc:
                problems.append(f"{path}:1: {exc}")
                continue
            old = known.get(name)
            if old is not None and old.source.digest == source.digest:
                scripts[name] = old
                continue
            loaded, errors = self._compile(source, scripts_dir)
            if loaded is None:
                problems.extend(errors)
                if name in known:  # the previous version keeps running: its status says why not this one
                    self._reload_failed(name, source.digest, errors)
            else:
                scripts[name] = loaded
        for i, b in enumerate(cfg.model.bindings):
            s = scripts.get(b.script)
            if s is not None and b.handler not in s.functions:
                problems.append(
                    f"{cfg.where(('bindings', i, 'function' if b.function else 'script'))}: "
                    f"{b.script} defines no function {b.handler}() for event {b.event!r}"
                )
        return scripts, problems

    def _compile(self, source: ScriptSource, scripts_dir: Path) -> tuple[LoadedScript | None, list[str]]:
        result = self.pool.compile(source)
        if not result.ok:
            return None, [f"{scripts_dir}/{e}" for e in result.errors]
        return LoadedScript(source, frozenset(result.functions)), []

    # --- hot reload ----------------------------------------------------------------

    def script_changed(self, name: str) -> None:
        """Called (debounced) by the watcher when a script file changed, appeared or vanished."""
        if name not in self._registry.script_names():
            return
        path = self.scripts_dir / name
        with self._swap:
            reg = self._registry
            try:
                source = read_script(path, name)
            except FileNotFoundError:
                if name in reg.scripts:
                    self._registry = reg.with_script(name, None)
                    self._failed.pop(name, None)
                    self._reload_failed(name, None, ["script file deleted: its bindings are disabled"])
                    log.error("%s: script deleted; its bindings are disabled until it is back", path)
                return
            except (OSError, ValueError) as exc:
                if self._failed.get(name) != f"unreadable: {exc}":
                    self._reload_failed(name, f"unreadable: {exc}", [str(exc)])
                    log.error("%s: not reloaded: %s (the previous version stays active)", path, exc)
                return
            current = reg.scripts.get(name)
            if current is not None and current.source.digest == source.digest:
                self._reload_back(name)  # the file is again what runs: a reload error is over
                return
            if self._failed.get(name) == source.digest:
                return  # this content was compiled and reported already
            loaded, errors = self._compile(source, self.scripts_dir)
            if loaded is not None:
                for b in (b for bs in reg.by_event.values() for b in bs if b.script == name):
                    if b.spec.handler not in loaded.functions:
                        errors.append(f"{path}:1: defines no function {b.spec.handler}() (bound to {b.spec.event})")
                        loaded = None
                        break
            if loaded is None:
                self._reload_failed(name, source.digest, errors)
                for e in errors:
                    log.error("not reloaded: %s (the previous version stays active)", e)
                return
            self._registry = reg.with_script(name, loaded)
            self._new_version(name)
            log.info("reloaded script %s (sha256 %s)", name, loaded.source.digest[:12])

    # --- script status: the truth about what runs (admin /api/scripts, dashboard) ----------

    def _reload_failed(self, name: str, content: str | None, errors: list[str]) -> None:
        """A file that could not replace the running version: its status is ``error`` until
        the file compiles again or is restored to what runs."""
        message = "; ".join(errors)
        if content is not None:
            self._failed[name] = content
        m = re.search(r":(\d+): (\w+Error)\b", message)
        self.last_errors[name] = message
        self.last_error_details[name] = {"time": time.time(), "line": int(m.group(1)) if m else None,
                                         "kind": m.group(2) if m else "load", "event": "reload"}

    def _reload_back(self, name: str) -> None:
        """The file holds the running version again: a reload error no longer describes anything."""
        self._failed.pop(name, None)
        if self.last_error_details.get(name, {}).get("event") == "reload":
            self.last_errors.pop(name, None)
            self.last_error_details.pop(name, None)

    def _new_version(self, name: str) -> None:
        """A new version runs: earlier errors (load or run) were about other code."""
        self._failed.pop(name, None)
        self.last_errors.pop(name, None)
        self.last_error_details.pop(name, None)

    # --- config reload (SIGHUP) ------------------------------------------------------

    def prepare(self, cfg: ScriptConfig) -> "PendingReload":
        """Load every script the new bindings name; raise ConfigError listing every problem.

        On success the engine is locked (no script swap) until the returned reload is
        committed or abandoned, so the daemon can check its other steps first and apply
        all or nothing."""
        self._swap.acquire()
        try:
            scripts, problems = self._load(cfg, self._registry.scripts)
            if problems:
                raise ConfigError(problems)
        except BaseException:
            self._swap.release()
            raise
        return PendingReload(self, cfg, Registry.from_config(cfg, scripts))

    def _commit(self, cfg: ScriptConfig, registry: Registry) -> None:
        old = self._registry.scripts
        for name, script in registry.scripts.items():
            if old.get(name) is not script:
                self._new_version(name)
            else:
                self._reload_back(name)
        self._registry = registry
        self.cfg = cfg
        self._keep_login_reserve()
        self.pool.set_nice(cfg.model.scripts.nice)   # workers started from now on
        if self.watcher is not None:
            self.watcher.resync()  # newly bound names are watched from their current content

    def reload(self, cfg: ScriptConfig) -> bool:
        """New bindings from a reloaded config, swapped only if every bound script is usable."""
        try:
            pending = self.prepare(cfg)
        except ConfigError as exc:
            for p in exc.problems:
                log.error("bindings not reloaded: %s", p)
            return False
        pending.commit()
        return True

    # --- dispatch ---------------------------------------------------------------------

    def _keep_login_reserve(self) -> None:
        """Workers are kept for connect/pre-login only while something is bound to them: with
        no login bindings a reserve would only take a worker from every other event."""
        wanted = any(self._registry.wants(name) for name in LOGIN_EVENTS)
        self.pool.set_login_reserve(self.cfg.model.scripts.login_reserve if wanted else 0)

    def wants(self, event_name: str) -> bool:
        return self._registry.wants(event_name)

    def has_async(self, event: ev.Event) -> bool:
        return any(b.spec.mode == "async" for b in self._registry.matching(event.to_dict()))

    def pre(self, event: ev.Event, file: FileOpener | None = None, mode: str | None = None) -> Decision:
        reg = self._registry  # one registry for the whole chain, even if a reload swaps it meanwhile
        data = event.to_dict()
        trace = EventTrace(self.audit, data)  # the event's id (in its log lines), audit trail, metrics
        for binding in reg.matching(data):
            if mode is not None and binding.spec.mode != mode:
                continue  # pre-publish: sync bindings before the reply, async ones after it
            script = reg.scripts.get(binding.script)
            if script is None:
                continue  # deleted: binding disabled (logged when it happened)
            result = self._call(binding, script, data, file)
            if result.verdict == "veto":
                return trace.decided(Decision(False, result.reason or f"denied by {binding.script}"), binding.script)
            if result.verdict != "allow" and binding.spec.error_policy == "deny":
                return trace.decided(Decision(False, ERROR_DENIAL), binding.script, failed=True)
        return trace.decided(ALLOW)

    def post(self, event: ev.Event, file: FileOpener | None = None) -> None:
        reg = self._registry
        data = event.to_dict()
        trace = EventTrace(self.audit, data)
        for binding in reg.matching(data):
            script = reg.scripts.get(binding.script)
            if script is None:
                continue
            if binding.spec.mode == "sync":
                self._call(binding, script, data, file)
                continue
            # Async: pin the file as it is now, so the script sees what was published even if
            # it is moved or replaced before the handler runs.
            fd = None
            if file is not None and ("read" in binding.spec.allow or "run" in binding.spec.allow):
                try:
                    fd = file()
                except Exception as exc:
                    log.warning("%s: cannot open %s for an async handler: %s", binding.script, data.get("path"), exc)
            if not self._enqueue(binding, script, data, fd):
                if fd is not None:
                    os.close(fd)
                log.error("async queue full (%d): %s for %s not run on %s", self._queue.maxsize,
                          binding.script, data["name"], data.get("path", ""),
                          extra=_ctx(data))
        trace.decided(None)

    def _enqueue(self, binding: ActiveBinding, script: LoadedScript, data: dict[str, Any], fd: int | None,
                 done: Callable[[], None] | None = None) -> bool:
        """Queue one async handler call; False (and counted in ``dropped``) when the queue is full.
        ``done()`` is called once the call ended (a scheduled minute is then marked done)."""
        try:
            self._queue.put_nowait((binding, script, data, fd, done))
        except queue.Full:
            self.dropped += 1
            return False
        return True

    def _async_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            binding, script, data, fd, done = item
            try:
                opener = (lambda fd=fd: os.dup(fd)) if fd is not None else None
                self._call(binding, script, data, opener)
            except Exception:
                log.exception("async handler %s failed", binding.script)
            finally:
                if fd is not None:
                    os.close(fd)
                if done is not None:
                    try:
                        done()
                    except Exception:
                        log.exception("async handler %s: its completion failed", binding.script)

    def _call(self, binding: ActiveBinding, script: LoadedScript, data: dict[str, Any],
              file: FileOpener | None) -> CallResult:
        spec = binding.spec
        sc = self.cfg.model.scripts
        req = CallRequest(
            script=script.source,
            function=spec.handler,
            event=data,
            capabilities=frozenset(spec.allow),
            timeout=spec.timeout or sc.timeout,
            cpu_time=spec.cpu_time or sc.cpu_time,
            file=file if "read" in spec.allow else None,
            context=self.services.context(data, file, spec.timeout or sc.timeout),
        )
        result = self.pool.call(req)
        self.audit.script_ran(str(data.get("_event_id") or ""), script.source.name, spec.handler, spec.mode, result)
        ctx = _ctx(data)
        for line in result.logs:
            fields = " ".join(f"{k}={v}" for k, v in (line.fields or {}).items())
            # text: "script.py: message k=v"; JSON: the message, and the fields as their own object
            script_log.info("%s: %s%s", script.source.name, line.message, f" {fields}" if fields else "",
                            extra={**ctx, "_json_msg": f"{script.source.name}: {line.message}",
                                   "_json_fields": dict(line.fields or {})})
        if result.verdict == "veto":
            log.info("%s vetoed %s %s: %s", script.source.name, data["name"], data.get("path", ""), result.reason,
                     extra=ctx)
        elif result.verdict != "allow":
            where = f"{script.source.name}:{result.error_line}" if result.error_line else script.source.name
            # the worker already names "script:line" for errors raised in the script; timeouts etc. do not
            message = result.reason if result.reason.startswith(script.source.name) else f"{where}: {result.reason}"
            log.error("%s (%s, on_error=%s)", message, result.error_kind, spec.error_policy, extra=ctx)
            self.last_errors[script.source.name] = message
            self.last_error_details[script.source.name] = {"time": time.time(), "line": result.error_line,
                                                           "kind": result.error_kind, "event": data["name"]}
            if data["name"] != "script-error" and self.wants("script-error"):
                self.post(ev.ScriptError(
                    session_id=data.get("session_id", ""), protocol=data.get("protocol", ""),
                    remote_ip=data.get("remote_ip", ""), user=data.get("user", ""),
                    script=script.source.name, event=data["name"], error=result.reason, line=result.error_line,
                ))
        return result


class PendingReload:
    """A prepared config reload of the engine: :meth:`commit` swaps it in, :meth:`abandon`
    drops it; either releases the engine's swap lock (exactly once)."""

    def __init__(self, engine: ScriptEngine, cfg: ScriptConfig, registry: Registry) -> None:
        self._engine, self._cfg, self._registry = engine, cfg, registry
        self._open = True

    def commit(self) -> None:
        if self._open:
            self._open = False
            try:
                self._engine._commit(self._cfg, self._registry)
            finally:
                self._engine._swap.release()

    def abandon(self) -> None:
        if self._open:
            self._open = False
            self._engine._swap.release()


def _ctx(data: dict[str, Any]) -> dict[str, Any]:
    return {"sid": data.get("session_id", ""), "user": data.get("user", ""), "proto": data.get("protocol", ""),
            "ip": data.get("remote_ip", ""), "event_id": data.get("_event_id", "")}


def check_scripts(cfg: ScriptConfig, *, user: int | None = None, group: int | None = None) -> list[str]:
    """For `scriptsftp check`: compile every bound script in a throwaway worker; list every problem.

    ``user``/``group``: the account ``run`` would use (untrusted source is compiled as it)."""
    sc = cfg.model.scripts
    with tempfile.TemporaryDirectory(prefix="scriptsftp-check-") as tmp:
        pool = WorkerPool(1, memory_mb=sc.memory_mb, state_dir=Path(tmp), user=user, group=group)
        pool.start()
        try:
            engine = ScriptEngine(cfg, Path(tmp), pool=pool)
            _, problems = engine._load(cfg, {})
        finally:
            pool.close()
    return problems

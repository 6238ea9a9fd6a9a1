"""The admin API, Prometheus metrics and the dashboard, on the ``[admin] listen`` address.

An aiohttp application on its own event loop in its own thread: nothing it
does (a slow scrape, an audit query, a reload) runs on a transfer's thread,
and the front ends never import it (docs/architecture.md rule 1).

Authentication is by named bearer tokens with a scope (read: GET only; write:
everything), each kept as an argon2id hash: ``[[admin.tokens]]``, and ``[admin]
token_hash`` as the write token "admin" (admin_tokens.py verifies and caches
them). A read token on any other method gets 403. Without a token the API only
listens on loopback; config validation and :func:`make_listener` both refuse
anything else.

Endpoints: see docs/admin.md. ``/healthz`` needs no token; the dashboard at
``/`` accepts the token in the Authorization header or a cookie set by the
login form or by a one-time link from ``POST /api/login-link``.

The API sees the running server only through :class:`AdminPort`, which the
daemon provides: what it shows (uptime, listeners, connections, engine, audit,
bans) and the three things it may do (reload; drain; kick, through a connection's
``on_kick``), and the account database whose users, groups and folders
admin_accounts.py serves. Every read is live, since a reload swaps the config and engine.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import re
import secrets
import socket
import threading
import time
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Protocol, Sequence
from urllib.parse import urlsplit

from aiohttp import web

from scriptsftp.server import __version__

from scriptsftp.server.contract.scripting import ScriptEngineLifecycle
from scriptsftp.server.core.session import ReadHandle, WriteHandle
from scriptsftp.server.ops import openapi
from scriptsftp.server.ops.admin_accounts import MAX_BODY, AccountRoutes
from scriptsftp.server.ops.admin_tokens import GRANT, TokenChecker
from scriptsftp.server.support import metrics
from scriptsftp.server.support.config import AdminSection, ConfigError, is_loopback
from scriptsftp.server.support.listen import ConfigFiles, Listener

if TYPE_CHECKING:
    from scriptsftp.server.core.connections import Connection
    from scriptsftp.server.ops.accounts_page import AccountLookup
    from scriptsftp.server.ops.audit import AuditTrail
    from scriptsftp.server.ops.defender import Defender
    from scriptsftp.server.stores.accounts_db import AccountDb
    from scriptsftp.server.stores.cluster_sessions import ClusterSessions

log = logging.getLogger("scriptsftp.admin")

COOKIE = "scriptsftp_admin"
WEB_SESSION_TTL = 8 * 3600.0
LINK_TTL = 120.0
MAX_WEB_SESSIONS = 256


# --- the port ------------------------------------------------------------------------------


class ConnectionRegistry(Protocol):
    """The core's list of client connections (the LoginCore is one)."""

    @property
    def preauth_evicted(self) -> int: ...  # pre-auth connections closed for newer ones, since start

    def connections(self) -> list[Connection]: ...


class AdminPort(Protocol):
    """What the admin API reads and asks of the running server (daemon.py provides it)."""

    @property
    def started(self) -> float: ...  # Unix time

    @property
    def config_path(self) -> Path: ...

    @property
    def admin(self) -> AdminSection: ...  # [admin] as running now (token_hash and tokens are live)

    @property
    def preauth_timeout(self) -> float: ...  # [server] preauth_timeout, live

    @property
    def pending_restart(self) -> list[str]: ...  # keys changed in the file, waiting for a restart

    @property
    def listeners(self) -> Sequence[Listener]: ...

    @property
    def core(self) -> ConnectionRegistry: ...

    @property
    def engine(self) -> ScriptEngineLifecycle: ...  # the scripting engine, or a NullEngine

    @property
    def audit(self) -> AuditTrail | None: ...

    @property
    def defender(self) -> Defender | None: ...

    @property
    def accounts(self) -> AccountLookup: ...  # the file's and the database's users, for the accounts page

    @property
    def account_db(self) -> AccountDb: ...  # the account database behind /api/users, /api/groups, /api/folders

    def make_home(self, name: str) -> None:
        """Make a new account's home and home_folders per [accounts]; OSError, LookupError
        (an unknown home_owner) or HomeMissing (create_homes off) when it cannot."""

    def reload(self) -> bool:
        """Re-read the config and apply it all, or nothing; False if refused."""

    def drain(self, timeout: float | None) -> dict[str, Any]:
        """Start draining (or bring the deadline of the drain under way closer); what
        :attr:`draining` then answers. ``timeout`` None: ``[server] drain_timeout``."""

    @property
    def draining(self) -> dict[str, Any] | None: ...  # the drain under way (api_models.Drain), or None

    @property
    def node(self) -> str: ...  # [cluster] node, else the host name

    @property
    def config_hash(self) -> str: ...  # SHA-256 of the running configuration (reload_plan.config_hash)

    @property
    def cluster(self) -> dict[str, Any] | None: ...  # every node and the drift (node_registry.cluster_view), or None

    @property
    def cluster_sessions(self) -> ClusterSessions | None: ...  # every node's sessions ([cluster] database)


# --- the caller ---------------------------------------------------------------------------


def _loopback_name(host: str | None) -> bool:
    """``localhost`` or a loopback address (a port, IPv6 brackets allowed)."""
    try:
        name = urlsplit("//" + (host or "")).hostname
    except ValueError:
        return False
    if name == "localhost":
        return True
    try:
        return name is not None and ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def foreign_request(request: web.Request) -> str | None:
    """Without a token the API trusts whoever reaches loopback, which a web page in a
    browser on this host does too: by DNS rebinding (its own name in ``Host``) or by a
    cross-site form POST (its ``Origin``). Why such a request is refused, or None."""
    if not _loopback_name(request.host):
        return f"Host {request.host!r} is not a loopback name (without [admin] token_hash only this host may call)"
    origin = request.headers.get("Origin")
    if origin is not None and not (origin.lower().startswith(("http://", "https://"))
                                   and _loopback_name(urlsplit(origin).netloc)):
        return f"cross-site request from Origin {origin[:100]!r} refused"
    return None


def _bearer(request: web.Request) -> str | None:
    auth = request.headers.get("Authorization", "")
    scheme, _, value = auth.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


# --- helpers ---------------------------------------------------------------------------------


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def parse_since(value: str | None, now: float | None = None) -> float | None:
    """``since``: Unix seconds, ISO 8601 (``2026-11-17T09:00:00``, local time unless it has an offset),
    or an age: ``90s``, ``30m``, ``12h``, ``7d``. ValueError with a clear message otherwise."""
    if value is None or value == "":
        return None
    now = time.time() if now is None else now
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd])", value.strip())
    if m:
        return now - float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    try:
        return float(value)
    except ValueError:
        pass
    from datetime import datetime

    try:
        return datetime.fromisoformat(value.strip()).timestamp()
    except ValueError:
        raise ValueError(f"since={value!r}: use Unix seconds, an ISO 8601 time or an age like 30m, 12h, 7d") \
            from None


def connection_info(conn: Connection) -> dict[str, Any]:
    """What /api/sessions shows about one connection (bytes include transfers still running)."""
    now_m, now = time.monotonic(), time.time()
    transfers = []
    bytes_in = bytes_out = 0
    for s in list(conn.sessions):
        bytes_in += s.bytes_in
        bytes_out += s.bytes_out
        for h in s.open_handles():
            upload = isinstance(h, WriteHandle)
            n = h.written if isinstance(h, WriteHandle) else h.sent if isinstance(h, ReadHandle) else 0
            transfers.append({"path": h.path, "direction": "upload" if upload else "download", "bytes": n,
                              "seconds": round(now_m - h.started, 1)})
            if upload:
                bytes_in += n
            else:
                bytes_out += n
    return {
        "id": conn.id, "protocol": conn.protocol, "remote_ip": conn.remote_ip, "user": conn.user,
        "started": round(now - (now_m - conn.started), 3), "seconds": round(now_m - conn.started, 1),
        "channels": [s.protocol for s in list(conn.sessions)], "bytes_in": bytes_in, "bytes_out": bytes_out,
        "transfers": transfers,
    }




class _LogCollector(logging.Handler):
    """Collects error lines logged while a reload runs, to return them to the API caller."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.lines: list[str] = []
        self.thread = threading.get_ident()  # only the reload's own lines, not other sessions' errors

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            self.lines.append(record.getMessage())


# --- the listener ---------------------------------------------------------------------------------


class AdminListener:
    """aiohttp on its own loop and thread; implements server/listener.Listener."""

    name = "admin"

    def __init__(self, server: AdminPort, host: str, port: int) -> None:
        self.server = server
        self.host, self.port = host, port
        self.tokens = TokenChecker(lambda: self.server.admin.all_tokens(), is_loopback(f"{host}:{port}"))
        self._bound: list[str] = []
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self._inflight = 0
        self._web_sessions: dict[str, float] = {}   # cookie value -> expiry (dashboard logins)
        self._links: dict[str, float] = {}          # one-time login codes -> expiry
        self._reload_lock = threading.Lock()
        self._requested: weakref.WeakSet[asyncio.BaseTransport] = weakref.WeakSet()  # sent a request
        self._document: bytes | None = None  # /api/openapi.json, made on first request

    # --- Listener protocol ---

    @property
    def bound(self) -> list[str]:
        return list(self._bound)

    def start(self) -> None:
        metrics.install(self.server)
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.create_server((self.host, self.port), family=family, reuse_port=False)
        self._sock = sock
        h, p = sock.getsockname()[:2]
        self._bound = [f"[{h}]:{p}" if ":" in h else f"{h}:{p}"]
        ready = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                self._runner = web.AppRunner(self.build_app(), access_log=None, handle_signals=False,
                                             keepalive_timeout=self.server.admin.idle_timeout)
                loop.run_until_complete(self._runner.setup())
                self._bound_first_request(self._runner.server)
                loop.run_until_complete(web.SockSite(self._runner, sock).start())
            except BaseException as exc:  # noqa: BLE001 - reported to start()'s caller
                errors.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, name="scriptsftp-admin", daemon=True)
        self._thread.start()
        ready.wait(30)
        if errors:
            raise errors[0]
        if not self.tokens.required:
            log.warning("admin API on %s has no token (token_hash, tokens): anyone on this host can use it",
                        self._bound[0])

    def _bound_first_request(self, server: Any) -> None:
        """aiohttp waits for ever for a connection's first request (keepalive_timeout counts
        only after a response): an idle socket held a slot for good. One that has sent no
        complete request within ``[server] preauth_timeout`` is closed."""
        if server is None:
            return
        opened = server.connection_made

        def connection_made(handler: Any, transport: asyncio.Transport) -> None:
            opened(handler, transport)
            delay = float(self.server.preauth_timeout)
            asyncio.get_running_loop().call_later(delay, self._close_if_silent, transport)

        server.connection_made = connection_made

    def _close_if_silent(self, transport: asyncio.Transport) -> None:
        if transport not in self._requested and not transport.is_closing():
            log.info("closing an admin connection that sent no request in time")
            transport.close()

    def stop_accepting(self) -> None:
        pass  # the API stays up during the grace period: operators may want to watch or kick

    def active(self) -> int:
        return self._inflight

    def close_all(self, reason: str) -> None:
        loop = self._loop
        if loop is None or not loop.is_running():
            return
        if self._runner is not None:
            fut = asyncio.run_coroutine_threadsafe(self._runner.cleanup(), loop)
            try:
                fut.result(timeout=5)
            except Exception as exc:  # noqa: BLE001
                log.warning("admin API did not stop cleanly: %s", exc)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.tokens.close()
        self._inflight = 0

    # --- app ---

    def build_app(self) -> web.Application:
        """Every route of the listener (tests/test_openapi.py holds them to openapi.OPERATIONS)."""
        app = web.Application(middlewares=[self._middleware], client_max_size=MAX_BODY)
        r = app.router
        r.add_get("/healthz", self.healthz)
        r.add_get("/metrics", self.metrics)
        r.add_get("/api/openapi.json", self.openapi)
        r.add_get("/api/status", self.status)
        r.add_get("/api/sessions", self.sessions)
        r.add_delete("/api/sessions/{id}", self.kick)
        r.add_get("/api/scripts", self.scripts)
        r.add_post("/api/reload", self.reload)
        r.add_post("/api/drain", self.drain)
        r.add_get("/api/events", self.events)
        r.add_get("/api/bans", self.bans)
        r.add_delete("/api/bans/{ip}", self.unban)
        r.add_post("/api/login-link", self.login_link)
        r.add_get("/", self.dashboard)
        r.add_get("/accounts", self.accounts_page)
        r.add_post("/login", self.login_form)
        r.add_get("/login/{code}", self.login_code)
        r.add_post("/logout", self.logout)
        AccountRoutes(lambda: self.server.account_db, self._blocking,
                      lambda name: self.server.make_home(name)).add_to(r)
        return app

    @web.middleware
    async def _middleware(self, request: web.Request,
                          handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        self._inflight += 1
        if request.transport is not None:
            self._requested.add(request.transport)
        try:
            path = request.path
            if not self.tokens.required and path != "/healthz":
                why = foreign_request(request)
                if why is not None:
                    log.warning("admin API: %s (%s %s from %s)", why, request.method, path, request.remote)
                    return _error(403, why)
            if path.startswith("/api/") or path == "/metrics":
                token = _bearer(request)
                if self.tokens.required and token is None:
                    return self._unauthorized("missing bearer token (Authorization: Bearer TOKEN)")
                grant = await self.tokens.check(token)
                if grant is None:
                    log.warning("admin API: wrong token from %s for %s %s", request.remote, request.method, path)
                    return self._unauthorized("wrong token")
                if not grant.allows(request.method):
                    log.warning("admin API: read-only token %r refused %s %s", grant.name, request.method, path)
                    return _error(403, f"token {grant.name!r} is read-only (scope \"read\": GET requests only)")
                request[GRANT] = grant
            try:
                resp = await handler(request)
            except web.HTTPException:
                raise
            except Exception:
                log.exception("admin API: %s %s failed", request.method, path)
                return _error(500, "internal error (see the server log)")
            resp.headers.setdefault("Cache-Control", "no-store")
            resp.headers.setdefault("X-Content-Type-Options", "nosniff")
            return resp
        finally:
            self._inflight -= 1

    @staticmethod
    def _unauthorized(message: str) -> web.Response:
        resp = _error(401, message)
        resp.headers["WWW-Authenticate"] = 'Bearer realm="scriptsftp"'
        return resp

    async def _blocking(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    # --- endpoints ---

    async def healthz(self, request: web.Request) -> web.Response:
        drain = self.server.draining
        if drain is not None:  # first: a balancer must stop sending here, whatever else holds
            return web.json_response({"status": "draining", "reason": "draining: no new connections",
                                      "since": drain["started"], "sessions": drain["sessions"]}, status=503)
        health = self.server.engine.worker_health()
        if health is not None and (health.get("closed") or health.get("alive", 0) == 0):
            return web.json_response({"status": "degraded", "reason": "no script workers alive"}, status=503)
        return web.json_response({"status": "ok"})

    async def openapi(self, request: web.Request) -> web.Response:
        if self._document is None:
            self._document = json.dumps(openapi.document(__version__), separators=(",", ":")).encode()
        return web.Response(body=self._document, content_type="application/json")

    async def metrics(self, request: web.Request) -> web.Response:
        body, ctype = await self._blocking(metrics.exposition)
        resp = web.Response(body=body)
        resp.headers["Content-Type"] = ctype
        return resp

    def _status(self) -> dict[str, Any]:
        d = self.server
        audit = d.audit
        scripts = d.engine.scripts_info()
        return {
            "version": __version__,
            "started": d.started,
            "uptime": round(time.time() - d.started, 1),
            "config": str(d.config_path),
            # keys changed in the file that the running daemon does not use yet (reload_plan.py)
            "pending_restart": list(d.pending_restart),
            "listeners": [{"name": lst.name, "bound": lst.bound, "active": lst.active()} for lst in d.listeners],
            "sessions": len(d.core.connections()),
            "workers": d.engine.worker_health(),
            "scripts": sum(s["status"] != "missing" for s in scripts),
            # what this node runs, comparable with the other nodes' (docs/cluster.md)
            "node": d.node,
            "config_hash": d.config_hash,
            "script_hashes": {s["name"]: s["sha256"] for s in scripts if s["sha256"]},
            "draining": d.draining,
            # with [cluster] database: every node from the node registry, alive or not, and the drift
            "cluster": d.cluster,
            "audit": audit.stats() if audit is not None else None,
            # api.notify's durable outbox: pending / failed / delivered (scripting/outbox.py)
            "outbox": d.engine.outbox_stats(),
        }

    async def status(self, request: web.Request) -> web.Response:
        return web.json_response(await self._blocking(self._status))

    async def sessions(self, request: web.Request) -> web.Response:
        return web.json_response(await self._all_sessions())

    async def _all_sessions(self) -> list[dict[str, Any]]:
        """This node's connections, then (on a cluster) the other live nodes' sessions, each
        with its node. The others are left out, and the log says why, if their table cannot
        be read: the list of this node's must not depend on the database."""
        node = self.server.node
        conns = sorted(self.server.core.connections(), key=lambda c: c.started)
        rows = [{**connection_info(c), "node": node} for c in conns]
        shared = self.server.cluster_sessions
        if shared is not None:
            try:
                rows += await self._blocking(shared.others)
            except shared.db.errors as exc:
                log.warning("the other nodes' sessions cannot be listed: %s", " ".join(str(exc).split())[:200])
        return rows

    async def kick(self, request: web.Request) -> web.Response:
        sid = request.match_info["id"]
        conn = next((c for c in self.server.core.connections() if c.id == sid), None)
        if conn is None:
            return await self._kick_elsewhere(sid)
        if conn.on_kick is None:
            return _error(409, f"session {sid} cannot be closed by this front end")
        log.info("session closed by an administrator", extra={"sid": conn.id, "user": conn.user,
                                                               "proto": conn.protocol, "ip": conn.remote_ip})
        await self._blocking(conn.on_kick, "closed by an administrator")
        return web.json_response({"kicked": sid, "user": conn.user, "node": self.server.node, "pending": False})

    async def _kick_elsewhere(self, sid: str) -> web.Response:
        """A session of another node (cluster): that node ends it within a poll
        (cluster_sessions.KICK_POLL); ``pending`` true if it was not gone within
        KICK_WAIT (the kick stays asked for while that node lives)."""
        shared = self.server.cluster_sessions
        if shared is None:
            return _error(404, f"no session {sid!r}")
        try:
            found = await self._blocking(shared.kick, sid, "closed by an administrator")
        except shared.db.errors as exc:
            return _error(503, f"the cluster's session table cannot be reached: {' '.join(str(exc).split())[:200]}")
        if found is None:
            return _error(404, f"no session {sid!r}")
        node, user, gone = found
        log.info("session on node %s closed by an administrator", node, extra={"sid": sid, "user": user})
        return web.json_response({"kicked": sid, "user": user, "node": node, "pending": not gone})

    async def scripts(self, request: web.Request) -> web.Response:
        return web.json_response(self.server.engine.scripts_info())

    def _reload(self) -> dict[str, Any]:
        collector = _LogCollector()
        root = logging.getLogger()
        with self._reload_lock:
            root.addHandler(collector)
            try:
                ok = self.server.reload()
            finally:
                root.removeHandler(collector)
        return {"ok": bool(ok) and not collector.lines, "errors": collector.lines,
                "pending_restart": list(self.server.pending_restart)}

    async def reload(self, request: web.Request) -> web.Response:
        log.info("reload requested through the admin API")
        result = await self._blocking(self._reload)
        return web.json_response(result, status=200 if result["ok"] else 422)

    async def drain(self, request: web.Request) -> web.Response:
        raw = request.query.get("timeout")
        timeout: float | None = None
        if raw is not None:
            try:
                timeout = float(raw)
            except ValueError:
                timeout = -1.0
            if not 0 <= timeout <= 7 * 86400:
                return _error(400, "timeout: seconds, from 0 to 604800")
        grant = request.get(GRANT)
        log.info("drain requested through the admin API%s", f" (token {grant.name!r})" if grant else "")
        info = await self._blocking(self.server.drain, timeout)
        return web.json_response(info, status=202)

    def _query_events(self, q: dict[str, Any]) -> list[dict[str, Any]]:
        audit = self.server.audit
        if audit is None:
            return []
        audit.flush(1.0)  # what was decided before this request is in the answer
        return audit.query(**q)

    @staticmethod
    def event_filters(params: Any) -> dict[str, Any]:
        """Query parameters of /api/events (and the dashboard) -> AuditTrail.query arguments; ValueError if bad."""
        from scriptsftp.server.ops.audit import DECISIONS

        q: dict[str, Any] = {"since": parse_since(params.get("since")), "user": params.get("user") or None,
                             "path": params.get("path") or None, "name": params.get("event") or None,
                             "event_id": params.get("id") or None}
        decision = params.get("decision") or None
        if decision is not None and decision not in DECISIONS:
            raise ValueError(f"decision={decision!r}: one of {', '.join(DECISIONS)}")
        q["decision"] = decision
        limit = params.get("limit") or "100"
        if not limit.isdigit() or not 1 <= int(limit) <= 1000:
            raise ValueError(f"limit={limit!r}: a number from 1 to 1000")
        q["limit"] = int(limit)
        return q

    async def events(self, request: web.Request) -> web.Response:
        try:
            q = self.event_filters(request.query)
        except ValueError as exc:
            return _error(400, str(exc))
        return web.json_response(await self._blocking(self._query_events, q))

    def _defender(self) -> Any:
        return self.server.defender

    async def bans(self, request: web.Request) -> web.Response:
        defender = self._defender()
        if defender is None or not hasattr(defender, "bans"):
            return web.json_response([])
        return web.json_response(await self._blocking(lambda: list(defender.bans())))

    async def unban(self, request: web.Request) -> web.Response:
        raw = request.match_info["ip"]
        try:
            ip = str(ipaddress.ip_address(raw))
        except ValueError:
            return _error(400, f"{raw!r} is not an IP address")
        defender = self._defender()
        if defender is None or not hasattr(defender, "unban"):
            return _error(404, f"{ip} is not banned")
        if not await self._blocking(defender.unban, ip):
            return _error(404, f"{ip} is not banned")
        log.info("ban lifted by an administrator", extra={"ip": ip})
        return web.json_response({"unbanned": ip})

    # --- dashboard logins ---

    def _prune(self) -> None:
        now = time.time()
        for table in (self._web_sessions, self._links):
            for k in [k for k, exp in table.items() if exp < now]:
                del table[k]

    def _new_web_session(self, resp: web.StreamResponse, request: web.Request) -> None:
        self._prune()
        while len(self._web_sessions) >= MAX_WEB_SESSIONS:
            del self._web_sessions[next(iter(self._web_sessions))]
        value = secrets.token_urlsafe(32)
        self._web_sessions[value] = time.time() + WEB_SESSION_TTL
        resp.set_cookie(COOKIE, value, max_age=int(WEB_SESSION_TTL), httponly=True, samesite="Strict", path="/",
                        secure=request.secure)

    def _cookie_ok(self, request: web.Request) -> bool:
        value = request.cookies.get(COOKIE)
        if not value:
            return False
        exp = self._web_sessions.get(value)
        return exp is not None and exp > time.time()

    async def login_link(self, request: web.Request) -> web.Response:
        """A one-time dashboard URL (for a browser, or headless Chromium in tests), valid LINK_TTL seconds."""
        self._prune()
        code = secrets.token_urlsafe(24)
        self._links[code] = time.time() + LINK_TTL
        return web.json_response({"path": f"/login/{code}", "url": f"http://{self._bound[0]}/login/{code}",
                                  "expires_in": LINK_TTL})

    async def login_code(self, request: web.Request) -> web.StreamResponse:
        code = request.match_info["code"]
        exp = self._links.pop(code, None)
        if exp is None or exp < time.time():
            return self._page(render_login("this login link is unknown, used or expired"), 401)
        resp = web.HTTPSeeOther("/")
        self._new_web_session(resp, request)
        return resp

    async def login_form(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        token = str(form.get("token", ""))
        if not token or await self.tokens.check(token) is None:
            log.warning("dashboard: wrong token from %s", request.remote)
            return self._page(render_login("wrong token"), 401)
        resp = web.HTTPSeeOther("/")
        self._new_web_session(resp, request)
        return resp

    async def logout(self, request: web.Request) -> web.StreamResponse:
        self._web_sessions.pop(request.cookies.get(COOKIE, ""), None)
        resp = web.HTTPSeeOther("/")
        resp.del_cookie(COOKIE, path="/")
        return resp

    @staticmethod
    def _page(body: str, status: int = 200) -> web.Response:
        resp = web.Response(text=body, status=status, content_type="text/html", charset="utf-8")
        resp.headers["Content-Security-Policy"] = ("default-src 'none'; style-src 'unsafe-inline'; "
                                                   "form-action 'self'; frame-ancestors 'none'")
        resp.headers["X-Frame-Options"] = "DENY"
        resp.headers["Referrer-Policy"] = "no-referrer"
        return resp

    async def _dashboard_allowed(self, request: web.Request) -> bool:
        """The dashboard's pages take the login cookie or the bearer token."""
        if self._cookie_ok(request):
            return True
        token = _bearer(request)
        return (token is not None or not self.tokens.required) and await self.tokens.check(token) is not None

    async def dashboard(self, request: web.Request) -> web.Response:
        if not await self._dashboard_allowed(request):
            return self._page(render_login(), 401)
        error = ""
        try:
            q = self.event_filters(request.query)
        except ValueError as exc:
            error, q = str(exc), {"limit": 100}
        q["limit"] = min(q.get("limit", 100), 200)
        events = await self._blocking(self._query_events, q)
        page = render_dashboard(
            status=await self._blocking(self._status),
            sessions=await self._all_sessions(),
            scripts=self.server.engine.scripts_info(),
            events=events,
            filters={k: request.query.get(k, "") for k in ("user", "path", "decision", "since")},
            error=error,
        )
        return self._page(page)


    async def accounts_page(self, request: web.Request) -> web.Response:
        """Read-only: one page of users (?page=N&q=TEXT), each read by primary key."""
        if not await self._dashboard_allowed(request):
            return self._page(render_login(), 401)
        raw = request.query.get("page", "1")
        number = int(raw) if raw.isdigit() and len(raw) < 7 else 1
        connected: dict[str, int] = {}
        for conn in self.server.core.connections():
            if conn.user:
                connected[conn.user] = connected.get(conn.user, 0) + 1
        page = await self._blocking(lambda: accounts_page(self.server.accounts, connected, page=number,
                                                          query=request.query.get("q", ""), now=time.time()))
        return self._page(render_accounts(page))


from scriptsftp.server.ops.accounts_page import accounts_page  # noqa: E402
from scriptsftp.server.ops.dashboard import render_accounts, render_dashboard, render_login  # noqa: E402  (dashboard imports nothing from here)


def make_listener(server: AdminPort, a: AdminSection, files: ConfigFiles) -> AdminListener:
    """The daemon's entry point; refuses a non-loopback address without a token (a clear startup error)."""
    if not a.all_tokens() and not is_loopback(a.listen):
        raise ConfigError([f"{files.where(('admin', 'listen'))}: {a.listen!r} is not a loopback address "
                           "and [admin] has no token_hash or tokens: set a token (`scriptsftp hash-password`)"])
    host, _, port = a.listen.rpartition(":")
    return AdminListener(server, host.strip("[]"), int(port))


__all__ = ["make_listener", "AdminListener", "AdminPort", "ConnectionRegistry", "GRANT", "TokenChecker", "parse_since"]

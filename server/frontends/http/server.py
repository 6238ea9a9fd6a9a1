"""HTTP file API and WebDAV front end (aiohttp), on the same Session core as SFTP.

One asyncio loop in its own thread serves every connection; anything that can
block (password checks, Session calls that may wait seconds for a script's
verdict, disk reads and writes) runs in bounded thread pools (see
:class:`~.httputil.Pools`), so a slow script or a slow disk never stalls other
clients.

* The core, a connection, a session and its handles are the contract's ports
  (server/contract/ports.py: ``LocalCorePort``, ``LocalConnectionView``,
  :data:`~.util.HttpSession`, the handle ports), never the core's classes.
* Login: HTTP Basic on every request, checked by the LoginCore like an SFTP
  password. A TCP connection is one LoginCore connection (``connect`` and
  ``disconnect`` events at its start and end); its first authenticated request
  logs in and opens the Session that later requests on the connection reuse.
  Clients send the password with every request and open many connections:
  later requests on a connection are matched to its login by a keyed SHA-256
  of the credentials, and new connections are cheap because the login core
  remembers verified passwords (``[server] password_cache``); policy and
  ``pre-login`` still run for every new connection.
* ``GET``/``HEAD`` stream a read handle (Range, ETag, Last-Modified,
  conditional requests); ``PUT`` streams the body chunk by chunk into the
  staged write handle and answers only when the Session has published it, so a
  pre-publish veto is a ``403`` carrying the script's reason. A directory GET
  gives a JSON listing (``Accept: application/json`` or ``?format=json``) or a
  small HTML page.
* WebDAV methods are in :mod:`.webdav`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import html
import json
import logging
import os
import secrets
import socket
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Awaitable, Callable, NoReturn

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from scriptsftp.server.frontends.http import webdav
from scriptsftp.server.contract.credentials import Credentials
from scriptsftp.server.contract.errors import BadCredentials, FsError, IsADirectory, LoginRefused, NotFound
from scriptsftp.server.frontends.http.util import (
    CHUNK, Ctx, HttpError, HttpSession, Pools, StallWatch, decode_path, etag_of, href, http_date, not_found, paced,
    parse_http_date, read_size, status_of,
)
from scriptsftp.server.support.config import HttpSection, ServerSection
from scriptsftp.server.support.listen import ConfigFiles, listen_addresses
from scriptsftp.server.support.proxy_protocol import (
    ProxyError, TrustedProxies, forwarded_for, looks_like_header, read_header_async,
)

if TYPE_CHECKING:
    from scriptsftp.server.contract.ports import (
        LocalConnectionView, LocalCorePort, LocalWriteHandle, ReadHandlePort, WriteHandlePort,
    )

log = logging.getLogger("scriptsftp.http")

REALM = 'Basic realm="scriptsftp", charset="UTF-8"'
METHODS = ("OPTIONS", "GET", "HEAD", "PUT", "DELETE", "PROPFIND", "PROPPATCH", "MKCOL", "COPY", "MOVE",
           "LOCK", "UNLOCK")
ALLOW = ", ".join(METHODS)
#: bytes of a PUT body gathered before one write call goes to the pool
PUT_BATCH = 2 * CHUNK


# --- connections -----------------------------------------------------------------


@dataclass
class _ConnState:
    """One TCP connection: its LoginCore connection and, once logged in, its Session."""

    handler: RequestHandler
    #: None until the first request of a connection whose client X-Forwarded-For names
    connected: "asyncio.Future[tuple[LocalConnectionView, Any]] | None"
    session: HttpSession | None = None
    auth_digest: bytes = b""
    busy: int = 0
    lost: bool = False
    finished: bool = False
    preauth_timer: asyncio.TimerHandle | None = None
    ip: str = ""
    local_port: int = 0
    forwarded: bool = False  # from a trusted proxy without a PROXY header: X-Forwarded-For decides


UNTRUSTED_HEADER = "PROXY protocol header from an address not in [cluster] trusted_proxies"


class _Handler(RequestHandler):
    """aiohttp's connection handler, looking at the first bytes of a connection from an
    untrusted address: a PROXY protocol header there is refused, not answered as a bad
    request (the defender scores it). ``data_received`` is aiohttp's protocol callback."""

    listener: "HttpListener"
    proxied: tuple[str, int] | None = None  # the client a trusted proxy's header named
    forwarded = False
    sniff = True
    sniffed = b""

    def data_received(self, data: bytes) -> None:
        if self.sniff:
            self.sniffed += data[:6]
            if not looks_like_header(self.sniffed):
                self.sniff = False
            elif len(self.sniffed) >= 6:
                self.sniff = False
                self.listener._refuse_proxy_header(self)
                return
        super().data_received(data)


class _Server(web.Server):
    """aiohttp's low-level server, telling the listener when connections come and go."""

    def __init__(self, listener: "HttpListener", handler: Callable[[web.BaseRequest], Awaitable[Any]],
                 **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._listener = listener

    def __call__(self) -> RequestHandler:
        # aiohttp's Server.__call__ with our handler class (its _loop and _kwargs: what it
        # passes to RequestHandler)
        handler = _Handler(self, loop=self._loop, **self._kwargs)
        handler.listener = self._listener
        return handler

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        self._listener._opened(handler, transport)

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        super().connection_lost(handler, exc)
        self._listener._lost(handler)


def tls_context(certificate: str, private_key: str) -> ssl.SSLContext:
    """Server TLS, 1.2 or newer only."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(certificate, private_key)
    return ctx


class HttpListener:
    name = "http"

    def __init__(self, addresses: list[tuple[str, int]], core: "LocalCorePort[Any, Any]", *,
                 tls: ssl.SSLContext | None = None, max_upload_size: int = 0, stall_timeout: float = 120.0,
                 idle_timeout: float = 120.0, proxies: TrustedProxies | None = None) -> None:
        self.core = core
        self.proxies = proxies or TrustedProxies()
        self._accepting: list[asyncio.Task[None]] = []
        self.tls = tls
        self.max_upload_size = max_upload_size
        self.stall_timeout = stall_timeout
        self.idle_timeout = idle_timeout  # [http] idle_timeout: aiohttp's keep-alive timeout
        self.locks = webdav.LockManager()
        self.pools = Pools(
            auth=ThreadPoolExecutor(8, thread_name_prefix="http-auth"),
            ops=ThreadPoolExecutor(32, thread_name_prefix="http-op"),
            io=ThreadPoolExecutor(8, thread_name_prefix="http-io"),
        )
        self._secret = secrets.token_bytes(32)
        self._states: dict[RequestHandler, _ConnState] = {}
        self._stopping = False  # no new connections; kept-alive ones close after their request
        self._tasks: set[asyncio.Task[Any]] = set()
        self._servers: list[asyncio.AbstractServer] = []
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.sockets: list[socket.socket] = []
        for host, port in addresses:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            s = socket.socket(family, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
            s.listen(128)
            s.setblocking(False)
            self.sockets.append(s)

    def reconfigure(self, section: HttpSection) -> None:
        """``[http]`` keys a reload applies live: ``max_upload_size`` (the next uploads)."""
        self.max_upload_size = section.max_upload_size

    # --- Listener protocol ---------------------------------------------------------

    @property
    def bound(self) -> list[str]:
        out = []
        for s in self.sockets:
            if s.fileno() == -1:  # closed: the listener stopped accepting
                continue
            host, port = s.getsockname()[:2]
            out.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
        return out

    def start(self) -> None:
        ready = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self.loop = loop
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._serve())
            except BaseException as exc:  # noqa: BLE001 - reported to start()
                errors.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()

        self._thread = threading.Thread(target=run, name="http-loop", daemon=True)
        self._thread.start()
        ready.wait(30)
        if errors:
            raise errors[0]

    async def _serve(self) -> None:
        server = _Server(self, self._handle, access_log=None, keepalive_timeout=self.idle_timeout,
                         read_bufsize=CHUNK, auto_decompress=False, lingering_time=5.0)
        loop = asyncio.get_running_loop()
        for s in self.sockets:
            if self.proxies:  # each connection looked at before aiohttp gets it (_admit)
                self._accepting.append(loop.create_task(self._accept(s, server)))
            else:
                self._servers.append(await loop.create_server(server, sock=s, ssl=self.tls, backlog=128))

    # --- behind a load balancer ------------------------------------------------------------

    async def _accept(self, listening: socket.socket, server: _Server) -> None:
        """The accept loop when ``[cluster] trusted_proxies`` is set: a connection from a
        trusted proxy is read for a PROXY header first (:meth:`_admit`)."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, addr = await loop.sock_accept(listening)
            except OSError:
                await asyncio.sleep(0.05)  # e.g. EMFILE: do not spin
                continue
            if self.proxies.trusts(addr[0]):
                task = loop.create_task(self._admit(sock, addr, server))
            else:  # (a task: a TLS handshake must not hold up the accepting)
                task = loop.create_task(self._hand_to_aiohttp(sock, server, None, forwarded=False, sniff=True))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _hand_to_aiohttp(self, sock: socket.socket, server: _Server, proxied: tuple[str, int] | None, *,
                               forwarded: bool, sniff: bool) -> None:
        def make() -> RequestHandler:
            handler = server()
            assert isinstance(handler, _Handler)
            handler.proxied, handler.forwarded, handler.sniff = proxied, forwarded, sniff
            return handler
        try:
            await asyncio.get_running_loop().connect_accepted_socket(make, sock, ssl=self.tls)
        except (OSError, ssl.SSLError) as exc:
            log.debug("HTTP connection failed before it started: %s", exc)
            sock.close()

    async def _admit(self, sock: socket.socket, addr: tuple, server: _Server) -> None:
        """A connection from a trusted proxy: a PROXY header, if its first bytes start one,
        names the client (read within the pre-authentication time); else the proxy speaks
        HTTP itself and each request's X-Forwarded-For names the client (a balancer in HTTP
        mode, docs/cluster.md)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.core.preauth_timeout
        try:
            first = await _peek(sock, deadline)
            if looks_like_header(first):
                header = await read_header_async(sock, max(0.0, deadline - loop.time()))
                await self._hand_to_aiohttp(sock, server, header.client, forwarded=False, sniff=False)
            else:
                await self._hand_to_aiohttp(sock, server, None, forwarded=True, sniff=False)
        except ProxyError as exc:
            log.info("connection from trusted proxy %s closed: %s", addr[0], exc, extra={"ip": addr[0]})
            sock.close()

    def _refuse_proxy_header(self, handler: RequestHandler) -> None:
        """A PROXY header from an untrusted address: closed, logged once, scored."""
        state = self._states.get(handler)
        handler.force_close()
        if state is None or state.connected is None:
            return
        log.info("HTTP connection closed: %s", UNTRUSTED_HEADER, extra={"ip": state.ip})
        connected = state.connected

        async def score() -> None:
            conn, _ = await connected
            await asyncio.get_running_loop().run_in_executor(self.pools.ops, self.core.protocol_error, conn,
                                                             UNTRUSTED_HEADER)
        task = asyncio.get_running_loop().create_task(score())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _forwarded(self, request: web.BaseRequest, state: _ConnState) -> None:
        """A request from a trusted proxy speaking HTTP: its X-Forwarded-For names the
        client. The connection is the core's as that client's from its first request; a
        later request naming another client (a balancer reuses connections) ends that
        login and connects afresh, as a change of user does."""
        peer = request.transport.get_extra_info("peername")[0] if request.transport else state.ip
        ip = forwarded_for(request.headers.getall("X-Forwarded-For", []), peer, self.proxies)
        if state.connected is not None and ip == state.ip:
            return
        loop = asyncio.get_running_loop()
        if state.connected is not None:
            conn, _ = await state.connected
            await loop.run_in_executor(self.pools.ops, self.core.disconnect, conn)
            state.session, state.auth_digest = None, b""
        state.ip = ip
        state.connected = loop.run_in_executor(self.pools.ops, self._connect, state.handler, ip, state.local_port)

    def _call(self, fn: Callable[[], Any]) -> None:
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(fn)

    def stop_accepting(self) -> None:
        """Close the listening sockets. A kept-alive connection is not a new one: a request
        on it is still served, but answered with ``Connection: close``, and an idle one is
        closed now, so clients open their next connection elsewhere (a balancer's other node)."""
        def stop() -> None:
            self._stopping = True
            for srv in self._servers:
                srv.close()
            for task in self._accepting:
                task.cancel()
            for s in self.sockets if self._accepting else ():
                try:
                    s.shutdown(socket.SHUT_RDWR)  # the kernel completes no more handshakes
                except OSError:
                    pass
                s.close()  # (as an asyncio server's close() closes its sockets)
            for state in list(self._states.values()):
                if state.busy == 0:  # between requests: closed as its keep-alive timeout would
                    state.handler.force_close()
        self._call(stop)

    def active(self) -> int:
        return len(self._states)

    def close_all(self, reason: str) -> None:
        def close() -> None:
            if self._states:
                log.info("closing %d HTTP connection(s): %s", len(self._states), reason)
            for state in list(self._states.values()):
                state.handler.force_close()
        self._call(close)

    # --- connection lifetime -----------------------------------------------------------

    def _opened(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        peer = transport.get_extra_info("peername") or ("", 0)
        local = transport.get_extra_info("sockname") or ("", 0)
        if isinstance(handler, _Handler) and handler.proxied is not None:
            peer = handler.proxied  # the client a trusted proxy's PROXY header named
        forwarded = isinstance(handler, _Handler) and handler.forwarded
        loop = asyncio.get_running_loop()
        fut = None if forwarded else loop.run_in_executor(self.pools.ops, self._connect, handler, peer[0], local[1])
        state = self._states[handler] = _ConnState(handler, fut, ip=peer[0], local_port=local[1],
                                                   forwarded=forwarded)
        state.preauth_timer = loop.call_later(self.core.preauth_timeout, self._preauth_expired, state)

    def _preauth_expired(self, state: _ConnState) -> None:
        """``[server] preauth_timeout``: a connection that has not logged in by now is closed
        (no response: it may not even have sent a complete request head; aiohttp itself has
        no deadline before the first request). One whose request is still being answered
        (its password being checked, say) is looked at again a moment later."""
        state.preauth_timer = None
        if state.finished or state.lost or state.session is not None:
            return
        if state.busy:
            state.preauth_timer = asyncio.get_running_loop().call_later(1.0, self._preauth_expired, state)
            return
        log.info("closing HTTP connection not logged in after %gs", self.core.preauth_timeout,
                 extra={"ip": state.ip})
        state.handler.force_close()

    def _connect(self, handler: RequestHandler, ip: str, port: int) -> tuple[LocalConnectionView, Any]:
        """LoginCore connect (defender, ``connect`` event), in a pool thread."""
        conn, decision = self.core.connect("http", ip, port)
        # the core ends a connection this way (user removed on reload, address banned)
        conn.on_kick = lambda reason: self._call(lambda: self._kick(handler, conn, reason))
        return conn, decision

    def _kick(self, handler: RequestHandler, conn: LocalConnectionView, reason: str) -> None:
        log.info("closing HTTP connection: %s", reason, extra={"sid": conn.id, "user": conn.user})
        handler.force_close()

    def _lost(self, handler: RequestHandler) -> None:
        state = self._states.get(handler)
        if state is None:
            return
        state.lost = True
        if state.preauth_timer is not None:
            state.preauth_timer.cancel()
            state.preauth_timer = None
        if state.busy == 0:
            self._finish(state)

    def _finish(self, state: _ConnState) -> None:
        if state.finished:
            return
        state.finished = True
        task = asyncio.get_running_loop().create_task(self._disconnect(state))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _disconnect(self, state: _ConnState) -> None:
        try:
            if state.connected is None:  # no request came: the core never heard of it
                return
            conn, _ = await state.connected
            await asyncio.get_running_loop().run_in_executor(self.pools.ops, self.core.disconnect, conn)
        except Exception:  # noqa: BLE001 - a connection's end must never kill the loop
            log.exception("HTTP disconnect failed")
        finally:
            self._states.pop(state.handler, None)

    # --- requests ------------------------------------------------------------------

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        state = self._states.get(request.protocol)
        if state is None:  # cannot happen: connection_made always runs first
            return web.Response(status=503, text="connection not registered\n")
        state.busy += 1
        try:
            resp = await self._dispatch(request, state)
        except HttpError as exc:
            resp = exc.response()
        except FsError as exc:
            resp = HttpError.from_fs(exc).response()
        except ConnectionResetError:
            # the client left in the middle of its request body (aiohttp: "Connection lost");
            # the handler already discarded what it had (an upload is aborted). Nobody is left
            # to answer: aiohttp drops this response quietly instead of logging a traceback
            return web.Response(status=400, text="connection lost before the request body was complete\n")
        finally:
            state.busy -= 1
            if state.lost and state.busy == 0:
                self._finish(state)
        if self._stopping:  # the client's next request goes elsewhere
            if not resp.prepared:
                resp.force_close()  # says Connection: close
            state.handler.close()   # and closes once this response is sent (a streamed one too)
        return resp

    async def _dispatch(self, request: web.BaseRequest, state: _ConnState) -> web.StreamResponse:
        if state.forwarded:
            await self._forwarded(request, state)
        assert state.connected is not None
        conn, decision = await state.connected
        if not decision.allowed:
            raise HttpError(403, decision.reason or "connection refused by a server script", close=True)
        method = request.method.upper()
        if method not in METHODS:
            raise HttpError(405, f"method {method} not supported", headers={"Allow": ALLOW})
        if method == "OPTIONS" and request.raw_path == "*":
            vpath = "/"
        else:
            vpath = decode_path(request.raw_path)
        if method == "OPTIONS":  # discovery, before credentials (Windows and macOS probe this way)
            return web.Response(status=200, headers={
                "DAV": "1, 2", "MS-Author-Via": "DAV", "Allow": ALLOW, "Accept-Ranges": "bytes"})
        session = await self._authenticate(request, state, conn)
        ctx = Ctx(request, session, vpath, self.pools, self.locks)
        if method in ("GET", "HEAD"):
            return await self._get(ctx, head=method == "HEAD")
        if method == "PUT":
            return await self._put(ctx)
        if method == "DELETE":
            return await webdav.delete(ctx)
        return await webdav.HANDLERS[method](ctx)

    # --- authentication -----------------------------------------------------------------

    def _credentials(self, request: web.BaseRequest) -> tuple[str, str, bytes]:
        header = request.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        if not header or scheme.lower() != "basic":
            raise HttpError(401, "authentication required", headers={"WWW-Authenticate": REALM})
        try:
            raw = base64.b64decode(value.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise HttpError(400, "malformed Basic credentials") from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")
        user, sep, password = text.partition(":")
        if not sep:
            raise HttpError(400, "malformed Basic credentials")
        digest = hmac.new(self._secret, raw, hashlib.sha256).digest()
        return user, password, digest

    async def _authenticate(self, request: web.BaseRequest, state: _ConnState,
                            conn: LocalConnectionView) -> HttpSession:
        user, password, digest = self._credentials(request)
        if state.session is not None and hmac.compare_digest(state.auth_digest, digest):
            return state.session
        loop = asyncio.get_running_loop()
        if state.session is not None and state.session.user == user:
            # same user, another password (changed meanwhile): prove it, keep the session
            ok, wait = await loop.run_in_executor(self.pools.auth, self.core.check_password_nowait, conn, user,
                                                  password)
            if not ok:
                await self._login_refused(BadCredentials("authentication failed", wait))
            state.auth_digest = digest
            return state.session
        if state.session is not None:
            # another user on this keep-alive connection: end the first login, start afresh
            await loop.run_in_executor(self.pools.ops, self.core.disconnect, conn)
            state.session = None
            state.connected = loop.run_in_executor(self.pools.ops, self._connect, state.handler, conn.remote_ip,
                                                   conn.local_port)
            conn, decision = await state.connected
            if not decision.allowed:
                raise HttpError(403, decision.reason or "connection refused by a server script", close=True)
        try:  # in the auth pool: the password check is the part a flood of bad logins would fill
            session = await loop.run_in_executor(self.pools.auth, self.core.login, conn, Credentials(user, password))
        except LoginRefused as exc:
            await self._login_refused(exc)
        state.session = session
        state.auth_digest = digest
        return session

    async def _login_refused(self, exc: LoginRefused) -> NoReturn:
        """The one place a refused login becomes an HTTP answer (the core has logged it).
        The failure delay is waited here, on the loop: it holds no thread."""
        if exc.wait:
            await asyncio.sleep(exc.wait)
        if isinstance(exc, BadCredentials):
            raise HttpError(401, "wrong user name or password", headers={"WWW-Authenticate": REALM})
        raise HttpError(403, exc.reason or "login refused", close=True)

    # --- GET / HEAD -----------------------------------------------------------------------

    async def _get(self, ctx: Ctx, *, head: bool) -> web.StreamResponse:
        entry = await ctx.op(ctx.session.stat, ctx.vpath)
        if entry.is_dir:
            return await self._listing(ctx, head=head)
        st = entry.st
        not_modified = _conditional(ctx.request, etag_of(st), st.st_mtime)
        if not_modified is not None:
            return not_modified
        if head:
            return web.Response(headers=_file_headers(st, ctx.vpath, st.st_size))
        handle: ReadHandlePort = await ctx.op(ctx.session.open_read, ctx.vpath)  # pre-download may veto
        pending: asyncio.Future[bytes] | None = None
        watch: StallWatch | None = None
        try:
            st = handle.fstat()
            size = st.st_size
            start, end, status = 0, size - 1, 200
            rng = _range(ctx.request, size, etag_of(st), st.st_mtime)
            if rng == "unsatisfiable":
                await ctx.op(handle.abort, "requested range not satisfiable")
                raise HttpError(416, "requested range not satisfiable", headers={"Content-Range": f"bytes */{size}"})
            if isinstance(rng, tuple):
                start, end = rng
                status = 206
            length = end - start + 1 if size else 0
            headers = _file_headers(st, ctx.vpath, length)
            if status == 206:
                headers["Content-Range"] = f"bytes {start}-{end}/{size}"
            resp = web.StreamResponse(status=status, headers=headers)
            resp.content_length = length
            watch = StallWatch(ctx.request, self.stall_timeout)
            await resp.prepare(ctx.request)
            pos, remaining = start, length
            down = ctx.session.bandwidth.down  # the user's, shared with all their sessions
            if remaining:
                pending = ctx.io(handle.read, pos, read_size(down, remaining))
            while remaining:
                assert pending is not None
                data = await pending
                pending = None
                if not data:
                    raise ConnectionError("file shrank while being sent")
                pos += len(data)
                remaining -= len(data)
                if remaining:  # read the next chunk while this one is sent
                    pending = ctx.io(handle.read, pos, read_size(down, remaining))
                await paced(down, len(data))
                await resp.write(data)
                watch.touch()
            await resp.write_eof()
        except HttpError:
            raise
        except BaseException:
            if pending is not None:  # never close the fd under a read still running
                await asyncio.gather(pending, return_exceptions=True)
            reason = watch.reason if watch is not None and watch.reason else \
                "connection closed before the download completed"
            await ctx.op(handle.abort, reason)
            raise
        finally:
            if watch is not None:
                watch.stop()
        await ctx.op(handle.close)
        return resp

    async def _listing(self, ctx: Ctx, *, head: bool) -> web.StreamResponse:
        entries = await ctx.op(ctx.session.listdir, ctx.vpath)
        vpath = ctx.session.realpath(ctx.vpath)
        req = ctx.request
        entries.sort(key=lambda e: e.name)
        if req.query.get("format") == "json" or "application/json" in req.headers.get("Accept", ""):
            items = [{
                "name": e.name,
                "type": "dir" if e.is_dir else "link" if e.is_link else "file",
                "size": e.size,
                "mtime": e.st.st_mtime,
                "modified": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(e.st.st_mtime)),
                "href": href(vpath.rstrip("/") + "/" + e.name, e.is_dir),
            } for e in entries]
            body = json.dumps({"path": vpath, "entries": items}, ensure_ascii=False).encode()
            ctype = "application/json"
        else:
            rows = "".join(
                f'<li><a href="{html.escape(href(vpath.rstrip("/") + "/" + e.name, e.is_dir))}">'
                f"{html.escape(e.name)}{'/' if e.is_dir else ''}</a> {'' if e.is_dir else e.size}</li>\n"
                for e in entries)
            title = html.escape(vpath)
            body = (f"<!doctype html>\n<meta charset=utf-8>\n<title>{title}</title>\n<h1>{title}</h1>\n"
                    f"<ul>\n{rows}</ul>\n").encode()
            ctype = "text/html"
        if head:
            return web.Response(headers={"Content-Type": f"{ctype}; charset=utf-8",
                                         "Content-Length": str(len(body))})
        return web.Response(body=body, content_type=ctype, charset="utf-8")

    # --- PUT -----------------------------------------------------------------------------------

    async def _put(self, ctx: Ctx) -> web.StreamResponse:
        req = ctx.request
        if "Content-Range" in req.headers:
            raise HttpError(400, "partial PUT (Content-Range) is not supported")
        limit = self.max_upload_size
        length = req.content_length
        if limit and length is not None and length > limit:
            raise HttpError(413, f"upload larger than the server's limit of {limit} bytes", close=True)
        try:
            handle: LocalWriteHandle = await ctx.op(ctx.session.open_write, ctx.vpath)  # pre-upload may veto
        except IsADirectory as exc:
            raise HttpError(405, exc.message) from None
        except NotFound as exc:
            raise await not_found(ctx, exc) from None
        if length is not None:
            try:
                handle.expect(length)  # over a quota: 507 before the body (and before 100 Continue)
            except FsError as exc:
                await ctx.op(handle.abort, exc.message)
                raise HttpError(status_of(exc), exc.message, close=True) from None
        if req.headers.get("Expect", "").lower() == "100-continue" and req.version >= (1, 1):
            # only now: a refused upload is answered before the client sends its body
            await req.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        pending: asyncio.Future[None] | None = None
        offset = 0
        batch: list[bytes] = []
        batched = 0
        watch = StallWatch(req, self.stall_timeout)
        up = ctx.session.bandwidth.up  # the user's, shared with all their sessions
        try:
            while True:
                # limited: one take's worth at a time (readany may give megabytes), read on
                # only once the user's bucket allows
                data = await (req.content.read(up.chunk) if up.rate else req.content.readany())
                watch.touch()
                await paced(up, len(data))
                if data:
                    batch.append(data)
                    batched += len(data)
                    if limit and offset + batched > limit:
                        raise HttpError(413, f"upload larger than the server's limit of {limit} bytes", close=True)
                if batched >= PUT_BATCH or (not data and batch):
                    if pending is not None:
                        await pending
                    # write this batch in the pool while the next one is read
                    pending = ctx.io(_write_all, handle, offset, batch)
                    offset += batched
                    batch, batched = [], 0
                if not data:
                    break
            if pending is not None:
                await pending
                pending = None
        except BaseException as exc:
            if pending is not None:
                await asyncio.gather(pending, return_exceptions=True)
            reason = exc.text if isinstance(exc, HttpError) else \
                watch.reason or "connection closed before the upload completed"
            await ctx.op(handle.abort, reason)
            if isinstance(exc, FsError):
                raise HttpError.from_fs(exc) from None
            raise
        finally:
            watch.stop()  # before publishing: a pre-publish script may take its time
        await ctx.op(handle.close)  # publish: the pre-publish verdict (sync bindings) comes back here
        return web.Response(status=204 if handle.existed else 201)


def _write_all(handle: "WriteHandlePort", offset: int, chunks: list[bytes]) -> None:
    """Write received chunks as they came (no joining copy), in a pool thread."""
    for chunk in chunks:
        handle.write(offset, chunk)
        offset += len(chunk)


def _file_headers(st: os.stat_result, vpath: str, length: int) -> dict[str, str]:
    import mimetypes

    return {
        "Content-Type": mimetypes.guess_type(vpath)[0] or "application/octet-stream",
        "Content-Length": str(length),
        "ETag": etag_of(st),
        "Last-Modified": http_date(st.st_mtime),
        "Accept-Ranges": "bytes",
        # Files are users' uploads: an HTML or SVG one must not run script in this origin,
        # where the browser sends the viewer's Basic credentials with every request.
        "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": "sandbox",
    }


def _etag_list(value: str) -> list[str]:
    return [t.strip().removeprefix("W/") for t in value.split(",") if t.strip()]


def _conditional(request: web.BaseRequest, etag: str, mtime: float) -> web.Response | None:
    """RFC 9110 section 13.2.2 order: If-Match, If-Unmodified-Since, If-None-Match, If-Modified-Since."""
    h = request.headers
    if "If-Match" in h:
        tags = _etag_list(h["If-Match"])
        if "*" not in tags and etag not in tags:
            raise HttpError(412, "the file changed (If-Match)")
    elif "If-Unmodified-Since" in h:
        since = parse_http_date(h["If-Unmodified-Since"])
        if since is not None and int(mtime) > since:
            raise HttpError(412, "the file changed (If-Unmodified-Since)")
    if "If-None-Match" in h:
        tags = _etag_list(h["If-None-Match"])
        if "*" in tags or etag in tags:
            return web.Response(status=304, headers={"ETag": etag, "Last-Modified": http_date(mtime)})
    elif "If-Modified-Since" in h:
        since = parse_http_date(h["If-Modified-Since"])
        if since is not None and int(mtime) <= since:
            return web.Response(status=304, headers={"ETag": etag, "Last-Modified": http_date(mtime)})
    return None


def _digits(text: str) -> bool:
    """ASCII digits only: str.isdigit() also accepts '²' and the like, which int() refuses."""
    return text.isascii() and text.isdigit()


def _range(request: web.BaseRequest, size: int, etag: str, mtime: float) -> tuple[int, int] | str | None:
    """One byte range, "unsatisfiable", or None (whole file: no, several or unusable ranges)."""
    value = request.headers.get("Range", "")
    if not value.startswith("bytes="):
        return None
    if_range = request.headers.get("If-Range")
    if if_range is not None:
        if if_range.startswith('"') or if_range.startswith("W/"):
            if if_range != etag:
                return None
        else:
            since = parse_http_date(if_range)
            if since is None or int(mtime) != int(since):
                return None
    specs = value[len("bytes="):].split(",")
    if len(specs) != 1:
        return None
    first, sep, last = specs[0].strip().partition("-")
    if not sep or not (_digits(first) or first == "") or not (_digits(last) or last == ""):
        return None
    if first == "":
        if last == "":
            return None
        n = int(last)
        if n == 0 or size == 0:
            return "unsatisfiable"
        return max(0, size - n), size - 1
    start = int(first)
    if last and int(last) < start:
        return None  # invalid: ignored, the whole file is sent
    if start >= size:
        return "unsatisfiable"
    end = int(last) if last else size - 1
    return start, min(end, size - 1)


def make_listener(core: "LocalCorePort[Any, Any]", m: HttpSection, server: ServerSection,
                  files: ConfigFiles, *, proxies: TrustedProxies | None = None) -> HttpListener:
    """The HTTP/WebDAV listener of ``[http]`` (``m``), on ``core``; ``[server]`` gives the stall timeout."""
    tls = None
    if bool(m.certificate) != bool(m.private_key):
        raise ValueError("[http] certificate and private_key must be given together")
    if m.certificate:
        tls = tls_context(str(files.resolve(m.certificate)), str(files.resolve(m.private_key)))
    return HttpListener(listen_addresses(m.listen), core, tls=tls, max_upload_size=m.max_upload_size,
                        stall_timeout=server.stall_timeout, idle_timeout=m.idle_timeout, proxies=proxies)


async def _peek(sock: socket.socket, deadline: float) -> bytes:
    """The first bytes a connection sent (up to 6, enough for :func:`looks_like_header`),
    left in the socket for whoever reads next; ProxyError if none came by ``deadline``."""
    loop = asyncio.get_running_loop()
    while True:
        ready: asyncio.Future[None] = loop.create_future()
        def wake() -> None:
            if not ready.done():
                ready.set_result(None)
        loop.add_reader(sock.fileno(), wake)
        try:
            await asyncio.wait_for(ready, max(0.0, deadline - loop.time()))
        except asyncio.TimeoutError:
            raise ProxyError("nothing received in time") from None
        finally:
            loop.remove_reader(sock.fileno())
        try:
            data = sock.recv(6, socket.MSG_PEEK)
        except BlockingIOError:
            continue
        except OSError as exc:
            raise ProxyError(f"connection failed: {exc}") from None
        if not data:
            raise ProxyError("connection closed before it sent anything")
        if len(data) >= 6 or not looks_like_header(data):
            return data
        await asyncio.sleep(0.01)  # the start of a header, and the rest not there yet

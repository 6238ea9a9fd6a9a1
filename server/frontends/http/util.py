"""Pieces shared by the HTTP file API (:mod:`.http`) and WebDAV (:mod:`.webdav`).

Nothing here decides who may do what: paths are only *decoded* here (once,
strictly), then handed to the Session, which normalises, confines and checks
them exactly as for SFTP (docs/architecture.md rules 1 and 2). Session errors become HTTP
statuses in one table, so every method answers the same way.
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import stat as statmod
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Callable, TypeVar
from urllib.parse import quote, unquote_to_bytes, urlsplit

from aiohttp import web

from scriptsftp.server.contract.errors import (
    AlreadyExists, DirectoryNotEmpty, Failure, FsError, InvalidPath, IsADirectory, LimitExceeded, NoSpace,
    NotADirectory, NotFound, PermissionDenied, Vetoed,
)
from scriptsftp.server.contract.ports import LocalSessionPort, LocalWriteHandle, ThrottlePort

T = TypeVar("T")

#: The session an HTTP request acts through: the core's port with its account (WebDAV keys
#: its locks on the home), whose uploads can be filled in the kernel (WebDAV COPY) and know
#: whether they replace a file (PUT's 204 or 201).
HttpSession = LocalSessionPort[LocalWriteHandle]

#: bytes per read/write call handed to the thread pool (large enough that the
#: round trip to the pool costs nothing next to the copy)
CHUNK = 1 << 20

#: Session error -> HTTP status. Order matters: subclasses first (Vetoed is a PermissionDenied).
_STATUS: list[tuple[type[FsError], int]] = [
    (Vetoed, 403),
    (NotFound, 404),
    (PermissionDenied, 403),
    (AlreadyExists, 409),
    (NotADirectory, 409),
    (IsADirectory, 409),
    (DirectoryNotEmpty, 409),
    (InvalidPath, 400),
    (NoSpace, 507),
    (LimitExceeded, 503),
    (Failure, 500),
]

REASONS = {
    200: "OK", 201: "Created", 204: "No Content", 207: "Multi-Status", 400: "Bad Request", 403: "Forbidden",
    404: "Not Found", 405: "Method Not Allowed", 409: "Conflict", 412: "Precondition Failed",
    413: "Payload Too Large", 415: "Unsupported Media Type", 423: "Locked", 424: "Failed Dependency",
    500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable", 507: "Insufficient Storage",
}


def status_of(exc: FsError) -> int:
    for cls, status in _STATUS:
        if isinstance(exc, cls):
            return status
    return 500


def status_line(status: int) -> str:
    return f"HTTP/1.1 {status} {REASONS.get(status, '')}".rstrip()


class HttpError(Exception):
    """An answer other than success; ``text`` is the plain-text body the client sees."""

    def __init__(self, status: int, text: str, *, headers: dict[str, str] | None = None,
                 close: bool = False, body: bytes | None = None, content_type: str | None = None) -> None:
        super().__init__(text)
        self.status = status
        self.text = text
        self.headers = headers or {}
        self.close = close
        self.body = body
        self.content_type = content_type

    @classmethod
    def from_fs(cls, exc: FsError, *, status: int | None = None) -> "HttpError":
        return cls(status or status_of(exc), exc.message)

    def response(self) -> web.Response:
        if self.body is not None:
            resp = web.Response(status=self.status, body=self.body, headers=self.headers,
                                content_type=self.content_type or "application/xml", charset="utf-8")
        else:
            resp = web.Response(status=self.status, text=self.text + "\n", headers=self.headers,
                                content_type="text/plain", charset="utf-8")
        if self.close:
            resp.force_close()
        return resp


def decode_path(target: str) -> str:
    """The request target's path, percent-decoded exactly once.

    ``..``, ``.`` and empty segments are left for the Session (``..`` stops at
    the user's home, as over SFTP); what no Session path may hold is refused
    here with a clear 400: NUL, invalid UTF-8, backslashes (Windows clients would
    mean a separator; a name holding one is only reachable over SFTP), and
    anything but an absolute path."""
    path = target.split("#", 1)[0].split("?", 1)[0]
    if path.startswith(("http://", "https://")):  # absolute-form request target
        path = urlsplit(path).path or "/"
    if not path.startswith("/"):
        raise HttpError(400, "the request path must be absolute")
    raw = unquote_to_bytes(path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise HttpError(400, "the request path is not valid UTF-8") from None
    if "\x00" in text:
        raise HttpError(400, "the request path contains a NUL byte")
    if "\\" in text:
        raise HttpError(400, "the request path contains a backslash")
    return text


_SAFE = "-._~!$&'()*+,;=:@"


def href(vpath: str, is_dir: bool = False) -> str:
    """The URL path of a virtual path, each segment percent-encoded."""
    out = "/".join(quote(p, safe=_SAFE) for p in vpath.split("/"))
    if is_dir and not out.endswith("/"):
        out += "/"
    return out or "/"


def child(vpath: str, name: str) -> str:
    return vpath.rstrip("/") + "/" + name


def http_date(ts: float) -> str:
    return email.utils.formatdate(ts, usegmt=True)


def parse_http_date(value: str) -> float | None:
    try:
        dt = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if dt is None:
        return None
    return dt.timestamp()


def etag_of(st: Any) -> str:
    """Strong ETag: a published upload is a new inode (atomic rename), so any change shows."""
    mtime_ns = st.st_mtime_ns if st.st_mtime_ns is not None else int(st.st_mtime * 1e9)  # synthetic stats
    return f'"{st.st_ino:x}-{mtime_ns:x}-{st.st_size:x}"'


def is_dir(st: Any) -> bool:
    return statmod.S_ISDIR(st.st_mode)


@dataclass
class Pools:
    """Where blocking calls run, so the event loop never waits on a disk or a script.

    ``auth``: logins (``LoginCore.login``: the argon2 check, and ``pre-login`` scripts
    when bound; the failure delay is waited on the loop), so a flood of bad logins
    cannot hold the threads logged-in users need. ``ops``: calls that may wait on a
    script verdict (connect, open, close/publish, namespace changes).
    ``io``: chunk reads and writes of open handles, never behind a script."""

    auth: Executor
    ops: Executor
    io: Executor


@dataclass
class Ctx:
    """One authenticated request: the Session it acts through and the decoded path."""

    request: web.BaseRequest
    session: HttpSession
    vpath: str
    pools: Pools
    locks: Any = None

    async def op(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pools.ops, functools.partial(fn, *args, **kw))

    def io(self, fn: Callable[..., T], *args: Any) -> "asyncio.Future[T]":
        loop = asyncio.get_running_loop()
        return loop.run_in_executor(self.pools.io, functools.partial(fn, *args))


async def read_small_body(request: web.BaseRequest, limit: int) -> bytes:
    """A request body that is meant to be small (XML); more than ``limit`` bytes is a 413."""
    length = request.content_length
    if length is not None and length > limit:
        raise HttpError(413, f"request body larger than {limit} bytes", close=True)
    chunks: list[bytes] = []
    total = 0
    while True:
        data = await request.content.readany()
        if not data:
            break
        total += len(data)
        if total > limit:
            raise HttpError(413, f"request body larger than {limit} bytes", close=True)
        chunks.append(data)
    return b"".join(chunks)


async def not_found(ctx: Ctx, exc: FsError) -> HttpError:
    """A create (PUT, MKCOL, LOCK) answered NotFound: 409 when the parent is missing
    (RFC 4918), else 404 (the name itself is hidden by a filter)."""
    parent = ctx.session.realpath(ctx.vpath).rsplit("/", 1)[0] or "/"
    try:
        parent_ok = (await ctx.op(ctx.session.stat, parent)).is_dir
    except FsError:
        parent_ok = False
    if parent_ok:
        return HttpError(404, exc.message)
    return HttpError(409, f"{exc.message} (the parent directory must exist)")


def destination_path(request: web.BaseRequest) -> str:
    """The ``Destination`` of COPY/MOVE, decoded like a request path and kept on this server."""
    value = request.headers.get("Destination")
    if not value:
        raise HttpError(400, "Destination header missing")
    parts = urlsplit(value)
    if parts.scheme or parts.netloc:
        if parts.scheme not in ("http", "https") or parts.netloc.lower() != (request.host or "").lower():
            raise HttpError(502, "Destination is on another server")
    return decode_path(parts.path or "/")


def overwrite_flag(request: web.BaseRequest) -> bool:
    value = request.headers.get("Overwrite", "T").strip().upper()
    if value not in ("T", "F"):
        raise HttpError(400, "Overwrite header must be T or F")
    return value == "T"


#: the longest one sleep of a transfer waiting for the user's bandwidth before it looks
#: at the rate again (a limit changed meanwhile applies from there)
BANDWIDTH_RECHECK = 0.25


async def paced(throttle: ThrottlePort, n: int) -> None:
    """Wait on the event loop, holding no thread, until the user's bucket lets ``n`` bytes
    move (``bandwidth_up``/``_down``, shared with every session of the user). Costs one
    attribute read for an unlimited user. A wait longer than the stall timeout shows as a
    stall (StallWatch), as any transfer that moves nothing for that long."""
    if not throttle.rate or n <= 0:
        return
    mark = throttle.charge(n)
    while (wait := throttle.wait_for(mark)) > 0:
        await asyncio.sleep(min(wait, BANDWIDTH_RECHECK))


def read_size(throttle: ThrottlePort, remaining: int) -> int:
    """Bytes of a download to read next: CHUNK, or one take's worth while the user is limited."""
    return min(throttle.chunk if throttle.rate else CHUNK, remaining)


class StallWatch:
    """Ends a connection whose transfer has moved no byte for ``seconds`` (``[server]
    stall_timeout``; 0: never), so that a client that stops sending a PUT body, or stops
    reading a download, holds no staging file, handle or pool slot for longer.

    One timer per transfer, armed for the moment the silence would reach the limit
    (not a tick per second); :meth:`touch` per chunk costs a clock read. Bytes the
    client takes from a download show as a shrinking write buffer. On a stall the
    transport is aborted: the read or write waiting on it fails, and the handler
    aborts the transfer with :attr:`reason`. The client sees the connection closed."""

    def __init__(self, request: web.BaseRequest, seconds: float) -> None:
        self.seconds = seconds
        self.reason: str | None = None
        self._transport = request.transport
        self._loop = asyncio.get_running_loop()
        self._last = self._loop.time()
        self._buffered = self._write_buffer()
        self._timer: asyncio.TimerHandle | None = None
        if seconds and self._transport is not None:
            self._timer = self._loop.call_later(seconds, self._check)

    def touch(self) -> None:
        """Bytes moved now."""
        self._last = self._loop.time()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _write_buffer(self) -> int:
        t = self._transport
        return t.get_write_buffer_size() if t is not None and not t.is_closing() else 0

    def _check(self) -> None:
        self._timer = None
        now = self._loop.time()
        buffered = self._write_buffer()
        if buffered != self._buffered:  # the client read part of a download meanwhile
            self._buffered, self._last = buffered, now
        quiet = now - self._last
        if quiet < self.seconds:
            self._timer = self._loop.call_later(self.seconds - quiet, self._check)
            return
        self.reason = f"stalled: no data for {self.seconds:g} s"
        assert self._transport is not None
        self._transport.abort()  # not close(): that would wait to flush a download nobody reads

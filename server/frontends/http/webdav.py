"""WebDAV (RFC 4918 class 1, plus the LOCK/UNLOCK that Windows and macOS need).

Every method is a sequence of Session calls (stat, listdir, open_read,
open_write, mkdir, rmdir, remove, rename, setstat), so WebDAV users get the same
permissions, filters, staged uploads and events as SFTP users; COPY is a
download plus an upload, and fires both. Tree walks run as one blocking
function in the ``ops`` thread pool, never on the event loop.

XML: request bodies are capped (:data:`MAX_XML`) and refused when they hold a
DOCTYPE or entity declaration (billion laughs, external entities), checked by
expat itself so no encoding trick gets past it.

Locks are *advisory and in memory* (:class:`LockManager`): tokens are issued,
refreshed, listed in ``lockdiscovery`` and released, and a second exclusive
lock on the same resource is refused with 423, which is what Windows Explorer,
macOS Finder and office suites need; writes are never refused because of a lock
and locks are forgotten on restart.
"""

from __future__ import annotations

import mimetypes
import re
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Any, Callable, NoReturn
from xml.parsers import expat

from aiohttp import web

from scriptsftp.server.contract.errors import AlreadyExists, FsError, IsADirectory, NotFound, PermissionDenied
from scriptsftp.server.frontends.http.util import (
    Ctx, HttpError, HttpSession, child, destination_path, etag_of, href, http_date, is_dir, overwrite_flag,
    not_found, parse_http_date, read_small_body, status_line, status_of,
)

DAV = "DAV:"
MS = "urn:schemas-microsoft-com:"
MAX_XML = 256 * 1024
DEFAULT_LOCK_SECONDS = 3600
MAX_LOCK_SECONDS = 24 * 3600
#: Locks live in memory for up to MAX_LOCK_SECONDS: what one user may hold, and how large an
#: owner element is kept (clients send a name or a URL), so LOCK cannot grow the daemon without bound.
MAX_LOCKS_PER_USER = 1000
MAX_OWNER_BYTES = 4096

ET.register_namespace("D", DAV)
ET.register_namespace("Z", MS)


def D(name: str) -> str:
    return f"{{{DAV}}}{name}"


# --- XML in and out ----------------------------------------------------------------


class _Refused(Exception):
    pass


def _refuse(*_args: Any) -> NoReturn:
    raise _Refused()


def parse_xml(body: bytes) -> ET.Element | None:
    """Parse a small request body; None when empty. DTDs and entities are refused."""
    if not body.strip():
        return None
    probe = expat.ParserCreate()
    probe.StartDoctypeDeclHandler = _refuse
    probe.EntityDeclHandler = _refuse
    probe.UnparsedEntityDeclHandler = _refuse
    probe.ExternalEntityRefHandler = _refuse
    try:
        probe.Parse(body, True)
    except _Refused:
        raise HttpError(400, "XML with a DOCTYPE or entity declarations is not accepted") from None
    except expat.ExpatError as exc:
        raise HttpError(400, f"malformed XML body: {exc}") from None
    return ET.fromstring(body)


async def xml_body(ctx: Ctx) -> ET.Element | None:
    return parse_xml(await read_small_body(ctx.request, MAX_XML))


def xml_bytes(root: ET.Element) -> bytes:
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


def xml_response(root: ET.Element, status: int = 207, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=xml_bytes(root), headers=headers,
                        content_type="application/xml", charset="utf-8")


def dav_error(status: int, condition: str, text: str) -> HttpError:
    """An error with an RFC 4918 precondition element as body."""
    root = ET.Element(D("error"))
    ET.SubElement(root, D(condition))
    return HttpError(status, text, body=xml_bytes(root))


def _status_el(parent: ET.Element, status: int) -> None:
    ET.SubElement(parent, D("status")).text = status_line(status)


def multistatus_errors(errors: list[tuple[str, FsError]]) -> web.Response:
    """207 listing the members an operation on a tree could not handle."""
    root = ET.Element(D("multistatus"))
    for vpath, exc in errors:
        r = ET.SubElement(root, D("response"))
        ET.SubElement(r, D("href")).text = href(vpath)
        _status_el(r, status_of(exc))
        ET.SubElement(r, D("responsedescription")).text = exc.message
    return xml_response(root)


# --- locks -------------------------------------------------------------------------


@dataclass
class Lock:
    token: str
    home: str
    root: str
    exclusive: bool
    infinite: bool
    owner: ET.Element | None
    seconds: int
    expires: float
    user: str

    def covers(self, vpath: str) -> bool:
        if vpath == self.root:
            return True
        return self.infinite and vpath.startswith(self.root.rstrip("/") + "/")


class Locked(Exception):
    pass


class TooManyLocks(Exception):
    pass


class LockManager:
    """In-memory advisory locks keyed by (home, virtual path); see the module docstring."""

    def __init__(self) -> None:
        self._locks: dict[str, Lock] = {}
        self._mutex = threading.Lock()

    def _purge(self) -> None:
        now = time.monotonic()
        for token in [t for t, lk in self._locks.items() if lk.expires < now]:
            del self._locks[token]

    def on(self, home: str, vpath: str) -> list[Lock]:
        with self._mutex:
            self._purge()
            return [lk for lk in self._locks.values() if lk.home == home and lk.covers(vpath)]

    def acquire(self, home: str, vpath: str, user: str, *, exclusive: bool, infinite: bool,
                owner: ET.Element | None, seconds: int) -> Lock:
        with self._mutex:
            self._purge()
            below = vpath.rstrip("/") + "/"
            for lk in self._locks.values():
                if lk.home != home:
                    continue
                overlaps = lk.covers(vpath) or (infinite and lk.root.startswith(below))
                if overlaps and (exclusive or lk.exclusive):
                    raise Locked(lk.root)
            if sum(1 for lk in self._locks.values() if lk.user == user) >= MAX_LOCKS_PER_USER:
                raise TooManyLocks(f"too many WebDAV locks held by {user} (limit {MAX_LOCKS_PER_USER})")
            lock = Lock(f"opaquelocktoken:{uuid.uuid4()}", home, vpath, exclusive, infinite, owner, seconds,
                        time.monotonic() + seconds, user)
            self._locks[lock.token] = lock
            return lock

    def refresh(self, home: str, vpath: str, tokens: list[str], seconds: int) -> Lock | None:
        with self._mutex:
            self._purge()
            for t in tokens:
                lk = self._locks.get(t)
                if lk is not None and lk.home == home and lk.covers(vpath):
                    lk.seconds = seconds
                    lk.expires = time.monotonic() + seconds
                    return lk
        return None

    def release(self, home: str, vpath: str, token: str) -> bool:
        with self._mutex:
            lk = self._locks.get(token)
            if lk is None or lk.home != home or not lk.covers(vpath):
                return False
            del self._locks[token]
            return True

    def forget(self, home: str, vpath: str) -> None:
        """The resource is gone (DELETE, MOVE): its locks go with it."""
        with self._mutex:
            below = vpath.rstrip("/") + "/"
            for t in [t for t, lk in self._locks.items()
                      if lk.home == home and (lk.root == vpath or lk.root.startswith(below))]:
                del self._locks[t]


def _lock_xml(parent: ET.Element, lk: Lock) -> None:
    a = ET.SubElement(parent, D("activelock"))
    ET.SubElement(ET.SubElement(a, D("locktype")), D("write"))
    ET.SubElement(ET.SubElement(a, D("lockscope")), D("exclusive" if lk.exclusive else "shared"))
    ET.SubElement(a, D("depth")).text = "infinity" if lk.infinite else "0"
    if lk.owner is not None:
        a.append(lk.owner)
    ET.SubElement(a, D("timeout")).text = f"Second-{lk.seconds}"
    ET.SubElement(ET.SubElement(a, D("locktoken")), D("href")).text = lk.token
    ET.SubElement(ET.SubElement(a, D("lockroot")), D("href")).text = href(lk.root)


def _supportedlock(el: ET.Element) -> None:
    for scope in ("exclusive", "shared"):
        e = ET.SubElement(el, D("lockentry"))
        ET.SubElement(ET.SubElement(e, D("lockscope")), D(scope))
        ET.SubElement(ET.SubElement(e, D("locktype")), D("write"))


def _home(ctx: Ctx) -> str:
    return str(ctx.session.account.home)


# --- PROPFIND ------------------------------------------------------------------------

# The "allprop" set (RFC 4918 section 14.2 plus the lock properties).
ALLPROP = ["displayname", "resourcetype", "getcontentlength", "getlastmodified", "creationdate", "getetag",
           "getcontenttype", "supportedlock", "lockdiscovery"]


class _Props:
    """Fills property elements for one resource; False means 'no such property here' (404)."""

    def __init__(self, session: HttpSession, locks: LockManager, home: str) -> None:
        self.session = session
        self.locks = locks
        self.home = home
        self._vfs: Any = None

    def fill(self, el: ET.Element, tag: str, vpath: str, st: Any) -> bool:
        if not tag.startswith("{DAV:}"):
            return False
        name = tag[len("{DAV:}"):]
        directory = is_dir(st)
        if name == "displayname":
            el.text = vpath.rstrip("/").rsplit("/", 1)[-1] or "/"
        elif name == "resourcetype":
            if directory:
                ET.SubElement(el, D("collection"))
        elif name == "getcontentlength":
            if directory:
                return False
            el.text = str(st.st_size)
        elif name == "getlastmodified":
            el.text = http_date(st.st_mtime)
        elif name == "creationdate":
            el.text = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(min(st.st_mtime, st.st_ctime)))
        elif name == "getetag":
            if directory:
                return False
            el.text = etag_of(st)
        elif name == "getcontenttype":
            if directory:
                return False
            el.text = mimetypes.guess_type(vpath)[0] or "application/octet-stream"
        elif name == "supportedlock":
            _supportedlock(el)
        elif name == "lockdiscovery":
            for lk in self.locks.on(self.home, vpath):
                _lock_xml(el, lk)
        elif name in ("quota-available-bytes", "quota-used-bytes"):  # RFC 4331, only when asked
            if self._vfs is None:
                self._vfs = self.session.statvfs("/")
            v = self._vfs
            el.text = str(v.f_bavail * v.f_frsize if name == "quota-available-bytes"
                          else (v.f_blocks - v.f_bfree) * v.f_frsize)
        else:
            return False
        return True


def _propfind_sync(session: HttpSession, locks: LockManager, vpath: str, depth: int, mode: str,
                   wanted: list[str]) -> bytes:
    """Stat the resource (and its members for depth 1) and build the multistatus."""
    vpath = session.realpath(vpath)
    top = session.stat(vpath)
    members: list[tuple[str, Any]] = [(vpath, top.st)]
    if depth == 1 and top.is_dir:
        for e in sorted(session.listdir(vpath), key=lambda e: e.name):
            p = child(vpath, e.name)
            st = e.st
            if e.is_link:
                try:
                    st = session.stat(p).st
                except FsError:
                    continue  # a link pointing outside the home or nowhere: not offered
            members.append((p, st))
    props = _Props(session, locks, str(session.account.home))
    root = ET.Element(D("multistatus"))
    for p, st in members:
        r = ET.SubElement(root, D("response"))
        ET.SubElement(r, D("href")).text = href(p, is_dir(st))
        found = ET.Element(D("prop"))
        missing = ET.Element(D("prop"))
        names = [D(n) for n in ALLPROP] if mode == "allprop" else wanted
        if mode == "allprop":
            names += [t for t in wanted if t not in names]  # <include>
        for tag in names:
            el = ET.Element(tag)
            if mode == "propname":
                if props.fill(ET.Element(tag), tag, p, st):
                    found.append(el)
            elif props.fill(el, tag, p, st):
                found.append(el)
            elif mode != "allprop" or tag in wanted:
                missing.append(el)
        for prop, status in ((found, 200), (missing, 404)):
            if len(prop):
                ps = ET.SubElement(r, D("propstat"))
                ps.append(prop)
                _status_el(ps, status)
    return xml_bytes(root)


async def propfind(ctx: Ctx) -> web.StreamResponse:
    depth_hdr = ctx.request.headers.get("Depth", "infinity").strip().lower()
    if depth_hdr == "infinity":
        raise dav_error(403, "propfind-finite-depth", "PROPFIND with Depth: infinity is not supported")
    if depth_hdr not in ("0", "1"):
        raise HttpError(400, "Depth must be 0 or 1")
    body = await xml_body(ctx)
    mode, wanted = "allprop", []
    if body is not None:
        if body.tag != D("propfind"):
            raise HttpError(400, "PROPFIND body must be a DAV:propfind element")
        for el in body:
            if el.tag == D("prop"):
                mode, wanted = "prop", [p.tag for p in el]
            elif el.tag == D("propname"):
                mode = "propname"
                wanted = [D(n) for n in ALLPROP]
            elif el.tag == D("allprop"):
                mode = "allprop"
            elif el.tag == D("include"):
                wanted = [p.tag for p in el]
    data = await ctx.op(_propfind_sync, ctx.session, ctx.locks, ctx.vpath, int(depth_hdr), mode, wanted)
    return web.Response(status=207, body=data, content_type="application/xml", charset="utf-8")


# --- PROPPATCH -----------------------------------------------------------------------

MTIME_PROPS = {D("getlastmodified"), f"{{{MS}}}Win32LastModifiedTime"}
# Windows sets these with every copy; answering 200 (and ignoring them) keeps Explorer happy.
IGNORED_PROPS = {f"{{{MS}}}{n}" for n in ("Win32CreationTime", "Win32LastAccessTime", "Win32FileAttributes")}


async def proppatch(ctx: Ctx) -> web.StreamResponse:
    body = await xml_body(ctx)
    if body is None or body.tag != D("propertyupdate"):
        raise HttpError(400, "PROPPATCH body must be a DAV:propertyupdate element")
    st = (await ctx.op(ctx.session.stat, ctx.vpath)).st
    results: list[tuple[str, int]] = []
    mtime: float | None = None
    for op in body:
        if op.tag not in (D("set"), D("remove")):
            continue
        for prop in op.iter(D("prop")):
            for p in prop:
                if p.tag in MTIME_PROPS and op.tag == D("set"):
                    value = parse_http_date((p.text or "").strip())
                    if value is None:
                        results.append((p.tag, 409))
                    else:
                        mtime = value
                        results.append((p.tag, 200))
                elif p.tag in IGNORED_PROPS:
                    results.append((p.tag, 200))
                else:
                    results.append((p.tag, 403))  # no dead properties are stored
    if any(s != 200 for _, s in results):
        results = [(t, 424 if s == 200 else s) for t, s in results]
    elif mtime is not None:
        try:
            await ctx.op(ctx.session.setstat, ctx.vpath, times=(st.st_atime, mtime))
        except FsError as exc:
            results = [(t, status_of(exc)) for t, _ in results]
    root = ET.Element(D("multistatus"))
    r = ET.SubElement(root, D("response"))
    ET.SubElement(r, D("href")).text = href(ctx.session.realpath(ctx.vpath), is_dir(st))
    for status in sorted({s for _, s in results}):
        ps = ET.SubElement(r, D("propstat"))
        prop = ET.SubElement(ps, D("prop"))
        for tag, s in results:
            if s == status:
                ET.SubElement(prop, tag)
        _status_el(ps, status)
    return xml_response(root)


# --- MKCOL ------------------------------------------------------------------------------


async def mkcol(ctx: Ctx) -> web.StreamResponse:
    req = ctx.request
    if req.body_exists and (req.content_length or 0) != 0 or req.headers.get("Transfer-Encoding"):
        raise HttpError(415, "MKCOL with a body is not supported")
    try:
        await ctx.op(ctx.session.mkdir, ctx.vpath)
    except AlreadyExists as exc:
        raise HttpError(405, exc.message) from None
    except NotFound as exc:
        raise await not_found(ctx, exc) from None
    return web.Response(status=201)


# --- DELETE, COPY, MOVE (tree walks, blocking, run in the ops pool) ------------------


def delete_tree(session: HttpSession, vpath: str) -> list[tuple[str, FsError]]:
    """Remove a file, or a directory and all it holds, through the Session.

    A member that cannot go is reported and its parents stay; everything else
    goes (RFC 4918 9.6.1)."""
    entry = session.stat(vpath, follow=False)
    errors: list[tuple[str, FsError]] = []
    if entry.is_dir:
        session.check_removable(vpath)  # a virtual folder is refused before it is emptied
        _delete_dir(session, session.realpath(vpath), errors)
    else:
        session.remove(vpath)
    return errors


def _delete_dir(session: HttpSession, vpath: str, errors: list[tuple[str, FsError]]) -> bool:
    try:
        entries = session.listdir(vpath)
    except FsError as exc:
        errors.append((vpath, exc))
        return False
    ok = True
    for e in entries:
        p = child(vpath, e.name)
        if e.is_dir:
            ok = _delete_dir(session, p, errors) and ok
            continue
        try:
            session.remove(p)
        except FsError as exc:
            errors.append((p, exc))
            ok = False
    if ok:
        try:
            session.rmdir(vpath)
        except FsError as exc:
            errors.append((vpath, exc))
            ok = False
    return ok


def copy_file(session: HttpSession, src: str, dst: str) -> None:
    """A download of ``src`` and an upload to ``dst`` (staged, published on success)."""
    rh = session.open_read(src)
    try:
        wh = session.open_write(dst)
    except BaseException:
        rh.abort("copy destination refused")
        raise
    try:
        wh.copy_from(rh.fd)  # in the kernel, holes kept, never a byte through here
        rh.sent = wh.written
    except BaseException:
        wh.abort("copy failed")
        rh.abort("copy failed")
        raise
    rh.close()
    wh.close()


def copy_tree(session: HttpSession, src: str, dst: str, infinite: bool, errors: list[tuple[str, FsError]]) -> None:
    session.mkdir(dst)
    if not infinite:
        return
    for e in sorted(session.listdir(src), key=lambda e: e.name):
        s, d = child(src, e.name), child(dst, e.name)
        try:
            if e.is_link and session.stat(s).is_dir:
                # Followed, a link to a directory can lead back into the tree (or to where the
                # copy is being written): an endless copy. It is reported, not copied.
                raise PermissionDenied(f"{s}: a symbolic link to a directory is not copied")
            if e.is_dir:
                copy_tree(session, s, d, True, errors)
            else:
                copy_file(session, s, d)
        except FsError as exc:
            errors.append((s, exc))


def _exists(session: HttpSession, vpath: str) -> Any:
    try:
        return session.stat(vpath, follow=False)
    except NotFound:
        return None


def _copy_move_sync(session: HttpSession, src: str, dst: str, *, move: bool, overwrite: bool,
                    infinite: bool) -> tuple[bool, list[tuple[str, FsError]]]:
    """Returns (destination existed, member errors)."""
    src, dst = session.realpath(src), session.realpath(dst)
    if src == dst:
        raise HttpError(403, "source and destination are the same")
    if dst.startswith(src.rstrip("/") + "/"):
        raise HttpError(409, "cannot copy or move a collection into itself")
    if src == "/" or dst == "/":
        raise HttpError(403, "cannot copy or move the home directory, or onto it")
    source = session.stat(src, follow=not move)
    target = _exists(session, dst)
    if target is not None and not overwrite:
        raise HttpError(412, f"{dst}: already exists and Overwrite is F")
    try:
        if target is not None and (target.is_dir or source.is_dir):
            errors = delete_tree(session, dst)
            if errors:
                return True, errors
        if move:
            session.rename(src, dst, overwrite=target is not None)
            return target is not None, []
        errors = []
        if source.is_dir:
            copy_tree(session, src, dst, infinite, errors)
        else:
            copy_file(session, src, dst)
        return target is not None, errors
    except NotFound as exc:
        if _exists(session, src) is not None:
            # the source is there: what is missing is the destination's parent
            raise HttpError(409, f"{exc.message} (the destination's parent collection must exist)") from None
        raise


async def copy_or_move(ctx: Ctx, move: bool) -> web.StreamResponse:
    dst = destination_path(ctx.request)
    overwrite = overwrite_flag(ctx.request)
    depth = ctx.request.headers.get("Depth", "infinity").strip().lower()
    if depth not in ("0", "infinity") or (move and depth != "infinity"):
        raise HttpError(400, "Depth must be infinity (or 0 for COPY)")
    existed, errors = await ctx.op(_copy_move_sync, ctx.session, ctx.vpath, dst, move=move,
                                   overwrite=overwrite, infinite=depth == "infinity")
    home = _home(ctx)
    if move:
        ctx.locks.forget(home, ctx.session.realpath(ctx.vpath))
    if errors:
        return multistatus_errors(errors)
    return web.Response(status=204 if existed else 201)


async def copy(ctx: Ctx) -> web.StreamResponse:
    return await copy_or_move(ctx, move=False)


async def move(ctx: Ctx) -> web.StreamResponse:
    return await copy_or_move(ctx, move=True)


async def delete(ctx: Ctx) -> web.StreamResponse:
    depth = ctx.request.headers.get("Depth", "infinity").strip().lower()
    if depth != "infinity":
        raise HttpError(400, "DELETE needs Depth: infinity")
    if ctx.session.realpath(ctx.vpath) == "/":
        # refused outright: a stray `DELETE /` would otherwise empty the whole home
        raise HttpError(403, "the home directory cannot be deleted")
    errors = await ctx.op(delete_tree, ctx.session, ctx.vpath)
    ctx.locks.forget(_home(ctx), ctx.session.realpath(ctx.vpath))
    if errors:
        return multistatus_errors(errors)
    return web.Response(status=204)


# --- LOCK / UNLOCK ----------------------------------------------------------------------

_TOKEN = re.compile(r"<(opaquelocktoken:[^>\s]+)>")


def _timeout(request: web.BaseRequest) -> int:
    for part in request.headers.get("Timeout", "").split(","):
        part = part.strip()
        if part.lower() == "infinite":
            return MAX_LOCK_SECONDS
        if part.lower().startswith("second-") and part[7:].isascii() and part[7:].isdigit():
            return max(1, min(int(part[7:]), MAX_LOCK_SECONDS))
    return DEFAULT_LOCK_SECONDS


def _create_empty(session: HttpSession, vpath: str) -> None:
    """LOCK on an unmapped URL creates an empty file (RFC 4918 9.10.4), as an ordinary upload."""
    session.open_write(vpath, exclusive=True).close()


async def lock(ctx: Ctx) -> web.StreamResponse:
    req = ctx.request
    body = await xml_body(ctx)
    home = _home(ctx)
    vpath = ctx.session.realpath(ctx.vpath)
    seconds = _timeout(req)
    if body is None:  # refresh
        lk = ctx.locks.refresh(home, vpath, _TOKEN.findall(req.headers.get("If", "")), seconds)
        if lk is None:
            raise dav_error(412, "lock-token-submitted", "no lock of yours to refresh here")
        status, created = 200, False
    else:
        if body.tag != D("lockinfo"):
            raise HttpError(400, "LOCK body must be a DAV:lockinfo element")
        scope = body.find(D("lockscope"))
        exclusive = scope is None or scope.find(D("shared")) is None
        owner = body.find(D("owner"))
        if owner is not None and len(ET.tostring(owner)) > MAX_OWNER_BYTES:
            raise HttpError(400, f"the lock's owner element is larger than {MAX_OWNER_BYTES} bytes")
        depth = req.headers.get("Depth", "infinity").strip().lower()
        if depth not in ("0", "infinity"):
            raise HttpError(400, "Depth must be 0 or infinity")
        created = False
        try:
            await ctx.op(ctx.session.stat, vpath)
        except NotFound:
            try:
                await ctx.op(_create_empty, ctx.session, vpath)
            except NotFound as exc:
                raise await not_found(ctx, exc) from None
            except (AlreadyExists, IsADirectory):
                pass
            else:
                created = True
        try:
            lk = ctx.locks.acquire(home, vpath, ctx.session.user, exclusive=exclusive, infinite=depth != "0",
                                   owner=owner, seconds=seconds)
        except Locked as exc:
            raise dav_error(423, "no-conflicting-lock", f"{exc.args[0]} is locked") from None
        except TooManyLocks as exc:
            raise HttpError(503, str(exc)) from None
        status = 201 if created else 200
    root = ET.Element(D("prop"))
    _lock_xml(ET.SubElement(root, D("lockdiscovery")), lk)
    return xml_response(root, status, headers={"Lock-Token": f"<{lk.token}>"})


async def unlock(ctx: Ctx) -> web.StreamResponse:
    tokens = _TOKEN.findall(ctx.request.headers.get("Lock-Token", ""))
    if not tokens:
        raise HttpError(400, "Lock-Token header missing")
    if not ctx.locks.release(_home(ctx), ctx.session.realpath(ctx.vpath), tokens[0]):
        raise dav_error(409, "lock-token-matches-request-uri", "no such lock on this resource")
    return web.Response(status=204)


HANDLERS: dict[str, Callable[[Ctx], Any]] = {
    "PROPFIND": propfind, "PROPPATCH": proppatch, "MKCOL": mkcol, "COPY": copy, "MOVE": move,
    "LOCK": lock, "UNLOCK": unlock,
}

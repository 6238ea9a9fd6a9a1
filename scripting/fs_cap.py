"""``api.fs``: a script works on the event user's files through a Session.

The handler asks the daemon's :class:`~scriptsftp.server.contract.scripting.ScriptFiles`
(``server/core/script_files.py``) for a session on the event's user, opened exactly as
a login would, so every path goes through the same confinement (no ``..`` above the
home, no symlink out, no staging names), the same permissions and filters: a script
cannot do what the user could not. It never builds a Session itself.

Those sessions raise no events: what a script does never raises events (no pre-event
recursion, no script triggering itself), but every change is logged by the Session as
usual, with ``script=NAME`` added.

``fs_admin``: a binding granted ``fs_admin`` may also address the directory
configured as ``[scripts] fs_admin_root`` (an archive or quarantine area) with
paths written ``admin:/some/path``; there the script has every permission, but
still no way out of that root.

``own_file``: a binding granted ``own_file`` may move, copy and remove *the file the
event is about* (``event.path``) as the server, whatever the user's rights on it and
on where it goes in the home: an upload-only partner's ``/inbox`` can be archived.
Only that one path, in the user's home, with the home's confinement and filters; any
other path still goes through the user's permissions.
"""

from __future__ import annotations

import logging
import stat as statmod
from pathlib import Path
from typing import Any, Callable

from scriptsftp.server.contract import errors as fserr
from scriptsftp.server.contract.scripting import CopyingWriteHandle, ScriptFiles, ScriptFileSession

from .capabilities import CapabilityCall, CapabilityError

log = logging.getLogger("scriptsftp.scripting.fs")

ADMIN_PREFIX = "admin:"
MAX_TEXT_BYTES = 16 * 1024 * 1024
MAX_LIST_ENTRIES = 100_000

_ETYPES: list[tuple[type[fserr.FsError], str]] = [
    (fserr.NotFound, "FileNotFoundError"),
    (fserr.PermissionDenied, "PermissionError"),
    (fserr.AlreadyExists, "FileExistsError"),
    (fserr.NotADirectory, "NotADirectoryError"),
    (fserr.IsADirectory, "IsADirectoryError"),
    (fserr.InvalidPath, "ValueError"),
]


#: A session for a path's area: ``session(admin, own=False)``.
SessionFor = Callable[..., ScriptFileSession]


def _parents(vpath: str) -> list[str]:
    """``/a/b/c`` (normalised) -> ``/a``, ``/a/b``, ``/a/b/c``."""
    parts = [p for p in vpath.split("/") if p]
    return ["/" + "/".join(parts[:i]) for i in range(1, len(parts) + 1)]


class FsCapability:
    """Parent-side handler of ``api.fs``."""

    def __init__(self, files: Callable[[], ScriptFiles | None], admin_root: Callable[[], Path | None]) -> None:
        self.files = files  # None until the daemon hands its ScriptFiles (none in `scriptsftp script test`)
        self.admin_root = admin_root

    # --- sessions ---------------------------------------------------------------

    @staticmethod
    def own_path(call: CapabilityCall, files: ScriptFiles | None) -> str | None:
        """The event's own file as a normalised virtual path, when ``own_file`` is granted."""
        path = (call.event or {}).get("path")
        if "own_file" not in call.granted or not isinstance(path, str) or not path or files is None:
            return None
        return files.normalize(path)

    def _session(self, call: CapabilityCall, admin: bool, own: bool = False) -> ScriptFileSession:
        files = self.files()
        if files is None:
            raise CapabilityError("api.fs is not available here (no server: e.g. `scriptsftp script test`)",
                                  "NotImplementedError")
        event = call.event or {}
        session_id = str(event.get("session_id") or "script")
        protocol, remote_ip = str(event.get("protocol") or "script"), str(event.get("remote_ip") or "")
        if admin:
            if "fs_admin" not in call.granted:
                raise CapabilityError("capability 'fs_admin' is not granted to this binding "
                                      "(add it to allow = [...] to use admin: paths)", "PermissionError")
            root = self.admin_root()
            if root is None:
                raise CapabilityError("admin: paths need [scripts] fs_admin_root in the config",
                                      "PermissionError")
            root.mkdir(parents=True, exist_ok=True)
            return files.root_session(root, session_id=session_id, protocol=protocol, remote_ip=remote_ip,
                                      script=call.script)
        user = event.get("user") or ""
        if not user:
            raise CapabilityError(f"api.fs needs an event with a user; this {event.get('name', '')!r} "
                                  "event has none (schedule bindings: set users = [...])",
                                  "PermissionError")
        # own: the event's own file: every permission in the home, the user's filters kept
        s = files.user_session(user, every_permission=own, session_id=session_id, protocol=protocol,
                               remote_ip=remote_ip, script=call.script)
        if s is None:
            raise CapabilityError(f"user {user!r} does not exist or is disabled", "PermissionError")
        return s

    def _path(self, value: Any, what: str = "path") -> tuple[bool, str]:
        if type(value) is not str:
            raise CapabilityError(f"api.fs: {what} must be a str", "TypeError")
        admin = value.startswith(ADMIN_PREFIX)
        if admin:
            value = value[len(ADMIN_PREFIX):]
        if not value:
            raise CapabilityError(f"api.fs: {what} is empty", "ValueError")
        return admin, value

    # --- dispatch -------------------------------------------------------------------

    def __call__(self, call: CapabilityCall, op: str, args: list) -> Any:
        method = getattr(self, "op_" + op, None) if op.isidentifier() else None
        if method is None:
            raise CapabilityError(f"api.fs has no operation {op!r}", "TypeError")
        opened: list[ScriptFileSession] = []
        cache: dict[tuple[bool, bool], ScriptFileSession] = {}

        def session(admin: bool, own: bool = False) -> ScriptFileSession:
            key = (admin, own and not admin)
            if key not in cache:
                cache[key] = self._session(call, *key)
                opened.append(cache[key])
            return cache[key]

        session.deadline = getattr(call.context, "deadline", None)  # type: ignore[attr-defined]
        session.own_path = self.own_path(call, self.files())  # type: ignore[attr-defined]
        try:
            return method(session, *args)
        except TypeError as exc:
            if "positional argument" in str(exc):
                raise CapabilityError(f"api.fs.{op}(): wrong number of arguments", "TypeError") from None
            raise
        except fserr.FsError as exc:
            etype = next((t for cls, t in _ETYPES if isinstance(exc, cls)), "OSError")
            raise CapabilityError(exc.message, etype) from None
        finally:
            for s in opened:
                s.close()

    # --- operations (``session(admin)`` gives the Session for a path's area) ----------

    def op_exists(self, session: SessionFor, path: Any) -> bool:
        admin, p = self._path(path)
        try:
            session(admin).stat(p)
        except fserr.NotFound:
            return False
        return True

    def op_stat(self, session: SessionFor, path: Any) -> dict[str, Any]:
        admin, p = self._path(path)
        e = session(admin).stat(p, follow=False)
        mode = e.st.st_mode
        return {"name": e.name, "size": e.st.st_size, "mtime": e.st.st_mtime, "mode": statmod.S_IMODE(mode),
                "is_dir": statmod.S_ISDIR(mode), "is_file": statmod.S_ISREG(mode),
                "is_link": statmod.S_ISLNK(mode)}

    def op_listdir(self, session: SessionFor, path: Any = "/") -> list[str]:
        admin, p = self._path(path)
        names = sorted(e.name for e in session(admin).listdir(p))
        if len(names) > MAX_LIST_ENTRIES:
            raise CapabilityError(f"api.fs.listdir(): more than {MAX_LIST_ENTRIES} entries", "OverflowError")
        return names

    def op_mkdir(self, session: SessionFor, path: Any) -> None:
        """Create the directory and missing parents; an existing directory is fine."""
        admin, p = self._path(path)
        s = session(admin)
        for sub in _parents(self._normalize(p)):
            try:
                if not s.stat(sub).is_dir:
                    raise CapabilityError(f"{sub}: exists and is not a directory", "NotADirectoryError")
                continue
            except fserr.NotFound:
                pass
            try:
                s.mkdir(sub)
            except fserr.AlreadyExists:
                if not s.stat(sub).is_dir:
                    raise

    def _normalize(self, vpath: str) -> str:
        files = self.files()
        return files.normalize(vpath) if files is not None else vpath

    def _own(self, session: SessionFor, admin: bool, path: str) -> bool:
        """True when ``path`` (in the home) is the event's own file and own_file is granted."""
        own = getattr(session, "own_path", None)
        return not admin and own is not None and self._normalize(path) == own

    def op_remove(self, session: SessionFor, path: Any) -> None:
        """Remove a file, or an empty directory."""
        admin, p = self._path(path)
        s = session(admin, self._own(session, admin, p))
        if s.stat(p, follow=False).is_dir:
            s.rmdir(p)
        else:
            s.remove(p)

    def op_move(self, session: SessionFor, src: Any, dst: Any) -> None:
        """Rename within one area; across areas (home <-> admin:) copy then remove.
        An existing target is refused (FileExistsError)."""
        a1, p1 = self._path(src, "src")
        a2, p2 = self._path(dst, "dst")
        own = self._own(session, a1, p1)  # the event's own file: as the server, within the home too
        if a1 == a2:
            session(a1, own).rename(p1, p2)
            return
        self._copy(session(a1, own), p1, session(a2, own), p2, getattr(session, "deadline", None))
        session(a1, own).remove(p1)

    def op_copy(self, session: SessionFor, src: Any, dst: Any) -> None:
        """Copy a file (published atomically); an existing target is refused."""
        a1, p1 = self._path(src, "src")
        a2, p2 = self._path(dst, "dst")
        own = self._own(session, a1, p1)
        self._copy(session(a1, own), p1, session(a2, own), p2, getattr(session, "deadline", None))

    def op_read_text(self, session: SessionFor, path: Any, max_bytes: Any = 1024 * 1024) -> str:
        admin, p = self._path(path)
        if type(max_bytes) is not int or not 0 < max_bytes <= MAX_TEXT_BYTES:
            raise CapabilityError(f"api.fs.read_text(path, max_bytes): max_bytes must be an int from 1 to "
                                  f"{MAX_TEXT_BYTES}", "ValueError")
        h = session(admin).open_read(p)
        try:
            data = h.read(0, max_bytes + 1)
        finally:
            h.close()
        if len(data) > max_bytes:
            raise CapabilityError(f"{self._normalize(p)}: larger than max_bytes={max_bytes}", "ValueError")
        return data.decode("utf-8", "replace")

    def op_write_text(self, session: SessionFor, path: Any, text: Any) -> int:
        """Write (create or replace) a UTF-8 text file, published atomically; returns its size."""
        admin, p = self._path(path)
        if type(text) is not str:
            raise CapabilityError("api.fs.write_text(path, text): text must be a str", "TypeError")
        data = text.encode("utf-8", "surrogatepass")
        if len(data) > MAX_TEXT_BYTES:
            raise CapabilityError(f"api.fs.write_text(): text is larger than {MAX_TEXT_BYTES} bytes", "ValueError")
        h = session(admin).open_write(p, truncate=True)
        try:
            h.write(0, data)
        except BaseException:
            h.abort("write failed")
            raise
        h.close()
        return len(data)

    @staticmethod
    def _copy(src_s: ScriptFileSession, src: str, dst_s: ScriptFileSession, dst: str,
              deadline: float | None) -> None:
        rh = src_s.open_read(src)
        try:
            wh: CopyingWriteHandle = dst_s.open_write(dst, exclusive=True)
            try:
                try:
                    wh.copy_from(rh.fd, deadline=deadline)  # in the kernel, holes kept
                except TimeoutError:
                    # the worker is gone by now: stop, publish nothing
                    raise CapabilityError(f"copying {src} did not finish within the handler's timeout",
                                          "TimeoutError") from None
                rh.sent = wh.written
            except BaseException:
                wh.abort("copy failed")
                raise
            wh.close()
        finally:
            rh.close()

"""Typed, frozen server events.

Every event is built once by the Session core (or the login core) and is the
same on every protocol: only the ``protocol`` field differs. Scripts receive a
read-only copy of :meth:`Event.to_dict`, so nothing they do can change what the
server or another script sees (docs/architecture.md rule 3).

The list of kinds and their fields is generated from these classes for
``scriptsftp events`` and docs/events.md, so this module is the one source of
truth for the event contract.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """Fields every event carries."""

    name: ClassVar[str] = ""
    can_veto: ClassVar[bool] = False
    summary: ClassVar[str] = ""

    time: float = field(default_factory=time.time)
    session_id: str = ""
    protocol: str = ""
    remote_ip: str = ""
    user: str = ""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able copy, the form in which events cross into script workers."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["name"] = self.name
        return data


@dataclass(frozen=True, slots=True, kw_only=True)
class PathEvent(Event):
    """Events about one file or directory: ``path`` is virtual (as the user sees it);
    ``folder`` names the virtual folder it is in (empty in the home)."""

    path: str = ""
    size: int | None = None
    folder: str = ""


# --- connection and login -------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Connect(Event):
    name: ClassVar[str] = "connect"
    can_veto: ClassVar[bool] = True
    summary: ClassVar[str] = (
        "A client opened a connection; nothing is known of the user yet. `defender_score` is the"
        " address's current score (failed logins etc. within [defender] observation_window);"
        " `banned_before` is true if it was banned before. Banned addresses never reach this event."
    )
    local_port: int = 0
    defender_score: int = 0
    banned_before: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class PreLogin(Event):
    name: ClassVar[str] = "pre-login"
    can_veto: ClassVar[bool] = True
    summary: ClassVar[str] = "Credentials were verified; a veto still refuses the login."
    login_method: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class PostLogin(Event):
    name: ClassVar[str] = "post-login"
    summary: ClassVar[str] = "The user is logged in."
    login_method: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class LoginFailed(Event):
    name: ClassVar[str] = "login-failed"
    summary: ClassVar[str] = "A login attempt failed (wrong secret, unknown user, policy, veto)."
    login_method: str = ""
    reason: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class UserLocked(Event):
    name: ClassVar[str] = "user-locked"
    summary: ClassVar[str] = (
        "Password logins for `user` were locked after [defender] user_max_failures failures from"
        " addresses not allow-listed (one account guessed from many addresses); public keys still"
        " work. `remote_ip` is the address of the last failure; the lock ends at `locked_until`."
    )
    failures: int = 0
    locked_until: float = 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Disconnect(Event):
    name: ClassVar[str] = "disconnect"
    summary: ClassVar[str] = "A session ended."
    duration: float = 0.0
    bytes_in: int = 0
    bytes_out: int = 0


# --- file operations -------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class PreUpload(PathEvent):
    name: ClassVar[str] = "pre-upload"
    can_veto: ClassVar[bool] = True
    summary: ClassVar[str] = "A client is about to write a file; no byte is stored yet."
    mode: str = "write"  # "write" (create/truncate) | "append" | "resume"
    exists: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class PrePublish(PathEvent):
    name: ClassVar[str] = "pre-publish"
    can_veto: ClassVar[bool] = True
    summary: ClassVar[str] = (
        "All bytes arrived; the file is still hidden. Read it with api.file and veto to reject it."
    )
    exists: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class PostUpload(PathEvent):
    name: ClassVar[str] = "post-upload"
    summary: ClassVar[str] = "The upload is published under its final path."
    duration: float = 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class UploadFailed(PathEvent):
    name: ClassVar[str] = "upload-failed"
    summary: ClassVar[str] = "An upload was vetoed, aborted or failed; nothing was published."
    reason: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class PreDownload(PathEvent):
    name: ClassVar[str] = "pre-download"
    can_veto: ClassVar[bool] = True
    summary: ClassVar[str] = "A client is about to read a file."


@dataclass(frozen=True, slots=True, kw_only=True)
class PostDownload(PathEvent):
    name: ClassVar[str] = "post-download"
    summary: ClassVar[str] = "A client closed a file it read; bytes is how much it read."
    bytes: int = 0
    duration: float = 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class PreDelete(PathEvent):
    name: ClassVar[str] = "pre-delete"
    can_veto: ClassVar[bool] = True
    summary: ClassVar[str] = "A client is about to delete a file."


@dataclass(frozen=True, slots=True, kw_only=True)
class PostDelete(PathEvent):
    name: ClassVar[str] = "post-delete"
    summary: ClassVar[str] = "A file was deleted."


@dataclass(frozen=True, slots=True, kw_only=True)
class PreRename(PathEvent):
    name: ClassVar[str] = "pre-rename"
    can_veto: ClassVar[bool] = True
    summary: ClassVar[str] = "A client is about to rename path to target."
    target: str = ""
    overwrite: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class PostRename(PathEvent):
    name: ClassVar[str] = "post-rename"
    summary: ClassVar[str] = "path was renamed to target."
    target: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class PreMkdir(PathEvent):
    name: ClassVar[str] = "pre-mkdir"
    can_veto: ClassVar[bool] = True
    summary: ClassVar[str] = "A client is about to create a directory."


@dataclass(frozen=True, slots=True, kw_only=True)
class PostMkdir(PathEvent):
    name: ClassVar[str] = "post-mkdir"
    summary: ClassVar[str] = "A directory was created."


@dataclass(frozen=True, slots=True, kw_only=True)
class PreRmdir(PathEvent):
    name: ClassVar[str] = "pre-rmdir"
    can_veto: ClassVar[bool] = True
    summary: ClassVar[str] = "A client is about to remove a directory."


@dataclass(frozen=True, slots=True, kw_only=True)
class PostRmdir(PathEvent):
    name: ClassVar[str] = "post-rmdir"
    summary: ClassVar[str] = "A directory was removed."


@dataclass(frozen=True, slots=True, kw_only=True)
class QuotaThreshold(Event):
    name: ClassVar[str] = "quota-threshold"
    summary: ClassVar[str] = (
        "A published upload made a quota's use cross one of [accounts] quota_thresholds (once per"
        " crossing, upwards). `user` published it; `folder` names the virtual folder whose quota it"
        " is (\"\": the user's home); `kind` is \"size\" (bytes) or \"files\"; `percent` is the"
        " threshold crossed; `used` and `limit` are in bytes or files."
    )
    folder: str = ""
    kind: str = "size"
    percent: int = 0
    used: int = 0
    limit: int = 0


# --- server-wide -------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Schedule(Event):
    name: ClassVar[str] = "schedule"
    summary: ClassVar[str] = (
        "A cron binding fired (no session). `user` is empty unless the binding lists users"
        " (then one event per user); `scheduled` is the minute it fired for (epoch seconds)."
    )
    cron: str = ""
    scheduled: float = 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Startup(Event):
    name: ClassVar[str] = "startup"
    summary: ClassVar[str] = "The daemon started and is listening."
    version: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Shutdown(Event):
    name: ClassVar[str] = "shutdown"
    summary: ClassVar[str] = "The daemon is stopping."


@dataclass(frozen=True, slots=True, kw_only=True)
class ScriptError(Event):
    name: ClassVar[str] = "script-error"
    summary: ClassVar[str] = "A script raised, timed out, ran out of memory or returned garbage."
    script: str = ""
    event: str = ""
    error: str = ""
    line: int | None = None


EVENT_TYPES: dict[str, type[Event]] = {
    cls.name: cls
    for cls in (
        Connect, PreLogin, PostLogin, LoginFailed, UserLocked, Disconnect,
        PreUpload, PrePublish, PostUpload, UploadFailed,
        PreDownload, PostDownload, PreDelete, PostDelete,
        PreRename, PostRename, PreMkdir, PostMkdir, PreRmdir, PostRmdir, QuotaThreshold,
        Schedule, Startup, Shutdown, ScriptError,
    )
}
VETOABLE: frozenset[str] = frozenset(n for n, c in EVENT_TYPES.items() if c.can_veto)


def describe_fields(cls: type[Event]) -> list[tuple[str, str]]:
    """(field, type) pairs in declaration order, for `scriptsftp events` and the docs."""
    out = [("name", "str")]
    for f in dataclasses.fields(cls):
        out.append((f.name, str(f.type)))
    return out

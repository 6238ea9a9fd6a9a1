"""Protocol-neutral errors raised by the core; each front end maps them to its replies.

The Session raises the :class:`FsError` family: every one carries a message fit
for the client that names the virtual path, never a host path. The login core
raises the :class:`LoginRefused` family.
"""

from __future__ import annotations

import errno


class FsError(Exception):
    """Base of every error the Session raises to a front end."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotFound(FsError):
    pass


class PermissionDenied(FsError):
    pass


class Vetoed(PermissionDenied):
    """A script said no; ``message`` is its reason, for the client."""


class AlreadyExists(FsError):
    pass


class NotADirectory(FsError):
    pass


class IsADirectory(FsError):
    pass


class DirectoryNotEmpty(FsError):
    pass


class InvalidPath(FsError):
    pass


class NoSpace(FsError):
    pass


class LimitExceeded(FsError):
    pass


class QuotaExceeded(NoSpace):
    """An account's or a folder's quota (size, files, or bytes moved per day) would be
    passed: no space *for this user*, which is what every protocol already has a reply
    for (FTP 552 "exceeded storage allocation", HTTP 507, an SFTP failure with the
    message); ``message`` says which quota and its limit."""


class Failure(FsError):
    pass


class CoreGone(Failure):
    """An SSH worker's link to the core is closed (the core is stopping, or has ended this
    connection, e.g. when its login grace ran out while a password was being checked):
    nothing more can be asked for this connection. Expected, so logged without a traceback."""



class LoginRefused(Exception):
    """A login the core refused: ``reason`` is fit for the client (a policy or a script's
    veto), already logged, audited and counted by the core.

    ``wait``: seconds the front end holds its answer back (the failure delay). The core
    never sleeps in a login, so a front end on an event loop holds no thread meanwhile;
    one with a thread per connection simply sleeps."""

    def __init__(self, reason: str, wait: float = 0.0) -> None:
        super().__init__(reason)
        self.reason = reason
        self.wait = wait


class BadCredentials(LoginRefused):
    """Unknown user, wrong password, a locked or banned login: the client is told only
    that the credentials failed (the reason, which tells more, is in the log)."""


class TlsRequired(LoginRefused):
    """The account takes logins only over TLS and the connection is in clear. Raised
    before any password is checked (nothing counted), so the front end can refuse
    before the client sends one; its reply says how to get TLS on that protocol."""

_ERRNO = {
    errno.ENOENT: (NotFound, "no such file or directory"),
    errno.EACCES: (PermissionDenied, "permission denied"),
    errno.EPERM: (PermissionDenied, "operation not permitted"),
    errno.EEXIST: (AlreadyExists, "already exists"),
    errno.ENOTDIR: (NotADirectory, "not a directory"),
    errno.EISDIR: (IsADirectory, "is a directory"),
    errno.ENOTEMPTY: (DirectoryNotEmpty, "directory not empty"),
    errno.ENOSPC: (NoSpace, "no space left on device"),
    errno.EFBIG: (Failure, "file too large"),
    errno.EDQUOT: (NoSpace, "disk quota exceeded"),
    errno.ENAMETOOLONG: (InvalidPath, "name too long"),
    errno.ELOOP: (InvalidPath, "too many levels of symbolic links"),
    errno.EXDEV: (Failure, "cannot move across filesystems"),
    errno.EROFS: (PermissionDenied, "read-only filesystem"),
}


def from_oserror(exc: OSError, vpath: str) -> FsError:
    """Translate an OSError on a host path into a client-safe error about ``vpath``."""
    cls, text = _ERRNO.get(exc.errno or 0, (Failure, "operation failed"))
    return cls(f"{vpath}: {text}")


class fs_errors:
    """``with fs_errors(vpath):`` turns an ``OSError`` raised inside into the
    :func:`from_oserror` error about ``vpath`` (the host path never reaches a client);
    FsErrors and everything else pass through unchanged.

    A class rather than a ``@contextmanager`` generator: the Session opens one per
    operation (every STAT, OPEN, listing) and this costs two plain method calls."""

    __slots__ = ("vpath",)

    def __init__(self, vpath: str) -> None:
        self.vpath = vpath

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if isinstance(exc, OSError):
            raise from_oserror(exc, self.vpath) from None

"""Making an account's home and its ``home_folders``, at login and at account creation.

What is made, and how:

- a missing home is made (its missing parents too, as ``mkdir -p`` would, left as the
  umask makes them), with ``[accounts] home_mode`` and, when the daemon runs as root,
  owned by ``[accounts] home_owner``; an existing home is left as it is (mode, owner);
- each of ``home_folders`` is made inside the home, one component at a time from a
  descriptor on the home with ``O_NOFOLLOW``, so a symbolic link planted at
  ``/inbox`` (or at any component on the way) is never followed: that entry is left
  alone and logged, and nothing outside the home is touched;
- directories are made 0700 and then given their mode with ``fchmod`` on the open
  descriptor, so the umask does not change the configured mode and no one can enter
  one before its owner is set.

Without ``[accounts] create_homes`` nothing is made: a missing home refuses the login
(:class:`HomeMissing`), so an administrator who provisions homes by other means sees a
typo in a ``home`` at once instead of an empty directory the server made.
"""

from __future__ import annotations

import errno
import logging
import os
import pwd
from dataclasses import dataclass, field
from pathlib import Path

from scriptsftp.server.core.session import Account
from scriptsftp.server.support.config import AccountsSection
from scriptsftp.server.core.vfs import split

log = logging.getLogger("scriptsftp.homes")

# the home path itself is the administrator's and may be a symbolic link (LocalStorage
# opens it the same way); everything below it is walked without following links
_HOME_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_DIR_FLAGS = _HOME_FLAGS | os.O_NOFOLLOW


class HomeMissing(Exception):
    """The home does not exist and ``create_homes`` is off."""


class HomeFenced(Exception):
    """The home or one of the account's folders holds, or lies in, a directory of the
    server's own (``state_dir``: host keys, the account database, staging records)."""


@dataclass(frozen=True)
class HomePolicy:
    """``[accounts] create_homes``, ``home_mode``, ``home_owner``."""

    create: bool = True
    mode: int = 0o750
    owner: str = ""  # user name or uid; empty: whoever the daemon runs as
    #: the server's own directories (state_dir): no home or folder may hold or lie in one,
    #: whoever wrote the account (a database row is checked by nothing else)
    fenced: tuple[Path, ...] = ()

    @classmethod
    def of(cls, section: AccountsSection, *, fenced: tuple[Path, ...] = ()) -> "HomePolicy":
        """The policy of the configuration (the daemon at login; the CLI and the API when
        they create an account: ``ensure_home(build_record(...).account, HomePolicy.of(...))``)."""
        return cls(create=section.create_homes, mode=section.home_mode, owner=section.home_owner,
                   fenced=tuple(Path(os.path.realpath(p)) for p in fenced))


@dataclass
class HomeReport:
    """What :func:`ensure_home` did: the virtual paths it made ("/" for the home), and the
    ``home_folders`` entries it left alone (a link, a file), with why."""

    made: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def owner_ids(owner: str) -> tuple[int, int] | None:
    """(uid, gid) for ``home_owner``, or None when nothing is to be chowned (empty, or the
    daemon is not root). A uid without a passwd entry keeps the group as it is (-1).
    Raises ``LookupError`` for a name the system does not know."""
    if not owner or os.geteuid() != 0:
        return None
    if owner.isdigit():
        uid = int(owner)
        try:
            return uid, pwd.getpwuid(uid).pw_gid
        except KeyError:
            return uid, -1
    try:
        entry = pwd.getpwnam(owner)
    except KeyError:
        raise LookupError(f"[accounts] home_owner {owner!r}: no such user on this system") from None
    return entry.pw_uid, entry.pw_gid


def ensure_home(account: Account, policy: HomePolicy) -> HomeReport:
    """Make ``account``'s home and ``home_folders`` as the module says.

    Raises :class:`HomeFenced` (a home or folder over the server's own files: nothing is
    made), :class:`HomeMissing` (no home, and not ours to make), ``LookupError`` (an
    unknown ``home_owner``) or ``OSError`` (the home cannot be made or opened)."""
    check_fence(account, policy.fenced)
    report = HomeReport()
    home = account.home
    try:
        fd = os.open(home, _HOME_FLAGS)
    except FileNotFoundError:
        if not policy.create:
            raise HomeMissing(f"home directory {home} does not exist") from None
        fd = _make_home(home, policy, report)
    try:
        if policy.create:
            ids = owner_ids(policy.owner) if account.home_folders else None
            for vpath in account.home_folders:
                _make_folder(fd, vpath, policy.mode, ids, report)
    finally:
        os.close(fd)
    if report.made:
        log.info("made %s for %s in %s (mode %04o%s)", ", ".join(report.made), account.name, home,
                 policy.mode, f", owner {policy.owner}" if policy.owner and os.geteuid() == 0 else "")
    for vpath, why in report.skipped:
        log.warning("home folder %s of %s left alone: %s", vpath, account.name, why)
    return report


def check_fence(account: Account, fenced: tuple[Path, ...]) -> None:
    """Raise :class:`HomeFenced` if the home or a folder of ``account`` is one of ``fenced``,
    holds one (a home of "/" would serve the account database's hashes) or lies inside
    one. Paths are compared with their links resolved, as the kernel will open them."""
    if not fenced:
        return
    roots = [("home", account.home), *((f"folder {m.folder}", m.root) for m in account.folders)]
    for what, root in roots:
        real = Path(os.path.realpath(root))
        for wall in fenced:
            if real == wall or wall.is_relative_to(real) or real.is_relative_to(wall):
                raise HomeFenced(f"{what} {root} overlaps the server's state directory {wall}")


def _make_home(home: Path, policy: HomePolicy, report: HomeReport) -> int:
    ids = owner_ids(policy.owner)
    home.parent.mkdir(parents=True, exist_ok=True)
    made = True
    try:
        os.mkdir(home, 0o700)
    except FileExistsError:  # another login of the same user made it meanwhile
        made = False
    fd = os.open(home, _HOME_FLAGS)
    if made:
        _settle(fd, policy.mode, ids)
        report.made.append("/")
    return fd


def _make_folder(home_fd: int, vpath: str, mode: int, ids: tuple[int, int] | None, report: HomeReport) -> None:
    fd = os.dup(home_fd)
    made_any = False
    try:
        for name in split(vpath):
            try:
                nfd = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                made = True
                try:
                    os.mkdir(name, 0o700, dir_fd=fd)
                except FileExistsError:
                    made = False
                try:
                    nfd = os.open(name, _DIR_FLAGS, dir_fd=fd)
                except OSError as exc:
                    report.skipped.append((vpath, _why(exc)))
                    return
                if made:
                    _settle(nfd, mode, ids)
                    made_any = True
            except OSError as exc:
                report.skipped.append((vpath, _why(exc)))
                return
            os.close(fd)
            fd = nfd
    finally:
        os.close(fd)
    if made_any:
        report.made.append(vpath)


def _settle(fd: int, mode: int, ids: tuple[int, int] | None) -> None:
    """Owner first, then mode: a setgid or sticky bit survives the chown that way."""
    if ids is not None:
        os.fchown(fd, *ids)
    os.fchmod(fd, mode)


def _why(exc: OSError) -> str:
    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
        return "a symbolic link or a file is in the way (never followed)"
    return exc.strerror or str(exc)

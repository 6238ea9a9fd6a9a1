"""Virtual paths, permissions and file-pattern filters: who may do what, where.

Pure policy, no I/O. A virtual path is what the user sees: ``/`` is their home.
The rules, in one place so every protocol applies the same ones:

* Paths are normalised lexically (server/contract/paths.py, re-exported here);
  ``..`` never climbs above ``/`` (chroot semantics). NUL, control characters, over-long names and our own staging
  names are refused before anything touches the disk.
* Permissions are given per virtual directory; the deepest configured
  directory that contains the entry wins. Operations on an entry (read,
  create, overwrite, delete, rename, setstat, symlink) are checked against the
  directory that contains it; listing a directory against the directory itself.
* Filters match entry names (case-insensitive globs) below their path. A
  ``hide`` filter makes a name invisible and inaccessible (as if absent); a
  ``deny`` filter leaves it listed but refuses every operation on it.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from scriptsftp.server.contract.errors import NotFound, PermissionDenied
# the path rules themselves are the contract's (front ends split and join paths too); the core's
# modules keep importing them from here, with the policy on those paths
from scriptsftp.server.contract.paths import MAX_NAME_BYTES as MAX_NAME_BYTES
from scriptsftp.server.contract.paths import MAX_PATH_BYTES as MAX_PATH_BYTES
from scriptsftp.server.contract.paths import STAGING_PREFIX as STAGING_PREFIX
from scriptsftp.server.contract.paths import check_name as check_name
from scriptsftp.server.contract.paths import join as join
from scriptsftp.server.contract.paths import normalize as normalize
from scriptsftp.server.contract.paths import split as split

ALL_PERMISSIONS = frozenset(
    ("list", "download", "upload", "overwrite", "delete", "rename", "mkdir", "rmdir", "setstat", "symlink")
)


@dataclass(frozen=True)
class FilterRule:
    path: tuple[str, ...]
    denied: tuple[str, ...]
    allowed: tuple[str, ...]
    hide: bool

    def applies(self, parent: tuple[str, ...]) -> bool:
        return parent[: len(self.path)] == self.path

    def rejects(self, name: str) -> bool:
        low = name.lower()
        if self.allowed and not any(fnmatch.fnmatchcase(low, p.lower()) for p in self.allowed):
            return True
        return any(fnmatch.fnmatchcase(low, p.lower()) for p in self.denied)


class Access:
    """One user's effective permissions and filters (their own plus their groups')."""

    def __init__(self, permissions: dict[str, frozenset[str]], filters: list[FilterRule]) -> None:
        self._perms = {tuple(split(p)): perms for p, perms in permissions.items()}
        # deepest first, so the first match is the one that wins
        self._order = sorted(self._perms, key=len, reverse=True)
        self._filters = filters

    @classmethod
    def build(cls, own: dict[str, list[str]], groups: list[dict[str, list[str]]], filters: list[FilterRule]) -> "Access":
        merged: dict[str, set[str]] = {}
        for group in groups:  # groups add up...
            for path, names in group.items():
                merged.setdefault(normalize(path), set()).update(names)
        for path, names in own.items():  # ...and the user's own entry for a path replaces them
            merged[normalize(path)] = set(names)
        return cls({p: _expand(n) for p, n in merged.items()}, filters)

    def with_all_permissions(self) -> "Access":
        """Every permission everywhere, the same filters: what the server itself may do in a
        home (the ``own_file`` capability acting on an event's file)."""
        return Access({"/": ALL_PERMISSIONS}, self._filters)

    def permissions_at(self, directory: tuple[str, ...]) -> frozenset[str]:
        for configured in self._order:
            if directory[: len(configured)] == configured:
                return self._perms[configured]
        return frozenset()

    def require(self, permission: str, directory: tuple[str, ...], vpath: str) -> None:
        if permission not in self.permissions_at(directory):
            raise PermissionDenied(f"{vpath}: permission denied ({permission})")

    def hidden(self, parent: tuple[str, ...], name: str) -> bool:
        """True when a hide filter makes this entry invisible."""
        return any(f.hide and f.applies(parent) and f.rejects(name) for f in self._filters)

    def check_filters(self, parts: tuple[str, ...], vpath: str, *, metadata: bool = False) -> None:
        """Refuse an entry excluded by filters: hidden ones look absent, denied ones are refused.

        ``metadata``: only the entry's attributes are wanted (STAT). A denied entry
        is listed with them anyway, so they are not refused; clients that stat
        before acting (OpenSSH ``get``) then report "permission denied", not "not found"."""
        for i in range(len(parts)):
            parent, name = parts[:i], parts[i]
            for f in self._filters:
                if f.applies(parent) and f.rejects(name):
                    if f.hide:
                        raise NotFound(f"{vpath}: no such file or directory")
                    if i == len(parts) - 1 and not metadata:
                        raise PermissionDenied(f"{vpath}: name not allowed by the server's filters")


def _expand(names: set[str]) -> frozenset[str]:
    return ALL_PERMISSIONS if "*" in names else frozenset(names)

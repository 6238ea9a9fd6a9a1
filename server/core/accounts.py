"""Where accounts come from: the account source the login core asks, and its first
implementation, the ``[[users]]`` and ``[[groups]]`` of the TOML file.

The login decision sees only :class:`AccountSource`: ``get(name)`` answers one
:class:`UserRecord` (the :class:`Account` a Session runs as, the password hash,
the public keys, whether it is disabled) or None, and ``names()`` lists them.
A source is replaced whole on reload (``LoginCore.replace_accounts``), never
edited in place, so a login in progress sees one version of its account. The
next source (a database) implements the same two calls; nothing above it
changes.

Public keys are kept as (type, canonical blob) pairs, not library objects, so
the core compares keys without importing the SSH library (``LoginCore.key_allowed``
asks the client's key for the same two things: the contract's ``PublicKey``).
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Protocol, Sequence

from scriptsftp.server.support.config import AccountsSection, Folder, Group, LoadedConfig, User
from scriptsftp.server.core.limits import Mount, Quota, Rates
from scriptsftp.server.core.session import Account
from scriptsftp.server.core.vfs import Access, FilterRule, normalize, split


class AuthorizedKey(NamedTuple):
    """A user's SSH public key as the wire carries it: its type name and its canonical blob."""

    key_type: str
    blob: bytes


@dataclass
class UserRecord:
    """One account as the login core needs it; ``password_hash`` None: no password login.

    ``expires``, ``password_changed`` are epoch seconds (None: never, unknown);
    ``password_max_age`` is in days (0: forever); ``origin`` says where the account is
    defined, for messages ("conf/scriptsftp.toml:12" or "the account database")."""

    account: Account
    password_hash: str | None
    keys: list[AuthorizedKey]
    disabled: bool
    disabled_reason: str = ""
    expires: float | None = None
    password_changed: float | None = None
    password_max_age: int = 0
    origin: str = ""


class AccountSource(Protocol):
    """Users, their groups' settings merged in, by name. Read by every login; a
    reload hands the login core a new source instead of changing this one."""

    def get(self, name: str) -> UserRecord | None:
        """The account called ``name``, or None if there is none (disabled ones included)."""
        ...

    def names(self) -> Iterable[str]:
        """Every account name (for schedules over all users, status pages, counts)."""
        ...


class TomlAccountSource:
    """The accounts of the configuration file, built once per (re)load by :meth:`from_config`.

    Built from ready records too (tests, tools): it is a read-only mapping of names."""

    def __init__(self, records: Mapping[str, UserRecord] | None = None) -> None:
        self._records: dict[str, UserRecord] = dict(records or {})

    @classmethod
    def from_config(cls, cfg: LoadedConfig) -> "TomlAccountSource":
        """Each user merged with their groups and folders (:func:`build_record`); password
        hashes read from their files now, so a changed file takes effect on reload."""
        groups = {g.name: g for g in cfg.model.groups}
        folders = {f.name: f for f in cfg.model.folders}
        out: dict[str, UserRecord] = {}
        for i, user in enumerate(cfg.model.users):
            out[user.name] = build_record(
                user, groups, folders, cfg.resolve, cfg.model.accounts,
                password_hash=_password_hash(cfg, user),
                origin=f"{cfg.path}:{cfg.key_lines.line_of(('users', i, 'name')) or 1}",
            )
        return cls(out)

    def get(self, name: str) -> UserRecord | None:
        return self._records.get(name)

    def names(self) -> list[str]:
        return list(self._records)


def build_record(
    user: User,
    groups: Mapping[str, Group],
    folders: Mapping[str, Folder],
    resolve: Callable[[str], Path],
    policy: AccountsSection,
    *,
    password_hash: str | None,
    password_changed: float | None = None,
    origin: str = "",
) -> UserRecord:
    """The one way a user definition (from the file or the database) becomes the record a
    login runs on: their groups merged in (a user's own value wins, else the first group
    that sets it, else the default; permissions and mounts add up over groups and the
    user's own entry for a path replaces theirs), folder names resolved to mounts.

    A group or folder named but not defined is skipped: the file's cross-check and the
    database's constraints refuse those before they get here."""
    from scriptsftp.server.support.keys import parse_public_key  # late: pulls in paramiko

    mine = [groups[g] for g in user.groups if g in groups]
    filters = [
        FilterRule(split(f.path), tuple(f.denied), tuple(f.allowed), f.policy == "hide")
        for f in [*(f for g in mine for f in g.filters), *user.filters]
    ]
    mounts_by_path: dict[str, str] = {}
    for g in mine:
        mounts_by_path.update({normalize(p): n for p, n in g.folders.items()})
    mounts_by_path.update({normalize(p): n for p, n in user.folders.items()})
    mounts: list[Mount] = []
    folder_perms: dict[str, list[str]] = {}
    for base, folder_name in mounts_by_path.items():
        folder = folders.get(folder_name)
        if folder is None:
            continue
        mounts.append(Mount(tuple(split(base)), folder.name, resolve(folder.path),
                            Quota(int(folder.quota_size), folder.quota_files)))
        for sub, names in folder.permissions.items():
            folder_perms[normalize(base + "/" + sub)] = names
    mounts.sort(key=lambda m: len(m.vpath), reverse=True)
    # a folder's own permissions are the least specific: groups add to them, the user replaces
    access = Access.build(user.permissions, [folder_perms, *(g.permissions for g in mine)], filters)
    protocols = _first_set(user.protocols, [g.protocols for g in mine], ["sftp", "scp", "ftp", "http"])
    nets = _first_set(user.allowed_ips, [g.allowed_ips for g in mine], [])

    def first(attr: str, default: Any) -> Any:
        for owner in (user, *mine):
            value = getattr(owner, attr)
            if value is not None:
                return value
        return default

    account = Account(
        name=user.name,
        home=resolve(user.home),
        access=access,
        groups=tuple(user.groups),
        protocols=frozenset(protocols),
        allowed_ips=tuple(ipaddress.ip_network(n, strict=False) for n in nets),
        max_sessions=user.max_sessions,
        require_tls=user.require_tls,
        setstat_mode=first("setstat_mode", "times"),
        quota=Quota(int(first("quota_size", 0)), int(first("quota_files", 0))),
        folders=tuple(mounts),
        rates=Rates(int(first("bandwidth_up", 0)), int(first("bandwidth_down", 0)),
                    int(first("transfer_up_daily", 0)), int(first("transfer_down_daily", 0))),
        home_folders=tuple(normalize(p) for p in first("home_folders", [])),
    )
    keys = [parse_public_key(k) for k in user.public_keys]
    return UserRecord(
        account=account,
        password_hash=password_hash,
        keys=[AuthorizedKey(k.get_name(), k.asbytes()) for k in keys],
        disabled=user.disabled,
        disabled_reason=user.disabled_reason,
        expires=epoch_of(user.expires),
        password_changed=password_changed,
        password_max_age=int(first("password_max_age", policy.password_max_age)),
        origin=origin,
    )


def epoch_of(when: datetime.date | datetime.datetime | None) -> float | None:
    """A date means its first instant in UTC; a time without a zone is taken as UTC."""
    if when is None:
        return None
    if not isinstance(when, datetime.datetime):
        when = datetime.datetime(when.year, when.month, when.day)
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return when.timestamp()


def _first_set(own: Sequence[str] | None, from_groups: Sequence[Sequence[str] | None],
               default: list[str]) -> list[str]:
    """The user's own list if set, else the union of their groups' lists, else the default."""
    if own is not None:
        return list(own)
    merged = [x for g in from_groups if g is not None for x in g]
    return merged if any(g is not None for g in from_groups) else default


def _password_hash(cfg: LoadedConfig, user: User) -> str | None:
    if user.password_hash:
        return user.password_hash
    if user.password_hash_file:
        return _read_hash_file(cfg.resolve(user.password_hash_file))
    return None


def _read_hash_file(path: Path) -> str | None:
    try:
        value = path.read_text().strip()
    except FileNotFoundError:
        return None
    return value or None

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

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, NamedTuple, Protocol, Sequence

from scriptsftp.server.support.config import LoadedConfig, User
from scriptsftp.server.core.session import Account
from scriptsftp.server.core.vfs import Access, FilterRule, split


class AuthorizedKey(NamedTuple):
    """A user's SSH public key as the wire carries it: its type name and its canonical blob."""

    key_type: str
    blob: bytes


@dataclass
class UserRecord:
    """One account as the login core needs it; ``password_hash`` None: no password login."""

    account: Account
    password_hash: str | None
    keys: list[AuthorizedKey]
    disabled: bool


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
        """Each user merged with their groups (see :func:`_first_set` for lists); password
        hashes read from their files now, so a changed file takes effect on reload."""
        from scriptsftp.server.support.keys import parse_public_key  # late: pulls in paramiko

        groups = {g.name: g for g in cfg.model.groups}
        out: dict[str, UserRecord] = {}
        for user in cfg.model.users:
            mine = [groups[g] for g in user.groups]
            filters = [
                FilterRule(split(f.path), tuple(f.denied), tuple(f.allowed), f.policy == "hide")
                for f in [*(f for g in mine for f in g.filters), *user.filters]
            ]
            access = Access.build(user.permissions, [g.permissions for g in mine], filters)
            protocols = _first_set(user.protocols, [g.protocols for g in mine], ["sftp", "scp", "ftp", "http"])
            nets = _first_set(user.allowed_ips, [g.allowed_ips for g in mine], [])
            account = Account(
                name=user.name,
                home=cfg.resolve(user.home),
                access=access,
                groups=tuple(user.groups),
                protocols=frozenset(protocols),
                allowed_ips=tuple(ipaddress.ip_network(n, strict=False) for n in nets),
                max_sessions=user.max_sessions,
                require_tls=user.require_tls,
                setstat_mode=next((m for m in (user.setstat_mode, *(g.setstat_mode for g in mine)) if m), "times"),
            )
            keys = [parse_public_key(k) for k in user.public_keys]
            out[user.name] = UserRecord(
                account=account,
                password_hash=_password_hash(cfg, user),
                keys=[AuthorizedKey(k.get_name(), k.asbytes()) for k in keys],
                disabled=user.disabled,
            )
        return cls(out)

    def get(self, name: str) -> UserRecord | None:
        return self._records.get(name)

    def names(self) -> list[str]:
        return list(self._records)


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

"""How the account commands' options become a user, group or folder definition.

A definition is the configuration's own model (``config.User``, ``Group``, ``Folder``), so an
account made by ``scriptsftp user add`` is validated by exactly the rules a ``[[users]]``
entry is. This module turns option values (strings, as a shell gives them) into changes
of that model's dict and validates the result; it knows nothing of click or the
database, so the REST API can take the same edits.

The rules a script can rely on: a value given replaces the stored one; a list given
(``--group``, ``--key``, ``--protocol``...) replaces the whole list; a table keyed by
path (``--perm PATH=LIST``, ``--folder PATH=NAME``) changes only the paths given, and
``PATH=`` with nothing after it removes that path; ``--unset KEY`` puts a key back to
its default (for a user's limit: "not set here", so their groups' value applies).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterable, Literal, Mapping, Sequence, TypeVar

from pydantic import BaseModel, ValidationError

from scriptsftp.server.support.config import PERMISSIONS, PROTOCOLS

Kind = Literal["value", "date", "list", "perms", "mounts", "flag", "path"]


class EditError(ValueError):
    """An option value or the definition it makes is not valid; the message names the
    account and the option or key, on one line."""


@dataclass(frozen=True)
class Field:
    """One option of the account commands and the model key it sets."""

    option: str
    key: str
    kind: Kind
    help: str
    metavar: str = "VALUE"
    choices: tuple[str, ...] = ()

    @property
    def param(self) -> str:
        """The Python name click gives the option's value."""
        return self.option.removeprefix("--").replace("-", "_")


def _sized(option: str, key: str, what: str) -> Field:
    return Field(option, key, "value", f"{what} (bytes, or 500MB, 10GiB); 0: no limit", "SIZE")


#: what users and groups share (config._Access)
ACCESS_FIELDS: tuple[Field, ...] = (
    Field("--perm", "permissions", "perms",
          f"PATH=PERMS, PERMS comma-separated ({','.join(PERMISSIONS)} or *); repeatable; PATH= removes PATH",
          "PATH=PERMS"),
    Field("--protocol", "protocols", "list", "a protocol allowed; repeatable (default: all)", "PROTO", PROTOCOLS),
    Field("--allowed-ip", "allowed_ips", "list", "an address or CIDR network logins may come from; repeatable",
          "NET"),
    Field("--setstat-mode", "setstat_mode", "value", "without setstat permission: refuse, ignore or times",
          "MODE", ("refuse", "ignore", "times")),
    _sized("--quota-size", "quota_size", "bytes the home may hold"),
    Field("--quota-files", "quota_files", "value", "files the home may hold; 0: no limit", "N"),
    _sized("--bandwidth-up", "bandwidth_up", "upload bytes/s over all sessions"),
    _sized("--bandwidth-down", "bandwidth_down", "download bytes/s over all sessions"),
    _sized("--transfer-up-daily", "transfer_up_daily", "bytes uploaded per UTC day"),
    _sized("--transfer-down-daily", "transfer_down_daily", "bytes downloaded per UTC day"),
    Field("--home-folder", "home_folders", "list", "a directory made in the home (e.g. /inbox); repeatable",
          "PATH"),
    Field("--folder", "folders", "mounts", "mount virtual folder NAME at PATH; repeatable; PATH= removes it",
          "PATH=NAME"),
    Field("--password-max-age", "password_max_age", "value", "days a password stays valid; 0: forever", "DAYS"),
)

#: what only users have
USER_FIELDS: tuple[Field, ...] = (
    Field("--home", "home", "path", "the home directory (default: [accounts] home_base/NAME)", "DIR"),
    Field("--group", "groups", "list", "a group the user belongs to; repeatable", "GROUP"),
    Field("--key", "public_keys", "list", 'an SSH public key line ("ssh-ed25519 AAAA... comment"); repeatable',
          "KEYLINE"),
    Field("--max-sessions", "max_sessions", "value", "open sessions at once; 0: [server] max_sessions_per_user", "N"),
    Field("--expires", "expires", "date", "no logins from this date (UTC) or ISO time on; never: no expiry",
          "DATE"),
    Field("--require-tls", "require_tls", "flag", "FTP and HTTP only over TLS"),
    *ACCESS_FIELDS,
)

GROUP_FIELDS: tuple[Field, ...] = ACCESS_FIELDS

FOLDER_FIELDS: tuple[Field, ...] = (
    Field("--path", "path", "path", "the directory on the server the folder shows", "DIR"),
    _sized("--quota-size", "quota_size", "bytes the folder may hold, over all its users"),
    Field("--quota-files", "quota_files", "value", "files the folder may hold; 0: no limit", "N"),
    Field("--perm", "permissions", "perms",
          "PATH=PERMS inside the folder (/ is its root); repeatable; PATH= removes PATH", "PATH=PERMS"),
    Field("--description", "description", "value", "what the folder is for", "TEXT"),
)

#: keys --unset may not clear (a definition without them is no definition)
REQUIRED = frozenset({"home", "path"})

M = TypeVar("M", bound=BaseModel)


def unset_key(fields: Sequence[Field], name: str) -> str:
    """The model key ``--unset NAME`` means: an option name (``quota-size``, ``--group``)
    or a key (``quota_size``, ``groups``)."""
    wanted = name.strip().removeprefix("--")
    for f in fields:
        if wanted in (f.option.removeprefix("--"), f.key, f.key.replace("_", "-"), f.param):
            if f.key in REQUIRED:
                raise EditError(f"--unset {name}: {f.key} cannot be unset (give {f.option} a new value)")
            return f.key
    known = ", ".join(f.option.removeprefix("--") for f in fields if f.key not in REQUIRED)
    raise EditError(f"--unset {name}: no such key (known: {known})")


def apply_edits(data: Mapping[str, Any], fields: Sequence[Field], given: Mapping[str, Any],
                unset: Iterable[str] = (), *, cwd: str | None = None) -> dict[str, Any]:
    """``data`` (a definition's dict) changed by the options ``given`` (by :attr:`Field.param`;
    None or an empty tuple: not given) and the keys in ``unset``; not validated yet."""
    out = dict(data)
    for key in unset:
        out.pop(unset_key(fields, key), None)
    for f in fields:
        value = given.get(f.param)
        if value is None or value == ():
            continue
        if f.kind == "value":
            out[f.key] = value
        elif f.kind == "flag":
            out[f.key] = bool(value)
        elif f.kind == "path":
            out[f.key] = absolute_path(value, cwd)
        elif f.kind == "date":
            out[f.key] = None if value.strip().lower() in ("never", "none", "") else value.strip()
        elif f.kind == "list":
            out[f.key] = list(value)
        else:  # perms, mounts: PATH=VALUE, changed path by path
            table = dict(out.get(f.key) or {})
            for item in value:
                path, value_text = _path_value(f, item)
                if not value_text:
                    if path not in table:
                        raise EditError(f"{f.option} {item}: {path} has no entry to remove")
                    del table[path]
                elif f.kind == "perms":
                    table[path] = [p.strip() for p in value_text.split(",") if p.strip()]
                else:
                    table[path] = value_text
            out[f.key] = table
    return out


def _path_value(f: Field, item: str) -> tuple[str, str]:
    path, sep, value = item.rpartition("=")
    if not sep or not path:
        raise EditError(f"{f.option} {item!r}: expected {f.metavar}")
    return path.strip(), value.strip()


def absolute_path(value: str, cwd: str | None = None) -> str:
    """A directory given on the command line, made absolute against where the command runs
    (symbolic links are kept: the server confines itself when it opens the home)."""
    path = os.path.expanduser(value)
    return os.path.normpath(os.path.join(cwd or os.getcwd(), path))


def validated(cls: type[M], data: Mapping[str, Any], what: str) -> M:
    """The model of ``data``, or :class:`EditError` naming ``what`` and every problem on one line."""
    try:
        return cls.model_validate(dict(data), strict=False)
    except ValidationError as exc:
        raise EditError(f"{what}: {problems_of(exc)}") from None


def problems_of(exc: ValidationError) -> str:
    """A pydantic error as one line: ``key: problem; key: problem``."""
    out = []
    for e in exc.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        out.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(out)


def editable(model: BaseModel) -> dict[str, Any]:
    """A stored definition as the dict :func:`apply_edits` changes (JSON-ready values)."""
    return model.model_dump(mode="json", exclude_defaults=True)


def definition(model: BaseModel, *, secrets: bool = False) -> dict[str, Any]:
    """What ``show --json`` prints of a definition: the keys set, never a password hash
    unless ``secrets`` (the export)."""
    hidden = set() if secrets else {"password_hash"}
    hidden |= {"password_hash_file", "generate_password"}
    return {k: v for k, v in model.model_dump(mode="json", exclude_defaults=True).items() if k not in hidden}


__all__ = [
    "ACCESS_FIELDS", "FOLDER_FIELDS", "GROUP_FIELDS", "USER_FIELDS", "EditError", "Field",
    "absolute_path", "apply_edits", "definition", "editable", "problems_of", "unset_key", "validated",
]

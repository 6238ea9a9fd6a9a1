"""The account database: users, groups, keys, virtual folders and quota usage as data.

Accounts beyond the file's ``[[users]]`` live here, in SQLite under ``state_dir`` by
default or in PostgreSQL (``[accounts] database``), with the same schema and the same
statements (:mod:`.sql`). The CLI, the REST API and the daemon each open it; a change
made by any of them is one transaction that also appends a row to the change feed
(``account_changes``: who changed what, when), which the daemon polls to end the
sessions of a disabled user. Logins read one user by primary key: nothing on the
login path scans.

A definition is stored as the JSON of its configuration model (``config.User``,
``Group``, ``Folder``), so the file and the database are validated by one set of
rules and merged by one function (``core.accounts.build_record``); the columns beside
it hold what is looked up or counted (keys by fingerprint, group members and folder
mounts for "still in use", usage totals). Names defined in the TOML file are refused
here, naming the file and line: a name lives in one place.

Migrations are numbered; :meth:`AccountDb.upgrade` applies the missing ones in one
transaction each, at start or by ``scriptsftp db upgrade``.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Mapping, Sequence, TypeVar

from pydantic import BaseModel, ValidationError

from scriptsftp.server.support.config import Folder, Group, LoadedConfig, User
from scriptsftp.server.core.accounts import UserRecord, build_record
from scriptsftp.server.contract.state import Migration
from scriptsftp.server.stores import migrations
from scriptsftp.server.stores.sql import Cursor, SqlDatabase, open_database

log = logging.getLogger("scriptsftp.accounts")

SQLITE_FILE = "accounts.sqlite3"
DUMP_FORMAT = "scriptsftp-accounts"
DUMP_VERSION = 1

Kind = Literal["user", "group", "folder"]


class AccountError(Exception):
    """A change refused; the message is for humans and names the account."""


class NoSuchAccount(AccountError):
    """The user, group, folder or key is not there."""


class AccountExists(AccountError):
    """The name is taken, in the database or by the configuration file."""


class AccountInUse(AccountError):
    """A group or folder still named by users or groups."""


class AccountInvalid(AccountError):
    """The definition fails validation or names an unknown group or folder."""


class SchemaTooNew(AccountError, migrations.SchemaTooNew):
    """The database was upgraded by a newer scriptsftp than this one."""


@dataclass(frozen=True)
class Changed:
    """When and by whom an entry was created and last changed."""

    created_at: float
    created_by: str
    updated_at: float
    updated_by: str


@dataclass(frozen=True)
class StoredUser:
    user: User
    changed: Changed
    password_changed: float | None
    last_login: float | None

    @property
    def created_at(self) -> float:
        return self.changed.created_at

    @property
    def created_by(self) -> str:
        return self.changed.created_by

    @property
    def updated_at(self) -> float:
        return self.changed.updated_at

    @property
    def updated_by(self) -> str:
        return self.changed.updated_by


@dataclass(frozen=True)
class StoredGroup:
    group: Group
    changed: Changed


@dataclass(frozen=True)
class StoredFolder:
    folder: Folder
    changed: Changed


@dataclass(frozen=True)
class Change:
    """One row of the change feed."""

    id: int
    at: float
    actor: str
    kind: str
    name: str
    action: str
    detail: str


# --- the schema --------------------------------------------------------------------------------

#: (version, statements), or a Migration marked compatible. Append only; a released migration is
#: never edited. A step the previous release can run against is marked compatible, so that a
#: cluster can be upgraded one node at a time (docs/cluster.md, "Rolling upgrade").
MIGRATIONS: list[Migration | tuple[int, list[str]]] = [
    (1, [
        """CREATE TABLE account_users (
            name TEXT PRIMARY KEY,
            definition TEXT NOT NULL,
            password_hash TEXT,
            password_changed DOUBLE PRECISION,
            last_login DOUBLE PRECISION,
            created_at DOUBLE PRECISION NOT NULL, created_by TEXT NOT NULL,
            updated_at DOUBLE PRECISION NOT NULL, updated_by TEXT NOT NULL)""",
        """CREATE TABLE user_keys (
            user_name TEXT NOT NULL REFERENCES account_users(name) ON DELETE CASCADE,
            fingerprint TEXT NOT NULL,
            key_line TEXT NOT NULL,
            position INTEGER NOT NULL,
            PRIMARY KEY (user_name, fingerprint))""",
        """CREATE TABLE account_groups (
            name TEXT PRIMARY KEY,
            definition TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL, created_by TEXT NOT NULL,
            updated_at DOUBLE PRECISION NOT NULL, updated_by TEXT NOT NULL)""",
        """CREATE TABLE account_folders (
            name TEXT PRIMARY KEY,
            definition TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL, created_by TEXT NOT NULL,
            updated_at DOUBLE PRECISION NOT NULL, updated_by TEXT NOT NULL)""",
        # who names a group or a folder: kept with each user and group, so "in use" is one lookup
        """CREATE TABLE account_references (
            owner_kind TEXT NOT NULL, owner_name TEXT NOT NULL,
            target_kind TEXT NOT NULL, target_name TEXT NOT NULL,
            PRIMARY KEY (owner_kind, owner_name, target_kind, target_name))""",
        "CREATE INDEX account_references_target ON account_references (target_kind, target_name)",
        """CREATE TABLE quota_usage (
            scope TEXT PRIMARY KEY,
            bytes BIGINT NOT NULL,
            files BIGINT NOT NULL)""",
        """CREATE TABLE transfer_usage (
            user_name TEXT NOT NULL,
            day TEXT NOT NULL,
            up BIGINT NOT NULL,
            down BIGINT NOT NULL,
            PRIMARY KEY (user_name, day))""",
        """CREATE TABLE account_changes (
            id {id},
            at DOUBLE PRECISION NOT NULL,
            actor TEXT NOT NULL,
            kind TEXT NOT NULL,
            name TEXT NOT NULL,
            action TEXT NOT NULL,
            detail TEXT NOT NULL)""",
    ]),
]
SCHEMA_VERSION = migrations.latest(MIGRATIONS)
#: PostgreSQL advisory lock keys (per database): one migration at a time, one account write at a time
UPGRADE_LOCK = 7318849
ACCOUNT_WRITES_LOCK = 7318850

#: keys of config.User kept in their own columns, not in the definition's JSON
_USER_OWN_COLUMNS = {"name", "password_hash", "public_keys"}
#: keys of config.User that make no sense in a database (files next to the config)
_USER_FILE_ONLY = {"password_hash_file", "generate_password"}

M = TypeVar("M", bound=BaseModel)


def _definition(model: BaseModel, exclude: set[str]) -> str:
    return json.dumps(model.model_dump(mode="json", exclude=exclude, exclude_defaults=True), sort_keys=True)


def _validated(cls: type[M], data: Mapping[str, Any], what: str) -> M:
    try:
        return cls.model_validate(dict(data), strict=False)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or what}: {e['msg'].removeprefix('Value error, ')}"
            for e in exc.errors())
        raise AccountInvalid(f"{what}: {problems}") from None


class _AccountBook:
    """The account database's version book: its own ``schema_version`` table (one row per
    step applied), as every account database has had it since the first release."""

    name = "accounts"

    def read(self, cur: Cursor) -> int:
        cur.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        row = cur.execute("SELECT max(version) FROM schema_version").fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    def record(self, cur: Cursor, version: int) -> None:
        cur.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))


class AccountDb:
    """The account database of one server (or of a cluster, on PostgreSQL)."""

    def __init__(self, db: SqlDatabase, file_names: dict[str, dict[str, str]] | None = None) -> None:
        self.db = db
        #: names the TOML file defines, with where: {"users"|"groups"|"folders": {name: "FILE:LINE"}}
        self.file_names: dict[str, dict[str, str]] = file_names or {"users": {}, "groups": {}, "folders": {}}

    @classmethod
    def open(cls, cfg: LoadedConfig, *, upgrade: bool = True) -> "AccountDb":
        """The database ``[accounts] database`` names (SQLite in state_dir when empty).

        ``upgrade``: apply missing migrations now; without it an old schema is refused."""
        state_dir = cfg.resolve(cfg.model.server.state_dir)
        store = cls(open_database(cfg.model.accounts.database, Path(state_dir) / SQLITE_FILE), file_names_of(cfg))
        try:
            if upgrade:
                store.upgrade()
            else:
                store.check_schema()
        except BaseException:
            store.close()
            raise
        return store

    def close(self) -> None:
        self.db.close()

    @property
    def _bytewise(self) -> str:
        """ORDER BY's collation for names: by code point on both engines (see sql.Dialect)."""
        return self.db.dialect.words["bytewise"]

    @contextmanager
    def _writing(self) -> Iterator[Cursor]:
        """A transaction that changes accounts. Writers take turns, on PostgreSQL as SQLite's
        ``BEGIN IMMEDIATE`` makes them: a check made inside ("is the name free?", "is the
        group in use?") still holds at the commit, so two processes adding one name get one
        user and one AccountExists (not the driver's unique violation, nor a deadlock), and
        change ids commit in the order they are drawn. Usage counters do not take the turn:
        each is one atomic upsert."""
        with self.db.transaction() as cur:
            if self.db.dialect.name == "postgresql":
                cur.execute("SELECT pg_advisory_xact_lock(?)", (ACCOUNT_WRITES_LOCK,))
            yield cur

    # --- schema ---------------------------------------------------------------------------------

    def schema_version(self) -> int:
        with self.db.transaction() as cur:
            return _AccountBook().read(cur)

    def check_schema(self) -> None:
        """Refuse a schema this code cannot use: older than its own (``db upgrade`` first), or
        newer unless the newer steps let this release run (a rolling upgrade)."""
        version = migrations.check(self.db, _AccountBook(), MIGRATIONS, "the account database", SchemaTooNew)
        if version < SCHEMA_VERSION:
            raise AccountError(f"{self.db.where}: the account database has schema {version}, this scriptsftp "
                               f"needs {SCHEMA_VERSION}: run `scriptsftp db upgrade`")

    def upgrade(self) -> list[int]:
        """Apply the missing migrations, each in its own transaction; concurrent upgraders
        (two nodes starting at once) wait for each other and apply each step once."""
        return migrations.migrate(self.db, _AccountBook(), MIGRATIONS, what="the account database",
                                  lock=UPGRADE_LOCK, too_new=SchemaTooNew)

    # --- users ----------------------------------------------------------------------------------

    def get_user(self, name: str) -> StoredUser | None:
        with self.db.read() as cur:
            return self._get_user(cur, name)

    def _get_user(self, cur: Cursor, name: str) -> StoredUser | None:
        row = cur.execute(
            "SELECT definition, password_hash, password_changed, last_login, created_at, created_by, "
            "updated_at, updated_by FROM account_users WHERE name = ?", (name,)).fetchone()
        if row is None:
            return None
        keys = [r[0] for r in cur.execute(
            "SELECT key_line FROM user_keys WHERE user_name = ? ORDER BY position", (name,)).fetchall()]
        return self._user_from(name, row, keys)

    @staticmethod
    def _user_from(name: str, row: Sequence[Any], keys: list[str]) -> StoredUser:
        data = json.loads(row[0])
        data.update(name=name, password_hash=row[1] or "", public_keys=keys)
        user = User.model_validate(data, strict=False)
        return StoredUser(user, Changed(row[4], row[5], row[6], row[7]), row[2], row[3])

    def list_users(self) -> list[StoredUser]:
        with self.db.read() as cur:
            keys: dict[str, list[str]] = {}
            for user_name, line in cur.execute(
                    "SELECT user_name, key_line FROM user_keys ORDER BY user_name, position").fetchall():
                keys.setdefault(user_name, []).append(line)
            rows = cur.execute(
                "SELECT name, definition, password_hash, password_changed, last_login, created_at, created_by, "
                f"updated_at, updated_by FROM account_users ORDER BY name {self._bytewise}").fetchall()
        return [self._user_from(r[0], r[1:], keys.get(r[0], [])) for r in rows]

    def user_names(self) -> list[str]:
        with self.db.read() as cur:
            rows = cur.execute(f"SELECT name FROM account_users ORDER BY name {self._bytewise}").fetchall()
        return [r[0] for r in rows]

    def add_user(self, user: User, actor: str) -> StoredUser:
        user = self._check_user(user)
        with self._writing() as cur:
            if self._exists(cur, "account_users", user.name):
                raise AccountExists(f"user {user.name!r} already exists")
            self._check_references(cur, "user", user.name, user.groups, user.folders)
            now = time.time()
            cur.execute(
                "INSERT INTO account_users (name, definition, password_hash, password_changed, created_at, "
                "created_by, updated_at, updated_by) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (user.name, _definition(user, _USER_OWN_COLUMNS | _USER_FILE_ONLY), user.password_hash or None,
                 now if user.password_hash else None, now, actor, now, actor))
            self._write_keys(cur, user.name, user.public_keys)
            self._write_references(cur, "user", user.name, user.groups, user.folders)
            self._log(cur, actor, "user", user.name, "add")
            stored = self._get_user(cur, user.name)
        assert stored is not None
        return stored

    def update_user(self, user: User, actor: str) -> StoredUser:
        user = self._check_user(user)
        with self._writing() as cur:
            old = self._get_user(cur, user.name)
            if old is None:
                raise NoSuchAccount(f"no user {user.name!r}")
            self._check_references(cur, "user", user.name, user.groups, user.folders)
            now = time.time()
            changed_password = (user.password_hash or "") != (old.user.password_hash or "")
            cur.execute(
                "UPDATE account_users SET definition = ?, password_hash = ?, password_changed = ?, updated_at = ?, "
                "updated_by = ? WHERE name = ?",
                (_definition(user, _USER_OWN_COLUMNS | _USER_FILE_ONLY), user.password_hash or None,
                 now if changed_password and user.password_hash else old.password_changed, now, actor, user.name))
            cur.execute("DELETE FROM user_keys WHERE user_name = ?", (user.name,))
            self._write_keys(cur, user.name, user.public_keys)
            self._write_references(cur, "user", user.name, user.groups, user.folders)
            self._log(cur, actor, "user", user.name, "update", _diff(old.user, user))
            stored = self._get_user(cur, user.name)
        assert stored is not None
        return stored

    def delete_user(self, name: str, actor: str) -> None:
        with self._writing() as cur:
            if cur.execute("DELETE FROM account_users WHERE name = ?", (name,)).rowcount == 0:
                raise NoSuchAccount(f"no user {name!r}")
            cur.execute("DELETE FROM account_references WHERE owner_kind = 'user' AND owner_name = ?", (name,))
            cur.execute("DELETE FROM quota_usage WHERE scope = ?", (f"user:{name}",))
            cur.execute("DELETE FROM transfer_usage WHERE user_name = ?", (name,))
            self._log(cur, actor, "user", name, "delete")

    def set_password(self, name: str, password_hash: str, actor: str) -> None:
        if not password_hash.startswith("$argon2id$"):
            raise AccountInvalid("password_hash: must be an argon2id hash")
        self._set_user_columns(name, actor, "password", "password_hash = ?, password_changed = ?",
                               (password_hash, time.time()))

    def set_disabled(self, name: str, disabled: bool, reason: str, actor: str) -> None:
        with self._writing() as cur:
            old = self._get_user(cur, name)
            if old is None:
                raise NoSuchAccount(f"no user {name!r}")
            user = old.user.model_copy(update={"disabled": disabled, "disabled_reason": reason if disabled else ""})
            cur.execute("UPDATE account_users SET definition = ?, updated_at = ?, updated_by = ? WHERE name = ?",
                        (_definition(user, _USER_OWN_COLUMNS | _USER_FILE_ONLY), time.time(), actor, name))
            self._log(cur, actor, "user", name, "disable" if disabled else "enable", reason if disabled else "")

    def add_key(self, name: str, key_line: str, actor: str) -> str:
        fingerprint = _fingerprint(key_line)
        with self._writing() as cur:
            if not self._exists(cur, "account_users", name):
                raise NoSuchAccount(f"no user {name!r}")
            if cur.execute("SELECT 1 FROM user_keys WHERE user_name = ? AND fingerprint = ?",
                           (name, fingerprint)).fetchone():
                raise AccountExists(f"user {name!r} already has the key {fingerprint}")
            row = cur.execute("SELECT max(position) FROM user_keys WHERE user_name = ?", (name,)).fetchone()
            position = (row[0] + 1) if row and row[0] is not None else 0
            cur.execute("INSERT INTO user_keys (user_name, fingerprint, key_line, position) VALUES (?, ?, ?, ?)",
                        (name, fingerprint, key_line.strip(), position))
            self._touch(cur, "account_users", name, actor)
            self._log(cur, actor, "user", name, "key-add", fingerprint)
        return fingerprint

    def remove_key(self, name: str, fingerprint: str, actor: str) -> None:
        with self._writing() as cur:
            if not self._exists(cur, "account_users", name):
                raise NoSuchAccount(f"no user {name!r}")
            if cur.execute("DELETE FROM user_keys WHERE user_name = ? AND fingerprint = ?",
                           (name, fingerprint)).rowcount == 0:
                raise NoSuchAccount(f"user {name!r} has no key {fingerprint}")
            self._touch(cur, "account_users", name, actor)
            self._log(cur, actor, "user", name, "key-remove", fingerprint)

    def record_logins(self, logins: Mapping[str, float]) -> None:
        """Last login times, written in one transaction (the daemon batches them off the login path)."""
        if not logins:
            return
        with self._writing() as cur:
            for name, at in sorted(logins.items()):
                cur.execute("UPDATE account_users SET last_login = ? WHERE name = ?", (at, name))

    def record_login(self, name: str, at: float) -> None:
        self.record_logins({name: at})

    def _check_user(self, user: User) -> User:
        if user.password_hash_file or user.generate_password:
            raise AccountInvalid(f"user {user.name!r}: password_hash_file and generate_password belong to the "
                                 "configuration file; give the database a password (scriptsftp user passwd)")
        where = self.file_names.get("users", {}).get(user.name)
        if where:
            raise AccountExists(f"user {user.name!r} is defined in the configuration file ({where})")
        # re-validate: a model_copy(update=...) skips the validators
        return _validated(User, user.model_dump(), f"user {user.name!r}")

    def _set_user_columns(self, name: str, actor: str, action: str, assignments: str,
                          values: tuple[Any, ...]) -> None:
        with self._writing() as cur:
            n = cur.execute(f"UPDATE account_users SET {assignments}, updated_at = ?, updated_by = ? WHERE name = ?",
                            (*values, time.time(), actor, name)).rowcount
            if n == 0:
                raise NoSuchAccount(f"no user {name!r}")
            self._log(cur, actor, "user", name, action)

    @staticmethod
    def _write_keys(cur: Cursor, name: str, lines: Iterable[str]) -> None:
        seen: set[str] = set()
        for position, line in enumerate(lines):
            fingerprint = _fingerprint(line)
            if fingerprint in seen:
                raise AccountInvalid(f"user {name!r}: the key {fingerprint} is given twice")
            seen.add(fingerprint)
            cur.execute("INSERT INTO user_keys (user_name, fingerprint, key_line, position) VALUES (?, ?, ?, ?)",
                        (name, fingerprint, line.strip(), position))

    # --- groups and folders ---------------------------------------------------------------------

    def get_group(self, name: str) -> StoredGroup | None:
        with self.db.read() as cur:
            row = self._get_entry(cur, "account_groups", name)
        return None if row is None else StoredGroup(_load(Group, name, row[0]), Changed(*row[1:]))

    def list_groups(self) -> list[StoredGroup]:
        with self.db.read() as cur:
            rows = self._list_entries(cur, "account_groups")
        return [StoredGroup(_load(Group, r[0], r[1]), Changed(*r[2:])) for r in rows]

    def add_group(self, group: Group, actor: str) -> StoredGroup:
        group = _validated(Group, group.model_dump(), f"group {group.name!r}")
        with self._writing() as cur:
            self._add_entry(cur, "group", "account_groups", group.name, _definition(group, {"name"}), actor)
            self._check_references(cur, "group", group.name, (), group.folders)
            self._write_references(cur, "group", group.name, (), group.folders)
        stored = self.get_group(group.name)
        assert stored is not None
        return stored

    def update_group(self, group: Group, actor: str) -> StoredGroup:
        group = _validated(Group, group.model_dump(), f"group {group.name!r}")
        with self._writing() as cur:
            self._check_references(cur, "group", group.name, (), group.folders)
            self._update_entry(cur, "group", "account_groups", group.name, _definition(group, {"name"}), actor)
            self._write_references(cur, "group", group.name, (), group.folders)
        stored = self.get_group(group.name)
        assert stored is not None
        return stored

    def delete_group(self, name: str, actor: str) -> None:
        with self._writing() as cur:
            self._refuse_in_use(cur, "group", name)
            self._delete_entry(cur, "group", "account_groups", name, actor)
            cur.execute("DELETE FROM account_references WHERE owner_kind = 'group' AND owner_name = ?", (name,))

    def get_folder(self, name: str) -> StoredFolder | None:
        with self.db.read() as cur:
            row = self._get_entry(cur, "account_folders", name)
        return None if row is None else StoredFolder(_load(Folder, name, row[0]), Changed(*row[1:]))

    def list_folders(self) -> list[StoredFolder]:
        with self.db.read() as cur:
            rows = self._list_entries(cur, "account_folders")
        return [StoredFolder(_load(Folder, r[0], r[1]), Changed(*r[2:])) for r in rows]

    def add_folder(self, folder: Folder, actor: str) -> StoredFolder:
        folder = _validated(Folder, folder.model_dump(), f"folder {folder.name!r}")
        with self._writing() as cur:
            self._add_entry(cur, "folder", "account_folders", folder.name, _definition(folder, {"name"}), actor)
        stored = self.get_folder(folder.name)
        assert stored is not None
        return stored

    def update_folder(self, folder: Folder, actor: str) -> StoredFolder:
        folder = _validated(Folder, folder.model_dump(), f"folder {folder.name!r}")
        with self._writing() as cur:
            self._update_entry(cur, "folder", "account_folders", folder.name, _definition(folder, {"name"}), actor)
        stored = self.get_folder(folder.name)
        assert stored is not None
        return stored

    def delete_folder(self, name: str, actor: str) -> None:
        with self._writing() as cur:
            self._refuse_in_use(cur, "folder", name)
            self._delete_entry(cur, "folder", "account_folders", name, actor)
            cur.execute("DELETE FROM quota_usage WHERE scope = ?", (f"folder:{name}",))

    def _get_entry(self, cur: Cursor, table: str, name: str) -> tuple[Any, ...] | None:
        return cur.execute(f"SELECT definition, created_at, created_by, updated_at, updated_by FROM {table} "
                           "WHERE name = ?", (name,)).fetchone()

    def _list_entries(self, cur: Cursor, table: str) -> list[tuple[Any, ...]]:
        return cur.execute(f"SELECT name, definition, created_at, created_by, updated_at, updated_by FROM {table} "
                           f"ORDER BY name {self._bytewise}").fetchall()

    def _add_entry(self, cur: Cursor, kind: Kind, table: str, name: str, definition: str, actor: str) -> None:
        where = self.file_names.get(kind + "s", {}).get(name)
        if where:
            raise AccountExists(f"{kind} {name!r} is defined in the configuration file ({where})")
        if self._exists(cur, table, name):
            raise AccountExists(f"{kind} {name!r} already exists")
        now = time.time()
        cur.execute(f"INSERT INTO {table} (name, definition, created_at, created_by, updated_at, updated_by) "
                    "VALUES (?, ?, ?, ?, ?, ?)", (name, definition, now, actor, now, actor))
        self._log(cur, actor, kind, name, "add")

    def _update_entry(self, cur: Cursor, kind: Kind, table: str, name: str, definition: str, actor: str) -> None:
        n = cur.execute(f"UPDATE {table} SET definition = ?, updated_at = ?, updated_by = ? WHERE name = ?",
                        (definition, time.time(), actor, name)).rowcount
        if n == 0:
            raise NoSuchAccount(f"no {kind} {name!r}")
        self._log(cur, actor, kind, name, "update")

    def _delete_entry(self, cur: Cursor, kind: Kind, table: str, name: str, actor: str) -> None:
        if cur.execute(f"DELETE FROM {table} WHERE name = ?", (name,)).rowcount == 0:
            raise NoSuchAccount(f"no {kind} {name!r}")
        self._log(cur, actor, kind, name, "delete")

    def _refuse_in_use(self, cur: Cursor, kind: Kind, name: str) -> None:
        rows = cur.execute("SELECT owner_kind, owner_name FROM account_references WHERE target_kind = ? "
                           f"AND target_name = ? ORDER BY owner_kind DESC, owner_name {self._bytewise} LIMIT 6",
                           (kind, name)).fetchall()
        if rows:
            users = ", ".join(f"{k} {n!r}" for k, n in rows[:5]) + (", …" if len(rows) > 5 else "")
            raise AccountInUse(f"{kind} {name!r} is still used by {users}")

    def _check_references(self, cur: Cursor, owner_kind: Kind, owner: str, groups: Iterable[str],
                          mounts: Mapping[str, str]) -> None:
        for group in groups:
            if group not in self.file_names.get("groups", {}) and not self._exists(cur, "account_groups", group):
                raise AccountInvalid(f"{owner_kind} {owner!r}: unknown group {group!r}")
        for vpath, folder in mounts.items():
            if folder not in self.file_names.get("folders", {}) and not self._exists(cur, "account_folders", folder):
                raise AccountInvalid(f"{owner_kind} {owner!r}: {vpath}: unknown folder {folder!r}")

    @staticmethod
    def _write_references(cur: Cursor, owner_kind: Kind, owner: str, groups: Iterable[str],
                          mounts: Mapping[str, str]) -> None:
        cur.execute("DELETE FROM account_references WHERE owner_kind = ? AND owner_name = ?", (owner_kind, owner))
        targets = {("group", g) for g in groups} | {("folder", f) for f in mounts.values()}
        for kind, name in sorted(targets):
            cur.execute("INSERT INTO account_references (owner_kind, owner_name, target_kind, target_name) "
                        "VALUES (?, ?, ?, ?)", (owner_kind, owner, kind, name))

    @staticmethod
    def _exists(cur: Cursor, table: str, name: str) -> bool:
        return cur.execute(f"SELECT 1 FROM {table} WHERE name = ?", (name,)).fetchone() is not None

    @staticmethod
    def _touch(cur: Cursor, table: str, name: str, actor: str) -> None:
        cur.execute(f"UPDATE {table} SET updated_at = ?, updated_by = ? WHERE name = ?", (time.time(), actor, name))

    # --- usage ledger ---------------------------------------------------------------------------

    def usage(self, scope: str) -> tuple[int, int]:
        with self.db.read() as cur:
            row = cur.execute("SELECT bytes, files FROM quota_usage WHERE scope = ?", (scope,)).fetchone()
        return (int(row[0]), int(row[1])) if row else (0, 0)

    def add_usage(self, scope: str, bytes_delta: int, files_delta: int) -> tuple[int, int]:
        greatest = self.db.dialect.words["greatest"]
        with self.db.transaction() as cur:
            row = cur.execute(
                "INSERT INTO quota_usage (scope, bytes, files) VALUES (?, ?, ?) ON CONFLICT (scope) DO UPDATE SET "
                f"bytes = {greatest}(0, quota_usage.bytes + excluded.bytes), "
                f"files = {greatest}(0, quota_usage.files + excluded.files) RETURNING bytes, files",
                (scope, bytes_delta, files_delta),
            ).fetchone()
            if row is not None and (row[0] < 0 or row[1] < 0):  # a first row from a negative delta
                row = cur.execute(f"UPDATE quota_usage SET bytes = {greatest}(0, bytes), files = {greatest}(0, files) "
                                  "WHERE scope = ? RETURNING bytes, files", (scope,)).fetchone()
        assert row is not None
        return int(row[0]), int(row[1])

    def set_usage(self, scope: str, size: int, files: int) -> None:
        with self.db.transaction() as cur:
            cur.execute("INSERT INTO quota_usage (scope, bytes, files) VALUES (?, ?, ?) ON CONFLICT (scope) "
                        "DO UPDATE SET bytes = excluded.bytes, files = excluded.files", (scope, size, files))

    def all_usage(self) -> dict[str, tuple[int, int]]:
        """Every scope's totals (status pages), one query."""
        with self.db.read() as cur:
            return {r[0]: (int(r[1]), int(r[2])) for r in
                    cur.execute("SELECT scope, bytes, files FROM quota_usage").fetchall()}

    def transfer_usage(self, user: str, day: str) -> tuple[int, int]:
        with self.db.read() as cur:
            row = cur.execute("SELECT up, down FROM transfer_usage WHERE user_name = ? AND day = ?",
                              (user, day)).fetchone()
        return (int(row[0]), int(row[1])) if row else (0, 0)

    def add_transfer(self, user: str, day: str, up: int, down: int) -> tuple[int, int]:
        with self.db.transaction() as cur:
            row = cur.execute(
                "INSERT INTO transfer_usage (user_name, day, up, down) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (user_name, day) DO UPDATE SET up = transfer_usage.up + excluded.up, "
                "down = transfer_usage.down + excluded.down RETURNING up, down", (user, day, up, down)).fetchone()
        assert row is not None
        return int(row[0]), int(row[1])

    # --- change feed ----------------------------------------------------------------------------

    def _log(self, cur: Cursor, actor: str, kind: Kind, name: str, action: str, detail: str = "") -> None:
        # called inside _writing(): writers take turns, so ids commit in order and a reader
        # polling "id > last" (the watcher, DatabaseAccountSource's kept records) misses none.
        # The turn is taken here too (a no-op when held): a writer that forgot _writing() keeps
        # the feed in order, though not its own checks
        if self.db.dialect.name == "postgresql":
            cur.execute("SELECT pg_advisory_xact_lock(?)", (ACCOUNT_WRITES_LOCK,))
        cur.execute("INSERT INTO account_changes (at, actor, kind, name, action, detail) VALUES (?, ?, ?, ?, ?, ?)",
                    (time.time(), actor, kind, name, action, detail))

    def last_change(self) -> int:
        with self.db.read() as cur:
            row = cur.execute("SELECT max(id) FROM account_changes").fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    def changes_since(self, after: int, limit: int = 1000) -> list[Change]:
        with self.db.read() as cur:
            rows = cur.execute("SELECT id, at, actor, kind, name, action, detail FROM account_changes "
                               "WHERE id > ? ORDER BY id LIMIT ?", (after, limit)).fetchall()
        return [Change(int(r[0]), float(r[1]), r[2], r[3], r[4], r[5], r[6]) for r in rows]

    # --- dump -----------------------------------------------------------------------------------

    def export(self) -> dict[str, Any]:
        """Every user, group and folder with their history stamps; :meth:`import_` takes it back."""

        def entry(model: BaseModel, changed: Changed, **extra: Any) -> dict[str, Any]:
            out = model.model_dump(mode="json", exclude_defaults=True, exclude=_USER_FILE_ONLY & set(type(model).model_fields))
            out["name"] = getattr(model, "name")
            out["_meta"] = {"created_at": changed.created_at, "created_by": changed.created_by,
                            "updated_at": changed.updated_at, "updated_by": changed.updated_by, **extra}
            return out

        return {
            "format": DUMP_FORMAT,
            "version": DUMP_VERSION,
            "folders": [entry(f.folder, f.changed) for f in self.list_folders()],
            "groups": [entry(g.group, g.changed) for g in self.list_groups()],
            "users": [entry(u.user, u.changed, password_changed=u.password_changed, last_login=u.last_login)
                      for u in self.list_users()],
        }

    def import_(self, dump: Mapping[str, Any], actor: str, *, replace: bool = False) -> dict[str, int]:
        """Load a dump in one transaction: all of it or nothing. Without ``replace`` a name
        that exists is an error; with it, the dump's definition replaces the stored one."""
        if dump.get("format") != DUMP_FORMAT or dump.get("version") != DUMP_VERSION:
            raise AccountInvalid(f"not a {DUMP_FORMAT} dump of version {DUMP_VERSION}")
        parsed: dict[str, list[tuple[BaseModel, dict[str, Any]]]] = {}
        for section, cls in (("folders", Folder), ("groups", Group), ("users", User)):
            items = dump.get(section, [])
            if not isinstance(items, list):
                raise AccountInvalid(f"{section}: must be a list")
            parsed[section] = []
            for i, item in enumerate(items):
                if not isinstance(item, dict):
                    raise AccountInvalid(f"{section}[{i}]: must be an object")
                data = dict(item)
                meta = data.pop("_meta", {}) or {}
                parsed[section].append((_validated(cls, data, f"{section}[{i}]"), meta))
        counts = {"added": 0, "replaced": 0}
        now = time.time()
        with self._writing() as cur:
            order: tuple[tuple[str, str, Kind], ...] = (
                ("folders", "account_folders", "folder"), ("groups", "account_groups", "group"),
                ("users", "account_users", "user"))
            for section, table, kind in order:
                for model, meta in parsed[section]:
                    name = getattr(model, "name")
                    where = self.file_names.get(section, {}).get(name)
                    if where:
                        raise AccountExists(f"{kind} {name!r} is defined in the configuration file ({where})")
                    exists = self._exists(cur, table, name)
                    if exists and not replace:
                        raise AccountExists(f"{kind} {name!r} already exists (import --replace to overwrite)")
                    if exists:
                        cur.execute(f"DELETE FROM {table} WHERE name = ?", (name,))
                    stamps = (meta.get("created_at", now), meta.get("created_by", actor),
                              meta.get("updated_at", now), meta.get("updated_by", actor))
                    if isinstance(model, User):
                        if model.password_hash_file or model.generate_password:
                            raise AccountInvalid(f"user {name!r}: password_hash_file has no place in the database")
                        cur.execute(
                            "INSERT INTO account_users (name, definition, password_hash, password_changed, last_login, "
                            "created_at, created_by, updated_at, updated_by) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                            (name, _definition(model, _USER_OWN_COLUMNS | _USER_FILE_ONLY), model.password_hash or None,
                             meta.get("password_changed"), meta.get("last_login"), *stamps))
                        self._write_keys(cur, name, model.public_keys)
                        self._check_references(cur, "user", name, model.groups, model.folders)
                        self._write_references(cur, "user", name, model.groups, model.folders)
                    else:
                        cur.execute(f"INSERT INTO {table} (name, definition, created_at, created_by, updated_at, "
                                    "updated_by) VALUES (?, ?, ?, ?, ?, ?)",
                                    (name, _definition(model, {"name"}), *stamps))
                        if isinstance(model, Group):
                            self._check_references(cur, "group", name, (), model.folders)
                            self._write_references(cur, "group", name, (), model.folders)
                    self._log(cur, actor, kind, name, "update" if exists else "add", "import")
                    counts["replaced" if exists else "added"] += 1
        return counts


def _load(cls: type[M], name: str, definition: str) -> M:
    data = json.loads(definition)
    data["name"] = name
    return cls.model_validate(data, strict=False)


def _fingerprint(key_line: str) -> str:
    from scriptsftp.server.support.keys import fingerprint, parse_public_key  # late: pulls in paramiko

    try:
        return fingerprint(parse_public_key(key_line))
    except ValueError as exc:
        raise AccountInvalid(f"key: {exc}") from None


def _diff(old: User, new: User) -> str:
    """The keys an update changed, for the change feed (names only: never a value, never a hash)."""
    a, b = old.model_dump(mode="json"), new.model_dump(mode="json")
    return ",".join(sorted(k for k in b if a.get(k) != b.get(k)))


def file_names_of(cfg: LoadedConfig) -> dict[str, dict[str, str]]:
    """The users, groups and folders the configuration file defines, with FILE:LINE."""
    out: dict[str, dict[str, str]] = {}
    for section in ("users", "groups", "folders"):
        entries = getattr(cfg.model, section)
        out[section] = {e.name: f"{cfg.path}:{cfg.key_lines.line_of((section, i, 'name')) or 1}"
                        for i, e in enumerate(entries)}
    return out


class DatabaseAccountSource:
    """The accounts of the database, as the login core reads them: one user by primary
    key (with their groups and folders), so a change is seen by the next login.

    One login asks for its user several times (TLS, lock, password, decision, session),
    and building a record (validation, key parsing, the groups' and folders' reads) costs
    more than the reads. So a record is kept with the change feed's last id at the time
    it was read, and used again only while that id is still the last one: one indexed
    ``max(id)`` per ask, and a change anywhere is seen by the very next ask. Absent users
    are not kept."""

    MAX_KEPT = 10000

    def __init__(self, db: AccountDb, cfg: LoadedConfig) -> None:
        self.db = db
        self._resolve: Callable[[str], Path] = cfg.resolve
        self._policy = cfg.model.accounts
        self._file_groups = {g.name: g for g in cfg.model.groups}
        self._file_folders = {f.name: f for f in cfg.model.folders}
        self._cache: dict[str, tuple[int, UserRecord]] = {}
        self._failing = False

    def forget(self, name: str | None = None) -> None:
        """Drop the kept record of ``name`` (every record: None)."""
        if name is None:
            self._cache.clear()
        else:
            self._cache.pop(name, None)

    def get(self, name: str) -> UserRecord | None:
        try:
            version = self.db.last_change()
            kept = self._cache.get(name)
            if kept is not None and kept[0] == version:
                return kept[1]
            rec = self._read(name)
        except Exception as exc:  # the database is down: its users cannot log in, the file's still can
            if not self._failing:
                log.error("account database unavailable (%s): logins of its users fail until it is back: %s",
                          self.db.db.where, exc)
            self._failing = True
            return None
        if self._failing:
            log.info("account database available again (%s)", self.db.db.where)
            self._failing = False
        if rec is None:
            self._cache.pop(name, None)
        else:
            if len(self._cache) >= self.MAX_KEPT:
                self._cache.clear()
            self._cache[name] = (version, rec)
        return rec

    def _read(self, name: str) -> UserRecord | None:
        stored = self.db.get_user(name)
        if stored is None:
            return None
        user = stored.user
        groups: dict[str, Group] = {}
        for g in user.groups:
            found = self._file_groups.get(g) or _model_of(self.db.get_group(g))
            if found is not None:
                groups[g] = found
        mounts = {*user.folders.values(), *(f for g in groups.values() for f in g.folders.values())}
        folders: dict[str, Folder] = {}
        for f in mounts:
            folder = self._file_folders.get(f) or _model_of(self.db.get_folder(f))
            if folder is not None:
                folders[f] = folder
        return build_record(user, groups, folders, self._resolve, self._policy,
                            password_hash=user.password_hash or None, password_changed=stored.password_changed,
                            origin="the account database")

    def names(self) -> list[str]:
        return self.db.user_names()


def _model_of(stored: StoredGroup | StoredFolder | None) -> Any:
    if stored is None:
        return None
    return stored.group if isinstance(stored, StoredGroup) else stored.folder


class MergedAccountSource:
    """The file's users first, then the database's: a name in both is refused at start and
    reload (:func:`name_conflicts`), and the database refuses the file's names."""

    def __init__(self, file: Any, database: DatabaseAccountSource | None) -> None:
        self.file = file
        self.database = database

    def forget(self, name: str | None = None) -> None:
        """The change feed named ``name`` (None: a group or folder): read it again next time."""
        if self.database is not None:
            self.database.forget(name)

    def get(self, name: str) -> UserRecord | None:
        rec: UserRecord | None = self.file.get(name)
        if rec is None and self.database is not None:
            rec = self.database.get(name)
        return rec

    def names(self) -> list[str]:
        out = list(self.file.names())
        if self.database is not None:
            mine = set(out)
            out += [n for n in self.database.names() if n not in mine]
        return out


def name_conflicts(cfg: LoadedConfig, db: AccountDb) -> list[str]:
    """Names the file and the database both define, one message each naming both places."""
    problems = []
    lookups = {"users": db.get_user, "groups": db.get_group, "folders": db.get_folder}
    for section, names in file_names_of(cfg).items():
        for name, where in names.items():
            if lookups[section](name) is not None:
                problems.append(f"{where}: {section}: {section[:-1]} {name!r} is defined both here and in the "
                                f"account database ({db.db.where}): remove one")
    return problems

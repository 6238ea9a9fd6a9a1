"""The account commands: ``scriptsftp user``, ``group``, ``folder``, ``accounts`` and ``db``.

They write the account database themselves (SQLite in ``state_dir``, or the PostgreSQL
server ``[accounts] database`` names), so they work whether the daemon runs or not: a
running daemon sees each change within ``[accounts] watch_interval`` through the
database's change feed. Every change is recorded with its actor, ``cli:<unix user>``.
Users, groups and folders of the configuration file are listed and shown too, but
only the file changes them.

The exit status is part of the interface (docs/accounts.md, "Command line"):

    0  done
    1  no such user, group, folder or key
    2  bad usage or configuration (click's own errors, a config file that does not load)
    3  the name exists already: in the database, or in the configuration file (FILE:LINE named)
    4  in use: a group or folder that users or groups still name
    5  invalid: a value, a key, a permission, a reference to an unknown group or folder
    6  the account database cannot be used (unreachable, locked, made by a newer scriptsftp),
       or the export file cannot be written

A refusal is one line on stderr, ``scriptsftp: ...``, never a traceback (docs/architecture.md
rule 9). Passwords come from standard input (``--password-stdin``) or a terminal prompt,
never from the command line, where every user of the machine could read them.
"""

from __future__ import annotations

import getpass
import json
import os
import pwd
import sqlite3
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, NoReturn, Sequence, TypeVar

import click

from scriptsftp.server.support.config import ConfigError, Folder, Group, LoadedConfig, User, default_config_path, \
    load_config
from scriptsftp.server.ops.account_edits import FOLDER_FIELDS, GROUP_FIELDS, USER_FIELDS, EditError, Field, \
    absolute_path, apply_edits, editable, validated
from scriptsftp.server.ops.account_views import DATABASE, Stamps, entry_view, show_lines, table_lines, user_row, \
    user_view

if TYPE_CHECKING:
    from scriptsftp.server.stores.accounts_db import AccountDb

CONFIG_HELP = "config file (default: $SCRIPTSFTP_CONFIG, else ./conf/scriptsftp.toml)"


class Exit(IntEnum):
    """The exit statuses a script can rely on (the module docstring says when each is used)."""

    OK = 0
    NOT_FOUND = 1
    USAGE = 2
    EXISTS = 3
    IN_USE = 4
    INVALID = 5
    UNAVAILABLE = 6


def fail(code: Exit, message: str) -> NoReturn:
    click.echo(f"scriptsftp: {message}", err=True)
    sys.exit(int(code))


@contextmanager
def refusals() -> Iterator[None]:
    """Every refusal of the database or of validation as its exit status and one line."""
    from scriptsftp.server.stores import accounts_db as adb

    try:
        yield
    except adb.NoSuchAccount as exc:
        fail(Exit.NOT_FOUND, str(exc))
    except adb.AccountExists as exc:
        fail(Exit.EXISTS, str(exc))
    except adb.AccountInUse as exc:
        fail(Exit.IN_USE, str(exc))
    except (adb.AccountInvalid, EditError) as exc:
        fail(Exit.INVALID, str(exc))
    except adb.AccountError as exc:  # the schema: too new, or an upgrade refused
        fail(Exit.UNAVAILABLE, str(exc))
    except (sqlite3.Error, OSError) as exc:
        fail(Exit.UNAVAILABLE, f"the account database cannot be used: {exc}")
    except Exception as exc:
        if type(exc).__module__.startswith("psycopg"):  # PostgreSQL unreachable, refused, timed out
            fail(Exit.UNAVAILABLE, f"the account database cannot be used: {str(exc).strip().splitlines()[0]}")
        raise


def actor() -> str:
    """Who changes, for the change feed: ``cli:`` and the Unix account running the command."""
    try:
        name = pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        name = str(os.getuid())
    return f"cli:{name}"


@dataclass
class Accounts:
    """What a command works on: the loaded config, the open database, who acts."""

    cfg: LoadedConfig
    db: "AccountDb"
    actor: str

    def file_entry(self, section: str, name: str) -> str | None:
        """``FILE:LINE`` where the configuration file defines ``name``, or None."""
        return self.db.file_names.get(section, {}).get(name)

    def refuse_file_entry(self, section: str, name: str) -> None:
        where = self.file_entry(section, name)
        if where:
            fail(Exit.EXISTS,
                 f"{section[:-1]} {name!r} is defined in the configuration file ({where}): change it there")


def load(config_path: str | None) -> LoadedConfig:
    try:
        return load_config(Path(config_path) if config_path else default_config_path())
    except ConfigError as exc:
        for line in exc.problems:
            click.echo(line, err=True)
        sys.exit(int(Exit.USAGE))


def private_state_dir(cfg: LoadedConfig) -> None:
    """Make a missing state_dir 0700, as the daemon does: a command run before the first
    start must not leave it open to everyone (the SQLite file would make it 0755)."""
    if not cfg.model.accounts.database:
        cfg.resolve(cfg.model.server.state_dir).mkdir(parents=True, exist_ok=True, mode=0o700)


@contextmanager
def opened(config_path: str | None) -> Iterator[Accounts]:
    """The account database of the config at ``config_path``, with every refusal inside
    mapped to its exit status."""
    from scriptsftp.server.stores.accounts_db import AccountDb

    cfg = load(config_path)
    with refusals():
        private_state_dir(cfg)
        db = AccountDb.open(cfg)
        try:
            yield Accounts(cfg, db, actor())
        finally:
            db.close()


def emit(as_json: bool, data: Any, lines: Sequence[str]) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2, ensure_ascii=False))
    else:
        for line in lines:
            click.echo(line)


# --- options -------------------------------------------------------------------------------------

F = TypeVar("F", bound=Callable[..., Any])


def config_option(fn: F) -> F:
    return click.option("-c", "--config", "config_path", help=CONFIG_HELP)(fn)


def json_option(fn: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="print JSON")(fn)


def field_options(fields: Sequence[Field], *, with_unset: bool) -> Callable[[F], F]:
    """Click options for ``fields``; values are checked by the model afterwards (exit 5 and
    one line), not by click, so every bad value is refused the same way."""

    def decorate(fn: F) -> F:
        if with_unset:
            fn = click.option("--unset", "unset", multiple=True, metavar="KEY",
                              help="put KEY back to its default (e.g. quota-size, expires, group); repeatable")(fn)
        for f in reversed(fields):
            if f.kind == "flag":
                fn = click.option(f"{f.option}/--no-{f.option[2:]}", f.param, default=None, help=f.help)(fn)
            elif f.kind in ("list", "perms", "mounts"):
                fn = click.option(f.option, f.param, multiple=True, metavar=f.metavar, help=f.help)(fn)
            else:
                fn = click.option(f.option, f.param, default=None, metavar=f.metavar, help=f.help)(fn)
        return fn

    return decorate


def edited(data: dict[str, Any], fields: Sequence[Field], opts: dict[str, Any],
           unset: Sequence[str] = ()) -> dict[str, Any]:
    given = {f.param: opts.get(f.param) for f in fields}
    return apply_edits(data, fields, given, unset)


def nothing_given(fields: Sequence[Field], opts: dict[str, Any], *also: Any) -> bool:
    return all(opts.get(f.param) in (None, ()) for f in fields) and not any(also)


def read_password(from_stdin: bool) -> str:
    """One line of standard input, or asked twice on a terminal; never an argument."""
    if from_stdin:
        line = sys.stdin.readline()
        if not line:
            fail(Exit.INVALID, "no password on standard input")
        password = line.rstrip("\r\n")
    elif sys.stdin.isatty():
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            fail(Exit.INVALID, "passwords differ")
    else:
        fail(Exit.USAGE, "standard input is not a terminal: give --password-stdin and the password on it")
    if not password:
        fail(Exit.INVALID, "empty password refused")
    return password


def hashed(password: str) -> str:
    from scriptsftp.server.core.passwords import hash_password

    return hash_password(password)


# --- users ---------------------------------------------------------------------------------------

@click.group("user")
def user_group() -> None:
    """Users of the account database (the configuration file's are listed and shown, read-only)."""


def _show_user(acc: Accounts, name: str) -> dict[str, Any]:
    from scriptsftp.server.core.accounts import TomlAccountSource
    from scriptsftp.server.stores.accounts_db import DatabaseAccountSource

    stored = acc.db.get_user(name)
    if stored is not None:
        record = DatabaseAccountSource(acc.db, acc.cfg).get(name)
        return user_view(stored.user, DATABASE, stamps=Stamps.of(stored), password_changed=stored.password_changed,
                         last_login=stored.last_login, record=record, usage=acc.db.usage(f"user:{name}"))
    where = acc.file_entry("users", name)
    for user in acc.cfg.model.users:
        if user.name == name and where:
            return user_view(user, where, record=TomlAccountSource.from_config(acc.cfg).get(name),
                             usage=acc.db.usage(f"user:{name}"))
    fail(Exit.NOT_FOUND, f"no user {name!r}")


def make_home(acc: Accounts, name: str) -> list[str]:
    """A new user's home and home_folders, made now with ``[accounts] create_homes`` (the
    login makes what is missing too, so a failure here warns and does not undo the user).
    Returns the lines to print."""
    from scriptsftp.server.core.homes import HomePolicy, ensure_home
    from scriptsftp.server.stores.accounts_db import DatabaseAccountSource

    policy = HomePolicy.of(acc.cfg.model.accounts)
    record = DatabaseAccountSource(acc.db, acc.cfg).get(name)
    if not policy.create or record is None:
        return []
    try:
        report = ensure_home(record.account, policy)
    except (OSError, LookupError) as exc:
        click.echo(f"scriptsftp: warning: user {name!r} added, but their home was not made (the first login "
                   f"tries again): {exc}", err=True)
        return []
    for vpath, why in report.skipped:
        click.echo(f"scriptsftp: warning: user {name!r}: home folder {vpath} left alone: {why}", err=True)
    folders = [vpath for vpath in report.made if vpath != "/"]
    if not report.made:
        return []
    return [f"made {record.account.home}" + (f" with {', '.join(folders)}" if folders else "")]


@user_group.command("add")
@click.argument("name")
@click.option("--password-stdin", is_flag=True, help="read the password from standard input (one line)")
@field_options(USER_FIELDS, with_unset=False)
@json_option
@config_option
def user_add(name: str, password_stdin: bool, as_json: bool, config_path: str | None, **opts: Any) -> None:
    """Add user NAME to the account database (home: --home, else [accounts] home_base/NAME; made
    with its home folders when [accounts] create_homes)."""
    with opened(config_path) as acc:
        acc.refuse_file_entry("users", name)
        data = edited({"name": name}, USER_FIELDS, opts)
        data.setdefault("home", str(acc.cfg.resolve(acc.cfg.model.accounts.home_base) / name))
        user = validated(User, data, f"user {name!r}")
        if password_stdin:
            user = user.model_copy(update={"password_hash": hashed(read_password(True))})
        acc.db.add_user(user, acc.actor)
        made = make_home(acc, name)
        view = _show_user(acc, name)
    emit(as_json, view, [f"added user {name} (home {view['home']})", *made])


@user_group.command("set")
@click.argument("name")
@click.option("--password-stdin", is_flag=True, help="read a new password from standard input (one line)")
@field_options(USER_FIELDS, with_unset=True)
@json_option
@config_option
def user_set(name: str, password_stdin: bool, unset: tuple[str, ...], as_json: bool, config_path: str | None,
             **opts: Any) -> None:
    """Change user NAME: only the options given change (a list given replaces the list)."""
    if nothing_given(USER_FIELDS, opts, unset, password_stdin):
        fail(Exit.USAGE, "user set: nothing to change (see --help)")
    new_hash = hashed(read_password(True)) if password_stdin else None  # before the read: a short window
    with opened(config_path) as acc:
        acc.refuse_file_entry("users", name)
        stored = acc.db.get_user(name)
        if stored is None:
            fail(Exit.NOT_FOUND, f"no user {name!r}")
        # read, change, write back: two `set`s of one user at the same instant, the later wins
        data = edited(editable(stored.user), USER_FIELDS, opts, unset)
        user = validated(User, data, f"user {name!r}")
        if new_hash is not None:
            user = user.model_copy(update={"password_hash": new_hash})
        acc.db.update_user(user, acc.actor)
        view = _show_user(acc, name)
    emit(as_json, view, [f"changed user {name}"])


@user_group.command("show")
@click.argument("name")
@json_option
@config_option
def user_show(name: str, as_json: bool, config_path: str | None) -> None:
    """Show user NAME: status, definition, keys, who changed it when."""
    with opened(config_path) as acc:
        view = _show_user(acc, name)
    emit(as_json, view, show_lines("user", view))


USER_COLUMNS = (("name", "NAME"), ("status", "STATUS"), ("groups", "GROUPS"), ("keys", "KEYS"),
                ("last_login", "LAST LOGIN"), ("origin", "ORIGIN"))


@user_group.command("list")
@json_option
@config_option
def user_list(as_json: bool, config_path: str | None) -> None:
    """List every user, the configuration file's and the database's, by name."""
    now = time.time()
    with opened(config_path) as acc:
        rows = [user_row(u, acc.file_entry("users", u.name) or "file", home=str(acc.cfg.resolve(u.home)),
                         last_login=None, now=now) for u in acc.cfg.model.users]
        rows += [user_row(s.user, DATABASE, last_login=s.last_login, now=now) for s in acc.db.list_users()]
    rows.sort(key=lambda r: r["name"])
    emit(as_json, rows, table_lines(rows, USER_COLUMNS))


@user_group.command("disable")
@click.argument("name")
@click.option("--reason", default="", help="shown to the client where the protocol carries it, and logged")
@json_option
@config_option
def user_disable(name: str, reason: str, as_json: bool, config_path: str | None) -> None:
    """Refuse NAME's logins (and end their sessions, with [accounts] kick_on_disable)."""
    with opened(config_path) as acc:
        acc.refuse_file_entry("users", name)
        acc.db.set_disabled(name, True, reason, acc.actor)
    emit(as_json, {"name": name, "disabled": True, "reason": reason}, [f"disabled user {name}"])


@user_group.command("enable")
@click.argument("name")
@json_option
@config_option
def user_enable(name: str, as_json: bool, config_path: str | None) -> None:
    """Let NAME log in again."""
    with opened(config_path) as acc:
        acc.refuse_file_entry("users", name)
        acc.db.set_disabled(name, False, "", acc.actor)
    emit(as_json, {"name": name, "disabled": False}, [f"enabled user {name}"])


@user_group.command("delete")
@click.argument("name")
@json_option
@config_option
def user_delete(name: str, as_json: bool, config_path: str | None) -> None:
    """Delete NAME (their sessions end; their home and files stay on disk)."""
    with opened(config_path) as acc:
        acc.refuse_file_entry("users", name)
        stored = acc.db.get_user(name)
        acc.db.delete_user(name, acc.actor)
    home = stored.user.home if stored else ""
    emit(as_json, {"name": name, "deleted": True, "home": home or None},
         [f"deleted user {name}" + (f" (home {home} kept)" if home else "")])


@user_group.command("passwd")
@click.argument("name")
@click.option("--password-stdin", is_flag=True, help="read the password from standard input (one line); "
              "without it the password is asked twice on the terminal")
@json_option
@config_option
def user_passwd(name: str, password_stdin: bool, as_json: bool, config_path: str | None) -> None:
    """Set NAME's password (never given on the command line)."""
    password = read_password(password_stdin)
    with opened(config_path) as acc:
        acc.refuse_file_entry("users", name)
        acc.db.set_password(name, hashed(password), acc.actor)
    emit(as_json, {"name": name, "password": True}, [f"changed the password of user {name}"])


@user_group.group("key")
def user_key() -> None:
    """A user's SSH public keys."""


def _fingerprint(line: str, what: str) -> str:
    from scriptsftp.server.support.keys import fingerprint, parse_public_key  # late: pulls in paramiko

    try:
        return fingerprint(parse_public_key(line))
    except ValueError as exc:
        raise EditError(f"{what}: {exc}") from None


@user_key.command("add")
@click.argument("name")
@click.argument("key_line", metavar="KEYLINE")
@json_option
@config_option
def user_key_add(name: str, key_line: str, as_json: bool, config_path: str | None) -> None:
    """Add the key KEYLINE ("ssh-ed25519 AAAA... comment"; - reads key lines from standard input)."""
    lines = ([ln.strip() for ln in sys.stdin if ln.strip() and not ln.lstrip().startswith("#")]
             if key_line == "-" else [key_line.strip()])
    if not lines:
        fail(Exit.INVALID, "no key on standard input")
    with opened(config_path) as acc:
        acc.refuse_file_entry("users", name)
        for i, line in enumerate(lines):
            _fingerprint(line, f"user {name!r}: key" + (f" {i + 1}" if len(lines) > 1 else ""))
        added = [acc.db.add_key(name, line, acc.actor) for line in lines]
    emit(as_json, {"name": name, "added": added}, [f"added key {fp} to user {name}" for fp in added])


@user_key.command("remove")
@click.argument("name")
@click.argument("fingerprint", metavar="FINGERPRINT")
@json_option
@config_option
def user_key_remove(name: str, fingerprint: str, as_json: bool, config_path: str | None) -> None:
    """Remove the key FINGERPRINT (SHA256:..., as `user show` and ssh-keygen -l print it; a key line works too)."""
    with opened(config_path) as acc:
        acc.refuse_file_entry("users", name)
        if not fingerprint.startswith("SHA256:"):
            fingerprint = _fingerprint(fingerprint, f"user {name!r}: {fingerprint[:40]!r} is not a SHA256: fingerprint")
        acc.db.remove_key(name, fingerprint, acc.actor)
    emit(as_json, {"name": name, "removed": fingerprint}, [f"removed key {fingerprint} from user {name}"])


# --- groups and folders --------------------------------------------------------------------------

@click.group("group")
def group_group() -> None:
    """Groups of the account database: settings their users share."""


@click.group("folder")
def folder_group() -> None:
    """Virtual folders of the account database: directories mounted into users' trees."""


def _show_entry(acc: Accounts, kind: str, name: str) -> dict[str, Any]:
    stored = acc.db.get_group(name) if kind == "group" else acc.db.get_folder(name)
    if stored is not None:
        model = stored.group if kind == "group" else stored.folder  # type: ignore[union-attr]
        return entry_view(model, DATABASE, Stamps.of(getattr(stored, "changed", stored)), usage_of(acc, kind, name))
    where = acc.file_entry(kind + "s", name)
    entries: Sequence[Group | Folder] = acc.cfg.model.groups if kind == "group" else acc.cfg.model.folders
    for entry in entries:
        if entry.name == name and where:
            return entry_view(entry, where, usage=usage_of(acc, kind, name))
    fail(Exit.NOT_FOUND, f"no {kind} {name!r}")


def usage_of(acc: Accounts, kind: str, name: str) -> tuple[int, int] | None:
    """A folder's bytes and files from the usage ledger; groups hold nothing themselves."""
    return acc.db.usage(f"folder:{name}") if kind == "folder" else None


def _entry_commands(group: click.Group, kind: str, model: type[Group] | type[Folder],
                    fields: Sequence[Field]) -> None:
    """add, set, show, list and delete for groups and folders, which differ only in their
    model and options."""
    section = kind + "s"

    def add(acc: Accounts, item: Group | Folder) -> None:
        acc.db.add_group(item, acc.actor) if isinstance(item, Group) else acc.db.add_folder(item, acc.actor)

    def update(acc: Accounts, item: Group | Folder) -> None:
        acc.db.update_group(item, acc.actor) if isinstance(item, Group) else acc.db.update_folder(item, acc.actor)

    @group.command("add")
    @click.argument("name")
    @field_options(fields, with_unset=False)
    @json_option
    @config_option
    def add_cmd(name: str, as_json: bool, config_path: str | None, **opts: Any) -> None:
        if kind == "folder" and not opts.get("path"):
            fail(Exit.USAGE, "folder add: --path DIR is required (the directory the folder shows)")
        with opened(config_path) as acc:
            acc.refuse_file_entry(section, name)
            item = validated(model, edited({"name": name}, fields, opts), f"{kind} {name!r}")
            add(acc, item)
            view = _show_entry(acc, kind, name)
        if kind == "folder" and not Path(view["path"]).is_dir():
            click.echo(f"scriptsftp: note: {view['path']} does not exist yet", err=True)
        emit(as_json, view, [f"added {kind} {name}"])

    add_cmd.help = f"Add {kind} NAME to the account database."

    @group.command("set")
    @click.argument("name")
    @field_options(fields, with_unset=True)
    @json_option
    @config_option
    def set_cmd(name: str, unset: tuple[str, ...], as_json: bool, config_path: str | None, **opts: Any) -> None:
        if nothing_given(fields, opts, unset):
            fail(Exit.USAGE, f"{kind} set: nothing to change (see --help)")
        with opened(config_path) as acc:
            acc.refuse_file_entry(section, name)
            stored = acc.db.get_group(name) if kind == "group" else acc.db.get_folder(name)
            if stored is None:
                fail(Exit.NOT_FOUND, f"no {kind} {name!r}")
            current = stored.group if kind == "group" else stored.folder  # type: ignore[union-attr]
            item = validated(model, edited(editable(current), fields, opts, unset), f"{kind} {name!r}")
            update(acc, item)
            view = _show_entry(acc, kind, name)
        emit(as_json, view, [f"changed {kind} {name}"])

    set_cmd.help = f"Change {kind} NAME: only the options given change."

    @group.command("show")
    @click.argument("name")
    @json_option
    @config_option
    def show_cmd(name: str, as_json: bool, config_path: str | None) -> None:
        with opened(config_path) as acc:
            view = _show_entry(acc, kind, name)
        emit(as_json, view, show_lines(kind, view))

    show_cmd.help = f"Show {kind} NAME."

    @group.command("list")
    @json_option
    @config_option
    def list_cmd(as_json: bool, config_path: str | None) -> None:
        with opened(config_path) as acc:
            file_entries: Sequence[Group | Folder] = (acc.cfg.model.groups if kind == "group"
                                                      else acc.cfg.model.folders)
            rows = [entry_view(e, acc.file_entry(section, e.name) or "file") for e in file_entries]
            stored = acc.db.list_groups() if kind == "group" else acc.db.list_folders()
            rows += [entry_view(s.group if kind == "group" else s.folder, DATABASE)  # type: ignore[union-attr]
                     for s in stored]
        rows.sort(key=lambda r: r["name"])
        columns = ((("name", "NAME"), ("permissions", "PERMISSIONS"), ("origin", "ORIGIN")) if kind == "group"
                   else (("name", "NAME"), ("path", "PATH"), ("quota_size", "QUOTA"), ("origin", "ORIGIN")))
        emit(as_json, rows, table_lines(rows, columns))

    list_cmd.help = f"List every {kind}, the configuration file's and the database's."

    @group.command("delete")
    @click.argument("name")
    @json_option
    @config_option
    def delete_cmd(name: str, as_json: bool, config_path: str | None) -> None:
        with opened(config_path) as acc:
            acc.refuse_file_entry(section, name)
            acc.db.delete_group(name, acc.actor) if kind == "group" else acc.db.delete_folder(name, acc.actor)
        emit(as_json, {"name": name, "deleted": True}, [f"deleted {kind} {name}"])

    delete_cmd.help = (f"Delete {kind} NAME (refused while users or groups name it"
                       + ("; the directory stays on disk)." if kind == "folder" else ")."))


_entry_commands(group_group, "group", Group, GROUP_FIELDS)
_entry_commands(folder_group, "folder", Folder, FOLDER_FIELDS)


# --- the whole database --------------------------------------------------------------------------

@click.group("accounts")
def accounts_group() -> None:
    """The account database as a whole: a JSON dump for backups and moves between SQLite and PostgreSQL."""


def dump_text(dump: dict[str, Any]) -> str:
    """The one way a dump is written, so exporting what was imported gives the same bytes."""
    return json.dumps(dump, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically, readable by its owner only (a dump holds
    password hashes)."""
    path = Path(absolute_path(str(path)))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


@accounts_group.command("export")
@click.argument("file", metavar="FILE")
@config_option
def accounts_export(file: str, config_path: str | None) -> None:
    """Write every user (with password hash and keys), group and folder to FILE (- for stdout), mode 0600."""
    with opened(config_path) as acc:
        dump = acc.db.export()
    text = dump_text(dump)
    if file == "-":
        sys.stdout.write(text)
        return
    try:
        write_private(Path(file), text)
    except OSError as exc:
        fail(Exit.UNAVAILABLE, f"cannot write {file}: {exc.strerror or exc}")
    click.echo(f"exported {len(dump.get('users', []))} users, {len(dump.get('groups', []))} groups, "
               f"{len(dump.get('folders', []))} folders to {file}")


@accounts_group.command("import")
@click.argument("file", metavar="FILE")
@click.option("--replace", is_flag=True, help="replace users, groups and folders that exist (else: refused, exit 3)")
@json_option
@config_option
def accounts_import(file: str, replace: bool, as_json: bool, config_path: str | None) -> None:
    """Load a dump from FILE (- for stdin): all of it or nothing."""
    try:
        text = sys.stdin.read() if file == "-" else Path(file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        fail(Exit.NOT_FOUND if isinstance(exc, FileNotFoundError) else Exit.INVALID, f"cannot read {file}: {exc}")
    try:
        dump = json.loads(text)
    except json.JSONDecodeError as exc:
        fail(Exit.INVALID, f"{file}: not JSON: line {exc.lineno}: {exc.msg}")
    if not isinstance(dump, dict):
        fail(Exit.INVALID, f"{file}: not a scriptsftp-accounts dump (a JSON object)")
    with opened(config_path) as acc:
        counts = acc.db.import_(dump, acc.actor, replace=replace)
    emit(as_json, counts, [f"imported {file}: " + ", ".join(f"{n} {what}" for what, n in counts.items())])


@click.group("db")
def db_group() -> None:
    """The account database's schema."""


@db_group.command("upgrade")
@json_option
@config_option
def db_upgrade(as_json: bool, config_path: str | None) -> None:
    """Apply the schema migrations the account database lacks (the daemon also does at start)."""
    from scriptsftp.server.stores.accounts_db import SQLITE_FILE, AccountDb, file_names_of
    from scriptsftp.server.stores.sql import open_database

    cfg = load(config_path)
    with refusals():  # opened as it is: AccountDb.open would upgrade it, or refuse an old schema
        private_state_dir(cfg)
        db = AccountDb(open_database(cfg.model.accounts.database,
                                     cfg.resolve(cfg.model.server.state_dir) / SQLITE_FILE), file_names_of(cfg))
        try:
            before = db.schema_version()
            applied = db.upgrade()
            version = db.schema_version()
        finally:
            db.close()
    lines = ([f"account database upgraded from schema {before} to {version} (applied {', '.join(map(str, applied))})"]
             if applied else [f"account database schema {version}: up to date"])
    emit(as_json, {"schema": version, "before": before, "applied": applied}, lines)


COMMANDS: tuple[click.Command, ...] = (user_group, group_group, folder_group, accounts_group, db_group)

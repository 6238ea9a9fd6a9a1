"""``scriptsftp quota scan``: recount what homes and folders hold, from the disk, into the ledger.

The ledger is counted where files change (core/quota.py), so it drifts only when files
change behind the server's back: copied in by hand, removed by a cron job, restored from
a backup, or by a scope whose quota was added after its files. A scan walks the directory
(published files only: staged uploads and symlinks left out, the folders mounted inside
a home left to their own scope) and sets the ledger to what it found, printing before and
after. It can run while the daemon serves: an upload published during the walk of its
scope may be missed (scan again when it is quiet for an exact figure).

Exit status: 0 done, 1 a user or folder that does not exist or a directory that cannot be
read (the others are still scanned), 2 a bad configuration or an unusable database.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import click

from scriptsftp.server.core.accounts import TomlAccountSource
from scriptsftp.server.core.quota import human, recount
from scriptsftp.server.stores.accounts_db import AccountDb, DatabaseAccountSource, MergedAccountSource
from scriptsftp.server.support.config import ConfigError, LoadedConfig, default_config_path, load_config

CONFIG_HELP = "config file (default: $SCRIPTSFTP_CONFIG, else ./conf/scriptsftp.toml)"


@dataclass(frozen=True)
class Recount:
    """One scope's figures: the ledger's before, the disk's after (None: not scanned, ``error`` says why)."""

    scope: str
    before: tuple[int, int]
    after: tuple[int, int] | None
    error: str = ""

    def as_json(self) -> dict[str, object]:
        out: dict[str, object] = {"scope": self.scope, "before": {"bytes": self.before[0], "files": self.before[1]}}
        if self.after is not None:
            out["after"] = {"bytes": self.after[0], "files": self.after[1]}
        if self.error:
            out["error"] = self.error
        return out

    def line(self) -> str:
        def figures(t: tuple[int, int]) -> str:
            return f"{human(t[0])} in {t[1]} files"

        if self.after is None:
            return f"{self.scope}: not scanned: {self.error}"
        same = " (unchanged)" if self.after == self.before else ""
        return f"{self.scope}: {figures(self.before)} -> {figures(self.after)}{same}"


def scan(cfg: LoadedConfig, db: AccountDb, user: str | None, folder: str | None) -> list[Recount]:
    """Recount the home of ``user``, the folder ``folder``, or (neither) every home and folder."""
    source = MergedAccountSource(TomlAccountSource.from_config(cfg), DatabaseAccountSource(db, cfg))
    folders: dict[str, Path] = {f.name: cfg.resolve(f.path) for f in cfg.model.folders}
    folders.update({s.folder.name: cfg.resolve(s.folder.path) for s in db.list_folders()})
    out: list[Recount] = []
    users = [user] if user else ([] if folder else source.names())
    for name in users:
        rec = source.get(name)
        key = f"user:{name}"
        if rec is None:
            out.append(Recount(key, db.usage(key), None, "no such user"))
            continue
        out.append(_recount(db, key, rec.account.home, [m.root for m in rec.account.folders]))
    for name in [folder] if folder else ([] if user else sorted(folders)):
        key = f"folder:{name}"
        root = folders.get(name)
        if root is None:
            out.append(Recount(key, db.usage(key), None, "no such folder"))
            continue
        out.append(_recount(db, key, root, []))
    return out


def _recount(db: AccountDb, key: str, root: Path, skip: list[Path]) -> Recount:
    before = db.usage(key)
    if not root.exists():
        after = (0, 0)  # not made yet: it holds nothing
    else:
        try:
            after = recount(root, skip)
        except OSError as exc:
            return Recount(key, before, None, f"cannot read {exc.filename or root}: {exc.strerror}")
    db.set_usage(key, *after)
    return Recount(key, before, after)


@click.group()
def quota() -> None:
    """Quota usage of homes and folders."""


@quota.command("scan")
@click.argument("user", required=False)
@click.option("-c", "--config", "config_path", help=CONFIG_HELP)
@click.option("--folder", default=None, help="recount this virtual folder (with USER: both)")
@click.option("--json", "as_json", is_flag=True, help="one JSON document: a list of {scope, before, after}")
def quota_scan(user: str | None, config_path: str | None, folder: str | None, as_json: bool) -> None:
    """Recount USER's home (or --folder, or every home and folder) from the disk and set the ledger."""
    try:
        cfg = load_config(Path(config_path) if config_path else default_config_path())
    except ConfigError as exc:
        for line in exc.problems:
            click.echo(line, err=True)
        sys.exit(2)
    try:
        db = AccountDb.open(cfg)
    except Exception as exc:  # AccountError, sqlite3/psycopg errors: one line, never a traceback
        click.echo(f"scriptsftp: cannot open the account database: {exc}", err=True)
        sys.exit(2)
    try:
        results = scan(cfg, db, user, folder)
    finally:
        db.close()
    if as_json:
        click.echo(json.dumps([r.as_json() for r in results], indent=2))
    else:
        for r in results:
            click.echo(r.line())
    sys.exit(1 if any(r.after is None for r in results) else 0)


__all__ = ["Recount", "quota", "scan"]

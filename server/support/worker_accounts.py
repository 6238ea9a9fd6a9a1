"""Which account worker processes run as (docs/architecture.md rule 11: workers never run as root).

When the daemon runs as root, script workers run as ``[scripts] user`` and SSH
workers as ``[sftp] worker_user`` (defaults: the dedicated system accounts
below). When it runs as a normal user it cannot switch: workers run as the
daemon's own uid, and a configured account other than that is reported once.
A missing account stops the start with the command that creates it, unless
``[server] allow_root_workers = true`` (discouraged: workers then run as root).
"""

from __future__ import annotations

import logging
import os
import pwd
from dataclasses import dataclass

log = logging.getLogger("scriptsftp.accounts")

SANDBOX_ACCOUNT = "scriptsftp-sandbox"   # [scripts] user
WORKER_ACCOUNT = "scriptsftp-worker"     # [sftp] worker_user


def create_command(name: str) -> str:
    return f"useradd --system --user-group --no-create-home --home-dir / --shell /usr/sbin/nologin {name}"


class AccountError(ValueError):
    """The configured worker account cannot be used (the message says what to do)."""


@dataclass(frozen=True)
class Account:
    name: str
    uid: int
    gid: int


def worker_account(setting: str, default: str, key: str, *, allow_root: bool) -> Account | None:
    """The account to switch workers to, or None: run them as this process (not root, or
    explicitly allowed). ``key`` names the setting in messages ("[scripts] user")."""
    if not hasattr(os, "geteuid"):
        return None
    if os.geteuid() != 0:
        if setting:
            try:
                same = pwd.getpwnam(setting).pw_uid == os.geteuid()
            except KeyError:
                same = False
            if not same:
                log.warning("%s = %r is ignored: the daemon does not run as root and cannot switch "
                            "accounts; workers run as uid %d", key, setting, os.geteuid())
        return None
    name = setting or default
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        if allow_root:
            log.warning("%s: the account %r does not exist; workers run as ROOT because [server] "
                        "allow_root_workers = true (discouraged: create it with `%s`)",
                        key, name, create_command(name))
            return None
        raise AccountError(
            f"{key}: the account {name!r} that workers run as does not exist; create it with "
            f"`{create_command(name)}` (docs/deploy.md), or name another unprivileged account in {key}"
            f" (or, discouraged, set [server] allow_root_workers = true to run workers as root)") from None
    if pw.pw_uid == 0:
        if allow_root:
            log.warning("%s = %r: workers run as root ([server] allow_root_workers = true; discouraged)",
                        key, name)
            return None
        raise AccountError(f"{key}: {name!r} is root; workers never run as root unless "
                           f"[server] allow_root_workers = true (discouraged)")
    return Account(name, pw.pw_uid, pw.pw_gid)


def script_worker_account(scripts_user: str, *, allow_root: bool) -> Account | None:
    """``[scripts] user``: the account script workers run as, resolved by the composition root
    (the daemon for ``run``, the CLI for ``check``) and handed to the script engine, which
    imports nothing from here."""
    return worker_account(scripts_user, SANDBOX_ACCOUNT, "[scripts] user", allow_root=allow_root)

"""Sessions for scripts: the core side of ``api.fs`` (scripting/fs_cap.py).

A script works on a user's files through a :class:`Session` opened exactly as a login
would open it, so every path goes through the same confinement (no ``..`` above the
home, no symlink out, no staging names), the same permissions and filters: a script
cannot do what the user could not. The daemon builds one :class:`ScriptSessions` and
hands it to the engine as its :class:`~scriptsftp.server.contract.scripting.ScriptFiles`;
the engine never constructs a Session itself.

The sessions get a dispatcher that raises nothing: what a script does never raises
events (no pre-event recursion, no script triggering itself), but every change is logged
by the Session as usual, with ``script=NAME`` added.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

from scriptsftp.server.contract.dispatch import NullDispatcher
from scriptsftp.server.core.storage import LocalStorage, StorageOpener
from scriptsftp.server.core.mounts import open_account_storage
from scriptsftp.server.core.publish import PendingIndex, Publisher
from scriptsftp.server.core.quota import Quotas
from scriptsftp.server.core.session import Account, Session, UploadPolicy
from scriptsftp.server.core.vfs import Access, normalize

#: Files and listings one script call may hold open at once.
SCRIPT_MAX_HANDLES = 8


class ScriptSession(Session):
    """A Session acting for a script: same checks, log lines tagged with the script."""

    script_name = ""

    def _log(self, op: str, path: str, result: str, **extra: object) -> None:
        super()._log(op, path, result, script=self.script_name, **extra)


class ScriptSessions:
    """Opens :class:`ScriptSession` objects for ``api.fs``.

    ``account(name)`` returns the user's current Account (after a reload too), or None
    when the user does not exist or is disabled. ``pending``: uploads waiting for an
    async check, as invisible to scripts as to clients."""

    def __init__(self, account: Callable[[str], Account | None], *, staging: Any = None,
                 uploads: UploadPolicy | None = None, pending: PendingIndex | None = None,
                 open_storage: StorageOpener = LocalStorage, quotas: Quotas | None = None) -> None:
        self.account = account
        self.quotas = quotas  # a script's uploads and deletes in a user's home count as the user's
        self.open_storage = open_storage  # the daemon's: the homes scripts touch are the clients' homes
        self.staging = staging
        self.uploads = uploads or UploadPolicy()
        self.pending = pending

    def normalize(self, vpath: str) -> str:
        return normalize(vpath)

    def user_session(self, user: str, *, every_permission: bool, session_id: str, protocol: str,
                     remote_ip: str, script: str) -> ScriptSession | None:
        account = self.account(user)
        if account is None:
            return None
        if every_permission:  # the event's own file (own_file): every permission in the home, filters kept
            account = dataclasses.replace(account, access=account.access.with_all_permissions())
        return self._open(account, session_id, protocol, remote_ip, script, self.quotas)

    def root_session(self, root: Path, *, session_id: str, protocol: str, remote_ip: str,
                     script: str) -> ScriptSession:
        account = Account(name="fs_admin", home=root, access=Access.build({"/": ["*"]}, [], []))
        return self._open(account, session_id, protocol, remote_ip, script)

    def _open(self, account: Account, session_id: str, protocol: str, remote_ip: str,
              script: str, quotas: Quotas | None = None) -> ScriptSession:
        """``quotas``: None for a root session, which is no user's and counts against nothing."""
        s = ScriptSession(
            session_id=session_id, account=account, protocol=protocol, remote_ip=remote_ip,
            dispatcher=NullDispatcher(), staging=self.staging, uploads=self.uploads,
            max_handles=SCRIPT_MAX_HANDLES,
            publisher=Publisher(NullDispatcher(), self.staging, self.uploads, pending=self.pending,
                                open_storage=self.open_storage, quotas=quotas),
            storage=open_account_storage(self.open_storage, account),
        )
        s.script_name = script
        return s

"""The core's classes fit the contract's ports: checked by mypy, nothing at run time.

``LoginCore`` is the ``LocalCorePort`` the daemon hands to FTP and HTTP (and the
``CorePort`` behind the SSH workers' links); ``Session`` is the ``SessionPort``
every front end works through (the ``LocalSessionPort`` FTP and HTTP see, with its
account), ``Connection`` the ``LocalConnectionView`` they read and set ``tls`` on.
A method that drifts from its port (a renamed option, a changed return type) fails
the type check here, not a worker at run time.
The worker-side stand-ins are checked the same way at the end of
server/frontends/ssh/remote_core.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from scriptsftp.server.contract.ports import (
        DirHandlePort, LocalConnectionView, LocalCorePort, LocalSessionPort, LocalWriteHandle, ReadHandlePort,
        SessionPort, WriteHandlePort,
    )
    from scriptsftp.server.core.connections import Connection
    from scriptsftp.server.core.login import LoginCore
    from scriptsftp.server.core.session import DirHandle, ReadHandle, Session, WriteHandle

    def _core(core: LoginCore) -> LocalCorePort[Connection, Session]:
        return core

    def _session(session: Session) -> SessionPort[WriteHandle]:
        return session

    def _local(conn: Connection, session: Session, upload: WriteHandle) -> tuple[
            LocalConnectionView, LocalSessionPort[WriteHandle], LocalWriteHandle]:
        return conn, session, upload

    def _handles(read: ReadHandle, write: WriteHandle, listing: DirHandle) -> tuple[
            ReadHandlePort, WriteHandlePort, DirHandlePort]:
        return read, write, listing

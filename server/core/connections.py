"""Client connections as the core knows them, before and after login: the
:class:`Connection`, the :class:`ConnectionRegistry` that bounds them, and how the
core ends one.

A front end registers each connection with ``LoginCore.connect`` and gets a
:class:`Connection` back; it sets ``on_kick`` to a callable that closes the
connection from any thread with a reason (a ban, a user removed on reload, an
eviction). The core calls it through :func:`kick_soon`, on a thread of its own:
the caller may be the front end's own I/O thread, which must first send the
reply it is in the middle of.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from scriptsftp.server.contract.errors import LimitExceeded
from scriptsftp.server.core.session import Account, Session


@dataclass
class Connection:
    """One client connection, before and after login."""

    id: str
    protocol: str
    remote_ip: str
    local_port: int = 0
    started: float = field(default_factory=time.monotonic)
    user: str = ""
    account: Account | None = None
    sessions: list[Session] = field(default_factory=list)
    on_kick: Callable[[str], None] | None = None
    login_counted: bool = False
    #: holds a slot of the defender's connection caps, given back at disconnect
    admitted: bool = False
    #: counted among the connections not logged in yet ([defender] max_preauth_connections)
    preauth: bool = False
    #: the front end secured it (FTPS): logged as tls=true, so FTPS and plain FTP can be told
    #: apart, and what ``require_tls`` asks of a login
    tls: bool = False
    #: sessions (SSH channels; one for FTP and HTTP) open now: see LoginCore.open_session
    open_sessions: int = 0
    #: when the account logged in here expires (epoch; None: never): LoginCore.end_expired
    expires: float | None = None

    def log_context(self, **more: object) -> dict[str, object]:
        ctx: dict[str, object] = {"sid": self.id, "proto": self.protocol, "ip": self.remote_ip, **more}
        if self.tls:
            ctx["tls"] = "true"
        return ctx


def kick_soon(conn: Connection, reason: str, thread_name: str) -> None:
    """Have the front end close ``conn`` with ``reason``, from a thread of its own."""
    if conn.on_kick is not None:
        threading.Thread(target=conn.on_kick, args=(reason,), name=thread_name, daemon=True).start()


class ConnectionRegistry:
    """The connections registered and not ended yet, which of them still wait for their
    login (bounded: ``[defender] max_preauth_connections``), and how many sessions each
    user holds (bounded per user: the account's ``max_sessions``, else ``[server]
    max_sessions_per_user``; the caller says which limit applies).

    One lock for the three, because a login moves a connection from waiting to counted
    in one step, and a kick or a reload reads them from other threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._connections: dict[str, Connection] = {}
        #: connections not logged in yet, oldest first (dicts keep insertion order)
        self._preauth: dict[str, Connection] = {}
        self._per_user: dict[str, int] = {}
        #: waiting connections closed to make room for newer ones, since start
        self.preauth_evicted = 0

    def add(self, conn: Connection, cap: int) -> tuple[bool, Connection | None]:
        """Register ``conn`` as waiting for its login if there is room under ``cap`` (0: no
        cap); the second value is a waiting connection the caller must now close to make
        that room. At the cap the one that has waited longest goes (a flood of idle sockets
        then only shortens each other's lives, and a real client, which logs in within a
        second, still gets in); refused only if none can be closed (none has a front end to
        close it yet)."""
        victim: Connection | None = None
        with self._lock:
            if cap and len(self._preauth) >= cap:
                victim = next((c for c in self._preauth.values() if c.on_kick is not None), None)
                if victim is None:
                    return False, None
                del self._preauth[victim.id]
                victim.preauth = False
                self.preauth_evicted += 1
            self._connections[conn.id] = conn
            self._preauth[conn.id] = conn
            conn.preauth = True
        return True, victim

    def give_back_admission(self, conn: Connection) -> bool:
        """Whether ``conn`` still held a slot of the defender's caps; it no longer does (so a
        refused connect and its disconnect give the slot back once)."""
        with self._lock:
            held, conn.admitted = conn.admitted, False
        return held

    def count_login(self, conn: Connection, user: str, limit: int) -> bool:
        """Count ``conn`` as one session of ``user`` unless that passes ``limit`` (0: none);
        a counted connection no longer waits for its login."""
        with self._lock:
            current = self._per_user.get(user, 0)
            if limit and current >= limit:
                return False
            self._per_user[user] = current + 1
            conn.login_counted = True
            self._preauth.pop(conn.id, None)
            conn.preauth = False
        return True

    def count_session(self, conn: Connection, delta: int, limit: int = 0) -> None:
        """A session of ``conn`` opens (+1) or ends (-1). The user's count holds each of their
        connections as max(1, its open sessions); the login already counted the 1. An opening
        that passes ``limit`` (0: none) is refused: :class:`LimitExceeded`."""
        with self._lock:
            before = max(1, conn.open_sessions)
            after = max(1, conn.open_sessions + delta)
            current = self._per_user.get(conn.user, 0)
            if delta > 0 and limit and after > before and current + after - before > limit:
                raise LimitExceeded(f"too many sessions for this user (limit {limit})")
            conn.open_sessions += delta
            if conn.login_counted:
                self._per_user[conn.user] = current + after - before

    def remove(self, conn: Connection) -> bool:
        """Forget ``conn`` and its count; False if it was not registered (refused, or gone)."""
        with self._lock:
            if self._preauth.pop(conn.id, None) is not None:
                conn.preauth = False
            if self._connections.pop(conn.id, None) is None:
                return False
            if conn.login_counted:
                self._per_user[conn.user] = self._per_user.get(conn.user, 1) - 1
        return True

    def all(self) -> list[Connection]:
        with self._lock:
            return list(self._connections.values())

    def preauth_count(self) -> int:
        with self._lock:
            return len(self._preauth)

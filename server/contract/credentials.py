"""What a client presents to log in, as every front end hands it to the login core.

``LoginCore.login(connection, credentials)`` (the ``CorePort`` login call) takes
one of these; facts about the channel (TLS or not, address) are the
connection's, not the credentials'.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Credentials:
    """A user name and a password. ``repr`` never shows the password (tracebacks, logs)."""

    user: str
    password: str

    def __repr__(self) -> str:
        return f"Credentials(user={self.user!r}, password=<hidden>)"

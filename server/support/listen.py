"""What the daemon needs from a front end's listener, whatever its protocol.

The daemon starts listeners, logs where they listen, and at shutdown stops them
accepting, waits for running transfers, then closes what is left. SSH, FTP,
HTTP and the admin API each provide one; nothing else about a front end is
visible to the daemon (DESIGN.md rule 1: front ends are thin).
"""

from __future__ import annotations

from typing import Protocol


def listen_addresses(listen: str | list[str]) -> list[tuple[str, int]]:
    """``[x] listen`` (one ``host:port`` or a list; IPv6 in brackets) as (host, port) pairs."""
    values = [listen] if isinstance(listen, str) else listen
    out = []
    for v in values:
        host, _, port = v.rpartition(":")
        out.append((host.strip("[]"), int(port)))
    return out


class Listener(Protocol):
    #: protocol name for log lines ("sftp", "ftp", "http", "admin")
    name: str

    @property
    def bound(self) -> list[str]:
        """``host:port`` of every socket actually bound (port 0 resolved)."""

    def start(self) -> None:
        """Begin accepting in background threads; return at once."""

    def stop_accepting(self) -> None:
        """Refuse new connections; running ones go on."""

    def active(self) -> int:
        """Number of open client connections."""

    def close_all(self, reason: str) -> None:
        """Close every connection, telling the client ``reason`` where the protocol can."""

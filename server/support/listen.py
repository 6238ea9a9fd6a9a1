"""What the daemon needs from a front end's listener, whatever its protocol.

The daemon starts listeners, logs where they listen, and at shutdown stops them
accepting, waits for running transfers, then closes what is left. SSH, FTP,
HTTP and the admin API each provide one; nothing else about a front end is
visible to the daemon (docs/architecture.md rule 1: front ends are thin).

A front end never sees the daemon either: its ``make_listener`` gets its port
(server/contract/ports.py), its config section, and :class:`ConfigFiles` to
resolve the paths in that section and name its keys in an error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable


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


@runtime_checkable
class Reconfigurable(Protocol):
    """A listener with live keys of its own ([http] max_upload_size): a reload hands it its
    section (the one named like the listener) and it applies them to the next connections."""

    def reconfigure(self, section: Any) -> None: ...


class ConfigFiles(Protocol):
    """Where a front end's config section came from (a LoadedConfig is one)."""

    def resolve(self, value: str) -> Path:
        """A path from the config, made absolute against the config's directory."""

    def where(self, loc: tuple[Any, ...]) -> str:
        """``file:line: key`` of a key, for an error that names it."""

"""Refuse to start, before any side effect, when a configured address cannot be bound.

The daemon used to generate host keys and passwords and fork its SSH workers, and
only then fail with ``[Errno 98] Address already in use``, naming neither the
listener nor the port. :func:`check_listen_addresses` tries every configured
``listen`` first and names the section, the address and, when /proc shows it, the
process that holds the port (another process's sockets are visible to root only).
"""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path


class AddressUnavailable(OSError):
    """A configured listen address cannot be bound; the message says which and why."""

    def __str__(self) -> str:
        return str(self.strerror)


def check_listen_addresses(listeners: dict[str, list[tuple[str, int]]]) -> None:
    """Bind (and release) every ``(host, port)`` of every enabled listener; port 0 is skipped."""
    for section, addresses in listeners.items():
        for host, port in addresses:
            if port:
                _try_bind(section, host, port)


def _try_bind(section: str, host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the listeners do: TIME_WAIT is no conflict
        s.bind((host, port))
    except OSError as exc:
        where = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
        why = exc.strerror or str(exc)
        if exc.errno == errno.EADDRINUSE:
            holder = port_holder(port)
            why = "address already in use" + (f" (held by {holder})" if holder else "")
        elif exc.errno == errno.EACCES and port < 1024:
            why = "permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE)"
        raise AddressUnavailable(exc.errno or 0, f"[{section}] listen {where}: {why}") from None
    finally:
        s.close()


def port_holder(port: int) -> str:
    """``pid N (name)`` of a process listening on ``port``, if /proc tells; else ""."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{fields[9]}]")  # state 0A: LISTEN
    if not inodes:
        return ""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                    name = Path(f"/proc/{pid}/comm").read_text().strip()
                    return f"pid {pid} ({name})"
            except OSError:
                continue
    return ""

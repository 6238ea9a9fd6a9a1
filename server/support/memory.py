"""glibc malloc tuning for a threaded server that moves data in 256 KiB buffers.

glibc gives each thread its own arena (up to 8 per core) and keeps what threads
free for reuse instead of returning it to the system. Every SSH connection has
threads that allocate and free 256 KiB buffers, so after a burst of parallel
transfers an idle daemon held ~98 MB (the bar for an idle daemon is 80 MB).
Two arenas keep freed memory reusable across threads, and a trim once the last
connection has gone hands the rest back; the daemon's main process, seldom without
any connection, also trims every 10 s after its connection count fell (daemon.py).
Elsewhere (musl, macOS) both are no-ops.
"""

from __future__ import annotations

import ctypes
import sys

M_ARENA_MAX = -8
ARENAS = 2

_libc: ctypes.CDLL | None = None
if sys.platform.startswith("linux"):
    try:
        _libc = ctypes.CDLL(None)
        _libc.mallopt  # noqa: B018  (glibc only)
        _libc.malloc_trim  # noqa: B018
    except (OSError, AttributeError):
        _libc = None


def limit_arenas(arenas: int = ARENAS) -> None:
    """Cap the arenas; call before the first thread starts (later threads may still share)."""
    if _libc is not None:
        _libc.mallopt(M_ARENA_MAX, arenas)


def release_free_memory() -> None:
    """Return freed heap pages to the system (milliseconds; call when the server goes idle)."""
    if _libc is not None:
        _libc.malloc_trim(0)

"""Virtual paths: what a client may name, and the one way to normalise it.

A virtual path is what the user sees: ``/`` is their home. Paths are normalised
lexically; ``..`` never climbs above ``/`` (chroot semantics). NUL, control
characters, over-long names and the server's own staging names are refused before
anything touches the disk.

Why here and not in the core: a front end that walks paths itself (SCP's ``-r``
targets and wildcard expansion build child paths) must join and split them exactly
as the Session does, and a front end imports only the contract. The core's policy
on those paths (permissions, filters) stays in server/core/vfs.py, which re-exports
these names.
"""

from __future__ import annotations

from scriptsftp.server.contract.errors import InvalidPath, NotFound

STAGING_PREFIX = ".scriptsftp-part-"
MAX_NAME_BYTES = 255
MAX_PATH_BYTES = 4096


def split(vpath: str, cwd: str = "/") -> tuple[str, ...]:
    """Normalise ``vpath`` (relative to ``cwd``) into checked path components."""
    if "\x00" in vpath:
        raise InvalidPath("path contains a NUL byte")
    if len(vpath.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES:
        raise InvalidPath("path too long")
    full = vpath if vpath.startswith("/") else cwd.rstrip("/") + "/" + vpath
    parts: list[str] = []
    for part in full.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if parts:
                parts.pop()
            continue
        check_name(part)
        parts.append(part)
    return tuple(parts)


def check_name(name: str) -> None:
    """Refuse names no client may use: control characters, too long, staging names."""
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        raise InvalidPath(f"name too long: {name[:40]}...")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        raise InvalidPath("name contains control characters")
    if name.startswith(STAGING_PREFIX):
        # Staging files exist only for the server; to clients they do not exist at all.
        raise NotFound("no such file or directory")


def join(parts: tuple[str, ...]) -> str:
    return "/" + "/".join(parts)


def normalize(vpath: str, cwd: str = "/") -> str:
    return join(split(vpath, cwd))


__all__ = ["MAX_NAME_BYTES", "MAX_PATH_BYTES", "STAGING_PREFIX", "check_name", "join", "normalize", "split"]

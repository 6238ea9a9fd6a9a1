"""A consistent copy of ``state_dir`` while the daemon runs (``scriptsftp backup DEST``).

Copying SQLite files with ``cp`` while the daemon writes them can give a torn
database (and misses what is still in the ``-wal`` file), so every database is
copied through SQLite's online backup API, which reads a consistent snapshot
while the daemon goes on. Everything else in state_dir (host keys, generated
password hashes, script store files...) is copied as is, keeping file modes:
host keys stay 0600. Restore is a plain copy back with the daemon stopped
(docs/deploy.md).
"""

from __future__ import annotations

import os
import shutil
import sqlite3
from pathlib import Path

_SQLITE_MAGIC = b"SQLite format 3\x00"
_SKIP_SUFFIXES = ("-wal", "-shm", "-journal")


def _is_sqlite(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(16) == _SQLITE_MAGIC
    except OSError:
        return False


def backup_state(state_dir: Path, dest: Path) -> list[str]:
    """Copy ``state_dir`` into ``dest`` (created 0700; must be empty or absent).

    Returns the relative paths written, databases marked with ``(sqlite)``."""
    state_dir = state_dir.resolve()
    dest = dest.resolve()
    if not state_dir.is_dir():
        raise ValueError(f"state_dir {state_dir} does not exist")
    if dest == state_dir or state_dir in dest.parents:
        raise ValueError("the backup destination must be outside state_dir")
    if dest.exists() and any(dest.iterdir()):
        raise ValueError(f"{dest} is not empty")
    dest.mkdir(parents=True, exist_ok=True, mode=0o700)
    written: list[str] = []
    for root, dirs, files in os.walk(state_dir):
        rel_root = Path(root).relative_to(state_dir)
        for d in dirs:
            target = dest / rel_root / d
            target.mkdir(exist_ok=True)
            shutil.copymode(Path(root) / d, target)
        for name in sorted(files):
            src = Path(root) / name
            target = dest / rel_root / name
            if name.endswith(_SKIP_SUFFIXES) or src.is_symlink() or not src.is_file():
                continue  # WAL/SHM are folded into the database copy
            if _is_sqlite(src):
                source_db = sqlite3.connect(f"file:{src}?mode=ro", uri=True)
                try:
                    target_db = sqlite3.connect(target)
                    try:
                        source_db.backup(target_db)
                    finally:
                        target_db.close()
                finally:
                    source_db.close()
                os.chmod(target, src.stat().st_mode & 0o777)
                written.append(f"{rel_root / name} (sqlite)")
            else:
                shutil.copy2(src, target)
                written.append(str(rel_root / name))
    return written

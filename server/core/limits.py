"""What an account may hold and move: quotas, virtual-folder mounts and rates, as plain values.

These are the numbers an :class:`~.session.Account` carries after its groups are merged in;
the accounting that enforces them lives with the code that counts (publish, the
transfer paths), so this module stays free of I/O and importable from everywhere in the core.
A limit of 0 means "no limit" throughout, as in the configuration.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Quota:
    """Bytes and files a home or a folder may hold (published files only); 0: no limit."""

    size: int = 0
    files: int = 0

    @property
    def limited(self) -> bool:
        return bool(self.size or self.files)


@dataclass(frozen=True)
class Mount:
    """A virtual folder as one user sees it: ``vpath`` (split, never empty) shows the
    directory ``root`` of the folder called ``folder``; its quota is the folder's own,
    shared by every user who mounts it."""

    vpath: tuple[str, ...]
    folder: str
    root: Path
    quota: Quota = field(default_factory=Quota)


@dataclass(frozen=True)
class Rates:
    """Transfer limits of one user over all their sessions and protocols; 0: no limit.

    ``up``/``down`` are bytes per second (one token bucket per user and direction);
    ``up_daily``/``down_daily`` are bytes per UTC day."""

    up: int = 0
    down: int = 0
    up_daily: int = 0
    down_daily: int = 0

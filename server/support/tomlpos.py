"""Map TOML keys to the line they are written on.

TOML parsers report positions only for syntax errors, never for valid values,
yet a sysadmin needs ``scriptsftp.toml:42: users[1].home: ...`` to find a wrong
value. This module scans the text once and records, for every table header and
every ``key =`` line, the dotted key path it defines, so a validation error's
location can be turned into a line number (falling back to the nearest enclosing
table when a key is missing altogether).
"""

from __future__ import annotations

import re

_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_KEY = re.compile(r"""^\s*((?:"[^"]*"|'[^']*'|[A-Za-z0-9_-]+)(?:\s*\.\s*(?:"[^"]*"|'[^']*'|[A-Za-z0-9_-]+))*)\s*=""")
_PART = re.compile(r"""\s*("([^"]*)"|'([^']*)'|([A-Za-z0-9_-]+))\s*(?:\.|$)""")

Loc = tuple[str | int, ...]


def _split_key(text: str) -> list[str]:
    parts: list[str] = []
    pos = 0
    while pos < len(text):
        m = _PART.match(text, pos)
        if not m or m.end() == pos:
            break
        parts.append(next(g for g in m.groups()[1:] if g is not None))
        pos = m.end()
    return parts


class KeyLines:
    """Line numbers (1-based) of keys and tables in one TOML document."""

    def __init__(self, text: str) -> None:
        self._lines: dict[Loc, int] = {}
        array_counts: dict[Loc, int] = {}
        prefix: Loc = ()
        in_multiline: str | None = None
        for lineno, line in enumerate(text.splitlines(), start=1):
            if in_multiline:
                if line.count(in_multiline) % 2 == 1:
                    in_multiline = None
                continue
            header = _HEADER.match(line)
            if header and not _KEY.match(line):
                parts = tuple(_split_key(header.group(2)))
                if header.group(1) == "[[":
                    index = array_counts.get(parts, 0)
                    array_counts[parts] = index + 1
                    prefix = parts + (index,)
                else:
                    prefix = parts
                self._lines.setdefault(prefix, lineno)
                continue
            key = _KEY.match(line)
            if key:
                loc = prefix + tuple(_split_key(key.group(1)))
                self._lines.setdefault(loc, lineno)
                rest = line[key.end():]
                for quote in ('"""', "'''"):
                    if rest.count(quote) % 2 == 1:
                        in_multiline = quote

    def line_of(self, loc: Loc) -> int | None:
        """The line of ``loc`` or of its closest enclosing key or table."""
        loc = tuple(loc)
        while loc:
            if loc in self._lines:
                return self._lines[loc]
            loc = loc[:-1]
        return None


def format_loc(loc: Loc) -> str:
    """``('users', 0, 'home')`` → ``users[0].home``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z0-9_-]+", part):
            out += ("." if out else "") + part
        else:
            out += f'["{part}"]'
    return out or "(top level)"

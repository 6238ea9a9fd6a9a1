"""Which scripts run for which event: bindings from the config plus the loaded script versions.

The registry is immutable once built; a reload builds a new one and the engine
swaps the reference, so an event already being dispatched keeps the bindings
and script versions it started with (docs/architecture.md rule 8).
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import re
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

from scriptsftp.server.contract.script_settings import Binding, ScriptConfig

from .workers import ScriptSource

MAX_SCRIPT_BYTES = 256 * 1024


@functools.lru_cache(maxsize=1024)
def glob_regex(pattern: str) -> re.Pattern[str]:
    """A path glob: ``**`` crosses directories, ``*`` and ``?`` stay within one."""
    out, i = "", 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            i += 2
            if pattern.startswith("/", i):  # "/**/" also matches "/"
                out += "(?:.*/)?"
                i += 1
            else:
                out += ".*"
            continue
        if c == "*":
            out += "[^/]*"
        elif c == "?":
            out += "[^/]"
        elif c == "[":
            end = pattern.find("]", i + 1)
            if end == -1:
                out += re.escape(c)
            else:
                body = pattern[i + 1:end].replace("\\", "\\\\")
                out += "[" + ("^" + body[1:] if body.startswith("!") else body) + "]"
                i = end
        else:
            out += re.escape(c)
        i += 1
    return re.compile(out + r"\Z")


@dataclass(frozen=True)
class LoadedScript:
    """One good version of a script, as compiled in a worker."""

    source: ScriptSource
    functions: frozenset[str]
    loaded_at: float = field(default_factory=time.time)


@dataclass(frozen=True)
class ActiveBinding:
    index: int  # position in the config, for messages
    spec: Binding

    @property
    def script(self) -> str:
        return self.spec.script

    def matches(self, event: dict[str, Any], groups: frozenset[str]) -> bool:
        b = self.spec
        user = event.get("user", "")
        if b.users and not any(fnmatch.fnmatchcase(user, u) for u in b.users):
            return False
        if b.groups and not groups.intersection(b.groups):
            return False
        if b.protocols and event.get("protocol") not in b.protocols:
            return False
        if b.paths:
            candidates = [p for p in (event.get("path"), event.get("target")) if p]
            if not any(glob_regex(g).match(p) for g in b.paths for p in candidates):
                return False
        if b.min_size or b.max_size:
            size = event.get("size")
            if size is None or size < b.min_size or (b.max_size and size > b.max_size):
                return False
        return True


class Registry:
    def __init__(self, bindings: list[ActiveBinding], scripts: dict[str, LoadedScript],
                 user_groups: dict[str, frozenset[str]]) -> None:
        self.scripts = scripts
        self.user_groups = user_groups
        by_event: dict[str, list[ActiveBinding]] = {}
        for b in sorted(bindings, key=lambda b: (b.spec.order, b.index)):
            by_event.setdefault(b.spec.event, []).append(b)
        self.by_event = by_event

    @classmethod
    def from_config(cls, cfg: ScriptConfig, scripts: dict[str, LoadedScript]) -> "Registry":
        bindings = [ActiveBinding(i, b) for i, b in enumerate(cfg.model.bindings)]
        groups = {u.name: frozenset(u.groups) for u in cfg.model.users}
        return cls(bindings, scripts, groups)

    def with_script(self, name: str, script: LoadedScript | None) -> "Registry":
        """A copy with one script replaced (or removed, with None)."""
        scripts = dict(self.scripts)
        if script is None:
            scripts.pop(name, None)
        else:
            scripts[name] = script
        return Registry([b for bs in self.by_event.values() for b in bs], scripts, self.user_groups)

    def wants(self, event_name: str) -> bool:
        return event_name in self.by_event

    def matching(self, event: dict[str, Any]) -> list[ActiveBinding]:
        groups = self.user_groups.get(event.get("user", ""), frozenset())
        return [b for b in self.by_event.get(event["name"], ()) if b.matches(event, groups)]

    def script_names(self) -> set[str]:
        return {b.script for bs in self.by_event.values() for b in bs}


def read_script(path: Any, name: str) -> ScriptSource:
    """Read a script file as text, refusing oversized or non-UTF-8 files with a clear reason."""
    raw = path.read_bytes()
    if len(raw) > MAX_SCRIPT_BYTES:
        raise ValueError(f"{name}: larger than {MAX_SCRIPT_BYTES // 1024} KiB")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{name}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    return ScriptSource(name=name, text=text, digest=hashlib.sha256(raw).hexdigest())


def referenced_scripts(bindings: Iterable[Binding]) -> list[str]:
    return sorted({b.script for b in bindings})

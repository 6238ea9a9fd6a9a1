"""Watch the scripts directory and report changed scripts, debounced.

Editors save by writing a temp file and renaming it over the script, emit
several events per save, and inotify can drop events when its queue overflows.
So: one recursive watch on the directory (not on files, which go deaf after the
first rename), a move's destination counts as a write and its source as a
delete, events are debounced per script, the engine compares content hashes
before doing anything, and a periodic rescan repairs whatever was missed. The
observer thread only records names; compiling happens on our own thread.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Callable

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver

log = logging.getLogger("scriptsftp.reload")

DEBOUNCE = 0.15
RESCAN_EVERY = 30.0
_EDITOR_TEMP = ("~", ".swp", ".swx", ".tmp")
#: Events that change nothing. Reading a script (which the engine does on every change)
#: makes inotify report "opened" and "closed_no_write": counting them fed a loop that
#: re-read, re-compiled and re-logged a broken script several times a second.
_READ_ONLY_EVENTS = frozenset({"opened", "closed_no_write"})


class ScriptWatcher(FileSystemEventHandler):
    def __init__(self, directory: Path, on_change: Callable[[str], None],
                 names: Callable[[], set[str]], *, debounce: float = DEBOUNCE, rescan: float = RESCAN_EVERY) -> None:
        self.directory = directory
        self.on_change = on_change
        self.names = names
        self.debounce = debounce
        self.rescan = rescan
        self._pending: dict[str, float] = {}
        self._cond = threading.Condition()
        self._stop = False
        self._observer: BaseObserver | None = None  # Observer is the platform's subclass
        self._seen: dict[str, tuple[float, int]] = {}

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._snapshot()
        try:
            observer = Observer()
            observer.schedule(self, str(self.directory), recursive=True)
            observer.start()
            self._observer = observer
        except OSError as exc:  # e.g. inotify watch limit: the rescan still works
            log.error("cannot watch %s (%s); falling back to a rescan every %.0fs", self.directory, exc, self.rescan)
        threading.Thread(target=self._run, name="script-reload", daemon=True).start()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)

    # --- watchdog callbacks (observer thread: record only) -----------------------

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory or event.event_type in _READ_ONLY_EVENTS:
            return
        for raw in (event.src_path, getattr(event, "dest_path", "")):
            if raw:
                self._touch(os.fsdecode(raw))

    def _touch(self, path: str) -> None:
        try:
            name = Path(path).relative_to(self.directory).as_posix()
        except ValueError:
            return
        if name.endswith(_EDITOR_TEMP) or Path(name).name.startswith((".#", "4913")):
            return
        with self._cond:
            self._pending[name] = time.monotonic() + self.debounce
            self._cond.notify_all()

    # --- our thread ----------------------------------------------------------------

    def _run(self) -> None:
        next_rescan = time.monotonic() + self.rescan
        while True:
            with self._cond:
                if self._stop:
                    return
                now = time.monotonic()
                due = [n for n, t in self._pending.items() if t <= now]
                for n in due:
                    del self._pending[n]
                if not due:
                    wake = min([next_rescan, *self._pending.values()])
                    self._cond.wait(max(0.01, wake - now))
            for name in due:
                self._notify(name)
            if time.monotonic() >= next_rescan:
                next_rescan = time.monotonic() + self.rescan
                for name in self._changed_since_snapshot():
                    log.info("rescan found a change in %s", name)
                    self._notify(name)

    def _notify(self, name: str) -> None:
        try:
            self.on_change(name)
        except Exception:
            log.exception("reloading %s failed", name)
        self._record(name)

    def _stat(self, name: str) -> tuple[float, int] | None:
        try:
            st = (self.directory / name).stat()
        except OSError:
            return None
        return (st.st_mtime, st.st_size)

    def _record(self, name: str) -> None:
        st = self._stat(name)
        if st is None:
            self._seen.pop(name, None)
        else:
            self._seen[name] = st

    def resync(self) -> None:
        """After a config reload: start tracking newly bound names (as they are now),
        so the periodic rescan compares them with what was loaded."""
        for name in self.names():
            if name not in self._seen:
                self._record(name)

    def _snapshot(self) -> None:
        for name in self.names():
            self._record(name)

    def _changed_since_snapshot(self) -> list[str]:
        changed = []
        for name in self.names():
            if self._stat(name) != self._seen.get(name):
                changed.append(name)
        return changed

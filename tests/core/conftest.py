"""The fast unit tier: the core (Session, Publisher, staging, access rules, dispatch) in-process.

No daemon, no sockets, no worker process: a Session is built on a temporary home with a
:class:`RecordingDispatcher`, so a test can fail a syscall exactly where it wants
(``monkeypatch`` on ``os``) and look at the disk, the staging records and the events afterwards.
The whole tier runs in seconds (``pytest tests/core``).

What is where:

- test_session_order.py: the order of checks of every Session operation, from one table
  (``OPS``); a new Session operation joins the table (a test fails until it does).
- test_vetoes.py, test_pending.py, test_recheck.py: sync vetoes, async pre-publish (pending
  names), the restart after a crash mid-check.
- test_vfs.py: path confinement and access rules as hypothesis properties.
- test_dispatch.py: the dispatcher contract, binding matching, the engine's decision with a
  stand-in worker pool.

The :func:`traced` fixture turns what an operation did into one list of steps: ``event:<name>``
(dispatcher), ``disk:<method>`` (the session's storage), ``log:<op> <result>`` (the Session's
log line) and ``refused:<kind>`` (the refusal record), in the order they happened.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import pytest

from scriptsftp.server.contract.dispatch import ALLOW, Decision, FileOpener
from scriptsftp.server.contract.events import Event
from scriptsftp.server.core.publish import Publisher, UploadPolicy
from scriptsftp.server.core.session import Account, Session
from scriptsftp.server.core.staging import StagingRecords
from scriptsftp.server.stores import StateStores
from scriptsftp.server.core.vfs import Access

OLD = b"the good old version\n" * 1000


@dataclass
class RecordingDispatcher:
    """Every event any binding would see; ``pre_hook`` decides (or raises) for pre-events."""

    events: list[Event] = field(default_factory=list)
    pre_hook: Callable[[Event], Decision] = lambda e: ALLOW
    steps: list[str] = field(default_factory=list)
    """The shared timeline (see :func:`traced`): ``event:<name>`` for each event raised."""

    def wants(self, event_name: str) -> bool:
        return True

    def pre(self, event: Event, file: FileOpener | None = None, mode: str | None = None) -> Decision:
        self.events.append(event)
        self.steps.append(f"event:{event.name}")
        return self.pre_hook(event)

    def has_async(self, event: Event) -> bool:
        return False

    def post(self, event: Event, file: FileOpener | None = None) -> None:
        self.events.append(event)
        self.steps.append(f"event:{event.name}")

    def names(self) -> list[str]:
        return [e.name for e in self.events]


@dataclass
class Core:
    home: Path
    state_dir: Path
    staging: StagingRecords
    dispatcher: RecordingDispatcher
    policy: UploadPolicy
    session: Session

    def part_files(self) -> list[str]:
        return [str(p.relative_to(self.home)) for p in self.home.rglob("*") if ".scriptsftp-part-" in p.name]

    def assert_untouched(self, name: str = "over.bin") -> None:
        """The promise: the old version byte for byte, nothing staged left, no record."""
        assert (self.home / name).read_bytes() == OLD
        assert self.part_files() == []
        assert self.staging.leftovers() == []


def open_staging(state_dir: Path) -> StagingRecords:
    """The staging records of a state_dir, opened as the daemon opens them: the one place the
    tests name how, so a change of stores touches this line only."""
    return StagingRecords(StateStores(state_dir))


@pytest.fixture
def core(tmp_path: Path) -> Core:
    home = tmp_path / "home"
    home.mkdir()
    (home / "over.bin").write_bytes(OLD)
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    staging = open_staging(state_dir)
    dispatcher = RecordingDispatcher()
    policy = UploadPolicy(state_dir=state_dir)
    account = Account(name="alice", home=home, access=Access.build({"/": ["*"]}, [], []))
    publisher = Publisher(dispatcher, staging, policy)
    session = Session(session_id="s1", account=account, protocol="sftp", remote_ip="127.0.0.1",
                      dispatcher=dispatcher, staging=staging, uploads=policy, publisher=publisher)
    yield Core(home, state_dir, staging, dispatcher, policy, session)
    session.close()
    publisher.close(1.0)
    staging.close()


def fail_with(err: int) -> Callable[..., int]:
    def failing(*args: object, **kwargs: object) -> int:
        raise OSError(err, os.strerror(err))
    return failing


def veto(reason: str, *names: str) -> Callable[[Event], Decision]:
    """A pre_hook that vetoes the named events (every pre-event when none is named) with ``reason``."""
    return lambda e: Decision(False, reason) if not names or e.name in names else ALLOW


# --- one timeline of what an operation did --------------------------------------------------

#: the Storage methods that change the disk or open something on it: each becomes ``disk:<name>``
TRACED_STORAGE = ("open_file", "open_dir_fd", "scandir", "readlink", "mkdir", "rmdir", "unlink", "rename",
                  "chmod", "utime", "symlink")


class _StepHandler(logging.Handler):
    """The Session's log lines as ``log:<op> <result>`` steps."""

    def __init__(self, steps: list[str]) -> None:
        super().__init__(logging.DEBUG)
        self.steps = steps

    def emit(self, record: logging.LogRecord) -> None:
        op, result = getattr(record, "op", None), getattr(record, "result", None)
        if op and result:
            self.steps.append(f"log:{op} {result}")


@pytest.fixture
def traced(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[Session], list[str]]]:
    """``traced(session)`` returns the session's dispatcher's ``steps``, to which every event
    (``event:``), Storage operation (``disk:``), Session log line (``log:``) and refusal record
    (``refused:<kind>``) is appended in the order they happen. The order of checks is then one
    list to compare."""
    handlers: list[tuple[logging.Logger, _StepHandler]] = []
    session_log = logging.getLogger("scriptsftp.session")
    level = session_log.level

    def trace(session: Session) -> list[str]:
        steps: list[str] = session.dispatcher.steps  # type: ignore[attr-defined]
        storage_class = type(session.storage)  # whatever implements the home's storage
        for name in TRACED_STORAGE:
            real = getattr(storage_class, name)

            def step(self: object, *args: object, _real: Callable[..., object] = real, _name: str = name,
                     **kwargs: object) -> object:
                result = _real(self, *args, **kwargs)
                steps.append(f"disk:{_name}")
                return result

            monkeypatch.setattr(storage_class, name, step)
        session.refusals = lambda record, reason, kind: steps.append(f"refused:{kind}")
        handler = _StepHandler(steps)
        session_log.addHandler(handler)
        session_log.setLevel(logging.INFO)
        handlers.append((session_log, handler))
        return steps

    yield trace
    for logger, handler in handlers:
        logger.removeHandler(handler)
    session_log.setLevel(level)


def snapshot(*roots: Path) -> dict[str, tuple]:
    """Everything under ``roots`` that an operation could change: kind, mode, size, content,
    link target and mtime (a directory's changes when an entry is made or removed in it, a
    staging file included). atime is left out: reading is not touching."""
    out: dict[str, tuple] = {}
    for root in roots:
        for p in [root, *sorted(root.rglob("*"))]:
            st = p.lstat()
            if p.is_symlink():
                extra: object = os.readlink(p)
            elif p.is_file():
                extra = p.read_bytes()
            else:
                extra = None
            out[str(p)] = (st.st_mode, st.st_size, st.st_mtime_ns, extra)
    return out

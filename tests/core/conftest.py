"""The fast unit tier: the core (Session, Publisher, staging) in-process, no daemon.

A Session is built on a temporary home with a recording dispatcher, so a test can
fail a syscall exactly where it wants (``monkeypatch`` on ``os``) and look at
the disk, the staging records and the events afterwards. Runs in seconds.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from scriptsftp.server.contract.dispatch import ALLOW, Decision, FileOpener
from scriptsftp.server.contract.events import Event
from scriptsftp.server.core.publish import Publisher
from scriptsftp.server.core.session import Account, Session, UploadPolicy
from scriptsftp.server.core.staging import StagingRecords
from scriptsftp.server.core.vfs import Access

OLD = b"the good old version\n" * 1000


@dataclass
class RecordingDispatcher:
    """Every event any binding would see; ``pre_hook`` decides (or raises) for pre-events."""

    events: list[Event] = field(default_factory=list)
    pre_hook: Callable[[Event], Decision] = lambda e: ALLOW

    def wants(self, event_name: str) -> bool:
        return True

    def pre(self, event: Event, file: FileOpener | None = None, mode: str | None = None) -> Decision:
        self.events.append(event)
        return self.pre_hook(event)

    def has_async(self, event: Event) -> bool:
        return False

    def post(self, event: Event, file: FileOpener | None = None) -> None:
        self.events.append(event)

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


@pytest.fixture
def core(tmp_path: Path) -> Core:
    home = tmp_path / "home"
    home.mkdir()
    (home / "over.bin").write_bytes(OLD)
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    staging = StagingRecords(state_dir / "staging.db")
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

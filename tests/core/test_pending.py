"""Async pre-publish: the client is answered at once, the file appears only once approved.

A dispatcher with an async pre-publish binding whose verdict the test gives when it wants:
meanwhile the client's close has succeeded, the final name is *pending* (STAT and listings
answer the uploaded size; download, rename, delete and a new upload to it are refused), the
previous version is on disk unchanged, and the staging record says "checking" so a crash
would recheck it. Approve publishes, veto discards; nothing staged is left either way.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator

import pytest

from scriptsftp.server.contract.dispatch import ALLOW, Decision, FileOpener
from scriptsftp.server.contract.errors import NotFound, PermissionDenied
from scriptsftp.server.contract.events import Event
from scriptsftp.server.core.staging import CHECKING

from .conftest import OLD, Core, RecordingDispatcher

NEW = b"a new version that waits for its check\n" * 3000
REASON = "the partner's file is malformed"


@dataclass
class AsyncCheck(RecordingDispatcher):
    """An async pre-publish binding: its verdict waits for :meth:`decide`. Records what the
    async check read through its file opener and the mode each pre-publish was asked in."""

    verdict: Decision | None = None
    decided: threading.Event = field(default_factory=threading.Event)
    modes: list[str | None] = field(default_factory=list)
    read: list[bytes] = field(default_factory=list)

    def has_async(self, event: Event) -> bool:
        return event.name == "pre-publish"

    def pre(self, event: Event, file: FileOpener | None = None, mode: str | None = None) -> Decision:
        if event.name != "pre-publish":
            return super().pre(event, file, mode)
        self.modes.append(mode)
        if mode == "sync":  # the sync bindings pass; the client is answered after them
            return super().pre(event, file, mode)
        assert self.decided.wait(10), "the test never decided"
        if file is not None:
            fd = file()
            try:
                self.read.append(os.pread(fd, len(NEW) + 1, 0))
            finally:
                os.close(fd)
        self.events.append(event)
        self.steps.append(f"event:{event.name}")
        assert self.verdict is not None
        return self.verdict

    def decide(self, verdict: Decision) -> None:
        self.verdict = verdict
        self.decided.set()


@pytest.fixture
def pending(core: Core) -> Iterator[tuple[Core, AsyncCheck]]:
    check = AsyncCheck()
    for holder in (core.session, core.session.publisher):
        holder.dispatcher = check
    yield core, check
    if not check.decided.is_set():
        check.decide(ALLOW)  # let a test that failed half way end its background check


def _settled(core: Core, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while core.session.publisher.busy():
        assert time.monotonic() < deadline, "the background check did not finish"
        time.sleep(0.005)


def _upload(core: Core, path: str = "/over.bin") -> None:
    h = core.session.open_write(path)
    h.write(0, NEW)
    h.close()  # async: returns before any verdict


def _assert_pending(core: Core, path: str) -> None:
    s = core.session
    assert s.stat(path).size == len(NEW)
    name = path.rsplit("/", 1)[1]
    assert {e.name: e.size for e in s.listdir("/")}[name] == len(NEW)
    listing = s.opendir("/")
    batch = listing.read(1000)
    listing.close()
    assert [e.size for e in batch if e.name == name] == [len(NEW)]
    with pytest.raises(NotFound):
        s.open_read(path)
    with pytest.raises(NotFound):
        s.remove(path)
    with pytest.raises(NotFound):
        s.rename(path, "/elsewhere.bin")
    (core.home / "other.bin").write_bytes(b"other")
    with pytest.raises(PermissionDenied, match="still being checked"):
        s.rename("/other.bin", path, overwrite=True)
    with pytest.raises(PermissionDenied, match="still being checked"):
        s.open_write(path)
    (core.home / "other.bin").unlink()


def test_close_succeeds_at_once_and_the_name_waits_for_the_verdict(pending: tuple[Core, AsyncCheck]) -> None:
    core, check = pending
    _upload(core)
    assert check.modes == ["sync", "async"] or check.modes == ["sync"]  # the async one may not have started
    assert (core.home / "over.bin").read_bytes() == OLD  # the old version, untouched, while it waits
    _assert_pending(core, "/over.bin")
    [record] = core.staging.leftovers()
    assert record.state == CHECKING and record.event is not None
    assert (record.event["name"], record.event["path"], record.event["size"]) == ("pre-publish", "/over.bin", len(NEW))
    assert "post-upload" not in check.names() and "upload-failed" not in check.names()

    check.decide(ALLOW)
    _settled(core)
    assert (core.home / "over.bin").read_bytes() == NEW
    assert check.read == [NEW]  # the async check read the staged bytes
    assert core.part_files() == [] and core.staging.leftovers() == []
    assert check.names()[-2:] == ["pre-publish", "post-upload"]
    assert core.session.stat("/over.bin").size == len(NEW)
    h = core.session.open_read("/over.bin")
    assert h.read(0, 10) == NEW[:10]
    h.close()


def test_an_async_veto_discards_and_the_old_version_comes_back(pending: tuple[Core, AsyncCheck]) -> None:
    core, check = pending
    _upload(core)
    check.decide(Decision(False, REASON))
    _settled(core)
    core.assert_untouched()
    assert core.session.stat("/over.bin").size == len(OLD)
    failed = check.events[-1]
    assert failed.name == "upload-failed" and failed.reason == REASON  # type: ignore[attr-defined]
    assert "post-upload" not in check.names()
    core.session.open_write("/over.bin").abort("a new upload is possible again")


def test_a_new_file_is_pending_without_existing(pending: tuple[Core, AsyncCheck]) -> None:
    core, check = pending
    _upload(core, "/fresh.bin")
    assert not (core.home / "fresh.bin").exists()
    _assert_pending(core, "/fresh.bin")
    check.decide(Decision(False, REASON))
    _settled(core)
    assert not (core.home / "fresh.bin").exists()
    with pytest.raises(NotFound):
        core.session.stat("/fresh.bin")
    assert core.part_files() == [] and core.staging.leftovers() == []


def test_a_session_closed_before_the_verdict_still_gets_it_applied(pending: tuple[Core, AsyncCheck]) -> None:
    """The check owns its own storage: the client may be long gone when the verdict comes."""
    core, check = pending
    _upload(core)
    core.session.close()
    check.decide(ALLOW)
    _settled(core)
    assert (core.home / "over.bin").read_bytes() == NEW
    assert core.part_files() == [] and core.staging.leftovers() == []


def test_a_sync_veto_before_the_async_check_answers_the_client(pending: tuple[Core, AsyncCheck]) -> None:
    core, check = pending
    check.pre_hook = lambda e: Decision(False, REASON) if e.name == "pre-publish" else ALLOW
    h = core.session.open_write("/over.bin")
    h.write(0, NEW)
    with pytest.raises(PermissionDenied, match=REASON):
        h.close()
    assert check.modes == ["sync"]  # the async binding never ran
    core.assert_untouched()


def test_a_directory_made_meanwhile_under_the_name_fails_the_publish(pending: tuple[Core, AsyncCheck]) -> None:
    """The name is free on disk while a new file waits: if a directory takes it, the approved
    upload cannot replace it; it fails (upload-failed) and leaves nothing staged."""
    core, check = pending
    _upload(core, "/fresh.bin")
    (core.home / "fresh.bin").mkdir()
    check.decide(ALLOW)
    _settled(core)
    assert (core.home / "fresh.bin").is_dir()
    failed = check.events[-1]
    assert failed.name == "upload-failed" and "directory" in failed.reason  # type: ignore[attr-defined]
    assert core.part_files() == [] and core.staging.leftovers() == []

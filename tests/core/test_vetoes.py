"""A veto always carries its reason and always leaves things as they were.

Every ``pre-`` event a script can veto, raised by a real Session on a temporary home: the
client's error is :class:`Vetoed` with the script's reason, the operation did not happen, the
veto is logged with that reason, and for uploads the previous version stays byte for byte with
nothing staged left behind and ``upload-failed`` telling the scripts why.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable

import pytest

from scriptsftp.server.contract.dispatch import Decision
from scriptsftp.server.contract.errors import Vetoed
from scriptsftp.server.contract.events import Event
from scriptsftp.server.core.session import Session

from .conftest import OLD, Core, veto

NEW = b"the new version, which a script rejects\n" * 2000
REASON = "virus found: EICAR-Test-File"


def _upload(session: Session, path: str = "/over.bin", data: bytes = NEW, **flags: object) -> None:
    h = session.open_write(path, **flags)  # type: ignore[arg-type]
    h.write(0, data)
    h.close()


@pytest.mark.parametrize("flags", [{}, {"truncate": False}, {"truncate": False, "append": True}],
                         ids=["write", "resume", "append"])
def test_a_sync_pre_publish_veto_fails_the_close_and_keeps_the_old_version(core: Core, flags: dict) -> None:
    core.dispatcher.pre_hook = veto(REASON, "pre-publish")
    h = core.session.open_write("/over.bin", **flags)
    h.write(0, NEW)
    assert core.part_files() != []  # staged beside the target while bytes arrive
    with pytest.raises(Vetoed) as raised:
        h.close()
    assert raised.value.message == REASON
    core.assert_untouched()
    names = core.dispatcher.names()
    assert names == ["pre-upload", "pre-publish", "upload-failed"]
    failed = core.dispatcher.events[-1]
    assert failed.reason == REASON and failed.path == "/over.bin"  # type: ignore[attr-defined]
    assert "post-upload" not in names


def test_pre_publish_reads_the_staged_bytes_not_the_published_ones(core: Core,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The script is handed the upload (through a fresh read-only descriptor), never the old file."""
    seen: list[bytes] = []
    recorded = core.dispatcher.pre

    def pre(event: Event, file: Callable[[], int] | None = None, mode: str | None = None) -> Decision:
        if event.name == "pre-publish":
            assert file is not None
            fd = file()
            try:
                seen.append(os.pread(fd, len(NEW) + 1, 0))
            finally:
                os.close(fd)
            return Decision(False, REASON)
        return recorded(event, file, mode)

    monkeypatch.setattr(core.dispatcher, "pre", pre)
    with pytest.raises(Vetoed):
        _upload(core.session)
    assert seen == [NEW]
    core.assert_untouched()


def test_a_veto_without_a_reason_still_gives_one(core: Core) -> None:
    core.dispatcher.pre_hook = lambda e: Decision(False, "")
    with pytest.raises(Vetoed, match="denied by a server script"):
        _upload(core.session)
    with pytest.raises(Vetoed, match="denied by a server script"):
        core.session.remove("/over.bin")
    core.assert_untouched()


def test_a_vetoed_upload_goes_to_quarantine_when_configured(core: Core, tmp_path: Path) -> None:
    core.policy.quarantine = tmp_path / "quarantine"
    core.dispatcher.pre_hook = veto(REASON, "pre-publish")
    with pytest.raises(Vetoed):
        _upload(core.session)
    core.assert_untouched()
    kept = list((tmp_path / "quarantine" / "alice").iterdir())
    assert len(kept) == 1 and kept[0].read_bytes() == NEW


def test_a_pre_upload_veto_stores_no_byte(core: Core) -> None:
    """Refused before a staging file or record exists: there is no upload to fail, so the
    pre-upload event is the only one (no upload-failed)."""
    core.dispatcher.pre_hook = veto(REASON, "pre-upload")
    for flags in ({}, {"truncate": False}, {"truncate": False, "append": True}):
        with pytest.raises(Vetoed, match=REASON):
            core.session.open_write("/over.bin", **flags)  # type: ignore[arg-type]
        with pytest.raises(Vetoed, match=REASON):
            core.session.open_write("/fresh.bin", **flags)  # type: ignore[arg-type]
    core.assert_untouched()
    assert not (core.home / "fresh.bin").exists()
    assert set(core.dispatcher.names()) == {"pre-upload"}


# --- the other vetoable operations -------------------------------------------------------------

def _setup(core: Core) -> None:
    (core.home / "dir").mkdir()
    (core.home / "dir" / "keep.txt").write_bytes(b"kept")
    (core.home / "empty").mkdir()


VETOED_OPS: list[tuple[str, Callable[[Session], object], str]] = [
    ("pre-delete", lambda s: s.remove("/over.bin"), "delete"),
    ("pre-rename", lambda s: s.rename("/over.bin", "/moved.bin"), "rename"),
    ("pre-rename", lambda s: s.rename("/dir/keep.txt", "/over.bin", overwrite=True), "rename"),
    ("pre-mkdir", lambda s: s.mkdir("/newdir"), "mkdir"),
    ("pre-rmdir", lambda s: s.rmdir("/empty"), "rmdir"),
    ("pre-download", lambda s: s.open_read("/over.bin"), "download"),
]


@pytest.mark.parametrize("event,run,op", VETOED_OPS,
                         ids=["delete", "rename", "rename-over", "mkdir", "rmdir", "download"])
def test_a_veto_stops_the_operation_with_its_reason(core: Core, caplog: pytest.LogCaptureFixture,
                                                    event: str, run: Callable[[Session], object], op: str) -> None:
    _setup(core)
    before = sorted(str(p.relative_to(core.home)) for p in core.home.rglob("*"))
    core.dispatcher.pre_hook = veto(REASON, event)
    with caplog.at_level(logging.INFO, logger="scriptsftp.session"):
        with pytest.raises(Vetoed) as raised:
            run(core.session)
    assert raised.value.message == REASON
    assert core.dispatcher.names() == [event]  # no post-event, nothing after the veto
    assert sorted(str(p.relative_to(core.home)) for p in core.home.rglob("*")) == before
    core.assert_untouched()
    assert (core.home / "dir" / "keep.txt").read_bytes() == b"kept"
    vetoed = [r for r in caplog.records if getattr(r, "result", "") == "vetoed"]
    assert [(r.op, r.reason) for r in vetoed] == [(op, REASON)]  # type: ignore[attr-defined]
    assert vetoed[0].user == "alice" and vetoed[0].sid == "s1"  # type: ignore[attr-defined]


def test_the_veto_of_one_event_does_not_stop_the_others(core: Core) -> None:
    core.dispatcher.pre_hook = veto(REASON, "pre-delete")
    _upload(core.session, "/other.bin")
    assert (core.home / "other.bin").read_bytes() == NEW
    core.session.rename("/other.bin", "/renamed.bin")
    h = core.session.open_read("/renamed.bin")
    assert h.read(0, 5) == NEW[:5]
    h.close()
    with pytest.raises(Vetoed):
        core.session.remove("/renamed.bin")
    assert (core.home / "renamed.bin").exists()
    assert core.dispatcher.names() == [
        "pre-upload", "pre-publish", "post-upload", "pre-rename", "post-rename", "pre-download", "post-download",
        "pre-delete"]


def test_a_post_event_sees_the_file_the_scripts_allowed(core: Core, monkeypatch: pytest.MonkeyPatch) -> None:
    """post-upload hands the published file, so a script reads what was checked."""
    seen: list[bytes] = []

    def post(event: Event, file: Callable[[], int] | None = None) -> None:
        core.dispatcher.events.append(event)
        if event.name == "post-upload" and file is not None:
            fd = file()
            try:
                seen.append(os.pread(fd, len(NEW) + 1, 0))
            finally:
                os.close(fd)

    monkeypatch.setattr(core.dispatcher, "post", post)
    _upload(core.session)
    assert seen == [NEW]

"""Nothing partial, nothing lost (rule 7 in docs/architecture.md), at the core.

Each test breaks one step of an overwrite of ``/over.bin`` and asserts the
promise: the client gets the error, the old version stays byte for byte, and
no staged file or staging record is left behind.
"""

from __future__ import annotations

import errno
import os
import sqlite3
from typing import Any

import pytest

from scriptsftp.server.contract.dispatch import ALLOW
from scriptsftp.server.contract.errors import Failure, FsError, NoSpace
from scriptsftp.server.contract.state import SqlDatabase
from scriptsftp.server.core.storage import LocalStorage as Storage

from .conftest import OLD, Core, fail_with

NEW = b"N" * 300_000


def test_a_failed_write_poisons_the_upload(core: Core, monkeypatch: pytest.MonkeyPatch) -> None:
    h = core.session.open_write("/over.bin")
    h.write(0, NEW[:100_000])
    monkeypatch.setattr(os, "pwrite", fail_with(errno.ENOSPC))
    with pytest.raises(NoSpace):
        h.write(100_000, NEW[100_000:])
    monkeypatch.undo()
    with pytest.raises(NoSpace):  # later writes answer the first error: the client stops sooner
        h.write(100_000, NEW[100_000:])
    with pytest.raises(NoSpace, match="upload failed: /over.bin: no space left on device"):
        h.close()  # before the fix, this published the 100 kB head over the old file
    core.assert_untouched()
    assert core.dispatcher.names()[-1] == "upload-failed"
    assert "post-upload" not in core.dispatcher.names()


def test_a_write_that_makes_no_progress_is_a_failure(core: Core, monkeypatch: pytest.MonkeyPatch) -> None:
    h = core.session.open_write("/over.bin")
    monkeypatch.setattr(os, "pwrite", lambda fd, data, offset: 0)
    with pytest.raises(FsError):
        h.write(0, NEW)
    monkeypatch.undo()
    with pytest.raises(FsError):
        h.close()
    core.assert_untouched()


def test_a_failed_truncate_poisons_the_upload(core: Core, monkeypatch: pytest.MonkeyPatch) -> None:
    h = core.session.open_write("/over.bin")
    h.write(0, NEW)
    monkeypatch.setattr(os, "ftruncate", fail_with(errno.EIO))
    with pytest.raises(FsError):
        h.truncate(10)
    monkeypatch.undo()
    with pytest.raises(FsError):
        h.close()
    core.assert_untouched()


def test_a_failed_fsync_poisons_the_upload(core: Core, monkeypatch: pytest.MonkeyPatch) -> None:
    h = core.session.open_write("/over.bin")
    h.write(0, NEW)
    monkeypatch.setattr(os, "fsync", fail_with(errno.EIO))
    with pytest.raises(FsError, match="upload failed"):
        h.close()
    monkeypatch.undo()
    core.assert_untouched()


def test_publish_is_write_fsync_rename_fsync_directory_then_forget(
        core: Core, monkeypatch: pytest.MonkeyPatch) -> None:
    """The staging record follows the same order: marked complete ("check again after a
    crash") only once the bytes are on disk, dropped only once the rename is."""
    calls: list[str] = []
    real_fsync, real_rename = os.fsync, Storage.rename
    real_checking, real_remove = core.staging.checking, core.staging.remove

    def fsync(fd: int) -> None:
        import stat
        calls.append("fsync dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def rename(self: Storage, src: object, dst: object) -> None:
        calls.append("rename")
        real_rename(self, src, dst)  # type: ignore[arg-type]

    def checking(record_id: int, event: dict[str, object]) -> None:
        calls.append("record complete")
        real_checking(record_id, event)

    def remove(record_id: int) -> None:
        calls.append("forget record")
        real_remove(record_id)

    h = core.session.open_write("/over.bin")
    h.write(0, NEW)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(Storage, "rename", rename)
    monkeypatch.setattr(core.staging, "checking", checking)
    monkeypatch.setattr(core.staging, "remove", remove)
    h.close()
    assert calls == ["fsync file", "record complete", "rename", "fsync dir", "forget record"]
    assert (core.home / "over.bin").read_bytes() == NEW


def test_fsync_off_publishes_without_flushing(core: Core, monkeypatch: pytest.MonkeyPatch) -> None:
    core.policy.fsync = False
    monkeypatch.setattr(os, "fsync", fail_with(errno.EIO))  # would poison if it were called
    h = core.session.open_write("/over.bin")
    h.write(0, NEW)
    h.close()
    assert (core.home / "over.bin").read_bytes() == NEW


class _FullDatabase:
    """Stands in for the staging database of a full state_dir: every transaction fails as
    SQLite does, with the real database's dialect and error types."""

    def __init__(self, real: SqlDatabase) -> None:
        self.dialect = real.dialect
        self.errors = real.errors

    def transaction(self) -> Any:
        raise sqlite3.OperationalError("database or disk is full")

    read = transaction


def test_a_full_state_dir_at_publish_discards_and_frees(core: Core, monkeypatch: pytest.MonkeyPatch) -> None:
    h = core.session.open_write("/over.bin")
    h.write(0, NEW)
    real = core.staging._db
    monkeypatch.setattr(core.staging, "_db", _FullDatabase(core.staging._db))
    with pytest.raises(NoSpace, match="state storage is full"):
        h.close()  # before the fix: sqlite3.OperationalError, the staged file kept the disk full
    assert core.part_files() == []  # the bytes are freed at once, record or not
    monkeypatch.setattr(core.staging, "_db", real)
    assert (core.home / "over.bin").read_bytes() == OLD
    # the record could not be dropped while the disk was full: the next start forgets it
    from scriptsftp.server.core.staging import discard_leftovers
    discard_leftovers(core.staging)
    core.assert_untouched()


def test_a_full_state_dir_at_open_is_no_space_not_a_crash(core: Core, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(core.staging, "_db", _FullDatabase(core.staging._db))
    with pytest.raises(NoSpace):
        core.session.open_write("/over.bin")
    monkeypatch.undo()
    core.assert_untouched()


def test_any_exception_in_publish_discards_and_answers_a_failure(core: Core) -> None:
    def broken(event: object) -> object:
        raise RuntimeError("a bug in the engine")

    h = core.session.open_write("/over.bin")
    h.write(0, NEW)
    core.dispatcher.pre_hook = lambda e: broken(e) if e.name == "pre-publish" else ALLOW  # type: ignore[assignment]
    with pytest.raises(Failure, match="could not be completed"):
        h.close()
    core.assert_untouched()


def test_below_the_free_space_reserve_uploads_are_refused_before_any_byte(core: Core) -> None:
    core.policy.min_free_space = 1 << 62
    with pytest.raises(NoSpace, match="nearly full"):
        core.session.open_write("/over.bin")
    assert "pre-upload" not in core.dispatcher.names()  # refused before scripts are asked
    core.assert_untouched()
    core.policy.min_free_space = 1
    h = core.session.open_write("/over.bin")
    h.write(0, NEW)
    h.close()
    assert (core.home / "over.bin").read_bytes() == NEW


def test_a_state_dir_below_the_reserve_refuses_uploads_too(core: Core, monkeypatch: pytest.MonkeyPatch) -> None:
    """The reserve is kept on state_dir as well as on the home: with the home roomy and only
    state_dir nearly full, an upload is refused up front, naming the state storage."""
    real = os.statvfs
    state = os.fspath(core.state_dir)

    def statvfs(path: object) -> os.statvfs_result:
        got = real(path)  # type: ignore[arg-type]
        if os.fspath(path) != state:  # type: ignore[call-overload]
            return got
        return os.statvfs_result((got.f_bsize, got.f_frsize, got.f_blocks, 0, 0, got.f_files, got.f_ffree,
                                  got.f_favail, got.f_flag, got.f_namemax))

    core.policy.min_free_space = 1
    monkeypatch.setattr(os, "statvfs", statvfs)
    assert os.statvfs(core.home).f_bavail > 0
    with pytest.raises(NoSpace, match="/over.bin: the server's state storage is nearly full; try again later"):
        core.session.open_write("/over.bin")
    assert "pre-upload" not in core.dispatcher.names()
    core.assert_untouched()
    monkeypatch.undo()
    h = core.session.open_write("/over.bin")  # space back: taken again, nothing to restart
    h.write(0, NEW)
    h.close()
    assert (core.home / "over.bin").read_bytes() == NEW


def test_close_after_a_clean_upload_still_publishes(core: Core) -> None:
    h = core.session.open_write("/over.bin")
    h.write(0, NEW)
    h.close()
    assert (core.home / "over.bin").read_bytes() == NEW
    assert core.part_files() == [] and core.staging.leftovers() == []
    assert OLD != NEW


# --- copies keep holes and fit above the reserve -------------------------------------------


def _sparse(path, size: int = (1 << 30) + 1) -> None:
    with open(path, "wb") as f:
        f.seek(size - 1)
        f.write(b"x")


def test_reopening_a_sparse_file_copies_its_data_not_its_holes(core: Core) -> None:
    """1 byte at offset 2^30, reopened r+: the staged copy was a full GiB written in the
    request thread (2^40 would have filled the disk)."""
    _sparse(core.home / "sparse.bin")
    h = core.session.open_write("/sparse.bin", truncate=False)
    st = os.fstat(h.fd)
    assert st.st_size == (1 << 30) + 1
    assert st.st_blocks * 512 < 1 << 20
    h.write(0, b"head")
    h.close()
    with open(core.home / "sparse.bin", "rb") as f:
        assert f.read(4) == b"head" and f.read(4) == b"\0" * 4
        f.seek(1 << 30)
        assert f.read() == b"x"


def test_append_after_a_hole_keeping_copy_lands_at_the_end(core: Core) -> None:
    _sparse(core.home / "sparse.bin", 1 << 20)
    h = core.session.open_write("/sparse.bin", truncate=False, append=True)
    h.write(0, b"tail")  # O_APPEND: the offset is ignored
    h.close()
    data = (core.home / "sparse.bin").read_bytes()
    assert len(data) == (1 << 20) + 4 and data.endswith(b"xtail")


def test_a_copy_that_would_not_fit_is_refused_before_it_starts(core: Core, monkeypatch: pytest.MonkeyPatch) -> None:
    (core.home / "big.bin").write_bytes(os.urandom(1 << 20))
    real = Storage.statvfs

    def nearly_full(self: Storage) -> os.statvfs_result:
        fs = real(self)
        return os.statvfs_result((fs.f_bsize, fs.f_frsize, fs.f_blocks, fs.f_bfree, 16, fs.f_files,
                                  fs.f_ffree, fs.f_favail, fs.f_flag, fs.f_namemax))

    core.policy.min_free_space = 0
    monkeypatch.setattr(Storage, "statvfs", nearly_full)
    with pytest.raises(NoSpace, match="not enough free space on the server to copy"):
        core.session.open_write("/big.bin", truncate=False)
    assert core.part_files() == [] and core.staging.leftovers() == []


def test_copy_from_keeps_holes_and_a_deadline_stops_it(core: Core) -> None:
    _sparse(core.home / "sparse.bin")
    rh = core.session.open_read("/sparse.bin")
    wh = core.session.open_write("/copy.bin")
    wh.copy_from(rh.fd)
    assert wh.written == (1 << 30) + 1 and os.fstat(wh.fd).st_blocks * 512 < 1 << 20
    wh.close()
    rh.close()
    (core.home / "dense.bin").write_bytes(os.urandom(1 << 20))
    rh = core.session.open_read("/dense.bin")
    wh = core.session.open_write("/late.bin")
    with pytest.raises(TimeoutError):
        wh.copy_from(rh.fd, deadline=0.0)
    wh.abort("copy failed")
    rh.close()
    assert not (core.home / "late.bin").exists() and core.part_files() == []

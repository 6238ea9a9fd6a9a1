"""Pieces that every login runs, made cheaper for connection latency: they must still
give exactly what they gave before (the home's real path, the same log line)."""

from __future__ import annotations

import os

import pytest

from scriptsftp.server.storage import Storage


def test_storage_home_is_the_real_path_through_a_symlink(tmp_path):
    real = tmp_path / "disk" / "alice"
    real.mkdir(parents=True)
    (tmp_path / "homes").mkdir()
    (tmp_path / "homes" / "alice").symlink_to(real)
    s = Storage(tmp_path / "homes" / "alice")
    try:
        assert s.home == real.resolve()
        assert s.host_to_virtual(str(real / "a" / "b"), ()) == ("a", "b")
    finally:
        s.close()


def test_storage_creates_a_missing_home(tmp_path):
    home = tmp_path / "new" / "bob"
    s = Storage(home)
    try:
        assert home.is_dir()
        assert s.home == home.resolve()
    finally:
        s.close()


def test_storage_home_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(OSError):
        Storage(tmp_path / "f")


def test_storage_home_without_proc_falls_back(tmp_path, monkeypatch):
    real_readlink = os.readlink

    def no_proc(path, *a, **kw):
        if str(path).startswith("/proc/"):
            raise FileNotFoundError(path)
        return real_readlink(path, *a, **kw)

    monkeypatch.setattr(os, "readlink", no_proc)
    (tmp_path / "h").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "h")
    s = Storage(tmp_path / "link")
    try:
        assert s.home == (tmp_path / "h").resolve()
    finally:
        s.close()

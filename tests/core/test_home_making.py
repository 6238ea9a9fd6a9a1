"""``ensure_home``: the home and its ``home_folders`` made with the configured mode (whatever
the umask), existing ones left as they are, links planted in the home never followed, and
nothing made without ``create_homes``. On a temporary directory, no daemon."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from scriptsftp.server.core.homes import HomeMissing, HomePolicy, ensure_home, owner_ids
from scriptsftp.server.core.session import Account
from scriptsftp.server.core.vfs import Access


def _account(home: Path, *folders: str) -> Account:
    return Account(name="alice", home=home, access=Access.build({"/": ["*"]}, [], []), home_folders=folders)


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
def strict_umask():
    old = os.umask(0o077)
    yield
    os.umask(old)


def test_a_new_home_and_its_folders_get_the_configured_mode(tmp_path, strict_umask):
    home = tmp_path / "homes" / "alice"
    report = ensure_home(_account(home, "/inbox", "/outbox", "/archive/2026"), HomePolicy(mode=0o2750))
    assert report.made == ["/", "/inbox", "/outbox", "/archive/2026"] and report.skipped == []
    for path in (home, home / "inbox", home / "outbox", home / "archive", home / "archive" / "2026"):
        assert _mode(path) == 0o2750, path


def test_an_existing_home_keeps_its_mode_and_gets_only_what_is_missing(tmp_path):
    home = tmp_path / "alice"
    (home / "inbox").mkdir(parents=True)
    home.chmod(0o700)
    (home / "inbox").chmod(0o755)
    report = ensure_home(_account(home, "/inbox", "/outbox"), HomePolicy(mode=0o750))
    assert report.made == ["/outbox"]
    assert _mode(home) == 0o700 and _mode(home / "inbox") == 0o755 and _mode(home / "outbox") == 0o750
    assert ensure_home(_account(home, "/inbox", "/outbox"), HomePolicy()).made == []  # the next login


def test_a_link_planted_in_the_home_is_never_followed(tmp_path):
    home, outside = tmp_path / "alice", tmp_path / "outside"
    home.mkdir()
    outside.mkdir()
    os.symlink(outside, home / "inbox")  # to a directory outside
    os.symlink(outside / "gone", home / "outbox")  # dangling: mkdir through it would make it outside
    (home / "archive").mkdir()
    os.symlink(outside, home / "archive" / "2026")  # deeper down
    os.symlink("/etc", home / "etc")  # an intermediate component
    report = ensure_home(_account(home, "/inbox/new", "/outbox", "/archive/2026/jan", "/etc/x", "/ok"),
                         HomePolicy())
    assert report.made == ["/ok"]
    assert [v for v, _ in report.skipped] == ["/inbox/new", "/outbox", "/archive/2026/jan", "/etc/x"]
    assert all("never followed" in why for _, why in report.skipped)
    assert os.listdir(outside) == [] and not os.path.exists("/etc/x")


def test_a_file_in_the_way_is_left_alone(tmp_path):
    home = tmp_path / "alice"
    home.mkdir()
    (home / "inbox").write_bytes(b"not a directory")
    report = ensure_home(_account(home, "/inbox"), HomePolicy())
    assert report.made == [] and report.skipped[0][0] == "/inbox"
    assert (home / "inbox").read_bytes() == b"not a directory"


def test_without_create_homes_nothing_is_made(tmp_path):
    with pytest.raises(HomeMissing, match="does not exist"):
        ensure_home(_account(tmp_path / "alice", "/inbox"), HomePolicy(create=False))
    assert not (tmp_path / "alice").exists()
    (tmp_path / "alice").mkdir()
    assert ensure_home(_account(tmp_path / "alice", "/inbox"), HomePolicy(create=False)).made == []
    assert not (tmp_path / "alice" / "inbox").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root (CI runs as root)")
def test_as_root_homes_belong_to_home_owner(tmp_path):
    home = tmp_path / "alice"
    ensure_home(_account(home, "/inbox"), HomePolicy(owner="nobody"))
    nobody = owner_ids("nobody")
    assert nobody is not None
    for path in (home, home / "inbox"):
        st = os.lstat(path)
        assert (st.st_uid, st.st_gid) == nobody
    ensure_home(_account(tmp_path / "bob"), HomePolicy(owner="4242"))
    assert os.lstat(tmp_path / "bob").st_uid == 4242


def test_an_unknown_home_owner_is_a_clear_error(tmp_path):
    if os.geteuid() != 0:
        assert owner_ids("no-such-user-here") is None  # not root: never chowned, never looked up
        return
    with pytest.raises(LookupError, match="home_owner 'no-such-user-here': no such user"):
        ensure_home(_account(tmp_path / "alice"), HomePolicy(owner="no-such-user-here"))

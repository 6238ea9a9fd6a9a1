"""Virtual folders in the core: a Session on a home with folders mounted in it (core/mounts.py).

Each test builds the user's tree as a login does (:func:`open_account_storage` on the
account's mounts) and then looks at the disk: what lands in the folder root, what stays in
the home, what the events say, and that nothing outside a folder's root is reachable
through it (symlinks planted on the host, links made by the client, ``..``).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Iterator

import pytest

from scriptsftp.server.contract.errors import AlreadyExists, FsError, IsADirectory, NotFound, PermissionDenied
from scriptsftp.server.core.limits import Mount
from scriptsftp.server.core.mounts import MountedStorage, find_mount, mount_of, mounts_under, open_account_storage
from scriptsftp.server.core.publish import Publisher, UploadPolicy
from scriptsftp.server.core.session import Account, Session
from scriptsftp.server.core.staging import discard_leftovers
from scriptsftp.server.core.storage import LocalStorage
from scriptsftp.server.core.vfs import Access

from .conftest import RecordingDispatcher, open_staging

SECRET = b"outside every root\n"


class World:
    """A home, two folder roots and a secret beside them; sessions made like a login's."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.home = tmp_path / "homes" / "alice"
        self.team = tmp_path / "folders" / "team"
        self.deep = tmp_path / "folders" / "deep"
        for d in (self.home, self.team, self.deep):
            d.mkdir(parents=True)
        (tmp_path / "secret.txt").write_bytes(SECRET)
        self.staging = open_staging(tmp_path / "state")
        self.dispatcher = RecordingDispatcher()
        self.policy = UploadPolicy(state_dir=tmp_path / "state")
        self.publisher = Publisher(self.dispatcher, self.staging, self.policy)
        self.sessions: list[Session] = []

    def account(self, name: str = "alice", home: Path | None = None, perms: dict[str, list[str]] | None = None,
                mounts: tuple[Mount, ...] | None = None) -> Account:
        if mounts is None:
            mounts = (Mount(("a", "b", "deep"), "deep", self.deep), Mount(("shared",), "team", self.team))
        return Account(name=name, home=home or self.home, access=Access.build(perms or {"/": ["*"]}, [], []),
                       folders=tuple(sorted(mounts, key=lambda m: len(m.vpath), reverse=True)))

    def session(self, account: Account | None = None) -> Session:
        account = account or self.account()
        s = Session(session_id=f"s{len(self.sessions)}", account=account, protocol="sftp", remote_ip="127.0.0.1",
                    dispatcher=self.dispatcher, staging=self.staging, uploads=self.policy, publisher=self.publisher,
                    storage=open_account_storage(LocalStorage, account))
        self.sessions.append(s)
        return s

    def close(self) -> None:
        for s in self.sessions:
            s.close()
        self.publisher.close(1.0)
        self.staging.close()


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path)
    yield w
    w.close()


def put(s: Session, path: str, data: bytes) -> None:
    h = s.open_write(path)
    h.write(0, data)
    h.close()


def get(s: Session, path: str) -> bytes:
    h = s.open_read(path)
    try:
        return h.read(0, 1 << 20)
    finally:
        h.close()


# --- routing -------------------------------------------------------------------------------------


def test_mount_of_finds_the_deepest_mount_holding_a_path(world: World) -> None:
    outer = Mount(("shared",), "team", world.team)
    inner = Mount(("shared", "sub"), "deep", world.deep)
    account = world.account(mounts=(outer, inner))
    assert mount_of(account, ("shared", "sub", "x")) is inner
    assert mount_of(account, ("shared", "sub")) is inner
    assert mount_of(account, ("shared", "subway")) is outer
    assert mount_of(account, ("shared",)) is outer
    assert mount_of(account, ("sharedx",)) is None and mount_of(account, ()) is None
    assert find_mount((), ("shared",)) is None
    assert mounts_under(account.folders, ("shared",)) == [inner, outer]
    assert mounts_under(account.folders, ("shared", "other")) == []


def test_no_folders_no_composite(world: World) -> None:
    """The common case costs nothing: a user without folders stands on the plain home."""
    storage = open_account_storage(LocalStorage, world.account(mounts=()))
    try:
        assert type(storage) is LocalStorage
    finally:
        storage.close()


# --- where files go ----------------------------------------------------------------------------


def test_upload_in_a_folder_is_staged_and_published_in_the_folder(world: World, monkeypatch) -> None:
    s = world.session()
    h = s.open_write("/shared/report.csv")
    h.write(0, b"a,b\n")
    staged = [p.name for p in world.team.iterdir()]
    assert len(staged) == 1 and staged[0].startswith(".scriptsftp-part-")  # beside its target, in the folder
    [rec] = world.staging.leftovers()
    assert rec.home == str(world.team.resolve()) and rec.directory == "/" and rec.final_name == "report.csv"
    renames: list[tuple[object, ...]] = []
    real_rename = os.rename
    monkeypatch.setattr(os, "rename", lambda *a, **k: (renames.append(a), real_rename(*a, **k))[1])
    h.close()
    assert len(renames) == 1  # one atomic rename, in the folder: never a copy across filesystems
    assert (world.team / "report.csv").read_bytes() == b"a,b\n"
    assert not (world.home / "shared").exists()
    assert world.staging.leftovers() == []
    assert get(s, "/shared/report.csv") == b"a,b\n"


def test_events_carry_the_folder(world: World) -> None:
    s = world.session()
    put(s, "/shared/x.txt", b"x")
    put(s, "/home.txt", b"h")
    s.rename("/shared/x.txt", "/shared/y.txt")
    s.mkdir("/a/b/deep/d")
    by_path = {(e.name, getattr(e, "path", "")): getattr(e, "folder", None) for e in world.dispatcher.events}
    assert by_path[("pre-upload", "/shared/x.txt")] == "team"
    assert by_path[("pre-publish", "/shared/x.txt")] == "team"
    assert by_path[("post-upload", "/shared/x.txt")] == "team"
    assert by_path[("post-rename", "/shared/x.txt")] == "team"
    assert by_path[("post-mkdir", "/a/b/deep/d")] == "deep"
    assert by_path[("post-upload", "/home.txt")] == ""


def test_mount_points_show_in_their_parents_listing(world: World) -> None:
    (world.home / "shared").write_text("a file the mount shadows\n")
    (world.team / "t.txt").write_text("t")
    s = world.session()
    top = {e.name: e for e in s.listdir("/")}
    assert stat.S_ISDIR(top["shared"].st.st_mode)  # the folder, not the shadowed file
    assert [e.name for e in s.listdir("/")].count("shared") == 1
    assert "a" in top  # the parents of a deep mount point are made in the home
    assert [e.name for e in s.listdir("/a/b")] == ["deep"]
    assert [e.name for e in s.listdir("/shared")] == ["t.txt"]
    assert stat.S_ISDIR(s.stat("/shared").st.st_mode)
    # the batched listing (SFTP READDIR) shows the same, in batches of one
    h = s.opendir("/")
    names = []
    while batch := h.read(1):
        names += [e.name for e in batch]
    h.close()
    assert sorted(names) == sorted(top)


def test_mount_points_cannot_be_removed_or_moved(world: World) -> None:
    (world.team / "keep.txt").write_text("keep")
    s = world.session()
    for op, exc in ((lambda: s.rmdir("/shared"), PermissionDenied),
                    (lambda: s.rmdir("/a"), PermissionDenied),  # would pull the deep mount's parent away
                    (lambda: s.rename("/shared", "/elsewhere"), PermissionDenied),
                    (lambda: s.rename("/a", "/z"), PermissionDenied),
                    (lambda: s.check_removable("/shared"), PermissionDenied),  # a tree delete asks first
                    (lambda: s.check_removable("/a"), PermissionDenied),
                    (lambda: s.check_removable("/"), PermissionDenied),
                    (lambda: s.mkdir("/shared"), AlreadyExists),
                    (lambda: s.remove("/shared"), IsADirectory)):
        with pytest.raises(exc):
            op()
    put(s, "/over.txt", b"o")
    with pytest.raises(PermissionDenied, match="virtual folder"):
        s.rename("/over.txt", "/shared", overwrite=True)
    assert (world.team / "keep.txt").read_text() == "keep" and (world.home / "over.txt").exists()
    assert world.dispatcher.names().count("pre-rmdir") == 0
    s.mkdir("/shared/sub")
    s.check_removable("/shared/sub")  # inside the folder: an ordinary directory


def test_rename_and_link_across_a_boundary_are_refused_with_a_message(world: World) -> None:
    s = world.session()
    put(s, "/mine.txt", b"m")
    put(s, "/shared/theirs.txt", b"t")
    before = len(world.dispatcher.events)
    for src, dst in (("/mine.txt", "/shared/mine.txt"), ("/shared/theirs.txt", "/theirs.txt"),
                     ("/shared/theirs.txt", "/a/b/deep/theirs.txt")):
        with pytest.raises(PermissionDenied, match="across a virtual folder boundary"):
            s.rename(src, dst)
    for target, link in (("/shared/theirs.txt", "/l1"), ("/mine.txt", "/shared/l2"), ("/", "/shared/l3")):
        with pytest.raises(PermissionDenied, match="across a virtual folder boundary"):
            s.symlink(target, link)
    assert len(world.dispatcher.events) == before  # refused before any pre-event
    assert (world.home / "mine.txt").exists() and (world.team / "theirs.txt").exists()
    # inside one folder both work, and a link is stored as a path in the folder
    s.rename("/shared/theirs.txt", "/shared/t2.txt")
    s.symlink("/shared/t2.txt", "/shared/link")
    assert os.readlink(world.team / "link") == str(world.team.resolve() / "t2.txt")
    assert s.readlink("/shared/link") == "/shared/t2.txt"
    assert get(s, "/shared/link") == b"t"


# --- confinement inside a folder -----------------------------------------------------------------


def _plant(world: World) -> None:
    outside = world.tmp
    (world.team / "sub").mkdir()
    (world.team / "sub" / "inside.txt").write_text("inside\n")
    os.symlink(str(outside / "secret.txt"), world.team / "abs_secret")
    os.symlink("../../secret.txt", world.team / "rel_secret")
    os.symlink(str(world.home), world.team / "to_home")  # another root: out of this one
    os.symlink("/etc", world.team / "etc_link")
    os.symlink(str(world.team / "sub"), world.team / "abs_inside")
    (world.home / "shadow").mkdir()
    os.symlink(str(world.home / "shared"), world.home / "into_shadow")  # the home's own 'shared' place
    (world.home / "shared").mkdir()
    (world.home / "shared" / "shadowed.txt").write_text("the home's, under the mount\n")


@pytest.mark.parametrize("path", [
    "/shared/../../secret.txt", "/shared/abs_secret", "/shared/rel_secret", "/shared/to_home/x",
    "/shared/etc_link/passwd", "/shared/sub/../../../secret.txt", "/into_shadow/shadowed.txt",
    "/shared/shadowed.txt", "/shared/.scriptsftp-part-x", "/shared/a\x00b", "/shared/" + "n" * 256,
])
def test_attack_paths_stay_inside_the_folder(world: World, path: str) -> None:
    _plant(world)
    s = world.session()
    before = sorted(os.listdir(world.tmp))
    try:
        assert SECRET not in get(s, path)  # ('..' stops at the user's root: a name in the home)
    except FsError:
        pass
    try:
        put(s, path, b"evil")  # may land in the home or the folder, never beside them
    except FsError:
        pass
    assert (world.tmp / "secret.txt").read_bytes() == SECRET and sorted(os.listdir(world.tmp)) == before
    assert (world.home / "shared" / "shadowed.txt").read_text() == "the home's, under the mount\n"


def test_links_inside_the_folder_work(world: World) -> None:
    _plant(world)
    s = world.session()
    assert get(s, "/shared/abs_inside/inside.txt") == b"inside\n"
    assert s.readlink("/shared/abs_inside") == "/shared/sub"
    with pytest.raises(NotFound):
        s.readlink("/shared/abs_secret")
    s.symlink("..", "/shared/sub/up")  # the folder's root: inside
    assert os.readlink(world.team / "sub" / "up") == str(world.team.resolve())
    assert sorted(e.name for e in s.listdir("/shared/sub/up")) == sorted(e.name for e in s.listdir("/shared"))
    for target in ("../../../..", "/etc", "/"):  # the user's root and beyond: the home, across the boundary
        with pytest.raises(PermissionDenied, match="boundary"):
            s.symlink(target, "/shared/sub/out")


def test_nested_mount_is_not_reached_through_the_outer_folder(world: World) -> None:
    inner_root = world.tmp / "folders" / "inner"
    inner_root.mkdir()
    (inner_root / "i.txt").write_text("inner")
    (world.team / "sub").mkdir()
    (world.team / "sub" / "outer-shadowed.txt").write_text("outer")
    os.symlink(str(world.team / "sub"), world.team / "alias")
    account = world.account(mounts=(Mount(("shared",), "team", world.team),
                                    Mount(("shared", "sub"), "inner", inner_root)))
    s = world.session(account)
    assert get(s, "/shared/sub/i.txt") == b"inner"
    assert [e.name for e in s.listdir("/shared/sub")] == ["i.txt"]
    with pytest.raises(NotFound, match="virtual folder"):
        s.listdir("/shared/alias")  # the outer folder's link into the place the inner one hides


# --- shared between users -----------------------------------------------------------------------------


def test_two_users_share_a_folder_each_with_their_permissions(world: World) -> None:
    bob_home = world.tmp / "homes" / "bob"
    bob_home.mkdir()
    mount = (Mount(("team",), "team", world.team),)
    alice = world.session()
    bob = world.session(world.account("bob", bob_home, {"/": ["*"], "/team": ["list", "download"]}, mount))
    put(alice, "/shared/from-alice.txt", b"hello bob")
    assert [e.name for e in bob.listdir("/team")] == ["from-alice.txt"]
    assert get(bob, "/team/from-alice.txt") == b"hello bob"
    with pytest.raises(PermissionDenied):
        put(bob, "/team/from-bob.txt", b"no")
    with pytest.raises(PermissionDenied):
        bob.remove("/team/from-alice.txt")
    assert os.listdir(world.team) == ["from-alice.txt"]


def test_a_pending_upload_in_a_shared_folder_is_pending_for_every_user(world: World) -> None:
    """The pending index is keyed by the folder, not by who uploaded."""
    bob_home = world.tmp / "homes" / "bob"
    bob_home.mkdir()
    alice = world.session()
    bob = world.session(world.account("bob", bob_home, mounts=(Mount(("t",), "team", world.team),)))
    put(alice, "/shared/old.txt", b"old")
    storage, inside = alice.storage.locate(("shared", "old.txt"))
    from scriptsftp.server.core.publish import PendingUpload

    world.publisher.pending.add(storage.home, inside, PendingUpload(3, 0.0, 0o644, None))
    assert [e.name for e in bob.listdir("/t")] == ["old.txt"]
    with pytest.raises(NotFound):
        get(bob, "/t/old.txt")  # waiting for its check: not there yet for a download
    with pytest.raises(PermissionDenied, match="still being checked"):
        put(bob, "/t/old.txt", b"new")


def test_leftovers_in_a_folder_are_cleaned_from_the_folder(world: World) -> None:
    s = world.session()
    h = s.open_write("/shared/half.bin")
    h.write(0, b"half")
    staging = [p for p in world.team.iterdir() if p.name.startswith(".scriptsftp-part-")]
    assert staging
    # a crash: the session is gone without closing the upload; the next start cleans up
    assert discard_leftovers(world.staging, open_storage=LocalStorage) == 1
    assert not any(p.exists() for p in staging)
    h.abort("test")


def test_a_closed_session_opens_no_folder(world: World) -> None:
    s = world.session()
    s.close()
    assert isinstance(s.storage, MountedStorage)
    with pytest.raises(FsError):
        s.storage.locate(("shared", "x"))


def test_the_disk_reserve_is_checked_on_the_folders_filesystem(world: World) -> None:
    """A folder may sit on another disk than the home: an upload there is refused when
    that disk is nearly full, and one in the home is not."""
    from scriptsftp.server.contract.errors import NoSpace

    world.policy.min_free_space = 1 << 20
    s = world.session()
    folder, _ = s.storage.locate(("shared", "x"))
    real = folder.statvfs()
    full = os.statvfs_result((real.f_bsize, real.f_frsize, real.f_blocks, 0, 0, real.f_files, real.f_ffree,
                              real.f_favail, real.f_flag, real.f_namemax))
    folder.statvfs = lambda: full  # type: ignore[method-assign]
    with pytest.raises(NoSpace, match="nearly full"):
        s.open_write("/shared/big.bin")
    assert s.statvfs("/shared").f_bavail == 0 and s.statvfs("/").f_bavail > 0
    put(s, "/home.bin", b"fits")
    assert os.listdir(world.team) == []


def test_an_aborted_upload_in_a_folder_leaves_nothing(world: World) -> None:
    s = world.session()
    put(s, "/shared/keep.txt", b"old")
    h = s.open_write("/shared/keep.txt")
    h.write(0, b"new and half")
    h.abort("connection lost")
    assert os.listdir(world.team) == ["keep.txt"] and (world.team / "keep.txt").read_bytes() == b"old"
    assert world.staging.leftovers() == []
    failed = [e for e in world.dispatcher.events if e.name == "upload-failed"]
    assert [(e.path, e.folder) for e in failed] == [("/shared/keep.txt", "team")]  # type: ignore[attr-defined]


def test_a_directory_reached_through_a_link_shows_no_mount_points(world: World) -> None:
    """A mount is reached by its own path only: a home link to its parent lists the home's
    directory as it is, and the mount point's name through the link is not the folder."""
    (world.team / "t.txt").write_text("t")
    os.symlink(str(world.home / "a" / "b"), world.home / "ab")
    s = world.session()
    assert [e.name for e in s.listdir("/a/b")] == ["deep"]
    assert s.listdir("/ab") == []
    h = s.opendir("/ab")
    assert h.read(10) == []
    h.close()
    with pytest.raises(NotFound):
        s.listdir("/ab/deep")

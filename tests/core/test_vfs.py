"""Path confinement and access rules (server/core/vfs.py, and Storage's walk), as properties.

Whatever a client sends as a path (``..`` runs, ``//``, NUL, control characters, unicode,
staging names, very long names and paths), :func:`split` either refuses it or returns clean
components that name a place inside the home; :class:`Storage` then never opens anything
outside the home, whatever symlinks the home holds. The permission and filter rules are checked
against a plain model of what the docs promise.
"""

from __future__ import annotations

import fnmatch
import os
import posixpath
from pathlib import Path
from typing import Any, Iterator

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from scriptsftp.server.contract.errors import FsError, InvalidPath, NotFound, PermissionDenied
from scriptsftp.server.contract.dispatch import NullDispatcher
from scriptsftp.server.core.session import Account, Session
from scriptsftp.server.core.vfs import (
    ALL_PERMISSIONS, MAX_NAME_BYTES, MAX_PATH_BYTES, STAGING_PREFIX, Access, FilterRule, join, normalize, split,
)

def budget(examples: int) -> settings:
    """Few examples per run: the unit tier must stay fast on a loaded machine, and every run
    (and CI) draws new ones; the hard cases are in the strategies, not in the count."""
    return settings(max_examples=examples, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

SEGMENTS = st.one_of(
    st.sampled_from(["..", ".", "", "...", "a", "B", "dir", "é", "名前", "\u202e", "a b", "\x00", "\x01", "\x7f",
                     STAGING_PREFIX + "0011", "n" * 255, "n" * 256, "ü" * 128, "..a", "a..", "~", "\\", "\ud800"]),
    st.text(max_size=12),
)
PATHS = st.one_of(
    st.builds(lambda segs, lead, sep: ("/" if lead else "") + sep.join(segs),
              st.lists(SEGMENTS, max_size=12), st.booleans(), st.sampled_from(["/", "//", "/./"])),
    st.text(max_size=64),
    st.builds(lambda n, tail: "/.." * n + tail, st.integers(0, 1500), st.sampled_from(["", "/x", "/../y"])),
)
CWDS = st.one_of(st.just("/"), st.builds(lambda p: normalize(p), st.sampled_from(["/a", "/a/b", "/dir/é/x"])))


def _clean(parts: tuple[str, ...]) -> None:
    for part in parts:
        assert part not in ("", ".", "..")
        assert "/" not in part and "\x00" not in part
        assert not any(ord(c) < 0x20 or ord(c) == 0x7F for c in part)
        assert len(part.encode("utf-8", "surrogatepass")) <= MAX_NAME_BYTES
        assert not part.startswith(STAGING_PREFIX)


@budget(120)
@given(PATHS, CWDS)
def test_split_refuses_for_a_reason_or_returns_clean_components_inside_the_home(vpath: str, cwd: str) -> None:
    try:
        parts = split(vpath, cwd)
    except InvalidPath as exc:
        assert ("\x00" in vpath or len(vpath.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES
                or "too long" in exc.message or "control characters" in exc.message)
        return
    except NotFound:
        assert STAGING_PREFIX in vpath or STAGING_PREFIX in cwd
        return
    _clean(parts)
    home = "/srv/home/alice"
    host = posixpath.normpath(posixpath.join(home, *parts))
    assert host == home or host.startswith(home + "/")
    assert split(join(parts)) == parts  # normalising is idempotent
    assert normalize(join(parts)) == join(parts)


@budget(30)
@given(st.integers(0, 200), st.lists(st.sampled_from(["a", "b", "c"]), max_size=5))
def test_dotdot_stops_at_the_root(ups: int, tail: list[str]) -> None:
    assert split("/" + "../" * ups + "/".join(tail)) == tuple(tail)
    assert split("../" * ups + "/".join(tail), "/x/y") == (("x", "y")[: max(0, 2 - ups)] + tuple(tail))


@budget(30)
@given(st.lists(st.sampled_from(["a", "b", "..", ".", ""]), max_size=8),
       st.lists(st.sampled_from(["c", "d", "..", "."]), max_size=6))
def test_a_relative_path_is_the_same_as_its_absolute_form(cwd_parts: list[str], rel: list[str]) -> None:
    cwd = normalize("/" + "/".join(cwd_parts))
    rel_path = "/".join(rel)
    assume(not rel_path.startswith("/"))
    assert split(rel_path, cwd) == split(cwd + "/" + rel_path)


def test_the_limits_are_bytes_not_characters() -> None:
    assert split("/" + "é" * 127) == ("é" * 127,)  # 254 bytes
    with pytest.raises(InvalidPath, match="name too long"):
        split("/" + "é" * 128)  # 256 bytes
    with pytest.raises(InvalidPath, match="path too long"):
        split("/" + "a/" * (MAX_PATH_BYTES // 2 + 1))
    with pytest.raises(NotFound):
        split("/x/" + STAGING_PREFIX + "ab/..")  # a staging name is absent, even on the way to ..


# --- Storage: the walk never leaves the home, whatever the links --------------------------------

LINK_NAMES = ["in", "up", "abs_out", "rel_out", "loop", "self", "deep", "dangling", "x", "sub", ".."]


@pytest.fixture(scope="module")
def linked_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path, Any]]:
    root = tmp_path_factory.mktemp("confinement")
    home, outside = root / "home", root / "outside"
    (home / "sub" / "x").mkdir(parents=True)
    (outside / "x").mkdir(parents=True)
    (home / "sub" / "f").write_text("inside")
    (outside / "f").write_text("outside")
    links = {
        "in": "sub", "up": "..", "abs_out": str(outside), "rel_out": "../outside", "loop": "loop2",
        "self": ".", "deep": "sub/x/../../sub", "dangling": "nowhere",
    }
    for name, target in links.items():
        (home / name).symlink_to(target)
    (home / "loop2").symlink_to("loop")
    (home / "sub" / "back").symlink_to("../../outside")
    (home / "sub" / "home_abs").symlink_to(str(home / "sub"))
    # the storage a Session opens on the home: the one every client operation walks through
    account = Account(name="alice", home=home, access=Access.build({"/": ["*"]}, [], []))
    session = Session(session_id="s1", account=account, protocol="sftp", remote_ip="127.0.0.1",
                      dispatcher=NullDispatcher())
    yield home.resolve(), outside.resolve(), session.storage
    session.close()


@budget(120)
@given(st.lists(st.sampled_from(LINK_NAMES + ["back", "home_abs", "f", "loop2"]), min_size=1, max_size=7),
       st.booleans())
def test_resolve_never_opens_a_directory_outside_the_home(linked_home: tuple[Path, Path, Any],
                                                          parts: list[str], follow: bool) -> None:
    home, outside, storage = linked_home
    try:
        clean = split("/" + "/".join(parts))
    except FsError:
        return
    try:
        r = storage.resolve(clean, follow=follow)
    except (FsError, OSError):
        return
    with r:
        where = Path(os.readlink(f"/proc/self/fd/{r.dir_fd}"))
        assert where == home or home in where.parents
        assert outside not in [where, *where.parents]
        if r.name:  # what the operation acts on is named in a directory inside the home
            assert "/" not in r.name


def test_the_ways_out_are_refused_by_name(linked_home: tuple[Path, Path, Any]) -> None:
    home, outside, storage = linked_home
    for name in ("up", "abs_out", "rel_out"):
        with pytest.raises(NotFound, match="points outside the home"):
            storage.resolve((name, "f")).__enter__()
    with pytest.raises(NotFound, match="points outside the home"):
        storage.resolve(("sub", "back", "f")).__enter__()
    with pytest.raises(InvalidPath, match="too many levels"):
        storage.resolve(("loop", "f")).__enter__()
    with storage.resolve(("sub", "home_abs", "f")) as r:  # an absolute link into the home is fine
        assert r.parts == ("sub", "f")
    with storage.resolve(("deep", "f")) as r:
        assert r.parts == ("sub", "f")


# --- permissions -----------------------------------------------------------------------------------

DIRS = st.lists(st.sampled_from(["a", "b", "c"]), max_size=3).map(tuple)
PERMS = st.frozensets(st.sampled_from(sorted(ALL_PERMISSIONS)), max_size=4)


@budget(40)
@given(st.dictionaries(DIRS, PERMS, min_size=1, max_size=5), DIRS)
def test_the_deepest_configured_directory_wins(configured: dict[tuple[str, ...], frozenset[str]],
                                               directory: tuple[str, ...]) -> None:
    access = Access({join(d): p for d, p in configured.items()}, [])
    containing = [d for d in configured if directory[: len(d)] == d]
    expected = configured[max(containing, key=len)] if containing else frozenset()
    assert access.permissions_at(directory) == expected
    for perm in ALL_PERMISSIONS:
        if perm in expected:
            access.require(perm, directory, "/x")
        else:
            with pytest.raises(PermissionDenied, match=rf"/x: permission denied \({perm}\)"):
                access.require(perm, directory, "/x")


def test_groups_add_up_and_the_users_own_entry_replaces_them() -> None:
    access = Access.build({"/in": ["upload"]}, [{"/": ["list"], "/in": ["list", "download"]},
                                                 {"/": ["download"], "/out": ["*"]}], [])
    assert access.permissions_at(()) == {"list", "download"}
    assert access.permissions_at(("in", "deeper")) == {"upload"}
    assert access.permissions_at(("out",)) == ALL_PERMISSIONS
    assert Access.build({"/x/../y//": ["list"]}, [], []).permissions_at(("y",)) == {"list"}
    assert access.with_all_permissions().permissions_at(("in",)) == ALL_PERMISSIONS


# --- filters ----------------------------------------------------------------------------------------

NAMES = st.sampled_from(["Report.PDF", "report.pdf", "a.exe", "A.EXE", "notes.txt", ".hidden", "data.csv", "x"])


@budget(60)
@given(st.lists(NAMES, min_size=1, max_size=4), st.sampled_from(["*.exe", "*.PDF", ".*", "x"]),
       st.booleans(), st.sampled_from([(), ("a",)]))
def test_a_filter_applies_below_its_path_case_insensitively(parts: list[str], pattern: str, hide: bool,
                                                            below: tuple[str, ...]) -> None:
    rule = FilterRule(below, (pattern,), (), hide)
    access = Access({"/": ALL_PERMISSIONS}, [rule])
    full = below + tuple(parts)
    vpath = join(full)
    matched = [i for i in range(len(below), len(full)) if fnmatch.fnmatchcase(full[i].lower(), pattern.lower())]
    if hide and matched:
        with pytest.raises(NotFound):
            access.check_filters(full, vpath)
        assert access.hidden(full[: matched[0]], full[matched[0]])
        return
    if not hide and matched and matched[-1] == len(full) - 1:
        with pytest.raises(PermissionDenied, match="not allowed by the server's filters"):
            access.check_filters(full, vpath)
        access.check_filters(full, vpath, metadata=True)  # stat still answers a denied name
        return
    access.check_filters(full, vpath)  # a denied directory on the way does not refuse what is below it
    assert not access.hidden(full[:-1], full[-1])


def test_an_allow_list_rejects_every_other_name() -> None:
    access = Access({"/": ALL_PERMISSIONS}, [FilterRule(("in",), (), ("*.csv", "*.TXT"), False)])
    access.check_filters(("in", "data.CSV"), "/in/data.CSV")
    access.check_filters(("in", "notes.txt"), "/in/notes.txt")
    with pytest.raises(PermissionDenied):
        access.check_filters(("in", "run.sh"), "/in/run.sh")
    access.check_filters(("run.sh",), "/run.sh")  # only below /in
    access.check_filters(("in",), "/in")


# --- the Session: no operation, on any path, changes anything outside the home ------------------

OPERATIONS = ["mkdir", "rmdir", "remove", "rename", "write", "resume", "chmod", "utime", "symlink", "read", "list"]


@pytest.fixture(scope="module")
def exposed_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path, Session, set[int]]]:
    root = tmp_path_factory.mktemp("exposed")
    home, outside = root / "home", root / "outside"
    (home / "sub").mkdir(parents=True)
    (outside / "x").mkdir(parents=True)
    (outside / "f").write_text("outside")
    for name, target in {"abs_out": str(outside), "rel_out": "../outside", "up": "..",
                         "sub/back": "../../outside", "in": "sub"}.items():
        (home / name).symlink_to(target)
    account = Account(name="alice", home=home, access=Access.build({"/": ["*"]}, [], []))
    session = Session(session_id="s1", account=account, protocol="sftp", remote_ip="127.0.0.1",
                      dispatcher=NullDispatcher())
    planted = {p.lstat().st_ino for p in home.rglob("*") if p.is_symlink()}  # the ways out, maybe moved later
    yield home, outside, session, planted
    session.close()


def _tree(root: Path) -> dict[str, tuple[int, int, int]]:
    return {str(p): (p.lstat().st_mode, p.lstat().st_size, p.lstat().st_mtime_ns) for p in [root, *root.rglob("*")]}


@budget(80)
@given(st.sampled_from(OPERATIONS),
       st.lists(st.sampled_from(["abs_out", "rel_out", "up", "in", "sub", "back", "x", "f", "..", "new"]),
                min_size=1, max_size=4),
       st.lists(st.sampled_from(["abs_out", "rel_out", "up", "in", "x", "f", "..", "other"]), min_size=1, max_size=3))
def test_no_operation_on_any_path_changes_anything_outside(
        exposed_home: tuple[Path, Path, Session, set[int]], op: str, a: list[str], b: list[str]) -> None:
    home, outside, session, planted = exposed_home
    before = _tree(outside)
    first, second = "/" + "/".join(a), "/".join(b)
    try:
        if op == "mkdir":
            session.mkdir(first)
        elif op == "rmdir":
            session.rmdir(first)
        elif op == "remove":
            session.remove(first)
        elif op == "rename":
            session.rename(first, "/" + second, overwrite=True)
        elif op in ("write", "resume"):
            h = session.open_write(first, truncate=op == "write")
            h.write(0, b"written")
            h.close()
        elif op == "chmod":
            session.setstat(first, mode=0o600)
        elif op == "utime":
            session.setstat(first, times=(1.0, 2.0))
        elif op == "symlink":
            session.symlink(second, first)
        elif op == "read":
            session.open_read(first).close()
        else:
            session.listdir(first)
    except FsError:
        pass
    assert _tree(outside) == before
    for link in home.rglob("*"):
        if link.is_symlink() and link.lstat().st_ino not in planted:
            target = os.readlink(link)  # what the Session made points into the home
            assert target == str(home) or target.startswith(str(home) + "/")

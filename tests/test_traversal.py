"""Path traversal corpus: every attempt to leave the home (or a permission) must fail.

The daemon's root holds, beside the homes, an ``outside`` directory with a
marker file and a secret. Every case runs against a real daemon through a real
client; afterwards the marker must be untouched (content, mode, mtime, and
atime: it was not even read), the secret must never appear in anything a client
received, and nothing new may exist outside the home.
"""

from __future__ import annotations

import os
import stat
import warnings

import pytest

from conftest import close_client, paramiko_client, plant_hostile_home, sftp_batch, user_toml

SECRET = b"TOP-SECRET-outside-the-home-7f3a\n"
MARKER = b"marker: must stay exactly like this\n"
OLD = 1_500_000_000


@pytest.fixture(scope="module")
def world(module_daemons, alice_key, bob_key):
    users = (
        user_toml("alice", keys=[alice_key])
        + user_toml("bob", keys=[bob_key], permissions='{ "/" = ["list", "download"], "/inbox" = ["*"] }',
                    filters='[{ path = "/", denied = ["*.hidden"], policy = "hide" },'
                            ' { path = "/vault", denied = ["*"], policy = "hide" }]')
    )
    d = module_daemons.start(users=users)
    root = module_daemons.root
    outside = root / "outside"
    home = d.home("alice")
    plant_hostile_home(home, outside, SECRET, MARKER)
    for f in ("secret.txt", "marker.txt"):
        # atime older than mtime: with relatime (or strictatime) any read moves atime
        os.utime(outside / f, (OLD, OLD + 100))
    os.symlink(str(home / "sub"), home / "abs_inside")  # absolute but inside: allowed
    bhome = d.home("bob")
    (bhome / "inbox").mkdir(parents=True)
    (bhome / "readme.txt").write_text("bob may only read this\n")
    (bhome / "notes.hidden").write_text("hidden from bob\n")
    (bhome / "vault").mkdir()
    (bhome / "vault" / "plans.txt").write_text("hidden from bob too\n")
    return d, outside


def _atime_is_tracked(tmp_dir) -> bool:
    probe = tmp_dir / "atime-probe"
    probe.write_bytes(b"x")
    os.utime(probe, (OLD, OLD + 100))
    probe.read_bytes()
    return probe.stat().st_atime != OLD


def _read_noatime(path) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOATIME)  # our own look must not count as a read
    try:
        return os.read(fd, 1 << 20)
    finally:
        os.close(fd)


def _snapshot(outside):
    out = {}
    for name in sorted(os.listdir(outside)):
        st = os.lstat(outside / name)
        out[name] = (st.st_mode, st.st_size, st.st_mtime, st.st_atime,
                     _read_noatime(outside / name) if stat.S_ISREG(st.st_mode) else None)
    return out


@pytest.fixture
def untouched(world, tmp_path):
    """Asserts after the test that nothing outside the home was read, written or created."""
    d, outside = world
    etc_before = set(os.listdir("/etc"))
    before = {n: v[:3] + (v[4],) for n, v in _snapshot(outside).items()}
    atimes = {n: v[3] for n, v in _snapshot(outside).items() if n in ("secret.txt", "marker.txt")}
    assert set(atimes.values()) == {OLD}
    yield d
    after = _snapshot(outside)
    assert {n: v[:3] + (v[4],) for n, v in after.items()} == before, "something outside the home changed"
    if _atime_is_tracked(tmp_path):
        assert {n: after[n][3] for n in atimes} == atimes, "a file outside the home was read"
    else:  # noatime mount: reads leave no trace; the content checks above still hold
        warnings.warn("filesystem does not record reads (noatime): 'not read' was not checked")
    assert set(os.listdir("/etc")) == etc_before


@pytest.fixture
def alice(world, alice_key):
    c = paramiko_client(world[0], "alice", key=alice_key)
    yield c
    close_client(c)


@pytest.fixture
def bob(world, bob_key):
    c = paramiko_client(world[0], "bob", key=bob_key)
    yield c
    close_client(c)


READ_CORPUS = [
    "../outside/secret.txt",
    "../../outside/secret.txt",
    "/../../outside/secret.txt",
    "sub/../../../outside/secret.txt",
    "../../../../../../../../etc/passwd",
    "/etc/passwd",
    "..%2f..%2foutside%2fsecret.txt",
    "%2e%2e/%2e%2e/outside/secret.txt",
    "..\\..\\outside\\secret.txt",
    "etc_link/passwd",
    "etc_link/../etc/passwd",
    "abs_out/secret.txt",
    "abs_out/marker.txt",
    "secret_link",
    "rel_out/secret.txt",
    "sub/rel_secret",
    "loop_a",
    "loop_a/x",
    ".scriptsftp-part-planted",
    "sub/../.scriptsftp-part-planted",
    "ok\x00/../../outside/secret.txt",
    "sub/inside.txt\x00.png",
    "a" * 256,
    "/".join(["sub"] * 1100) + "/x",
]


@pytest.mark.parametrize("path", READ_CORPUS, ids=[repr(p)[:40] for p in READ_CORPUS])
def test_read_corpus(untouched, alice, path):
    with pytest.raises(IOError):
        data = alice.open(path).read()
        assert SECRET not in data
    with pytest.raises(IOError):
        alice.stat(path)


def test_host_paths_are_not_even_guessable(world, untouched, alice):
    """The absolute host path of the secret, as a client would type it."""
    _, outside = world
    for path in (str(outside / "secret.txt"), str(outside), str(untouched.home("alice"))):
        with pytest.raises(IOError):
            alice.open(path).read()


@pytest.mark.parametrize("path", ["etc_link", "abs_out", "rel_out", "loop_a"])
def test_listing_through_outward_links_fails(untouched, alice, path):
    with pytest.raises(IOError):
        alice.listdir(path)


def test_outward_links_are_listed_but_readlink_does_not_leak(untouched, alice):
    names = alice.listdir("/")
    assert "etc_link" in names and "secret_link" in names
    assert not any(n.startswith(".scriptsftp-part-") for n in names)
    for link in ("etc_link", "abs_out", "secret_link", "rel_out", "sub/rel_secret"):
        with pytest.raises(IOError):
            alice.readlink(link)
    assert alice.readlink("abs_inside") == "/sub"  # a host path inside the home is shown virtual


def test_link_inside_the_home_works(untouched, alice):
    """Control: the same machinery follows links that stay inside the home."""
    assert alice.open("abs_inside/inside.txt").read() == b"inside\n"
    assert sorted(alice.listdir("abs_inside")) == ["inside.txt", "rel_secret"]


WRITE_CORPUS = [
    "../outside/evil.txt",
    "../../outside/evil.txt",
    "abs_out/evil.txt",
    "rel_out/evil.txt",
    "etc_link/evil.txt",
    "secret_link",
    "sub/rel_secret",
    ".scriptsftp-part-planted",
    ".scriptsftp-part-new",
    "loop_a",
    "evil\x00.txt",
    "x" * 256,
    "bad\nname",
]


@pytest.mark.parametrize("path", WRITE_CORPUS, ids=[repr(p)[:40] for p in WRITE_CORPUS])
def test_write_corpus(world, untouched, alice, path):
    home = untouched.home("alice")
    before = sorted(os.listdir(home))
    with pytest.raises(IOError):
        with alice.open(path, "w") as f:
            f.write(b"evil\n")
    ops = {"mkdir": lambda: alice.mkdir(path), "chmod": lambda: alice.chmod(path, 0o777),
           "utime": lambda: alice.utime(path, (0, 0)), "rename": lambda: alice.rename("sub/inside.txt", path)}
    if path not in ("secret_link", "sub/rel_secret", "loop_a"):  # removing a link inside the home is fine
        ops["remove"] = lambda: alice.remove(path)
    for name, op in ops.items():
        with pytest.raises(IOError):
            op()
            pytest.fail(f"{name} {path!r} succeeded")
    assert (home / "sub" / "inside.txt").read_text() == "inside\n"
    assert sorted(os.listdir(home)) == before
    assert (home / ".scriptsftp-part-planted").read_bytes() == b"staged bytes\n"
    assert not (world[1] / "evil.txt").exists()


def test_symlink_created_via_sftp_cannot_point_out(world, untouched, alice):
    home = untouched.home("alice")
    _, outside = world
    made = []
    for target, link in (("../../..", "up"), ("../../../outside/secret.txt", "sub/s1"),
                         (str(outside / "secret.txt"), "s2"), ("/etc", "etc2"), ("../" * 40 + "etc", "etc3")):
        alice.symlink(target, link)  # allowed: the target is read as a virtual path, clamped to the home
        made.append(link)
    for link in made:
        real = os.path.realpath(home / link)
        assert real == str(home) or real.startswith(str(home) + os.sep), (link, os.readlink(home / link))
    # none of them reaches anything outside
    for path in ("up/outside/secret.txt", "up/../outside/secret.txt", "sub/s1", "s2", "etc2/passwd", "etc3/passwd"):
        with pytest.raises(IOError):
            alice.open(path).read()
    assert sorted(alice.listdir("up")) == sorted(alice.listdir("/"))  # '../../..' is the home itself
    for link in made:
        alice.remove(link)


def test_openssh_batch_traversal(world, untouched, alice_key, tmp_path):
    """The same attempts typed into OpenSSH sftp; '-' keeps the batch going after each failure."""
    _, outside = world
    local = tmp_path / "local"
    local.mkdir()
    payload = tmp_path / "evil.txt"
    payload.write_text("evil\n")
    cmds = []
    for i, path in enumerate(["../../outside/secret.txt", "/etc/passwd", "etc_link/passwd", "abs_out/secret.txt",
                              "secret_link", "rel_out/marker.txt", str(outside / "secret.txt"),
                              ".scriptsftp-part-planted"]):
        cmds.append(f"-get {path} {local}/got{i}")
    for path in ("../../outside/evil.txt", "abs_out/evil.txt", "rel_out/evil.txt", ".scriptsftp-part-x"):
        cmds.append(f"-put {payload} {path}")
    cmds += ["cd ../../..", "pwd", "-ls ../outside", "-cd etc_link", "pwd", "-get -r abs_out " + str(local / "r")]
    proc = sftp_batch(untouched, "\n".join(cmds) + "\n", alice_key, timeout=60)
    assert proc.returncode == 0, proc.stderr  # only the pwd/cd lines must succeed
    assert proc.stdout.count("Remote working directory: /\n") == 2
    assert os.listdir(local) == []
    assert not (outside / "evil.txt").exists()


def test_curl_style_encoded_path_is_literal(untouched, alice):
    """Percent-encoding is a client-side matter: the server sees a literal name and it stays in the home."""
    with alice.open("%2e%2e%2fliteral", "w") as f:
        f.write(b"ok")
    assert (untouched.home("alice") / "%2e%2e%2fliteral").read_bytes() == b"ok"
    alice.remove("%2e%2e%2fliteral")


# --- permissions and filters cannot be dodged through links ----------------------------


def test_bob_cannot_reach_read_only_area_through_a_link(world, untouched, bob):
    """bob may create links in /inbox (he has '*' there); a link to '/' must not lend him
    /inbox's rights over the read-only top level."""
    bhome = untouched.home("bob")
    bob.symlink("..", "/inbox/top")
    try:
        assert "readme.txt" in bob.listdir("/inbox/top")  # reading is fine: bob may read /
        with pytest.raises(IOError):
            bob.remove("/inbox/top/readme.txt")
        with pytest.raises(IOError):
            with bob.open("/inbox/top/readme.txt", "w") as f:
                f.write(b"overwritten")
        with pytest.raises(IOError):
            with bob.open("/inbox/top/new.txt", "w") as f:
                f.write(b"new")
        with pytest.raises(IOError):
            bob.mkdir("/inbox/top/newdir")
        with pytest.raises(IOError):
            bob.rename("/inbox/top/readme.txt", "/inbox/stolen.txt")
        with pytest.raises(IOError):
            bob.chmod("/inbox/top/readme.txt", 0o600)
        assert (bhome / "readme.txt").read_text() == "bob may only read this\n"
        assert sorted(os.listdir(bhome)) == ["inbox", "notes.hidden", "readme.txt", "vault"]
    finally:
        bob.remove("/inbox/top")


def test_hidden_file_not_reachable_through_a_link(world, untouched, bob):
    bob.symlink("..", "/inbox/up")
    try:
        with pytest.raises(IOError):
            bob.symlink("../notes.hidden", "/inbox/direct")
        assert "notes.hidden" not in bob.listdir("/inbox/up")
        with pytest.raises(IOError):
            bob.open("/inbox/up/notes.hidden").read()
        with pytest.raises(IOError):
            bob.stat("/inbox/up/notes.hidden")
    finally:
        bob.remove("/inbox/up")


def test_directory_replaced_by_outward_link(world, untouched, alice):
    """A directory swapped for an outward symlink on the host: the next operations see the link and refuse."""
    home = untouched.home("alice")
    _, outside = world
    (home / "swap").mkdir()
    (home / "swap" / "secret.txt").write_text("harmless\n")
    assert alice.open("swap/secret.txt").read() == b"harmless\n"
    (home / "swap" / "secret.txt").unlink()
    (home / "swap").rmdir()
    os.symlink(str(outside), home / "swap")
    try:
        with pytest.raises(IOError):
            alice.open("swap/secret.txt").read()
        with pytest.raises(IOError):
            with alice.open("swap/evil.txt", "w") as f:
                f.write(b"x")
    finally:
        os.unlink(home / "swap")


def test_path_scoped_hide_filter_not_dodged_through_a_link(world, untouched, bob):
    """/vault hides everything in it; a link to /vault made in /inbox must not reveal it."""
    bob.symlink("../vault", "/inbox/v")
    try:
        assert bob.listdir("/inbox/v") == []
        for path in ("/inbox/v/plans.txt", "/vault/plans.txt"):
            with pytest.raises(IOError):
                bob.open(path).read()
            with pytest.raises(IOError):
                bob.stat(path)
    finally:
        bob.remove("/inbox/v")

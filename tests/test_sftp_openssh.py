"""OpenSSH `sftp -b` batch scripts against a real daemon: what users actually type.

One daemon serves the whole module (each test works in its own names); users:
alice may do everything, bob may read everywhere but write only under /inbox,
carol shows that the deepest configured directory wins, dave has filters.
"""

from __future__ import annotations

import os
import re
import stat

import pytest

from conftest import sftp_batch, user_toml

CAROL_PERMS = '{ "/" = ["*"], "/archive" = ["list", "download"], "/archive/drop" = ["list", "upload"] }'
DAVE_FILTERS = ('[{ path = "/", denied = ["*.secret"], policy = "hide" },'
                ' { path = "/", denied = ["*.tmp"], policy = "deny" }]')


@pytest.fixture(scope="module")
def d(module_daemons, alice_key, bob_key, stranger_key, rsa_key):
    users = (
        module_daemons.default_users()
        + user_toml("carol", keys=[stranger_key], permissions=CAROL_PERMS)
        + user_toml("dave", keys=[rsa_key], filters=DAVE_FILTERS)
    )
    daemon = module_daemons.start(users=users)
    for u in ("alice", "bob", "carol", "dave"):
        daemon.home(u).mkdir(parents=True, exist_ok=True)
    return daemon


def _data(n: int, seed: int = 0) -> bytes:
    return bytes((i * 31 + seed) % 251 for i in range(n))


def _run(d, commands: str, key, user="alice", **kw):
    return sftp_batch(d, commands, key, user, check=True, **kw)


def _fails(d, commands: str, key, user="alice"):
    proc = sftp_batch(d, commands, key, user)
    assert proc.returncode != 0, f"expected failure:\n{proc.stdout}\n{proc.stderr}"
    return proc


# --- the basic commands ---------------------------------------------------------------


def test_put_get_and_ls_l(d, alice_key, tmp_path):
    home = d.home("alice")
    src = tmp_path / "data.bin"
    src.write_bytes(_data(300_000))
    os.utime(src, (1_600_000_000, 1_600_000_000))
    proc = _run(d, f"mkdir tour\nput -p {src} tour/data.bin\nls -l tour\nget tour/data.bin {tmp_path / 'back.bin'}\n",
                alice_key)
    assert (home / "tour" / "data.bin").read_bytes() == src.read_bytes()
    assert (tmp_path / "back.bin").read_bytes() == src.read_bytes()
    # put -p carried the mtime through the staged upload
    assert int((home / "tour" / "data.bin").stat().st_mtime) == 1_600_000_000
    line = next(ln for ln in proc.stdout.splitlines() if ln.endswith("data.bin") and not ln.startswith("sftp>"))
    assert line.startswith("-rw-r--r--")
    assert " 300000 " in line
    assert not [n for n in os.listdir(home / "tour") if n.startswith(".scriptsftp-part-")]


def test_mkdir_rename_rm_rmdir(d, alice_key, tmp_path):
    home = d.home("alice")
    src = tmp_path / "f.txt"
    src.write_text("content\n")
    _run(d, f"mkdir ops\nmkdir ops/sub\nput {src} ops/sub/f.txt\nrename ops/sub/f.txt ops/g.txt\n"
            "rmdir ops/sub\n", alice_key)
    assert (home / "ops" / "g.txt").read_text() == "content\n"
    assert not (home / "ops" / "sub").exists()
    _run(d, "rm ops/g.txt\nrmdir ops\n", alice_key)
    assert not (home / "ops").exists()


@pytest.mark.parametrize("command,message", [
    ("rm nothing-here", "No such file or directory"),
    ("rmdir nothing-here", "No such file or directory"),
    ("get nothing-here", 'File "/nothing-here" not found'),  # OpenSSH globs get's argument
    ("mkdir no/such/parent", "No such file or directory"),
    ("rename nothing-here x", "No such file or directory"),
])
def test_failing_commands_report_status(d, alice_key, command, message, tmp_path):
    proc = _fails(d, command + "\n", alice_key)
    assert message in proc.stderr


def test_rmdir_non_empty_and_mkdir_existing_fail(d, alice_key, tmp_path):
    home = d.home("alice")
    (home / "full").mkdir()
    (home / "full" / "x").write_text("x")
    _fails(d, "rmdir full\n", alice_key)
    _fails(d, "mkdir full\n", alice_key)
    assert (home / "full" / "x").read_text() == "x"


def test_rename_over_existing_file_replaces_it(d, alice_key):
    """OpenSSH `rename` uses posix-rename@openssh.com when offered (as with OpenSSH's own server)."""
    home = d.home("alice")
    (home / "ren-a").write_text("new")
    (home / "ren-b").write_text("old")
    _run(d, "rename ren-a ren-b\n", alice_key)
    assert (home / "ren-b").read_text() == "new"
    assert not (home / "ren-a").exists()


def test_chmod(d, alice_key):
    home = d.home("alice")
    (home / "mode.txt").write_text("x")
    (home / "modedir").mkdir()
    _run(d, "chmod 600 mode.txt\nchmod 700 modedir\n", alice_key)
    assert stat.S_IMODE((home / "mode.txt").stat().st_mode) == 0o600
    assert stat.S_IMODE((home / "modedir").stat().st_mode) == 0o700
    # setuid/setgid/sticky bits are never set on the host
    _run(d, "chmod 4755 mode.txt\n", alice_key)
    assert stat.S_IMODE((home / "mode.txt").stat().st_mode) == 0o755


def test_symlink_inside_home(d, alice_key, tmp_path):
    home = d.home("alice")
    (home / "lnk").mkdir()
    (home / "lnk" / "target.txt").write_text("through the link\n")
    proc = _run(d, f"symlink target.txt lnk/alias\nls -l lnk\nget lnk/alias {tmp_path / 'a.txt'}\n", alice_key)
    assert (tmp_path / "a.txt").read_text() == "through the link\n"
    # stored as the place in the home, whatever the link's directory
    assert os.readlink(home / "lnk" / "alias") == os.path.join(os.path.realpath(home), "lnk", "target.txt")
    assert re.search(r"^l\S+ .* alias$", proc.stdout, re.M)


def test_df_matches_the_home_filesystem(d, alice_key):
    proc = _run(d, "df\n", alice_key)
    lines = [ln for ln in proc.stdout.splitlines() if not ln.startswith("sftp>")]
    assert lines[0].split() == ["Size", "Used", "Avail", "(root)", "%Capacity"]
    size, used, avail, root, _cap = lines[1].split()
    st = os.statvfs(d.home("alice"))
    assert int(size) == st.f_blocks * st.f_frsize // 1024
    # free space moves while the test runs: allow a little slack
    slack = 256 * 1024
    assert abs(int(avail) - st.f_bavail * st.f_frsize // 1024) < slack
    assert abs(int(root) - st.f_bfree * st.f_frsize // 1024) < slack
    assert abs(int(used) - (st.f_blocks - st.f_bfree) * st.f_frsize // 1024) < slack


def test_put_and_get_recursive(d, alice_key, tmp_path):
    tree = tmp_path / "tree"
    (tree / "a" / "b").mkdir(parents=True)
    (tree / "top.txt").write_text("top")
    (tree / "a" / "b" / "deep.bin").write_bytes(_data(70_000, 3))
    _run(d, f"put -r {tree} rtree\nget -r rtree {tmp_path / 'copy'}\n", alice_key)
    home = d.home("alice")
    assert (home / "rtree" / "a" / "b" / "deep.bin").read_bytes() == _data(70_000, 3)
    assert (tmp_path / "copy" / "top.txt").read_text() == "top"
    assert (tmp_path / "copy" / "a" / "b" / "deep.bin").read_bytes() == _data(70_000, 3)


# --- resume -------------------------------------------------------------------------------


def test_reput_resumes_where_the_server_copy_ends(d, alice_key, tmp_path):
    full = _data(1_000_000, 7)
    src = tmp_path / "resume.bin"
    src.write_bytes(full)
    home = d.home("alice")
    (home / "resume.bin").write_bytes(full[:400_000])
    mark = len(d.lines)
    _run(d, f"reput {src} resume.bin\n", alice_key)
    assert (home / "resume.bin").read_bytes() == full
    # only the missing part travelled
    m = d.wait_log(r"upload /resume\.bin ok bytes=(\d+) size=(\d+)", start=mark)
    assert (int(m.group(1)), int(m.group(2))) == (600_000, 1_000_000)


def test_reget_resumes_where_the_local_copy_ends(d, alice_key, tmp_path):
    full = _data(900_000, 11)
    (d.home("alice") / "reget.bin").write_bytes(full)
    dst = tmp_path / "reget.bin"
    dst.write_bytes(full[:250_000])
    mark = len(d.lines)
    _run(d, f"reget reget.bin {dst}\n", alice_key)
    assert dst.read_bytes() == full
    m = d.wait_log(r"download /reget\.bin ok bytes=(\d+)", start=mark)
    assert int(m.group(1)) == 650_000


# --- permissions ------------------------------------------------------------------------


def test_bob_reads_everywhere_writes_only_in_inbox(d, bob_key, tmp_path):
    home = d.home("bob")
    (home / "inbox").mkdir(exist_ok=True)
    (home / "readme.txt").write_text("read me\n")
    src = tmp_path / "up.txt"
    src.write_text("from bob\n")

    _run(d, f"get readme.txt {tmp_path / 'r.txt'}\nls /\n", bob_key, "bob")
    assert (tmp_path / "r.txt").read_text() == "read me\n"

    for cmd in (f"put {src} /up.txt", "mkdir /newdir", "rm /readme.txt", "rename /readme.txt /r2.txt",
                "chmod 600 /readme.txt", "symlink readme.txt /l"):
        proc = _fails(d, cmd + "\n", bob_key, "bob")
        assert "Permission denied" in proc.stderr, (cmd, proc.stderr)
    assert sorted(os.listdir(home)) == ["inbox", "readme.txt"]
    assert stat.S_IMODE((home / "readme.txt").stat().st_mode) == 0o644

    _run(d, f"put {src} /inbox/up.txt\nmkdir /inbox/sub\nrename /inbox/up.txt /inbox/sub/moved.txt\n",
         bob_key, "bob")
    assert (home / "inbox" / "sub" / "moved.txt").read_text() == "from bob\n"
    # moving out of the inbox needs rename where the target lives
    proc = _fails(d, "rename /inbox/sub/moved.txt /moved.txt\n", bob_key, "bob")
    assert "Permission denied" in proc.stderr
    _run(d, "rm /inbox/sub/moved.txt\nrmdir /inbox/sub\n", bob_key, "bob")
    assert os.listdir(home / "inbox") == []


def test_deepest_configured_directory_wins(d, stranger_key, tmp_path):
    home = d.home("carol")
    (home / "archive" / "drop").mkdir(parents=True, exist_ok=True)
    (home / "archive" / "old.txt").write_text("old")
    src = tmp_path / "f.txt"
    src.write_text("f")
    # "/" = ["*"] does not reach into /archive, which is read-only...
    proc = _fails(d, f"put {src} /archive/f.txt\n", stranger_key, "carol")
    assert "Permission denied" in proc.stderr
    _fails(d, "rm /archive/old.txt\n", stranger_key, "carol")
    _run(d, f"get /archive/old.txt {tmp_path / 'old.txt'}\n", stranger_key, "carol")
    # ...and /archive/drop may upload but not download
    _run(d, f"put {src} /archive/drop/f.txt\n", stranger_key, "carol")
    assert (home / "archive" / "drop" / "f.txt").read_text() == "f"
    proc = _fails(d, f"get /archive/drop/f.txt {tmp_path / 'no.txt'}\n", stranger_key, "carol")
    assert "Permission denied" in proc.stderr
    assert not (tmp_path / "no.txt").exists()
    # the top level still allows everything
    _run(d, f"put {src} /top.txt\nrm /top.txt\n", stranger_key, "carol")


def test_filters_hide_and_deny(d, rsa_key, tmp_path):
    home = d.home("dave")
    (home / "plan.secret").write_text("hidden")
    (home / "work.tmp").write_text("denied")
    (home / "ok.txt").write_text("fine")
    proc = _run(d, "ls -1\n", rsa_key, "dave")
    listed = [ln.strip() for ln in proc.stdout.splitlines() if not ln.startswith("sftp>")]
    assert "ok.txt" in listed and "work.tmp" in listed  # deny: visible
    assert "plan.secret" not in listed  # hide: invisible

    proc = _fails(d, f"get plan.secret {tmp_path / 's'}\n", rsa_key, "dave")
    assert 'File "/plan.secret" not found' in proc.stderr  # hidden looks absent
    # a denied name is listed, so its attributes are no secret; reading it is refused
    proc = _run(d, "ls -l work.tmp\n", rsa_key, "dave")
    assert re.search(r"^-\S+ .* work\.tmp$", proc.stdout, re.M)
    proc = _fails(d, f"get work.tmp {tmp_path / 't'}\n", rsa_key, "dave")
    assert "Permission denied" in proc.stderr
    assert not (tmp_path / "s").exists() and not (tmp_path / "t").exists()

    src = tmp_path / "x"
    src.write_text("overwrite attempt")
    _fails(d, f"put {src} plan.secret\n", rsa_key, "dave")
    _fails(d, f"put {src} new.tmp\n", rsa_key, "dave")
    _fails(d, "rm work.tmp\n", rsa_key, "dave")
    _fails(d, "rename ok.txt sneaky.secret\n", rsa_key, "dave")
    _fails(d, "rename ok.txt sneaky.tmp\n", rsa_key, "dave")
    assert (home / "plan.secret").read_text() == "hidden"
    assert (home / "work.tmp").read_text() == "denied"
    assert sorted(os.listdir(home)) == ["ok.txt", "plan.secret", "work.tmp"]
    # patterns are case-insensitive
    (home / "LOUD.SECRET").write_text("x")
    proc = _run(d, "ls -1\n", rsa_key, "dave")
    assert "LOUD.SECRET" not in proc.stdout

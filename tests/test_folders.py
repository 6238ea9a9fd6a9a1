"""Virtual folders end to end: a real daemon, real clients, a folder mounted in two users' trees.

``team`` (``srv/folders/team``) is mounted by alice at ``/shared`` (every permission, from the
folder's own entry) and by bob at ``/team`` (his own entry there: list and download only).
``hostile`` (``srv/folders/hostile``) is mounted by alice at ``/h`` and holds the links the
traversal suites plant in a home (absolute and relative links out, a loop, a staging-named
file); their attack corpus runs through it, and nothing outside the folder's root may be
read, written or created. A recording script logs every file event with its ``folder``.
"""

from __future__ import annotations

import ftplib
import io
import os
import re
import subprocess
import uuid
from pathlib import Path

import pytest

from conftest import (
    ALICE_PASSWORD, BOB_PASSWORD, SSH_OPTS, close_client, paramiko_client, plant_hostile_home, require_tool,
    sftp_batch, sftp_put, user_toml,
)
from httpkit import HTTP_EXTRA, curl, request
from test_http_traversal import READ_CORPUS as HTTP_READ_CORPUS
from test_http_traversal import WRITE_CORPUS as HTTP_WRITE_CORPUS
from test_traversal import READ_CORPUS, WRITE_CORPUS

SECRET = b"TOP-SECRET-beside-the-folder-9d1\n"
MARKER = b"marker: must stay exactly like this\n"
STAGING = ".scriptsftp-part-"

RECORD = """
def record(event, api):
    api.log("EV " + event.name + " " + event.path + " folder=" + repr(event.folder))
"""
RECORDED = ("pre-upload", "post-upload", "pre-download", "post-rename", "post-mkdir", "post-rmdir", "post-delete")

FOLDERS = """
[[folders]]
name = "team"
path = "folders/team"
permissions = { "/" = ["*"] }
description = "shared by alice and bob"

[[folders]]
name = "hostile"
path = "folders/hostile"
permissions = { "/" = ["*"] }
"""
FTP = '\n[ftp]\nenabled = true\nlisten = "127.0.0.1:0"\npassive_ports = ""\n'


@pytest.fixture(scope="module")
def world(module_daemons, alice_key, bob_key, password_hashes):
    root = module_daemons.root
    outside = root / "folders" / "outside"  # beside the folder roots, as the traversal suites have it
    (root / "folders").mkdir()
    plant_hostile_home(root / "folders" / "hostile", outside, SECRET, MARKER)
    os.symlink(str(root / "folders" / "hostile" / "sub"), root / "folders" / "hostile" / "abs_inside")
    (root / "folders" / "team").mkdir()
    (root / "scripts").mkdir(parents=True, exist_ok=True)
    (root / "scripts" / "rec.py").write_text(RECORD)
    binds = "".join(f'\n[[bindings]]\nevent = "{e}"\nscript = "rec.py"\nfunction = "record"\n' for e in RECORDED)
    users = (
        user_toml("alice", keys=[alice_key], password_hash=password_hashes["alice"],
                  folders='{ "/shared" = "team", "/h" = "hostile" }')
        + user_toml("bob", keys=[bob_key], password_hash=password_hashes["bob"],
                    permissions='{ "/" = ["*"], "/team" = ["list", "download"] }', folders='{ "/team" = "team" }')
    )
    d = module_daemons.start(binds + FTP + "\n" + HTTP_EXTRA + FOLDERS, users=users)
    return d, root / "folders" / "team", root / "folders" / "hostile", outside


@pytest.fixture
def d(world):
    return world[0]


@pytest.fixture
def team(world) -> Path:
    return world[1]


def fresh() -> str:
    return "t-" + uuid.uuid4().hex[:8]


def folder_events(d, start: int) -> list[tuple[str, str, str]]:
    """(event, path, folder) the recording script logged since ``start``."""
    with d._cond:
        lines = d.lines[start:]
    return [(m[1], m[2], m[3]) for line in lines if (m := re.search(r"rec\.py: EV (\S+) (\S+) folder='([^']*)'", line))]


def wait_event(d, start: int, name: str, path: str) -> None:
    d.wait_log(rf"rec\.py: EV {re.escape(name)} {re.escape(path)} folder=", start=start, timeout=30)


# --- each protocol in a folder ------------------------------------------------------------------


def test_openssh_sftp_in_a_folder(d, team, alice_key, tmp_path):
    require_tool("sftp")
    name = fresh()
    src = tmp_path / "up.bin"
    src.write_bytes(os.urandom(200_000))
    mark = len(d.lines)
    proc = sftp_batch(d, f"ls -l /\nmkdir /shared/{name}\nput {src} /shared/{name}/up.bin\n"
                         f"rename /shared/{name}/up.bin /shared/{name}/moved.bin\n"
                         f"get /shared/{name}/moved.bin {tmp_path}/back.bin\nls /shared/{name}\n"
                         f"-rename /shared/{name}/moved.bin /escaped.bin\n-rmdir /shared\n-rename /shared /gone\n",
                      alice_key, check=True)
    assert re.search(r"^d\S+ .* shared$", proc.stdout, re.M), proc.stdout  # the mount point, a directory
    assert (team / name / "moved.bin").read_bytes() == src.read_bytes()
    assert (tmp_path / "back.bin").read_bytes() == src.read_bytes()
    assert not (d.home("alice") / "escaped.bin").exists() and not (d.home("alice") / "shared").exists()
    assert team.is_dir() and not any(p.name.startswith(STAGING) for p in team.rglob("*"))
    # OpenSSH prints its own text for the status (the reason is in the reply, and the log)
    assert proc.stderr.count("Permission denied") == 3, proc.stderr
    d.wait_log(rf"rename /shared/{name}/moved\.bin denied .*across a virtual folder boundary", start=mark)
    d.wait_log(r"rmdir /shared denied .*a virtual folder is mounted here; it cannot be removed", start=mark)
    wait_event(d, mark, "post-upload", f"/shared/{name}/up.bin")
    seen = folder_events(d, mark)
    assert ("post-upload", f"/shared/{name}/up.bin", "team") in seen
    assert ("post-rename", f"/shared/{name}/up.bin", "team") in seen
    assert ("post-mkdir", f"/shared/{name}", "team") in seen


@pytest.mark.parametrize("legacy", [True, False], ids=["scp-O", "scp-sftp"])
def test_scp_into_and_out_of_a_folder(d, team, alice_key, tmp_path, legacy):
    require_tool("scp")
    src = tmp_path / "s.bin"
    src.write_bytes(os.urandom(70_000))
    target = f"/shared/{fresh()}.bin"

    def scp(*args: str) -> None:
        proc = subprocess.run(["scp", *(["-O"] if legacy else []), "-i", str(alice_key.private), "-P", str(d.port),
                               *SSH_OPTS, *args], text=True, capture_output=True, timeout=60)
        assert proc.returncode == 0, proc.stderr + d.log_text()[-2000:]

    scp(str(src), f"alice@127.0.0.1:{target}")
    assert (team / target.removeprefix("/shared/")).read_bytes() == src.read_bytes()
    scp(f"alice@127.0.0.1:{target}", str(tmp_path / "back.bin"))
    assert (tmp_path / "back.bin").read_bytes() == src.read_bytes()


def test_ftp_in_a_folder(d, team):
    name = fresh()
    c = ftplib.FTP()
    c.connect("127.0.0.1", d.ports["ftp"], timeout=30)
    c.login("alice", ALICE_PASSWORD)
    try:
        top = dict(c.mlsd("/"))
        assert top["shared"]["type"] == "dir" and top["h"]["type"] == "dir"
        c.mkd(f"/shared/{name}")
        c.storbinary(f"STOR /shared/{name}/f.txt", io.BytesIO(b"over ftp"))
        got = bytearray()
        c.retrbinary(f"RETR /shared/{name}/f.txt", got.extend)
        assert bytes(got) == b"over ftp"
        with pytest.raises(ftplib.error_perm, match=r"^550 .*across a virtual folder boundary"):
            c.rename(f"/shared/{name}/f.txt", "/f.txt")
        with pytest.raises(ftplib.error_perm, match=r"^550 .*virtual folder"):
            c.rmd("/shared")
        c.cwd("/shared")
        assert f"{name}" in c.nlst()
    finally:
        c.quit()
    assert (team / name / "f.txt").read_bytes() == b"over ftp"
    assert not (d.home("alice") / "f.txt").exists()


def test_http_and_webdav_in_a_folder(d, team):
    name = fresh()
    assert curl(d, f"/shared/{name}", "-X", "MKCOL").status == 201
    r = request(d, "PUT", f"/shared/{name}/w.txt", b"over http")
    assert r.status in (201, 204), r.text
    assert curl(d, f"/shared/{name}/w.txt").body == b"over http"
    r = request(d, "PROPFIND", "/", headers={"Depth": "1"})
    assert r.status == 207 and b"/shared/" in r.body
    r = request(d, "MOVE", f"/shared/{name}/w.txt", headers={"Destination": "/w.txt"})
    assert r.status == 403 and b"virtual folder boundary" in r.body, (r.status, r.body)
    r = request(d, "COPY", f"/shared/{name}/w.txt", headers={"Destination": f"/shared/{name}/c.txt"})
    assert r.status == 201, (r.status, r.body)
    r = request(d, "DELETE", "/shared")  # refused before anything in it goes (it would empty it for everyone)
    assert r.status == 403 and b"virtual folder" in r.body, (r.status, r.body)
    r = request(d, "MOVE", f"/shared/{name}/c.txt", headers={"Destination": "/shared", "Overwrite": "T"})
    assert r.status == 403, (r.status, r.body)
    assert (team / name / "w.txt").read_bytes() == b"over http"
    assert (team / name / "c.txt").read_bytes() == b"over http"
    assert not (d.home("alice") / "w.txt").exists()


def test_client_killed_mid_upload_in_a_folder_leaves_the_old_version(d, team, alice_key):
    name = f"{fresh()}.bin"
    (team / name).write_bytes(b"version 1")
    client = paramiko_client(d, "alice", key=alice_key)
    mark = len(d.lines)
    f = client.open(f"/shared/{name}", "w")
    f.write(os.urandom(300_000))
    f.flush()
    client.get_channel().get_transport().close()  # gone mid-upload, no CLOSE
    d.wait_log(rf"upload /shared/{re.escape(name)} aborted", start=mark, timeout=30)
    assert (team / name).read_bytes() == b"version 1"
    assert not any(p.name.startswith(STAGING) for p in team.iterdir())


# --- shared between users ----------------------------------------------------------------------------


def test_two_users_share_a_folder_each_with_the_permissions_of_their_mount(d, team, alice_key, bob_key):
    name = f"{fresh()}.txt"
    alice = paramiko_client(d, "alice", key=alice_key)
    bob = paramiko_client(d, "bob", key=bob_key)
    try:
        sftp_put(alice, f"/shared/{name}", b"from alice")
        assert name in bob.listdir("/team")
        with bob.open(f"/team/{name}") as f:
            assert f.read() == b"from alice"
        with pytest.raises(PermissionError):
            sftp_put(bob, f"/team/{name}", b"bob may not write here")
        with pytest.raises(PermissionError):
            bob.remove(f"/team/{name}")
        # bob's home is his own: the folder's files are not in it
        assert "team" in bob.listdir("/") and name not in bob.listdir("/")
    finally:
        close_client(alice)
        close_client(bob)
    assert (team / name).read_bytes() == b"from alice"
    # and over FTP with bob's password: the same answer
    c = ftplib.FTP()
    c.connect("127.0.0.1", d.ports["ftp"], timeout=30)
    c.login("bob", BOB_PASSWORD)
    try:
        with pytest.raises(ftplib.error_perm, match="^550"):
            c.storbinary(f"STOR /team/{name}", io.BytesIO(b"no"))
    finally:
        c.quit()


def test_events_carry_the_folder_and_an_empty_one_in_the_home(d, alice_key):
    name = fresh()
    client = paramiko_client(d, "alice", key=alice_key)
    mark = len(d.lines)
    try:
        sftp_put(client, f"/shared/{name}.txt", b"x")
        sftp_put(client, f"/{name}.txt", b"y")
        client.open(f"/shared/{name}.txt").read()
        client.remove(f"/shared/{name}.txt")
    finally:
        close_client(client)
    wait_event(d, mark, "post-delete", f"/shared/{name}.txt")
    wait_event(d, mark, "post-upload", f"/{name}.txt")
    seen = folder_events(d, mark)
    assert ("pre-upload", f"/shared/{name}.txt", "team") in seen
    assert ("post-upload", f"/shared/{name}.txt", "team") in seen
    assert ("post-delete", f"/shared/{name}.txt", "team") in seen
    assert ("pre-download", f"/shared/{name}.txt", "team") in seen
    assert ("post-upload", f"/{name}.txt", "") in seen


# --- the attack corpus, through a folder ----------------------------------------------------------------


def _snapshot(directory: Path) -> dict[str, tuple]:
    out = {}
    for p in [directory, *sorted(directory.rglob("*"))]:
        st = p.lstat()
        data = p.read_bytes() if p.is_file() and not p.is_symlink() else None
        out[str(p)] = (st.st_mode, st.st_size, st.st_mtime_ns, data)
    return out


@pytest.fixture
def untouched(world):
    """Nothing beside the folder changes, the folder's planted entries stay as they were,
    nothing new appears in /etc or alice's home."""
    d, _team, hostile, outside = world
    before = _snapshot(outside)
    planted = {n: os.lstat(hostile / n).st_ino for n in os.listdir(hostile)}
    home_before = sorted(os.listdir(d.home("alice"))) if d.home("alice").exists() else []
    etc_before = set(os.listdir("/etc"))
    yield d
    assert _snapshot(outside) == before, "something beside the folder changed"
    assert {n: os.lstat(hostile / n).st_ino for n in os.listdir(hostile)} == planted
    assert (hostile / ".scriptsftp-part-planted").read_bytes() == b"staged bytes\n"
    assert (hostile / "sub" / "inside.txt").read_text() == "inside\n"
    assert set(os.listdir("/etc")) == etc_before
    assert not (d.home("alice") / "evil.txt").exists()
    assert sorted(os.listdir(d.home("alice"))) == home_before


def through_folder(path: str) -> str:
    """A corpus path as seen from the folder: '/x' becomes '/h/x', 'x' becomes 'h/x'."""
    return "/h" + path if path.startswith("/") else "h/" + path


@pytest.fixture
def alice(world, alice_key):
    c = paramiko_client(world[0], "alice", key=alice_key)
    yield c
    close_client(c)


@pytest.mark.parametrize("path", READ_CORPUS, ids=[repr(p)[:40] for p in READ_CORPUS])
def test_read_corpus_through_a_folder(untouched, alice, path):
    with pytest.raises(IOError):
        data = alice.open(through_folder(path)).read()
        assert SECRET not in data
    with pytest.raises(IOError):
        alice.stat(through_folder(path))


@pytest.mark.parametrize("path", WRITE_CORPUS, ids=[repr(p)[:40] for p in WRITE_CORPUS])
def test_write_corpus_through_a_folder(world, untouched, alice, path):
    hostile, outside = world[2], world[3]
    target = through_folder(path)
    with pytest.raises(IOError):
        with alice.open(target, "w") as f:
            f.write(b"evil\n")
    ops = {"mkdir": lambda: alice.mkdir(target), "chmod": lambda: alice.chmod(target, 0o777),
           "utime": lambda: alice.utime(target, (0, 0)), "rename": lambda: alice.rename("h/sub/inside.txt", target)}
    if path not in ("secret_link", "sub/rel_secret", "loop_a"):  # removing a link inside the folder is fine
        ops["remove"] = lambda: alice.remove(target)
    for name, op in ops.items():
        with pytest.raises(IOError):
            op()
            pytest.fail(f"{name} {target!r} succeeded")
    assert not (outside / "evil.txt").exists() and not (hostile.parent / "evil.txt").exists()


def test_links_in_a_folder_stay_in_the_folder(untouched, alice):
    assert alice.open("/h/abs_inside/inside.txt").read() == b"inside\n"
    assert alice.readlink("/h/abs_inside") == "/h/sub"
    for link in ("etc_link", "abs_out", "secret_link", "rel_out", "sub/rel_secret"):
        with pytest.raises(IOError):
            alice.readlink(f"/h/{link}")
    with pytest.raises(PermissionError, match="boundary"):
        alice.symlink("/etc", "/h/etc2")  # a virtual target in the home: across the boundary
    for path in ("/h/etc_link", "/h/abs_out", "/h/rel_out", "/h/loop_a"):
        with pytest.raises(IOError):
            alice.listdir(path)


@pytest.mark.parametrize("path", HTTP_READ_CORPUS, ids=[repr(p)[:40] for p in HTTP_READ_CORPUS])
def test_http_read_corpus_through_a_folder(untouched, path):
    target = path if not path.startswith("/") or "://" in path else "/h" + path
    for method, headers in (("GET", {}), ("PROPFIND", {"Depth": "1"})):
        r = request(untouched, method, target, headers=headers)
        assert r.status >= 400, (method, target, r.status, r.body[:200])
        assert SECRET.strip() not in r.body


@pytest.mark.parametrize("path", HTTP_WRITE_CORPUS, ids=[repr(p)[:40] for p in HTTP_WRITE_CORPUS])
def test_http_write_corpus_through_a_folder(world, untouched, path):
    d, outside = world[0], world[3]
    target = "/h" + path
    links = ("/secret_link", "/sub/rel_secret", "/loop_a")
    attempts = [("PUT", target, b"evil\n", {}), ("MKCOL", target, None, {}),
                ("COPY", "/h/sub/inside.txt", None, {"Destination": target}),
                ("MOVE", "/h/sub/inside.txt", None, {"Destination": target, "Overwrite": "F" if path in links else "T"})]
    if path not in links:
        attempts.append(("DELETE", target, None, {}))
    for method, where, body, headers in attempts:
        r = request(d, method, where, body, headers)
        assert r.status >= 400, (method, where, headers, r.status, r.body[:200])
    assert not (outside / "evil.txt").exists()


# --- a folder from the account database -----------------------------------------------------------------


def test_a_folder_in_the_database_is_mounted_at_the_next_login(daemons, alice_key):
    """Made while the daemon runs (as `scriptsftp folder add` and `user add` would): no reload."""
    from scriptsftp.server.stores.accounts_db import AccountDb
    from scriptsftp.server.stores.sql import SqliteDatabase
    from scriptsftp.server.support.config import Folder, User

    d = daemons.start()
    drop = daemons.root / "drop"
    db = AccountDb(SqliteDatabase(daemons.root / "state" / "accounts.sqlite3"))
    try:
        db.add_folder(Folder(name="drop", path=str(drop), permissions={"/": ["list", "upload"]}), "test")
        db.add_user(User.model_validate({"name": "carol", "home": str(daemons.root / "homes" / "carol"),
                                         "public_keys": [alice_key.public_line], "permissions": {"/": ["*"]},
                                         "folders": {"/drop": "drop"}}, strict=False), "test")
        carol = paramiko_client(d, "carol", key=alice_key)
        try:
            assert "drop" in carol.listdir("/")
            sftp_put(carol, "/drop/in.csv", b"1,2\n")
            with pytest.raises(PermissionError):
                carol.open("/drop/in.csv").read()  # the folder's permissions: upload, no download
        finally:
            close_client(carol)
    finally:
        db.close()
    assert (drop / "in.csv").read_bytes() == b"1,2\n"


# --- staging, async checks, a crash, quarantine and api.fs in a folder ----------------------------------

CHECK = """
import time

HOLD = {hold}

def on_pre_publish(event, api):
    end = time.time() + HOLD
    while time.time() < end:
        pass
    if b"VIRUS" in api.file.read(65536):
        api.veto("infected: " + event.path)

def on_post_upload(event, api):
    if not event.path.endswith(".in"):
        return
    api.fs.copy(event.path, event.path + ".copy")
    try:
        api.fs.move(event.path, "/moved-out.txt")
    except PermissionError as exc:
        api.log("move refused: " + str(exc))
"""


def _checked_daemon(daemons, alice_key, bob_key, mode: str, hold: float, uploads: str = ""):
    (daemons.root / "scripts").mkdir(parents=True, exist_ok=True)
    (daemons.root / "scripts" / "check.py").write_text(CHECK.format(hold=hold))
    binds = f"""
[[bindings]]
event = "pre-publish"
script = "check.py"
mode = "{mode}"
allow = ["read"]
timeout = {hold + 20}
cpu_time = {hold + 10}

[[bindings]]
event = "post-upload"
script = "check.py"
allow = ["fs"]
"""
    users = (user_toml("alice", keys=[alice_key], folders='{ "/shared" = "team" }')
             + user_toml("bob", keys=[bob_key], folders='{ "/team" = "team" }'))
    folders = '\n[[folders]]\nname = "team"\npath = "folders/team"\npermissions = { "/" = ["*"] }\n'
    return daemons.start(binds + (f"\n[uploads]\n{uploads}\n" if uploads else "") + folders, users=users)


def _staged(directory: Path) -> list[str]:
    return [n for n in os.listdir(directory) if n.startswith(STAGING)] if directory.exists() else []


def test_async_check_in_a_folder_is_pending_for_every_user_and_rechecked_after_a_crash(daemons, alice_key, bob_key):
    d = _checked_daemon(daemons, alice_key, bob_key, "async", hold=30.0)  # no verdict in this run
    team = daemons.root / "folders" / "team"
    alice = paramiko_client(d, "alice", key=alice_key)
    bob = paramiko_client(d, "bob", key=bob_key)
    try:
        mark = len(d.lines)
        sftp_put(alice, "/shared/late.txt", b"clean data\n")  # answered before the verdict
        d.wait_log(r"publish /shared/late\.txt checking", start=mark)
        # pending in the folder, for bob as well: its size shows, its bytes do not
        assert bob.stat("/team/late.txt").st_size == len(b"clean data\n")
        assert "late.txt" in bob.listdir("/team")
        with pytest.raises(FileNotFoundError):
            bob.open("/team/late.txt").read()
        with pytest.raises(PermissionError, match="still being checked"):
            sftp_put(bob, "/team/late.txt", b"bob's")
    finally:
        d.kill()
        for c in (alice, bob):
            c.get_channel().get_transport().close()
    assert not (team / "late.txt").exists() and len(_staged(team)) == 1  # staged in the folder ...
    assert _staged(d.home("alice")) == []  # ... never in the home
    (daemons.root / "scripts" / "check.py").write_text(CHECK.format(hold=0.0))
    d2 = daemons.start(config=d.config)
    d2.wait_log(r"checking again 1 upload\(s\)")
    d2.wait_log(r"publish /shared/late\.txt ok", timeout=60)
    assert (team / "late.txt").read_bytes() == b"clean data\n"
    assert _staged(team) == []


def test_vetoed_upload_in_a_folder_goes_to_quarantine(daemons, alice_key, bob_key):
    d = _checked_daemon(daemons, alice_key, bob_key, "sync", hold=0.0, uploads='quarantine = "quarantine"')
    team = daemons.root / "folders" / "team"
    alice = paramiko_client(d, "alice", key=alice_key)
    try:
        with pytest.raises(PermissionError, match="infected: /shared/bad.txt"):
            sftp_put(alice, "/shared/bad.txt", b"VIRUS inside")
    finally:
        close_client(alice)
    assert not (team / "bad.txt").exists() and _staged(team) == []
    [kept] = os.listdir(daemons.root / "quarantine" / "alice")
    assert (daemons.root / "quarantine" / "alice" / kept).read_bytes() == b"VIRUS inside"


def test_api_fs_works_in_a_folder_and_stops_at_its_boundary(daemons, alice_key, bob_key):
    d = _checked_daemon(daemons, alice_key, bob_key, "sync", hold=0.0)
    team = daemons.root / "folders" / "team"
    alice = paramiko_client(d, "alice", key=alice_key)
    mark = len(d.lines)
    try:
        sftp_put(alice, "/shared/report.in", b"payload")
    finally:
        close_client(alice)
    d.wait_log(r"check\.py: move refused: .*across a virtual folder boundary", start=mark, timeout=30)
    assert (team / "report.in.copy").read_bytes() == b"payload"  # a copy inside the folder
    assert (team / "report.in").read_bytes() == b"payload"  # the move out was refused
    assert not (d.home("alice") / "moved-out.txt").exists()

"""api.fs: the event user's files through a Session (same confinement and permissions
as the user), no recursive events, every change logged with the script's name; fs_admin."""

from __future__ import annotations

import io
import os

import pytest

from conftest import DaemonFactory, close_client, paramiko_client
from test_scripting import binding, write_script


def upload(d, path: str, data: bytes, key, user: str = "alice") -> None:
    client = paramiko_client(d, user, key=key)
    try:
        client.putfo(io.BytesIO(data), path, confirm=False)
    finally:
        close_client(client)


# Scripts log each attempt's outcome (the exception's kind) instead of stopping at the first.
ATTEMPT = """
KINDS = [(FileNotFoundError, "FileNotFoundError"), (FileExistsError, "FileExistsError"),
         (PermissionError, "PermissionError"), (IsADirectoryError, "IsADirectoryError"),
         (NotADirectoryError, "NotADirectoryError"), (ValueError, "ValueError"),
         (TypeError, "TypeError"), (Exception, "Exception")]

def kind(e):
    for cls, name in KINDS:
        if isinstance(e, cls):
            return name

def attempt(api, label, fn, *args):
    try:
        value = fn(*args)
    except Exception as e:
        api.log(label, outcome=kind(e), error=str(e))
        return None
    api.log(label, outcome="ok", value=value)
    return value
"""

FS_SCRIPT = ATTEMPT + """
def on_post_upload(event, api):
    fs = api.fs
    name = event.path.split("/")[-1]
    attempt(api, "mkdir", fs.mkdir, "/archive/2026/11")
    attempt(api, "mkdir-again", fs.mkdir, "/archive/2026/11")
    attempt(api, "copy", fs.copy, event.path, "/archive/2026/11/copy-" + name)
    attempt(api, "copy-exists", fs.copy, event.path, "/archive/2026/11/copy-" + name)
    attempt(api, "move", fs.move, event.path, "/archive/2026/11/" + name)
    st = fs.stat("/archive/2026/11/" + name)
    api.log("stat", size=st.size, is_file=st.is_file, is_dir=st.is_dir)
    attempt(api, "exists-old", fs.exists, event.path)
    attempt(api, "exists-new", fs.exists, "/archive/2026/11/" + name)
    attempt(api, "listdir", fs.listdir, "/archive/2026/11")
    attempt(api, "read", fs.read_text, "/archive/2026/11/" + name, 100)
    attempt(api, "read-small", fs.read_text, "/archive/2026/11/" + name, 3)
    attempt(api, "write", fs.write_text, "/archive/2026/11/note.txt", "noted " + name)
    attempt(api, "remove", fs.remove, "/archive/2026/11/copy-" + name)
    attempt(api, "dotdot", fs.read_text, "../../../../../../etc/passwd", 100000)
    attempt(api, "absolute", fs.read_text, "/etc/passwd", 100000)
    attempt(api, "symlink-out", fs.read_text, "/escape/passwd", 100000)
    attempt(api, "symlink-list", fs.listdir, "/escape")
    attempt(api, "staging-name", fs.exists, "/.scriptsftp-part-x")
    attempt(api, "admin-ungranted", fs.exists, "admin:/x")
"""

BOB_SCRIPT = ATTEMPT + """
def on_post_upload(event, api):
    attempt(api, "bob-write-root", api.fs.write_text, "/notes.txt", "x")
    attempt(api, "bob-remove-root", api.fs.remove, "/readonly.txt")
    attempt(api, "bob-move-out", api.fs.move, event.path, "/moved.txt")
    attempt(api, "bob-mkdir-inbox", api.fs.mkdir, "/inbox/sub")
    attempt(api, "bob-read-root", api.fs.read_text, "/readonly.txt", 100)
"""


@pytest.fixture
def fs_daemon(daemons: DaemonFactory):
    write_script(daemons, "mover.py", FS_SCRIPT)
    write_script(daemons, "bobfs.py", BOB_SCRIPT)
    write_script(daemons, "nofs.py", """
        def on_post_upload(event, api):
            try:
                api.fs.exists("/")
            except PermissionError as e:
                api.log("not granted", error=str(e))
    """)
    write_script(daemons, "vetoall.py", """
        def on_pre_mkdir(event, api):
            api.veto("no mkdir")
        def on_pre_rename(event, api):
            api.veto("no rename")
        def on_pre_delete(event, api):
            api.veto("no delete")
        def on_pre_upload(event, api):
            if event.path.startswith("/archive"):
                api.veto("no upload into archive")
    """)
    extra = (binding("post-upload", "mover.py", allow=["fs"], users=["alice"], paths=["/in/*"], timeout=20)
             + binding("post-upload", "bobfs.py", allow=["fs"], users=["bob"], timeout=20)
             + binding("post-upload", "nofs.py", users=["alice"], paths=["/plain/*"])
             + binding("pre-mkdir", "vetoall.py") + binding("pre-rename", "vetoall.py")
             + binding("pre-delete", "vetoall.py") + binding("pre-upload", "vetoall.py"))
    d = daemons.start(extra)
    home = d.home("alice")
    (home / "in").mkdir(parents=True, exist_ok=True)
    (home / "plain").mkdir(parents=True, exist_ok=True)
    os.symlink("/etc", home / "escape")
    bob = d.home("bob")
    (bob / "inbox").mkdir(parents=True, exist_ok=True)
    (bob / "readonly.txt").write_text("read me")
    return d


def outcome(d, label: str) -> str:
    m = d.wait_log(rf"mover\.py: {label} outcome=(\S+)", timeout=30)
    return m.group(1)


def test_fs_operations_confinement_and_no_recursive_events(fs_daemon, alice_key):
    d = fs_daemon
    upload(d, "/in/inv.pdf", b"%PDF-1.4 invoice", alice_key)
    d.wait_log(r"mover\.py: admin-ungranted", timeout=30)
    # the script's changes raised no pre-events (vetoall.py would have refused each one)
    for label in ("mkdir", "mkdir-again", "copy", "move", "write", "remove"):
        assert outcome(d, label) == "ok", d.log_text()[-4000:]
    assert outcome(d, "copy-exists") == "FileExistsError"
    home = d.home("alice")
    assert (home / "archive/2026/11/inv.pdf").read_bytes() == b"%PDF-1.4 invoice"
    assert not (home / "in/inv.pdf").exists()
    assert not (home / "archive/2026/11/copy-inv.pdf").exists()
    assert (home / "archive/2026/11/note.txt").read_text() == "noted inv.pdf"
    log = d.log_text()
    assert "mover.py: stat size=16 is_file=True is_dir=False" in log
    assert "mover.py: exists-old outcome=ok value=False" in log
    assert "mover.py: exists-new outcome=ok value=True" in log
    assert "mover.py: listdir outcome=ok value=['copy-inv.pdf', 'inv.pdf']" in log
    assert "mover.py: read outcome=ok value=%PDF-1.4 invoice" in log
    assert outcome(d, "read-small") == "ValueError"
    # confinement: the home is "/", ".." stops there, links out are refused
    for label in ("dotdot", "absolute", "symlink-out", "symlink-list"):
        assert outcome(d, label) in ("FileNotFoundError", "PermissionError"), label
    assert "root:" not in log
    assert outcome(d, "staging-name") in ("FileNotFoundError", "ok")
    assert "mover.py: staging-name outcome=ok value=True" not in log
    m = d.wait_log(r"mover\.py: admin-ungranted outcome=PermissionError error=.*")
    assert "'fs_admin' is not granted" in m.group(0)
    # every change is logged by the Session with the script's name
    assert "rename /in/inv.pdf ok" in log and "script=mover.py" in log
    assert any("mkdir /archive" in line and "script=mover.py" in line for line in log.splitlines())
    assert any("delete /archive/2026/11/copy-inv.pdf ok" in line and "script=mover.py" in line
               for line in log.splitlines())
    assert "vetoed" not in log


def test_fs_has_exactly_the_users_permissions(fs_daemon, bob_key):
    d = fs_daemon
    upload(d, "/inbox/b.txt", b"bob", bob_key, user="bob")
    d.wait_log(r"bobfs\.py: bob-read-root", timeout=30)
    log = d.log_text()
    assert "bobfs.py: bob-write-root outcome=PermissionError" in log
    assert "bobfs.py: bob-remove-root outcome=PermissionError" in log
    assert "bobfs.py: bob-move-out outcome=PermissionError" in log
    assert "bobfs.py: bob-mkdir-inbox outcome=ok" in log
    assert "bobfs.py: bob-read-root outcome=ok value=read me" in log
    bob = d.home("bob")
    assert not (bob / "notes.txt").exists() and (bob / "readonly.txt").exists()
    assert (bob / "inbox/b.txt").exists()


def test_fs_not_granted_names_the_capability(fs_daemon, alice_key):
    d = fs_daemon
    upload(d, "/plain/p.txt", b"p", alice_key)
    m = d.wait_log(r"nofs\.py: not granted error=.*")
    assert "capability 'fs' is not granted" in m.group(0)


def test_fs_admin_reaches_only_its_root(daemons: DaemonFactory, alice_key):
    write_script(daemons, "archiver.py", """
        def on_post_upload(event, api):
            api.fs.mkdir("admin:/" + event.user)
            api.fs.move(event.path, "admin:/" + event.user + "/" + event.path.split("/")[-1])
            api.log("archived", listing=",".join(api.fs.listdir("admin:/" + event.user)))
            try:
                api.fs.read_text("admin:/../../../etc/passwd", 100000)
            except FileNotFoundError:
                api.log("escape", outcome="FileNotFoundError")
    """)
    extra = 'fs_admin_root = "archive-root"\n' + binding("post-upload", "archiver.py", allow=["fs", "fs_admin"])
    d = daemons.start(extra)
    upload(d, "/report.csv", b"a,b\n", alice_key)
    d.wait_log(r"archiver\.py: archived listing=report\.csv")
    d.wait_log(r"archiver\.py: escape outcome=FileNotFoundError")
    assert (d.root / "archive-root" / "alice" / "report.csv").read_bytes() == b"a,b\n"
    assert not (d.home("alice") / "report.csv").exists()


def test_fs_admin_without_fs_is_a_config_error(daemons: DaemonFactory):
    import subprocess

    from conftest import BIN

    path = daemons.write_config(binding("post-upload", "x.py", allow=["fs_admin"]))
    out = subprocess.run([str(BIN), "check", "-c", str(path)], capture_output=True, text=True)
    assert out.returncode != 0 and "'fs_admin' extends 'fs'" in out.stdout + out.stderr


OWN_FILE = ATTEMPT + """
def on_post_upload(event, api):
    name = event.path.split("/")[-1]
    attempt(api, "other file", api.fs.remove, "/inbox/keep.txt")   # not the event's file: the user's rights
    attempt(api, "archive", api.fs.move, event.path, "admin:/" + name)
"""


@pytest.mark.parametrize("grant", [["fs", "fs_admin", "own_file"], ["fs", "fs_admin"]], ids=["own_file", "without"])
def test_own_file_archives_an_upload_only_partners_file(daemons: DaemonFactory, alice_key, grant):
    """An upload-only /inbox could not be archived: api.fs acts with the partner's rights, and
    moving the file out needs download (and delete) on it. own_file lets the binding act as
    the server on the event's own file, and on nothing else."""
    from conftest import user_toml

    write_script(daemons, "mover.py", OWN_FILE)
    extra = 'fs_admin_root = "archive-root"\n' + binding("post-upload", "mover.py", allow=grant)
    users = user_toml("drop", keys=[alice_key], permissions='{ "/" = ["list"], "/inbox" = ["list", "upload"] }')
    d = daemons.start(extra, users=users)
    (d.home("drop") / "inbox").mkdir(parents=True)
    (d.home("drop") / "inbox" / "keep.txt").write_text("not the event's file\n")
    upload(d, "/inbox/invoice.pdf", b"%PDF-1.7\n", alice_key, user="drop")
    assert outcome(d, "other file") == "PermissionError"
    if grant[-1] == "own_file":
        assert outcome(d, "archive") == "ok"
        assert (d.root / "archive-root" / "invoice.pdf").read_bytes() == b"%PDF-1.7\n"
        assert not (d.home("drop") / "inbox" / "invoice.pdf").exists()
    else:
        assert outcome(d, "archive") == "PermissionError"
        assert (d.home("drop") / "inbox" / "invoice.pdf").exists()
    assert (d.home("drop") / "inbox" / "keep.txt").exists()


def test_own_file_without_fs_is_a_config_error(daemons: DaemonFactory):
    import subprocess

    from conftest import BIN

    path = daemons.write_config(binding("post-upload", "x.py", allow=["own_file"]))
    out = subprocess.run([str(BIN), "check", "-c", str(path)], capture_output=True, text=True)
    assert out.returncode != 0 and "'own_file' extends 'fs'" in out.stdout + out.stderr

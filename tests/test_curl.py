"""curl `sftp://` (libssh2) in both directions: a second, independent client implementation."""

from __future__ import annotations

import os
import subprocess

import pytest

from conftest import ALICE_PASSWORD, BOB_PASSWORD, require_tool


@pytest.fixture(scope="module")
def d(module_daemons):
    daemon = module_daemons.start()
    for u in ("alice", "bob"):
        daemon.home(u).mkdir(parents=True, exist_ok=True)
    (daemon.home("bob") / "inbox").mkdir()
    return daemon


def curl(d, path: str, *args: str, user: str = "alice", password: str | None = ALICE_PASSWORD, key=None,
         binary: bool = False) -> subprocess.CompletedProcess:
    require_tool("curl")
    auth = ["-u", f"{user}:{password}"] if key is None else [
        "-u", f"{user}:", "--key", str(key.private), "--pubkey", f"{key.private}.pub"]
    # -k: do not check the host key against ~/.ssh/known_hosts (the test's host key is new)
    proc = subprocess.run(["curl", "-sS", "-k", *auth, *args, f"sftp://127.0.0.1:{d.port}{path}"],
                          capture_output=True, timeout=60, text=not binary)
    return proc


def test_download_with_key(d, alice_key):
    content = os.urandom(3 * 1024 * 1024 + 5)
    (d.home("alice") / "dl.bin").write_bytes(content)
    proc = curl(d, "/dl.bin", key=alice_key, binary=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == content


def test_download_with_password_and_range(d):
    (d.home("alice") / "r.txt").write_text("0123456789abcdef")
    proc = curl(d, "/r.txt", "-r", "4-9")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "456789"


def test_resume_download(d, tmp_path):
    content = os.urandom(500_000)
    (d.home("alice") / "res.bin").write_bytes(content)
    out = tmp_path / "res.bin"
    out.write_bytes(content[:123_456])
    proc = curl(d, "/res.bin", "-C", "-", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == content


def test_upload_with_password(d, tmp_path):
    content = os.urandom(2 * 1024 * 1024 + 1)
    src = tmp_path / "up.bin"
    src.write_bytes(content)
    (d.home("alice") / "up.bin").write_bytes(b"old")
    proc = curl(d, "/up.bin", "-T", str(src))
    assert proc.returncode == 0, proc.stderr
    assert (d.home("alice") / "up.bin").read_bytes() == content
    assert not [n for n in os.listdir(d.home("alice")) if n.startswith(".scriptsftp-part-")]


def test_upload_with_key_creating_dirs(d, alice_key, tmp_path):
    src = tmp_path / "deep.txt"
    src.write_text("deep\n")
    proc = curl(d, "/a/b/c/deep.txt", "-T", str(src), "--ftp-create-dirs", key=alice_key)
    assert proc.returncode == 0, proc.stderr
    assert (d.home("alice") / "a" / "b" / "c" / "deep.txt").read_text() == "deep\n"
    proc = curl(d, "/x/y/deep.txt", "-T", str(src), key=alice_key)  # no --ftp-create-dirs: refused
    assert proc.returncode != 0
    assert not (d.home("alice") / "x").exists()


def test_listing(d):
    home = d.home("alice")
    (home / "lst").mkdir()
    (home / "lst" / "one.txt").write_text("1")
    (home / "lst" / "two.txt").write_text("22")
    (home / "lst" / ".scriptsftp-part-0000").write_text("staging")
    proc = curl(d, "/lst/")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert sorted(ln.split()[-1] for ln in lines) == ["one.txt", "two.txt"]  # no staging name
    assert any(ln.startswith("-rw-") and " 2 " in ln and ln.endswith("two.txt") for ln in lines)
    proc = curl(d, "/lst/", "-l")  # names only
    assert sorted(proc.stdout.split()) == ["one.txt", "two.txt"]


def test_quote_commands(d):
    home = d.home("alice")
    (home / "q.txt").write_text("q")
    proc = curl(d, "/", "-Q", "mkdir /qdir", "-Q", "rename /q.txt /qdir/q2.txt", "-Q", "chmod 600 /qdir/q2.txt")
    assert proc.returncode == 0, proc.stderr
    assert (home / "qdir" / "q2.txt").read_text() == "q"
    assert (home / "qdir" / "q2.txt").stat().st_mode & 0o777 == 0o600
    proc = curl(d, "/", "-Q", "rm /qdir/q2.txt", "-Q", "rmdir /qdir")
    assert proc.returncode == 0, proc.stderr
    assert not (home / "qdir").exists()
    proc = curl(d, "/", "-Q", "rmdir /not-there")
    assert proc.returncode == 21  # CURLE_QUOTE_ERROR


def test_errors(d, tmp_path):
    proc = curl(d, "/f.txt", password="wrong")
    assert proc.returncode == 67  # CURLE_LOGIN_DENIED
    proc = curl(d, "/missing.txt")
    assert proc.returncode == 78  # CURLE_REMOTE_FILE_NOT_FOUND
    assert "No such file" in proc.stderr
    proc = curl(d, "/../../../etc/passwd")
    assert proc.returncode == 78
    assert "root:" not in proc.stdout


def test_bob_permissions_over_curl(d, tmp_path):
    home = d.home("bob")
    (home / "readme.txt").write_text("for bob\n")
    src = tmp_path / "b.txt"
    src.write_text("bob's upload\n")
    proc = curl(d, "/readme.txt", user="bob", password=BOB_PASSWORD)
    assert proc.returncode == 0 and proc.stdout == "for bob\n"
    proc = curl(d, "/b.txt", "-T", str(src), user="bob", password=BOB_PASSWORD)
    assert proc.returncode != 0
    assert "Permission denied" in proc.stderr
    assert not (home / "b.txt").exists()
    proc = curl(d, "/inbox/b.txt", "-T", str(src), user="bob", password=BOB_PASSWORD)
    assert proc.returncode == 0, proc.stderr
    assert (home / "inbox" / "b.txt").read_text() == "bob's upload\n"
    proc = curl(d, "/", "-Q", "rm /readme.txt", user="bob", password=BOB_PASSWORD)
    assert proc.returncode == 21
    assert (home / "readme.txt").exists()

"""Atomic uploads: nothing is half-visible, and an interrupted upload changes nothing.

Uploads are written under a hidden ``.scriptsftp-part-*`` name beside the
target and renamed over it only when the client closes the file. These tests
interrupt uploads every way a client (or the server) can die and check that the
previous version survives, no partial file appears and no staging file is left
once the server has logged the abort.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import struct
import subprocess
import time

import paramiko
import pytest
from paramiko.sftp import CMD_CLOSE

from conftest import SSH_OPTS, close_client, paramiko_client, require_tool, sftp_batch, user_toml

STAGING = ".scriptsftp-part-"


def _staged(directory) -> list[str]:
    return [n for n in os.listdir(directory) if n.startswith(STAGING)]


def _wait_for(condition, timeout: float = 20.0, what: str = "condition"):
    """Bounded poll on a filesystem condition (there is no event to wait on)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


# One daemon for the module; each test has its own user (all with alice's key) so that
# each sees a home of its own and can assert on the exact contents of its directory.
USERS = ("vis", "old", "conc", "clash", "killed", "closed", "reset", "resume", "big")


@pytest.fixture(scope="module")
def d(module_daemons, alice_key):
    daemon = module_daemons.start(users="".join(user_toml(u, keys=[alice_key]) for u in USERS))
    return daemon


def fresh_home(d, user: str):
    """The user's home, emptied (a parametrized test runs more than once)."""
    path = d.home(user)
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def test_staging_file_never_visible_during_upload(d, alice_key):
    home = fresh_home(d, "vis")
    (home / "vis").mkdir()
    (home / "vis" / "other.txt").write_text("other")
    writer = paramiko_client(d, "vis", key=alice_key)
    reader = paramiko_client(d, "vis", key=alice_key)
    try:
        f = writer.open("vis/new.bin", "w")
        f.write(b"a" * 100_000)
        f.flush()
        staged = _staged(home / "vis")
        assert len(staged) == 1  # the bytes are on disk, under the hidden name...
        assert (home / "vis" / staged[0]).stat().st_size == 100_000
        assert reader.listdir("vis") == ["other.txt"]  # ...which no listing shows
        assert [a.filename for a in reader.listdir_attr("vis")] == ["other.txt"]
        with pytest.raises(FileNotFoundError):
            reader.stat("vis/new.bin")
        for op in (lambda: reader.stat(f"vis/{staged[0]}"), lambda: reader.open(f"vis/{staged[0]}"),
                   lambda: reader.remove(f"vis/{staged[0]}"),
                   lambda: reader.rename(f"vis/{staged[0]}", "vis/stolen")):
            with pytest.raises(FileNotFoundError):
                op()
        f.write(b"b" * 50_000)
        f.close()
        assert sorted(reader.listdir("vis")) == ["new.bin", "other.txt"]
        assert reader.stat("vis/new.bin").st_size == 150_000
        assert _staged(home / "vis") == []
    finally:
        close_client(writer)
        close_client(reader)


def test_old_version_served_until_the_new_one_is_complete(d, alice_key):
    home = fresh_home(d, "old")
    (home / "doc.txt").write_bytes(b"version 1\n")
    writer = paramiko_client(d, "old", key=alice_key)
    reader = paramiko_client(d, "old", key=alice_key)
    try:
        with writer.open("doc.txt", "w") as f:
            f.write(b"version 2, longer\n" * 1000)
            f.flush()
            assert reader.stat("doc.txt").st_size == len(b"version 1\n")
            assert reader.open("doc.txt").read() == b"version 1\n"
        assert reader.open("doc.txt").read() == b"version 2, longer\n" * 1000
    finally:
        close_client(writer)
        close_client(reader)


def test_concurrent_uploads_to_one_name_never_mix(d, alice_key):
    """Two clients upload the same name at once: the result is one of them, whole."""
    home = fresh_home(d, "conc")
    a = paramiko_client(d, "conc", key=alice_key)
    b = paramiko_client(d, "conc", key=alice_key)
    try:
        fa, fb = a.open("same.bin", "w"), b.open("same.bin", "w")
        for _ in range(20):
            fa.write(b"A" * 10_000)
            fb.write(b"B" * 7_000)
        fa.flush()
        fb.flush()
        assert len(_staged(home)) == 2
        fa.close()
        assert (home / "same.bin").read_bytes() == b"A" * 200_000
        fb.close()
        assert (home / "same.bin").read_bytes() == b"B" * 140_000
        assert _staged(home) == []
    finally:
        close_client(a)
        close_client(b)


def test_directory_created_under_the_name_before_publish(d, alice_key):
    home = fresh_home(d, "clash")
    a = paramiko_client(d, "clash", key=alice_key)
    b = paramiko_client(d, "clash", key=alice_key)
    try:
        f = a.open("clash", "w")
        f.write(b"data")
        f.flush()
        b.mkdir("clash")
        (home / "clash" / "keep.txt").write_text("keep")
        with pytest.raises(IOError) as info:
            a._request(CMD_CLOSE, f.handle)  # paramiko's f.close() swallows the CLOSE status
        f._closed = True
        assert "a directory now has this name" in str(info.value)
        assert (home / "clash" / "keep.txt").read_text() == "keep"
        assert _staged(home) == []
        d.wait_log(r"upload /clash rejected")
    finally:
        close_client(a)
        close_client(b)


# --- interrupted uploads -------------------------------------------------------------


def test_openssh_client_killed_mid_put(d, alice_key, tmp_path):
    require_tool("sftp")
    home = fresh_home(d, "killed")
    (home / "big.bin").write_bytes(b"the old version\n")
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(32 * 1024 * 1024))
    mark = len(d.lines)
    # -l caps the rate (Kbit/s) so the kill surely lands mid-transfer
    proc = subprocess.Popen(
        ["sftp", "-l", "40000", "-b", "-", "-i", str(alice_key.private), "-P", str(d.port), *SSH_OPTS,
         "killed@127.0.0.1"],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        proc.stdin.write(f"put {src} big.bin\n".encode())
        proc.stdin.close()
        staged = _wait_for(lambda: [n for n in _staged(home) if (home / n).stat().st_size > 1_000_000],
                           what="the staged upload to pass 1 MB")
        assert (home / "big.bin").read_bytes() == b"the old version\n"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        m = d.wait_log(r"upload /big\.bin aborted bytes=(\d+)", start=mark, timeout=30)
        assert 1_000_000 <= int(m.group(1)) < src.stat().st_size
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the ssh child sftp started, if still there
        except ProcessLookupError:
            pass
    assert (home / "big.bin").read_bytes() == b"the old version\n"
    assert _staged(home) == [], f"staging file {staged} left behind"
    assert sorted(os.listdir(home)) == ["big.bin"]


@pytest.mark.parametrize("existing", [True, False], ids=["overwrite", "new-file"])
def test_paramiko_transport_closed_mid_write(d, alice_key, existing):
    home = fresh_home(d, "closed")
    if existing:
        (home / "p.bin").write_bytes(b"previous\n")
    client = paramiko_client(d, "closed", key=alice_key)
    mark = len(d.lines)
    f = client.open("p.bin", "w")
    for _ in range(8):
        f.write(os.urandom(128 * 1024))
    f.flush()
    assert len(_staged(home)) == 1
    client.get_channel().get_transport().close()  # no CLOSE for the file, just gone
    d.wait_log(r"upload /p\.bin aborted bytes=1048576 reason=\"connection closed", start=mark)
    if existing:
        assert (home / "p.bin").read_bytes() == b"previous\n"
        assert sorted(os.listdir(home)) == ["p.bin"], d.log_text()[-3000:]
    else:
        assert os.listdir(home) == [], d.log_text()[-3000:]


def test_tcp_reset_mid_write(d, alice_key):
    """The socket dies without an SSH goodbye (client crash, network cut)."""
    home = fresh_home(d, "reset")
    (home / "r.bin").write_bytes(b"previous\n")
    sock = socket.create_connection(("127.0.0.1", d.port))
    t = paramiko.Transport(sock)
    t.start_client(timeout=10)
    t.auth_publickey("reset", paramiko.PKey.from_path(str(alice_key.private)))
    client = paramiko.SFTPClient.from_transport(t)
    mark = len(d.lines)
    f = client.open("r.bin", "w")
    f.write(os.urandom(300_000))
    f.flush()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close sends RST
    sock.close()
    d.wait_log(r"upload /r\.bin aborted", start=mark)
    t.close()
    assert (home / "r.bin").read_bytes() == b"previous\n"
    assert _staged(home) == [], d.log_text()[-3000:]


def test_resume_after_an_aborted_upload_starts_from_the_old_version(d, alice_key):
    """An aborted resume (append) does not grow the published file either."""
    home = fresh_home(d, "resume")
    (home / "log.txt").write_bytes(b"line 1\n")
    client = paramiko_client(d, "resume", key=alice_key)
    mark = len(d.lines)
    f = client.open("log.txt", "a")
    f.write(b"line 2\n" * 1000)
    f.flush()
    client.get_channel().get_transport().close()
    d.wait_log(r"upload /log\.txt aborted", start=mark)
    assert (home / "log.txt").read_bytes() == b"line 1\n"
    client = paramiko_client(d, "resume", key=alice_key)
    try:
        with client.open("log.txt", "a") as f:
            f.write(b"line 2\n")
    finally:
        close_client(client)
    assert (home / "log.txt").read_bytes() == b"line 1\nline 2\n"


def test_daemon_killed_mid_upload_cleans_up_on_restart(daemons, alice_key):  # its own daemon: it kills it
    d = daemons.start()
    home = d.home("alice")
    home.mkdir(parents=True, exist_ok=True)
    (home / "k.bin").write_bytes(b"survivor\n")
    client = paramiko_client(d, key=alice_key)
    f = client.open("k.bin", "w")
    f.write(b"partial" * 10_000)
    f.flush()
    staged = _staged(home)
    assert len(staged) == 1
    d.kill()  # SIGKILL: no chance to clean up
    client.get_channel().get_transport().close()
    assert _staged(home) == staged  # the crash left it
    d2 = daemons.start(config=d.config)
    d2.wait_log(r"removed 1 partial upload\(s\) left by an interrupted run")
    assert _staged(home) == []
    assert (home / "k.bin").read_bytes() == b"survivor\n"


def test_big_upload_integrity(d, alice_key, tmp_path):
    require_tool("sftp")
    fresh_home(d, "big")
    src = tmp_path / "big"
    src.write_bytes(os.urandom(24 * 1024 * 1024 + 3))
    sftp_batch(d, f"put {src} big\n", alice_key, "big", check=True)
    got = d.home("big") / "big"
    assert hashlib.sha256(got.read_bytes()).digest() == hashlib.sha256(src.read_bytes()).digest()
    assert os.stat(got).st_mode & 0o777 == 0o644

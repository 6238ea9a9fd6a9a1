"""``setstat_mode``: what a user without the ``setstat`` permission gets when a client
sets times or modes, as rclone, WinSCP, FileZilla and ``put -p`` do after every upload.

An upload-only partner used to see rclone fail every accepted upload with
``SetModTime failed: permission denied``. The default ("times") applies time changes
and ignores the mode part of a request that carries times; a plain chmod is refused.
"""

from __future__ import annotations

import io
import os
import stat
import subprocess

import paramiko
import pytest

from conftest import ALICE_PASSWORD, close_client, paramiko_client, require_tool, user_toml

DROP = '{ "/" = ["list", "upload"] }'
T = 1_200_000_000


@pytest.fixture(scope="module")
def d(module_daemons, alice_key, password_hashes):
    users = (user_toml("times", keys=[alice_key], password_hash=password_hashes["alice"], permissions=DROP)
             + user_toml("ignore", keys=[alice_key], permissions=DROP, setstat_mode='"ignore"')
             + user_toml("refuse", keys=[alice_key], permissions=DROP, setstat_mode='"refuse"'))
    daemon = module_daemons.start(users=users)
    for u in ("times", "ignore", "refuse"):
        daemon.home(u).mkdir(parents=True, exist_ok=True)
    return daemon


def _upload(d, key, user: str, name: str) -> paramiko.SFTPClient:
    c = paramiko_client(d, user, key=key)
    c.putfo(io.BytesIO(b"partner data\n"), name)
    return c


def test_times_applies_the_times_of_an_upload_and_refuses_a_chmod(d, alice_key):
    c = _upload(d, alice_key, "times", "a.csv")
    try:
        c.utime("a.csv", (T, T))
        assert int((d.home("times") / "a.csv").stat().st_mtime) == T
        with pytest.raises(IOError) as info:
            c.chmod("a.csv", 0o777)
        assert info.value.errno == 13  # EACCES
        # mode and times in one SETSTAT (what put -p and WinSCP send): times applied, mode dropped
        attrs = paramiko.SFTPAttributes()
        attrs.st_mode, attrs.st_atime, attrs.st_mtime = 0o777, T + 5, T + 5
        c._request(paramiko.sftp.CMD_SETSTAT, "/a.csv", attrs)
    finally:
        close_client(c)
    st = (d.home("times") / "a.csv").stat()
    assert int(st.st_mtime) == T + 5 and stat.S_IMODE(st.st_mode) == 0o644


def test_ignore_answers_success_and_changes_nothing(d, alice_key):
    c = _upload(d, alice_key, "ignore", "a.csv")
    try:
        before = (d.home("ignore") / "a.csv").stat()
        c.utime("a.csv", (T, T))
        c.chmod("a.csv", 0o777)
    finally:
        close_client(c)
    after = (d.home("ignore") / "a.csv").stat()
    assert after.st_mtime == before.st_mtime and after.st_mode == before.st_mode


def test_refuse_keeps_the_old_answer(d, alice_key):
    c = _upload(d, alice_key, "refuse", "a.csv")
    try:
        with pytest.raises(IOError) as info:
            c.utime("a.csv", (T, T))
        assert info.value.errno == 13
    finally:
        close_client(c)


def test_rclone_uploads_to_an_upload_only_account(d, tmp_path):
    rclone = require_tool("rclone")
    obscured = subprocess.run([rclone, "obscure", ALICE_PASSWORD], capture_output=True, text=True,
                              check=True).stdout.strip()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RCLONE_")}
    env.update(RCLONE_CONFIG_P_TYPE="sftp", RCLONE_CONFIG_P_HOST="127.0.0.1", RCLONE_CONFIG_P_PORT=str(d.port),
               RCLONE_CONFIG_P_USER="times", RCLONE_CONFIG_P_PASS=obscured, RCLONE_CONFIG="/dev/null")
    src = tmp_path / "out"
    src.mkdir()
    (src / "report.csv").write_text("a,b\n1,2\n")
    os.utime(src / "report.csv", (T, T))
    proc = subprocess.run([rclone, "copy", "--sftp-disable-hashcheck", str(src), "p:/"], capture_output=True,
                          text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr + "\n--- log:\n" + d.log_text()[-2000:]
    published = d.home("times") / "report.csv"
    assert published.read_text() == "a,b\n1,2\n" and int(published.stat().st_mtime) == T

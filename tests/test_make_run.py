"""`make run` on a fresh clone, as an unprivileged user, with nothing but Python.

The daemon needs none of the tools the tests drive (curl, lftp, rclone, clamd,
Chromium...), so `make run` must not ask for them: a throwaway account runs it in
a fresh clone with a PATH holding only Python, make and the basic shell tools, and
the daemon must come up. Needs root (to create the account): runs in CI, skips
elsewhere unless CI=true.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from conftest import IN_CI

REPO = Path(__file__).resolve().parent.parent
USER = "sftp-makerun"
BASIC_TOOLS = ("python3", "make", "bash", "sh", "env", "find", "id", "grep", "touch", "rm", "mkdir", "cat",
               "dirname", "uname", "ls", "cp", "sed", "ssh-keygen")


@pytest.fixture
def throwaway_user():
    if os.geteuid() != 0:
        if IN_CI:
            pytest.fail("this test needs root to create a throwaway account")
        pytest.skip("needs root to create a throwaway account")
    # a run killed half way (Ctrl-C, a timeout) can leave the account and its processes behind
    subprocess.run(["pkill", "-KILL", "-u", USER], capture_output=True)
    subprocess.run(["userdel", "-r", USER], capture_output=True)
    subprocess.run(["useradd", "--create-home", "--shell", "/bin/bash", USER], check=True)
    yield pwd.getpwnam(USER)
    subprocess.run(["pkill", "-KILL", "-u", USER], capture_output=True)
    subprocess.run(["userdel", "-r", USER], capture_output=True)


def test_make_run_needs_nothing_but_python_as_a_normal_user(throwaway_user):
    tmp_path = Path(tempfile.mkdtemp(prefix="makerun-", dir="/tmp"))  # pytest's tmp is root's alone
    try:
        _make_run(throwaway_user, tmp_path)
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)


def _make_run(throwaway_user: pwd.struct_passwd, tmp_path: Path) -> None:
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in BASIC_TOOLS:  # the system's own, never a venv's or pyenv's
        found = shutil.which(tool, path="/usr/local/bin:/usr/bin:/bin")
        assert found, f"{tool} missing on this machine"
        (bindir / tool).symlink_to(found)
    for p in (tmp_path, clone, bindir):
        os.chmod(p, 0o755)
    subprocess.run(["chown", "-R", USER, str(clone)], check=True)
    env = {"HOME": throwaway_user.pw_dir, "PATH": str(bindir), "LANG": "C.UTF-8"}
    if os.environ.get("PIP_FIND_LINKS"):
        env["PIP_FIND_LINKS"] = os.environ["PIP_FIND_LINKS"]
    log = tmp_path / "make-run.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(["su", USER, "-s", "/bin/bash", "-c", "cd " + str(clone) + " && exec env -i "
                                 + " ".join(f"{k}={v}" for k, v in env.items()) + " make run"],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 400
        while "scriptsftp 0.1.0 ready" not in log.read_text(errors="replace"):
            assert proc.poll() is None, "make run ended:\n" + log.read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, "not ready in time:\n" + log.read_text(errors="replace")[-3000:]
            time.sleep(0.5)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    text = log.read_text(errors="replace")
    assert "missing system packages" not in text
    assert "listening sftp on 127.0.0.1:2222" in text
    assert (clone / "var" / "host_keys").stat().st_uid == throwaway_user.pw_uid

    # installed once: the next `make run` installs nothing until the source changes
    def installed_package_is_current() -> bool:
        q = subprocess.run(["su", USER, "-s", "/bin/bash", "-c", "cd " + str(clone) + " && exec env -i "
                            + " ".join(f"{k}={v}" for k, v in env.items()) + " make -q .venv/.pkg-stamp"],
                           capture_output=True, text=True, timeout=60)
        assert q.returncode in (0, 1), q.stdout + q.stderr
        return q.returncode == 0
    assert installed_package_is_current()
    os.utime(clone / "server" / "daemon.py")  # a source file edited
    assert not installed_package_is_current()

"""Workers are a privilege boundary (docs/architecture.md rule 11): the account they run as and their
kernel jail (server/contract/jail.py, server/support/worker_accounts.py).

An escape is simulated with the test-only hook SCRIPTSFTP_TEST_ESCAPE=1: right after its jail
a worker tries what escaped code would (open /etc/passwd, write a file, create a socket, fork)
and reports the outcome in its greeting (script workers) or its log line (SSH workers).
"""

from __future__ import annotations

import hashlib
import os
import pwd
import re
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from conftest import IN_CI, paramiko_client, close_client

from scriptsftp.server.stores import StateStores
from scriptsftp.server.contract import jail
from scriptsftp.scripting.workers import CallRequest, ScriptSource, WorkerPool

ROOT = os.geteuid() == 0


def kernel_jail_available() -> bool:
    try:
        import landlockpy
        import pyseccomp  # noqa: F401
        return landlockpy.abi_version() >= 1
    except Exception:  # noqa: BLE001
        return False


def require_jail() -> None:
    """Skip without Landlock and seccomp on a laptop; fail in CI (its kernel offers both)."""
    if not sys.platform.startswith("linux") or not kernel_jail_available():
        msg = "the kernel (or the installed bindings) offer no Landlock/seccomp"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)


def require_root() -> None:
    if not ROOT:
        if IN_CI:
            pytest.fail("CI runs as root")
        pytest.skip("needs root (switching accounts)")


@pytest.fixture
def throwaway_account():
    """A fresh system account, removed afterwards."""
    require_root()
    name = f"sftpt{uuid.uuid4().hex[:8]}"
    subprocess.run(["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", "/",
                    "--shell", "/usr/sbin/nologin", name], check=True)
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", name], check=False)
        subprocess.run(["groupdel", name], check=False, stderr=subprocess.DEVNULL)


def status(pid: int) -> dict[str, str]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            out[k] = v.strip()
    return out


def assert_escape_blocked(report: dict) -> None:
    escape = report["escape"]
    assert escape["open"].startswith("PermissionError"), report
    assert escape["write"].startswith("PermissionError"), report
    assert escape["socket"].startswith("PermissionError"), report
    assert escape["unix_socket"].startswith("PermissionError"), report
    assert escape["fork"].startswith("PermissionError"), report
    assert report["landlock"].startswith("on"), report
    assert report["seccomp"].startswith("on"), report


def source(text: str, name: str = "t.py") -> ScriptSource:
    text = textwrap.dedent(text)
    return ScriptSource(name, text, hashlib.sha256(text.encode()).hexdigest())


CHECK = source("""
    def on_pre_upload(event, api):
        n = api.store.incr("calls")
        head = api.file.read(16)
        if b"EVIL" in head:
            api.veto("evil content")
        api.log("ok", n=n, head=head.decode())
""")


def run_checks(pool: WorkerPool, tmp_path: Path) -> None:
    """Normal operation inside the jail: a file handed as a descriptor, the store, a veto."""
    good, bad = tmp_path / "good.txt", tmp_path / "bad.txt"
    good.write_bytes(b"hello world")
    bad.write_bytes(b"EVIL bytes")
    for path, verdict in ((good, "allow"), (bad, "veto"), (good, "allow")):
        r = pool.call(CallRequest(CHECK, "on_pre_upload", {"name": "pre-upload", "user": "alice"},
                                  frozenset({"read", "store"}), 10, 5,
                                  file=lambda p=path: os.open(p, os.O_RDONLY)))
        assert r.verdict == verdict, r
    assert r.logs[0].fields["n"] == 3 and r.logs[0].fields["head"] == "hello world"


def test_script_worker_jail_blocks_an_escape(tmp_path, monkeypatch):
    require_jail()
    monkeypatch.setenv(jail.TEST_ESCAPE_ENV, "1")
    with WorkerPool(2, memory_mb=128, state_dir=tmp_path / "state", stores=StateStores(tmp_path / "state")) as pool:
        reports = pool.jail_reports()
        assert len(reports) == 2
        for report in reports.values():
            assert_escape_blocked(report)
        run_checks(pool, tmp_path)


def test_a_script_cannot_read_the_state_dir_even_with_a_descriptor_trick(tmp_path):
    """The state_dir is kept out of the jail's read-only paths even when it sits under
    sys.path (here: pretend it does by putting it there for the worker)."""
    require_jail()
    state = tmp_path / "state"
    state.mkdir()
    sys.path.append(str(tmp_path))
    try:
        paths = jail.read_paths([str(state)])
    finally:
        sys.path.remove(str(tmp_path))
    assert not any(str(state).startswith(p.rstrip("/") + "/") or p == str(state) for p in paths), paths


def test_script_workers_run_as_the_configured_account(tmp_path, monkeypatch, throwaway_account):
    require_jail()
    monkeypatch.setenv(jail.TEST_ESCAPE_ENV, "1")
    acct = throwaway_account
    with WorkerPool(2, memory_mb=128, state_dir=tmp_path / "state", stores=StateStores(tmp_path / "state"),
                    user=acct.pw_name) as pool:
        for pid, report in pool.jail_reports().items():
            st = status(pid)
            assert st["Uid"].split() == [str(acct.pw_uid)] * 4, st["Uid"]
            assert st["Gid"].split() == [str(acct.pw_gid)] * 4, st["Gid"]
            assert st["Groups"] == ""
            assert st["CapEff"] == "0000000000000000" and st["CapPrm"] == "0000000000000000"
            assert report["uid"] == acct.pw_uid
            assert_escape_blocked(report)
        run_checks(pool, tmp_path)


def test_account_rules(monkeypatch):
    from scriptsftp.server.support import worker_accounts as accounts

    if not ROOT:   # a normal user cannot switch: workers run as the daemon itself
        assert accounts.worker_account("", accounts.SANDBOX_ACCOUNT, "[scripts] user", allow_root=False) is None
        return
    missing = f"nosuch{uuid.uuid4().hex[:8]}"
    with pytest.raises(accounts.AccountError) as e:
        accounts.worker_account(missing, accounts.SANDBOX_ACCOUNT, "[scripts] user", allow_root=False)
    assert "[scripts] user" in str(e.value) and f"useradd --system" in str(e.value) and missing in str(e.value)
    assert accounts.worker_account(missing, accounts.SANDBOX_ACCOUNT, "[scripts] user", allow_root=True) is None
    with pytest.raises(accounts.AccountError, match="root"):
        accounts.worker_account("root", accounts.SANDBOX_ACCOUNT, "[scripts] user", allow_root=False)
    nobody = accounts.worker_account("nobody", accounts.SANDBOX_ACCOUNT, "[scripts] user", allow_root=False)
    assert nobody is not None and nobody.uid == pwd.getpwnam("nobody").pw_uid


def test_daemon_refuses_a_missing_worker_account(daemons):
    require_root()
    missing = f"nosuch{uuid.uuid4().hex[:8]}"
    path = daemons.write_config(sftp_extra=f'worker_user = "{missing}"')
    proc = subprocess.run([str(Path(sys.executable).with_name("scriptsftp")), "run", "-c", str(path)],
                          capture_output=True, text=True, timeout=60, cwd=daemons.root)
    assert proc.returncode == 2, proc
    assert f"[sftp] worker_user: the account '{missing}'" in proc.stderr
    assert f"useradd --system --user-group --no-create-home --home-dir / --shell /usr/sbin/nologin {missing}" \
        in proc.stderr


GATE = """
def on_pre_upload(event, api):
    if event.path.endswith(".exe"):
        api.veto("executables are not accepted")

def on_pre_publish(event, api):
    n = api.store.incr("uploads")
    if b"EVIL" in api.file.read(64):
        api.veto("evil content")
    api.log("upload checked", n=n)
"""


def test_daemon_workers_run_jailed_as_their_accounts(daemons, monkeypatch, tmp_path):
    """A daemon started as root: SSH workers as [sftp] worker_user, script workers as
    [scripts] user, both jailed; SFTP uploads (checked by a script reading the file),
    vetoes and downloads still work."""
    require_root()
    require_jail()
    monkeypatch.setenv(jail.TEST_ESCAPE_ENV, "1")
    (daemons.root / "scripts").mkdir(exist_ok=True)
    (daemons.root / "scripts" / "gate.py").write_text(GATE)
    bindings = ('user = "scriptsftp-sandbox"\n\n[[bindings]]\nevent = "pre-upload"\nscript = "gate.py"\n'
                '\n[[bindings]]\nevent = "pre-publish"\nscript = "gate.py"\nallow = ["read", "store"]\n')
    d = daemons.start(bindings, sftp_extra='processes = 2\nworker_user = "scriptsftp-worker"')
    sandbox, worker = pwd.getpwnam("scriptsftp-sandbox"), pwd.getpwnam("scriptsftp-worker")

    sftp = paramiko_client(d, password="alice-Secret-1")
    try:
        with sftp.open("/ok.txt", "w") as f:
            f.write(b"fine content")
        with sftp.open("/bad.txt", "w") as f:   # vetoed at close (paramiko drops close errors)
            f.write(b"EVIL payload")
        with pytest.raises(PermissionError, match="executables"):
            with sftp.open("/x.exe", "w") as f:
                f.write(b"MZ")
        with sftp.open("/ok.txt", "r") as f:
            assert f.read() == b"fine content"
        assert "ok.txt" in sftp.listdir("/")
    except BaseException:
        print(d.log_text()[-6000:])   # shown by pytest on failure
        raise
    finally:
        close_client(sftp)

    log = d.log_text()
    ssh_lines = re.findall(r"ssh worker pid (\d+) jail: (.*)", log)
    assert len(ssh_lines) >= 2, log[-3000:]
    for pid, line in ssh_lines:
        assert line.startswith(f"uid {worker.pw_uid};"), line
        assert "landlock on" in line and "seccomp on" in line, line
        for probe in ("open", "write", "socket", "unix_socket", "fork"):
            assert re.search(rf"\b{probe}=PermissionError", line), line
        st = status(int(pid))
        assert st["Uid"].split() == [str(worker.pw_uid)] * 4 and st["Groups"] == ""
    script_lines = re.findall(r"script worker (\d+) jail: (.*)", log)
    assert script_lines, log[-3000:]
    for pid, line in script_lines:
        assert line.startswith(f"uid {sandbox.pw_uid};"), line
        for probe in ("open", "write", "socket", "unix_socket", "fork"):
            assert re.search(rf"\b{probe}=PermissionError", line), line
    live = [int(p) for p, _ in script_lines if os.path.exists(f"/proc/{p}")]
    assert live
    for pid in live:
        assert status(pid)["Uid"].split()[0] == str(sandbox.pw_uid)
    assert (d.root / "homes" / "alice" / "ok.txt").read_bytes() == b"fine content"
    assert not (d.root / "homes" / "alice" / "bad.txt").exists()
    assert 'publish /bad.txt vetoed reason="evil content"' in log
    assert "upload checked n=1" in log   # the store worked from the jail

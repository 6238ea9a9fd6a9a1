"""Reject before visible: async pre-publish and crash safety of checks (issue 4).

Sync pre-publish (the client's CLOSE carries the verdict) is covered per
protocol in test_scripting.py, test_scp.py and the FTP/HTTP suites; here:

- async mode: the client is answered at once; until the verdict the final path
  STATs with the uploaded size while download, rename and delete answer "no
  such file"; then the file is published or rejected (previous version kept);
- a daemon killed mid-check checks the upload again on restart (or discards it
  with ``on_restart = "discard"``): a checked file or none, never an unchecked one;
- a 1 GiB upload hashed by a pre-publish script keeps the daemon small.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import threading
import time

import paramiko
import pytest

from conftest import (SSH_OPTS, close_client, paramiko_client, require_tool, sftp_batch, sftp_put,
                      wait_staging_state)

STAGING = ".scriptsftp-part-"

# Holds the verdict for HOLD seconds of wall-clock time (scripts cannot sleep), so the
# test can look at the file while its check runs; then rejects a marker.
CHECK_SCRIPT = """
import time

HOLD = {hold}

def on_pre_publish(event, api):
    end = time.time() + HOLD
    while time.time() < end:
        pass
    if b"VIRUS" in api.file.read(65536):
        api.veto("infected: " + event.path)
    api.log("clean", path=event.path)

def on_post_upload(event, api):
    api.log("published", path=event.path, size=event.size)
"""


def bindings(mode: str, hold: float = 3.0, extra: str = "") -> str:
    return f"""
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
{extra}
"""


def start(daemons, mode: str, hold: float = 3.0, *, uploads: str = "", config=None):
    (daemons.root / "scripts").mkdir(parents=True, exist_ok=True)
    (daemons.root / "scripts" / "check.py").write_text(CHECK_SCRIPT.format(hold=hold))
    if config is not None:
        return daemons.start(config=config)
    return daemons.start(bindings(mode, hold) + (f"\n[uploads]\n{uploads}\n" if uploads else ""))


def staged(directory) -> list[str]:
    return [n for n in os.listdir(directory) if n.startswith(STAGING)]


put = sftp_put  # surfaces the CLOSE status (the pre-publish verdict) that paramiko's close() hides


# --- sync mode (default): the client's completion reply carries the verdict ------------------


@pytest.fixture(scope="module")
def sync_d(module_daemons):
    (module_daemons.root / "scripts").mkdir(parents=True, exist_ok=True)
    (module_daemons.root / "scripts" / "check.py").write_text(CHECK_SCRIPT.format(hold=0.0))
    return module_daemons.start(bindings("sync", hold=0.0))


def test_sync_veto_reaches_paramiko_with_the_reason(sync_d, alice_key):
    client = paramiko_client(sync_d, key=alice_key)
    try:
        with pytest.raises(PermissionError, match=r"infected: /sync-bad\.txt"):
            put(client, "/sync-bad.txt", b"a VIRUS here")
        with pytest.raises(FileNotFoundError):
            client.stat("/sync-bad.txt")
        put(client, "/sync-good.txt", b"fine")
        assert client.stat("/sync-good.txt").st_size == 4
    finally:
        close_client(client)
    home = sync_d.home("alice")
    assert not (home / "sync-bad.txt").exists() and staged(home) == []


def test_sync_vetoed_overwrite_keeps_the_previous_version(sync_d, alice_key):
    home = sync_d.home("alice")
    home.mkdir(parents=True, exist_ok=True)
    (home / "keep.txt").write_bytes(b"good old\n")
    client = paramiko_client(sync_d, key=alice_key)
    try:
        with pytest.raises(PermissionError, match="infected"):
            put(client, "/keep.txt", b"VIRUS new\n")
    finally:
        close_client(client)
    assert (home / "keep.txt").read_bytes() == b"good old\n"


def test_sync_veto_fails_openssh_sftp_put(sync_d, alice_key, tmp_path):
    require_tool("sftp")
    bad, good = tmp_path / "bad.txt", tmp_path / "good.txt"
    bad.write_bytes(b"VIRUS\n")
    good.write_bytes(b"clean\n")
    proc = sftp_batch(sync_d, f"put {bad} /o-bad.txt\n", alice_key)
    assert proc.returncode != 0, proc.stdout + proc.stderr
    sftp_batch(sync_d, f"put {good} /o-good.txt\n", alice_key, check=True)
    home = sync_d.home("alice")
    assert not (home / "o-bad.txt").exists()
    assert (home / "o-good.txt").read_bytes() == b"clean\n"


def test_sync_veto_fails_legacy_scp_with_the_reason(sync_d, alice_key, tmp_path):
    require_tool("scp")
    bad, good = tmp_path / "s-bad.txt", tmp_path / "s-good.txt"
    bad.write_bytes(b"VIRUS\n")
    good.write_bytes(b"clean\n")
    argv = ["scp", "-O", "-i", str(alice_key.private), "-P", str(sync_d.port), *SSH_OPTS]
    proc = subprocess.run([*argv, str(bad), str(good), "alice@127.0.0.1:/"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode != 0
    assert "infected: /s-bad.txt" in proc.stderr
    home = sync_d.home("alice")
    assert not (home / "s-bad.txt").exists()
    assert (home / "s-good.txt").read_bytes() == b"clean\n"  # the next file of the same copy went on


def test_sync_file_is_invisible_while_its_check_runs(daemons, alice_key):
    d = start(daemons, "sync", hold=3.0)
    home = d.home("alice")
    home.mkdir(parents=True, exist_ok=True)
    uploader, watcher = paramiko_client(d, key=alice_key), paramiko_client(d, key=alice_key)
    done = threading.Event()
    seen: list[str] = []

    def upload() -> None:
        try:
            put(uploader, "/slow.txt", b"clean and slow")
        finally:
            done.set()

    t = threading.Thread(target=upload, daemon=True)
    t0 = time.monotonic()
    t.start()
    try:
        # The check starts right after t0 (14 bytes to send) and holds for 3 s of wall clock:
        # for the first 2 s the file must be nowhere, as often as we can look.
        while time.monotonic() - t0 < 2.0 and not done.is_set():
            if "slow.txt" in watcher.listdir("/") or (home / "slow.txt").exists():
                seen.append("visible")
                break
            try:
                watcher.stat("/slow.txt")
                seen.append("stat")
                break
            except FileNotFoundError:
                pass
        assert not done.is_set(), "the upload finished before the check could have"
        assert not seen, "the file was visible before its check passed"
        t.join(30)
        assert watcher.stat("/slow.txt").st_size == len(b"clean and slow")
    finally:
        close_client(uploader)
        close_client(watcher)


# --- async mode ------------------------------------------------------------------------


def test_async_veto_answers_at_once_and_hides_the_file_until_rejected(daemons, alice_key):
    d = start(daemons, "async")
    home = d.home("alice")
    home.mkdir(parents=True, exist_ok=True)
    client = paramiko_client(d, key=alice_key)
    try:
        mark = len(d.lines)
        put(client, "/bad.txt", b"VIRUS inside")  # CLOSE answered OK before the verdict
        d.wait_log(r"upload /bad\.txt accepted", start=mark)
        assert not re.search(r"vetoed", d.log_text()[-2000:]), "the verdict came before the reply"
        # During the check: STAT shows the uploaded size, listing shows it too ...
        assert client.stat("/bad.txt").st_size == len(b"VIRUS inside")
        assert "bad.txt" in client.listdir("/")
        # ... but it cannot be read, renamed, deleted or uploaded again
        with pytest.raises(FileNotFoundError):
            client.open("/bad.txt", "r").read()
        with pytest.raises(FileNotFoundError):
            client.rename("/bad.txt", "/moved.txt")
        with pytest.raises(FileNotFoundError):
            client.remove("/bad.txt")
        with pytest.raises(PermissionError, match="still being checked"):
            put(client, "/bad.txt", b"again")
        assert not (home / "bad.txt").exists()  # never visible on disk under its name
        d.wait_log(r"publish /bad\.txt vetoed \(async\): infected: /bad\.txt", timeout=60, start=mark)
        with pytest.raises(FileNotFoundError):
            client.stat("/bad.txt")
        assert "bad.txt" not in client.listdir("/")
    finally:
        close_client(client)
    assert not (home / "bad.txt").exists()
    assert staged(home) == []


def test_async_clean_file_is_published_then_post_upload_runs(daemons, alice_key):
    d = start(daemons, "async", hold=1.0)
    client = paramiko_client(d, key=alice_key)
    try:
        mark = len(d.lines)
        put(client, "/good.txt", b"all fine")
        d.wait_log(r"upload /good\.txt accepted", start=mark)
        d.wait_log(r"check\.py: published path=/good\.txt size=8", timeout=60, start=mark)
        with client.open("/good.txt", "r") as f:
            assert f.read() == b"all fine"
    finally:
        close_client(client)
    assert staged(d.home("alice")) == []


def test_async_vetoed_overwrite_keeps_the_previous_version(daemons, alice_key):
    d = start(daemons, "async", hold=1.0)
    home = d.home("alice")
    home.mkdir(parents=True, exist_ok=True)
    (home / "report.csv").write_bytes(b"version 1\n")
    client = paramiko_client(d, key=alice_key)
    try:
        mark = len(d.lines)
        put(client, "/report.csv", b"VIRUS version 2\n")
        d.wait_log(r"publish /report\.csv vetoed \(async\)", timeout=60, start=mark)
        with client.open("/report.csv", "r") as f:
            assert f.read() == b"version 1\n"
    finally:
        close_client(client)


def test_async_upload_over_openssh_sftp_reports_success(daemons, alice_key, tmp_path):
    """OpenSSH's sftp verifies nothing after put, but must not report an error in async mode."""
    require_tool("sftp")
    d = start(daemons, "async", hold=1.0)
    src = tmp_path / "x.bin"
    src.write_bytes(os.urandom(300_000))
    mark = len(d.lines)
    sftp_batch(d, f"put {src} /x.bin\n", alice_key, check=True)
    d.wait_log(r"publish /x\.bin ok", timeout=60, start=mark)
    assert (d.home("alice") / "x.bin").read_bytes() == src.read_bytes()


# --- crash safety --------------------------------------------------------------------------


@pytest.mark.parametrize("content, published", [(b"clean data\n", True), (b"VIRUS data\n", False)])
def test_daemon_killed_mid_async_check_checks_again_on_restart(daemons, alice_key, content, published):
    d = start(daemons, "async", hold=30.0)  # the first run never gets to a verdict
    home = d.home("alice")
    home.mkdir(parents=True, exist_ok=True)
    client = paramiko_client(d, key=alice_key)
    mark = len(d.lines)
    put(client, "/late.txt", content)
    d.wait_log(r"publish /late\.txt checking", start=mark)
    d.kill()
    client.get_channel().get_transport().close()  # (its SSH worker may have closed it already)
    assert not (home / "late.txt").exists() and len(staged(home)) == 1
    # restart with a quick check: the leftover is checked, not published blindly
    (daemons.root / "scripts" / "check.py").write_text(CHECK_SCRIPT.format(hold=0.0))
    d2 = daemons.start(config=d.config)
    d2.wait_log(r"checking again 1 upload\(s\)")
    if published:
        d2.wait_log(r"publish /late\.txt ok", timeout=60)
        assert (home / "late.txt").read_bytes() == content
    else:
        d2.wait_log(r"publish /late\.txt vetoed on recheck after restart: infected", timeout=60)
        assert not (home / "late.txt").exists()
    assert staged(home) == []


def test_daemon_killed_mid_sync_check_with_on_restart_discard(daemons, alice_key):
    d = start(daemons, "sync", hold=30.0, uploads='on_restart = "discard"')
    home = d.home("alice")
    home.mkdir(parents=True, exist_ok=True)
    client = paramiko_client(d, key=alice_key)
    failure: list[BaseException] = []

    def upload() -> None:
        try:
            put(client, "/held.txt", b"clean but slow\n")
        except BaseException as exc:  # the daemon dies under the client
            failure.append(exc)

    t = threading.Thread(target=upload, daemon=True)
    t.start()
    wait_staging_state(d, "check")
    d.kill()
    t.join(10)
    close_client(client)
    assert failure, "the client must not see success from a daemon that died before the verdict"
    d2 = daemons.start(config=d.config)
    d2.wait_log(r"removed 1 partial upload\(s\) left by an interrupted run")
    assert not (home / "held.txt").exists()
    assert staged(home) == []


# --- memory ------------------------------------------------------------------------------------

HASH_SCRIPT = """
def on_pre_publish(event, api):
    api.log("sha256", digest=api.file.hash("sha256"))
"""


def _rss_peak_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1))


def test_one_gib_upload_hashed_in_pre_publish_keeps_the_daemon_small(daemons, alice_key, tmp_path):
    require_tool("sftp")
    (daemons.root / "scripts").mkdir(parents=True, exist_ok=True)
    (daemons.root / "scripts" / "hash.py").write_text(HASH_SCRIPT)
    d = daemons.start('[[bindings]]\nevent = "pre-publish"\nscript = "hash.py"\nallow = ["read"]\n'
                      'timeout = 120\ncpu_time = 60\n')
    src = tmp_path / "big.bin"
    size = 1 << 30
    with open(src, "wb") as f:  # sparse: cheap to make, read as zeros
        f.truncate(size)
    expected = hashlib.sha256()
    block = bytes(1 << 20)
    for _ in range(size >> 20):
        expected.update(block)
    sftp_batch(d, f"put {src} /big.bin\n", alice_key, check=True, timeout=400)
    d.wait_log(rf"hash\.py: sha256 digest={expected.hexdigest()}", timeout=60)
    assert os.path.getsize(d.home("alice") / "big.bin") == size
    peak_mb = _rss_peak_kb(d.proc.pid) / 1024
    print(f"daemon peak RSS {peak_mb:.0f} MB")
    assert peak_mb < 150, f"daemon peak RSS {peak_mb:.0f} MB for a 1 GiB hashed upload"


# --- scripts see what clients see ------------------------------------------------------------

PROBE_SCRIPT = """
def on_post_upload(event, api):
    for what, call in (("stat", lambda: api.fs.stat("/held.txt").size),
                       ("read", lambda: api.fs.read_text("/held.txt", 100)),
                       ("write", lambda: api.fs.write_text("/held.txt", "from a script"))):
        try:
            api.log("probe", what=what, result="ok " + str(call()))
        except FileNotFoundError as exc:
            api.log("probe", what=what, result="FileNotFoundError: " + str(exc))
        except PermissionError as exc:
            api.log("probe", what=what, result="PermissionError: " + str(exc))
"""


def test_scripts_api_fs_sees_a_pending_upload_as_clients_do(daemons, alice_key):
    (daemons.root / "scripts").mkdir(parents=True, exist_ok=True)
    (daemons.root / "scripts" / "check.py").write_text(CHECK_SCRIPT.format(hold=30.0))
    (daemons.root / "scripts" / "probe.py").write_text(PROBE_SCRIPT)
    d = daemons.start(f"""
[[bindings]]
event = "pre-publish"
script = "check.py"
mode = "async"
paths = ["/held.txt"]
allow = ["read"]
timeout = 60
cpu_time = 40

[[bindings]]
event = "post-upload"
script = "probe.py"
paths = ["/probe.txt"]
allow = ["fs"]
""")
    client = paramiko_client(d, key=alice_key)
    try:
        mark = len(d.lines)
        put(client, "/held.txt", b"VIRUS waiting")
        d.wait_log(r"upload /held\.txt accepted", start=mark)
        put(client, "/probe.txt", b"go")
        for what, expected in (("stat", r"ok 13"), ("read", r"FileNotFoundError"),
                               ("write", r"PermissionError: .*still being checked")):
            d.wait_log(rf"probe\.py: probe what={what} result=\"?{expected}", start=mark, timeout=30)
    finally:
        close_client(client)
    assert not (d.home("alice") / "held.txt").exists()

"""Scripts bound to events, over real SFTP sessions (OpenSSH sftp and paramiko)."""

from __future__ import annotations

import subprocess
import textwrap
import time

import pytest

from conftest import BIN, Daemon, DaemonFactory, paramiko_client, sftp_batch


def write_script(daemons: DaemonFactory, name: str, body: str) -> None:
    path = daemons.root / "scripts" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp~")
    tmp.write_text(textwrap.dedent(body))
    tmp.replace(path)  # like an editor: write then rename over


def binding(event: str, script: str, **kw: object) -> str:
    lines = [f'[[bindings]]\nevent = "{event}"\nscript = "{script}"']
    for k, v in kw.items():
        if isinstance(v, str):
            lines.append(f'{k} = "{v}"')
        elif isinstance(v, bool):
            lines.append(f"{k} = {'true' if v else 'false'}")
        elif isinstance(v, list):
            lines.append(f"{k} = [" + ", ".join(f'"{x}"' for x in v) + "]")
        else:
            lines.append(f"{k} = {v}")
    return "\n".join(lines) + "\n"


VETO_ALL = """
def on_pre_upload(event, api):
    if event.path.endswith(".exe"):
        api.veto("executables are not accepted: " + event.path)

def on_pre_delete(event, api):
    api.veto("deleting is off today")

def on_pre_rename(event, api):
    api.veto("no renames into " + event.target)

def on_pre_mkdir(event, api):
    api.veto("no new directories")

def on_pre_download(event, api):
    if event.path.startswith("/secret"):
        api.veto("secret stays here")
"""


@pytest.fixture
def vetoing(daemons: DaemonFactory) -> Daemon:
    write_script(daemons, "veto.py", VETO_ALL)
    extra = "".join(binding(e, "veto.py") for e in ("pre-upload", "pre-delete", "pre-rename", "pre-mkdir",
                                                      "pre-download"))
    d = daemons.start(extra)
    home = d.home("alice")
    home.mkdir(parents=True, exist_ok=True)
    (home / "keep.txt").write_text("keep")
    (home / "secret.txt").write_text("s3cret")
    return d


def test_pre_upload_veto_with_openssh_writes_nothing(vetoing: Daemon, alice_key, tmp_path):
    bad = tmp_path / "tool.exe"
    bad.write_bytes(b"MZ" + b"\0" * 5000)
    proc = sftp_batch(vetoing, f"put {bad} /tool.exe\n", alice_key)
    assert proc.returncode != 0
    assert "Permission denied" in proc.stderr
    assert not (vetoing.home("alice") / "tool.exe").exists()
    assert [p.name for p in vetoing.home("alice").iterdir() if p.name.startswith(".scriptsftp")] == []
    vetoing.wait_log(r"veto\.py vetoed pre-upload /tool\.exe: executables are not accepted")


def test_each_pre_event_veto_reaches_paramiko_with_reason(vetoing: Daemon, alice_key):
    sftp = paramiko_client(vetoing, key=alice_key)
    try:
        with pytest.raises(PermissionError, match="executables are not accepted"):
            with sftp.open("/x.exe", "w") as f:
                f.write(b"x")
        with pytest.raises(PermissionError, match="deleting is off today"):
            sftp.remove("/keep.txt")
        with pytest.raises(PermissionError, match="no renames into /moved.txt"):
            sftp.rename("/keep.txt", "/moved.txt")
        with pytest.raises(PermissionError, match="no new directories"):
            sftp.mkdir("/newdir")
        with pytest.raises(PermissionError, match="secret stays here"):
            sftp.open("/secret.txt").read()
        # what was not vetoed still works, on the same session
        with sftp.open("/fine.txt", "w") as f:
            f.write(b"fine")
        assert sftp.open("/keep.txt").read() == b"keep"
    finally:
        sftp.get_channel().get_transport().close()
    home = vetoing.home("alice")
    assert (home / "keep.txt").exists() and not (home / "moved.txt").exists()
    assert not (home / "newdir").exists() and not (home / "x.exe").exists()
    assert (home / "fine.txt").read_bytes() == b"fine"


def test_connect_and_pre_login_vetoes_show_their_reason(daemons: DaemonFactory, alice_key, bob_key):
    write_script(daemons, "gate.py", """
        def on_pre_login(event, api):
            if event.user == "bob":
                api.veto("bob is on holiday")
    """)
    d = daemons.start(binding("pre-login", "gate.py"))
    proc = sftp_batch(d, "ls /\n", bob_key, user="bob")
    assert proc.returncode != 0
    assert "bob is on holiday" in proc.stderr
    assert sftp_batch(d, "ls /\n", alice_key).returncode == 0
    d.wait_log(r"login failed for 'bob' \(publickey\): bob is on holiday")


def test_connect_veto_disconnects_with_reason(daemons: DaemonFactory, alice_key):
    write_script(daemons, "door.py", """
        def on_connect(event, api):
            if event.remote_ip.startswith("127."):
                api.veto("closed for maintenance")
    """)
    d = daemons.start(binding("connect", "door.py"))
    proc = sftp_batch(d, "ls /\n", alice_key)
    assert proc.returncode != 0
    assert "closed for maintenance" in proc.stderr


def test_conditions_order_and_first_veto_wins(daemons: DaemonFactory, alice_key, bob_key):
    write_script(daemons, "chain.py", """
        def first(event, api):
            api.log("first ran", path=event.path)

        def second(event, api):
            api.veto("second says no")

        def third(event, api):
            api.log("third ran")

        def only_bob(event, api):
            api.veto("bob-only rule")
    """)
    extra = (
        binding("pre-upload", "chain.py", function="third", order=30, paths=["/inbox/**"])
        + binding("pre-upload", "chain.py", function="second", order=20, paths=["/inbox/**"])
        + binding("pre-upload", "chain.py", function="first", order=10, paths=["/inbox/**"])
        + binding("pre-upload", "chain.py", function="only_bob", users=["bob"], paths=["/inbox/**"], order=5)
    )
    d = daemons.start(extra)
    for user in ("alice", "bob"):
        for sub in ("inbox", "open"):
            (d.home(user) / sub).mkdir(parents=True, exist_ok=True)
    sftp = paramiko_client(d, key=alice_key)
    try:
        with pytest.raises(PermissionError, match="second says no"):
            with sftp.open("/inbox/a.txt", "w") as f:
                f.write(b"a")
        with sftp.open("/open/a.txt", "w") as f:  # no binding matches alice here
            f.write(b"a")
        with sftp.open("/top.txt", "w") as f:  # outside every path glob
            f.write(b"a")
    finally:
        sftp.get_channel().get_transport().close()
    sftp = paramiko_client(d, "bob", key=bob_key)
    try:
        with pytest.raises(PermissionError, match="bob-only rule"):  # order 5 runs before "second"
            with sftp.open("/inbox/b.txt", "w") as f:
                f.write(b"b")
    finally:
        sftp.get_channel().get_transport().close()
    d.wait_log(r"chain\.py: first ran path=/inbox/a\.txt")
    assert "third ran" not in d.log_text()
    assert (d.home("alice") / "open" / "a.txt").exists()


def test_post_upload_sees_final_path_and_size_and_store_survives_restart(daemons: DaemonFactory, alice_key, tmp_path):
    write_script(daemons, "count.py", """
        def on_post_upload(event, api):
            n = api.store.incr("uploads:" + event.user)
            api.log("uploaded", path=event.path, size=event.size, count=n)
    """)
    extra = binding("post-upload", "count.py", allow=["store"])
    d = daemons.start(extra)
    payload = tmp_path / "p.bin"
    payload.write_bytes(b"z" * 12345)
    sftp_batch(d, f"put {payload} /report.bin\n", alice_key, check=True)
    d.wait_log(r"count\.py: uploaded path=/report\.bin size=12345 count=1")
    assert d.stop() == 0
    d2 = daemons.start(config=d.config)
    sftp_batch(d2, f"put {payload} /report2.bin\n", alice_key, check=True)
    d2.wait_log(r"count\.py: uploaded path=/report2\.bin size=12345 count=2")


def test_script_errors_apply_on_error_and_server_keeps_serving(daemons: DaemonFactory, alice_key, bob_key):
    write_script(daemons, "bad.py", """
        def on_pre_upload(event, api):
            if event.path.endswith(".loop"):
                while True:
                    pass
            if event.path.endswith(".boom"):
                return 1 / 0
    """)
    extra = binding("pre-upload", "bad.py", timeout=1.0, cpu_time=0.5) + \
        binding("pre-mkdir", "bad.py", function="on_pre_upload", on_error="allow")
    d = daemons.start(extra)
    sftp = paramiko_client(d, key=alice_key)
    try:
        with pytest.raises(PermissionError, match="server-side check failed"):
            with sftp.open("/x.boom", "w") as f:
                f.write(b"x")
        d.wait_log(r"bad\.py:7: .*ZeroDivisionError")
        started = time.monotonic()
        with pytest.raises(PermissionError, match="server-side check failed"):
            with sftp.open("/x.loop", "w") as f:
                f.write(b"x")
        assert time.monotonic() - started < 5
        with sftp.open("/fine.txt", "w") as f:  # the replacement worker serves the next call
            f.write(b"ok")
    finally:
        sftp.get_channel().get_transport().close()
    assert not (d.home("alice") / "x.loop").exists()
    assert (d.home("alice") / "fine.txt").read_bytes() == b"ok"


def test_hot_reload_changes_behavior_without_dropping_the_session(daemons: DaemonFactory, alice_key):
    write_script(daemons, "live.py", """
        def on_pre_upload(event, api):
            pass
    """)
    d = daemons.start(binding("pre-upload", "live.py"))
    sftp = paramiko_client(d, key=alice_key)
    try:
        with sftp.open("/one.txt", "w") as f:
            f.write(b"1")
        mark = len(d.lines)
        started = time.monotonic()
        write_script(daemons, "live.py", """
            def on_pre_upload(event, api):
                api.veto("version two refuses")
        """)
        d.wait_log(r"reloaded script live\.py", timeout=2, start=mark)
        assert time.monotonic() - started < 2
        with pytest.raises(PermissionError, match="version two refuses"):
            with sftp.open("/two.txt", "w") as f:
                f.write(b"2")

        # a broken save keeps version two active
        mark = len(d.lines)
        write_script(daemons, "live.py", "def on_pre_upload(event, api)\n    pass\n")
        d.wait_log(r"not reloaded: .*live\.py:1", timeout=5, start=mark)
        with pytest.raises(PermissionError, match="version two refuses"):
            with sftp.open("/three.txt", "w") as f:
                f.write(b"3")

        # deleting the script disables its bindings, loudly
        mark = len(d.lines)
        (daemons.root / "scripts" / "live.py").unlink()
        d.wait_log(r"live\.py: script deleted; its bindings are disabled", timeout=5, start=mark)
        with sftp.open("/four.txt", "w") as f:
            f.write(b"4")
    finally:
        sftp.get_channel().get_transport().close()
    assert (d.home("alice") / "four.txt").exists()
    assert not (d.home("alice") / "two.txt").exists()


def test_run_refuses_a_broken_bound_script_and_check_reports_it(daemons: DaemonFactory):
    write_script(daemons, "broken.py", "x = 1\ndef on_pre_upload(event, api):\n    return (\n")
    write_script(daemons, "nofunc.py", "def something_else(event, api):\n    pass\n")
    cfg = daemons.write_config(binding("pre-upload", "broken.py") + binding("pre-delete", "nofunc.py")
                               + binding("pre-mkdir", "missing.py"))
    check = subprocess.run([str(BIN), "check", "-c", str(cfg)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 2, check.stdout + check.stderr
    assert "broken.py:3" in check.stderr or "broken.py:4" in check.stderr
    assert "nofunc.py defines no function on_pre_delete()" in check.stderr
    assert "missing.py" in check.stderr and "not found" in check.stderr
    assert "Traceback" not in check.stderr
    run = subprocess.run([str(BIN), "run", "-c", str(cfg)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert "nofunc.py defines no function" in run.stderr and "Traceback" not in run.stderr


def test_script_test_command(tmp_path):
    script = tmp_path / "exe.py"
    script.write_text(textwrap.dedent("""
        def on_pre_publish(event, api):
            head = api.file.read(2)
            api.log("checked", size=api.file.size)
            if head == b"MZ":
                api.veto("Windows executable inside " + event.path)
    """))
    exe = tmp_path / "a.bin"
    exe.write_bytes(b"MZ\x90\x00" + b"\0" * 100)
    txt = tmp_path / "b.txt"
    txt.write_text("hello")
    vetoed = subprocess.run([str(BIN), "script", "test", str(script), "--event", "pre-publish", "--path",
                             "/in/a.bin", "--file", str(exe)], capture_output=True, text=True, timeout=60)
    assert vetoed.returncode == 1, vetoed.stdout + vetoed.stderr
    assert "decision: veto: Windows executable inside /in/a.bin" in vetoed.stdout
    assert "log:      checked size=104" in vetoed.stdout
    allowed = subprocess.run([str(BIN), "script", "test", str(script), "--event", "pre-publish", "--path",
                              "/in/b.txt", "--file", str(txt)], capture_output=True, text=True, timeout=60)
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr
    assert "decision: allow" in allowed.stdout



def test_script_test_says_what_is_missing_instead_of_pretending(tmp_path):
    """`script test` used to say 'api.fs is not available yet in this version' (it is, in
    the daemon) and ran a pre-publish check with nothing to read without a word."""
    import subprocess

    from conftest import BIN

    script = tmp_path / "s.py"
    script.write_text("def on_pre_publish(event, api):\n    api.fs.exists('/x')\n")
    out = subprocess.run([str(BIN), "script", "test", str(script), "--event", "pre-publish", "--path", "/a.csv",
                          "--allow", "read,fs"], capture_output=True, text=True, timeout=60)
    assert "note:     no --file: the script's api.file has nothing to read; pass --file LOCAL" in out.stderr
    assert "api.fs is not available here: `scriptsftp script test` runs the script offline" in out.stdout
    assert "not available yet" not in out.stdout + out.stderr


def test_json_lines_keep_api_log_fields_as_keys_and_name_their_logger_once(daemons: DaemonFactory, alice_key):
    """In JSON logs api.log's fields were text inside msg, and some lines named their logger
    twice ('notify: notify: ...', 'scripting: scripting: ...'); rclone's hash probes logged one
    'exec refused' INFO line each (issue 16 item 11)."""
    import io
    import json

    import paramiko

    from conftest import close_client

    write_script(daemons, "s.py", """
        def on_post_upload(event, api):
            api.log("seen", path=event.path, size=event.size)
            api.notify.webhook("ops", {"path": event.path})
    """)
    extra = (binding("post-upload", "s.py", allow=["notify"])
             + '\n[notify]\nretry_delay = 300\n\n[notify.webhooks.ops]\nurl = "http://127.0.0.1:9/ops"\ntimeout = 2\n')
    d = daemons.start(extra, server_extra='log_format = "json"')
    d.home("alice").mkdir(parents=True, exist_ok=True)
    client = paramiko_client(d, key=alice_key)
    try:
        client.putfo(io.BytesIO(b"abcd"), "/a.txt")
        transport = client.get_channel().get_transport()
        for probe in ("md5sum /a.txt", "sha1sum /a.txt", "echo 'hi'"):  # what rclone asks
            channel = transport.open_session()
            try:
                channel.exec_command(probe)
            except paramiko.SSHException:
                pass
            channel.close()
    finally:
        close_client(client)
    d.wait_log(r'"msg": "webhook \d+ to ops attempt 1 failed')
    records = [json.loads(x) for x in d.lines if x.startswith("{")]
    seen = next(r for r in records if r["msg"] == "s.py: seen")
    assert seen["fields"] == {"path": "/a.txt", "size": 4}, seen
    for r in records:
        short = r["logger"].rsplit(".", 1)[-1]
        assert not r["msg"].startswith(f"{short}: {short}:") and not r["msg"].startswith(f"{short}:"), r
    probes = [r for r in records if "exec refused" in r["msg"]]
    assert len(probes) == 1 and probes[0]["level"] == "info", probes

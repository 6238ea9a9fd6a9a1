"""api.run: named commands only, argv templates, no shell, timeout, output cap, clean env.

A real daemon; uploads over SFTP (paramiko) trigger scripts that run real commands."""

from __future__ import annotations

import hashlib
import io
import os
import re
import time
from pathlib import Path

import pytest

from conftest import BIN, DaemonFactory, close_client, paramiko_client
from test_scripting import binding, write_script

COMMANDS = """
[commands.echo]
argv = ["printf", "[%s]", "{args}"]
timeout = 5

[commands.hash]
argv = ["sha256sum", "{path}"]

[commands.two]
argv = ["printf", "%s-%s|{{literal}}", "{1}", "{0}"]

[commands.sleepy]
argv = ["sh", "-c", "sleep 60 & echo $! > \\"$0\\"; sleep 60", "{0}"]
timeout = 1

[commands.big]
argv = ["head", "-c", "100000", "/dev/zero"]
max_output = 1000

[commands.env]
argv = ["env"]

[commands.grep]
argv = ["grep", "-q", "EVIL", "{path}"]

[commands.count]
argv = ["grep", "-c", "{0}", "{path}"]

[commands.opt]
argv = ["printf", "[%s]", "{0}"]
allow_dash_args = true
"""


def upload(d, name: str, data: bytes, key) -> Exception | None:
    client = paramiko_client(d, key=key)
    try:
        client.putfo(io.BytesIO(data), name)
    except OSError as exc:
        return exc
    finally:
        close_client(client)
    return None


@pytest.fixture
def run_daemon(daemons: DaemonFactory, tmp_path: Path):
    pwned = tmp_path / "pwned"
    pidfile = tmp_path / "bg.pid"
    write_script(daemons, "runner.py", f"""
        import time

        def on_post_upload(event, api):
            r = api.run("echo", "; rm -rf /", "$(touch {pwned})", "`touch {pwned}`", "a b", "*")
            api.log("echo", code=r.code, out=r.stdout, truncated=r.truncated)
            r = api.run("hash")
            api.log("hash", out=r.stdout.split(" ")[0])
            r = api.run("two", "A", "B")
            api.log("two", out=r.stdout)
            try:
                api.run("echo", "bad\\x00arg")
            except ValueError as e:
                api.log("nul refused", error=str(e))
            try:
                api.run("echo", 5)
            except TypeError as e:
                api.log("int refused", error=str(e))
            try:
                api.run("two", "only-one")
            except TypeError as e:
                api.log("missing arg refused", error=str(e))
            try:
                api.run("rm", "-rf", "/")
            except PermissionError as e:
                api.log("unknown refused", error=str(e))
            try:  # option injection: grep -c --file=/etc/passwd would read a file outside every home
                api.run("count", "--file=/etc/passwd")
            except ValueError as e:
                api.log("dash refused", error=str(e))
            r = api.run("opt", "-n")
            api.log("dash allowed", out=r.stdout)
            r = api.run("big")
            api.log("big", n=len(r.stdout), truncated=r.truncated)
            r = api.run("env")
            api.log("env", out=r.stdout.strip())
            t0 = time.time()
            try:
                api.run("sleepy", "{pidfile}")
            except TimeoutError as e:
                api.log("sleepy timed out", secs=round(time.time() - t0), error=str(e))

        def on_pre_publish(event, api):
            if api.run("grep").code == 0:
                api.veto("EVIL content found by grep")
    """)
    write_script(daemons, "nogrant.py", """
        def on_post_upload(event, api):
            try:
                api.run("echo", "x")
            except PermissionError as e:
                api.log("not granted", error=str(e))
    """)
    extra = (binding("post-upload", "runner.py", allow=["run"], paths=["/run/*"], timeout=20)
             + binding("pre-publish", "runner.py", allow=["run"], paths=["/scan/*"], timeout=10)
             + binding("post-upload", "nogrant.py", paths=["/plain/*"]))
    d = daemons.start(extra + COMMANDS)
    return d, pwned, pidfile


def test_run_passes_hostile_args_literally_and_enforces_limits(run_daemon, alice_key):
    d, pwned, pidfile = run_daemon
    (d.home("alice") / "run").mkdir(parents=True)
    data = b"hello run\n"
    assert upload(d, "/run/a.txt", data, alice_key) is None
    d.wait_log(r"runner\.py: sleepy timed out", timeout=60)
    log = d.log_text()
    # no shell: every argument arrives as one literal argv element
    assert "echo code=0 out=[; rm -rf /][$(touch " in log and "][a b][*] truncated=False" in log, log[-3000:]
    assert not pwned.exists()
    assert f"runner.py: hash out={hashlib.sha256(data).hexdigest()}" in log
    assert "runner.py: two out=B-A|{literal}" in log
    assert "runner.py: nul refused" in log and "NUL" in log
    assert "runner.py: int refused" in log
    assert "runner.py: missing arg refused" in log
    assert "runner.py: unknown refused error=no command named 'rm' in [commands]" in log
    assert "runner.py: dash refused error=api.run('count', ...): argument 0 starts with '-'" in log
    assert "runner.py: dash allowed out=[-n]" in log
    assert "runner.py: big n=1000 truncated=True" in log
    assert re.search(r"runner\.py: env out=PATH=/usr/local/bin:/usr/bin:/bin( |$)", log, re.M)
    m = re.search(r"runner\.py: sleepy timed out secs=(\d+) error=command 'sleepy' timed out after 1 s", log)
    assert m and int(m.group(1)) <= 5, log[-2000:]
    # the timeout killed the whole process group, the background child too
    pid = int(pidfile.read_text())
    deadline = time.monotonic() + 10
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        assert time.monotonic() < deadline, f"background child {pid} survived the timeout"
        time.sleep(0.1)


def test_run_in_pre_publish_reads_the_staged_file_and_can_veto(run_daemon, alice_key):
    d, _, _ = run_daemon
    (d.home("alice") / "scan").mkdir(parents=True)
    exc = upload(d, "/scan/bad.txt", b"some EVIL bytes\n", alice_key)
    # paramiko ignores the CLOSE status; its confirming stat then finds no file
    assert exc is not None
    d.wait_log(r"runner\.py vetoed pre-publish /scan/bad\.txt: EVIL content found by grep")
    assert not (d.home("alice") / "scan" / "bad.txt").exists()
    assert upload(d, "/scan/good.txt", b"fine\n", alice_key) is None
    assert (d.home("alice") / "scan" / "good.txt").read_bytes() == b"fine\n"


def test_run_not_granted_is_refused_with_the_grant_named(run_daemon, alice_key):
    d, _, _ = run_daemon
    (d.home("alice") / "plain").mkdir(parents=True)
    assert upload(d, "/plain/x.txt", b"x", alice_key) is None
    m = d.wait_log(r"nogrant\.py: not granted error=.*")
    assert "capability 'run' is not granted" in m.group(0)


def test_bad_command_template_is_a_config_error(daemons: DaemonFactory):
    import subprocess

    path = daemons.write_config('[commands.bad]\nargv = ["scan", "{file}"]\n')
    out = subprocess.run([str(BIN), "check", "-c", str(path)], capture_output=True, text=True)
    assert out.returncode != 0
    assert "commands.bad.argv" in out.stderr + out.stdout and "unknown placeholder {file}" in out.stderr + out.stdout


def test_check_warns_about_a_script_filled_argument_where_options_are_read(daemons: DaemonFactory):
    import subprocess

    path = daemons.write_config('[commands.count]\nargv = ["grep", "-c", "{0}", "{path}"]\n'
                                '[commands.safe]\nargv = ["grep", "-c", "--", "{0}", "{path}"]\n')
    out = subprocess.run([str(BIN), "check", "-c", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "warning: [commands.count] argv[2] ({0}) is filled by a script before any '--'" in out.stderr
    assert "commands.safe" not in out.stderr

"""docs/clients.md's table, row by row: what each real client shows for an upload a
``pre-publish`` script rejects (the reason arrives at CLOSE, or with the transfer's final
reply), its exit status, and the partner-side check the table gives where the client
cannot tell. A client that changes its behaviour fails here, and the table gets fixed."""

from __future__ import annotations

import ftplib
import io
import os
import subprocess
from pathlib import Path

import pytest

from conftest import ALICE_PASSWORD, SSH_OPTS, close_client, paramiko_client, require_tool, sftp_batch
from httpkit import HTTP_EXTRA, curl as http_curl
from test_scripting import binding

REASON = "REJECTED-BY-POLICY"
GATE = f"""
def on_pre_publish(event, api):
    if event.path.endswith(".bad"):
        api.veto("{REASON} " + event.path)
"""
FTP_EXTRA = '\n[ftp]\nenabled = true\nlisten = "127.0.0.1:0"\npassive_ports = ""\n'


@pytest.fixture(scope="module")
def d(module_daemons):
    (module_daemons.root / "scripts").mkdir(exist_ok=True)
    (module_daemons.root / "scripts" / "gate.py").write_text(GATE)
    daemon = module_daemons.start(binding("pre-publish", "gate.py") + FTP_EXTRA + HTTP_EXTRA)
    daemon.home("alice").mkdir(parents=True, exist_ok=True)
    return daemon


@pytest.fixture
def bad(tmp_path: Path) -> Path:
    f = tmp_path / "local.bad"
    f.write_text("a,b\n1,2\n")
    return f


def absent(d, name: str) -> bool:
    return not (d.home("alice") / name).exists()


def test_openssh_sftp_shows_the_status_not_the_reason(d, alice_key, bad):
    p = sftp_batch(d, f"put {bad} /sftp.bad\n", alice_key)
    assert p.returncode != 0 and REASON not in p.stdout + p.stderr, (p.stdout, p.stderr)
    assert absent(d, "sftp.bad")


@pytest.mark.parametrize("legacy", [False, True], ids=["scp", "scp-O"])
def test_openssh_scp(d, alice_key, bad, legacy):
    require_tool("scp")
    name = f"scp{'-O' if legacy else ''}.bad"
    p = subprocess.run(["scp", *(["-O"] if legacy else []), "-i", str(alice_key.private), "-P", str(d.port),
                        *SSH_OPTS, str(bad), f"alice@127.0.0.1:/{name}"], capture_output=True, text=True, timeout=60)
    assert p.returncode != 0
    # legacy SCP prints the reason (scp: <reason>); SFTP-mode scp, like sftp, the status only
    assert (f"scp: {REASON} /{name}" in p.stderr) == legacy, p.stderr
    assert absent(d, name)


def test_curl_sftp_exits_0_and_the_follow_up_head_says_no_such_file(d, alice_key, bad):
    require_tool("curl")
    auth = ["-u", "alice:", "--key", str(alice_key.private), "--pubkey", f"{alice_key.private}.pub"]
    url = f"sftp://127.0.0.1:{d.port}/curl.bad"
    up = subprocess.run(["curl", "-sS", "-k", *auth, "-T", str(bad), url], capture_output=True, text=True, timeout=60)
    assert up.returncode == 0 and REASON not in up.stderr, up.stderr  # libssh2 ignores CLOSE's status
    assert absent(d, "curl.bad")
    check = subprocess.run(["curl", "-sS", "-k", *auth, "-I", url], capture_output=True, text=True, timeout=60)
    assert check.returncode == 78, check  # CURLE_REMOTE_FILE_NOT_FOUND


def test_curl_ftp_fails_with_550_and_shows_the_reason_with_v(d, bad):
    require_tool("curl")
    url = f"ftp://127.0.0.1:{d.ports['ftp']}/curlftp.bad"
    p = subprocess.run(["curl", "-sS", "-v", "-u", f"alice:{ALICE_PASSWORD}", "-T", str(bad), url],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode != 0
    assert "got 550" in p.stderr and f"550 {REASON} /curlftp.bad" in p.stderr, p.stderr
    assert absent(d, "curlftp.bad")


def test_lftp_shows_the_reply_line(d, bad):
    lftp = require_tool("lftp")
    script = (f"set ftp:ssl-allow false; set net:max-retries 1; "
              f"open -u alice,{ALICE_PASSWORD} -p {d.ports['ftp']} 127.0.0.1; put {bad} -o /lftp.bad; bye")
    p = subprocess.run([lftp, "-c", script], capture_output=True, text=True, timeout=60)
    assert p.returncode != 0 and f"550 {REASON} /lftp.bad" in p.stderr, p.stderr
    assert absent(d, "lftp.bad")


def test_ftplib_raises_error_perm_with_the_reason(d):
    c = ftplib.FTP()
    c.connect("127.0.0.1", d.ports["ftp"], timeout=30)
    try:
        c.login("alice", ALICE_PASSWORD)
        with pytest.raises(ftplib.error_perm, match=rf"^550 {REASON} /ftplib\.bad$"):
            c.storbinary("STOR ftplib.bad", io.BytesIO(b"x"))
    finally:
        c.close()
    assert absent(d, "ftplib.bad")


def test_curl_http_put_is_403_with_the_reason_and_exits_0_unless_fail(d, bad):
    r = http_curl(d, "/http.bad", "-T", str(bad))
    assert r.status == 403 and REASON.encode() in r.body, (r.status, r.body)
    require_tool("curl")
    url = f"http://127.0.0.1:{d.ports['http']}/http.bad"
    plain = subprocess.run(["curl", "-sS", "-u", f"alice:{ALICE_PASSWORD}", "-T", str(bad), url],
                           capture_output=True, text=True, timeout=60)
    assert plain.returncode == 0 and REASON in plain.stdout, plain
    failing = subprocess.run(["curl", "-sS", "--fail", "-u", f"alice:{ALICE_PASSWORD}", "-T", str(bad), url],
                             capture_output=True, text=True, timeout=60)
    assert failing.returncode == 22, failing
    assert absent(d, "http.bad")


@pytest.mark.parametrize("backend", ["sftp", "webdav"])
def test_rclone_reports_the_upload_failed(d, bad, backend, tmp_path):
    rclone = require_tool("rclone")
    obscured = subprocess.run([rclone, "obscure", ALICE_PASSWORD], capture_output=True, text=True,
                              check=True).stdout.strip()
    env = dict(os.environ, RCLONE_CONFIG="/dev/null")
    if backend == "sftp":
        env.update(RCLONE_CONFIG_R_TYPE="sftp", RCLONE_CONFIG_R_HOST="127.0.0.1", RCLONE_CONFIG_R_PORT=str(d.port),
                   RCLONE_CONFIG_R_USER="alice", RCLONE_CONFIG_R_PASS=obscured)
    else:
        env.update(RCLONE_CONFIG_R_TYPE="webdav", RCLONE_CONFIG_R_URL=f"http://127.0.0.1:{d.ports['http']}/",
                   RCLONE_CONFIG_R_VENDOR="other", RCLONE_CONFIG_R_USER="alice", RCLONE_CONFIG_R_PASS=obscured)
    name = f"rclone-{backend}.bad"
    p = subprocess.run([rclone, "copyto", "--retries", "1", "--low-level-retries", "1", str(bad), f"r:/{name}"],
                       capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode != 0, p.stdout + p.stderr
    assert absent(d, name)


def test_paramiko_putfo_raises(d, alice_key):
    client = paramiko_client(d, key=alice_key)
    try:
        with pytest.raises(IOError):
            client.putfo(io.BytesIO(b"x"), "/paramiko.bad")
    finally:
        close_client(client)
    assert absent(d, "paramiko.bad")

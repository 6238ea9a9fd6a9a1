"""Draining a node (`scriptsftp drain`, SIGUSR2) and what /api/status publishes for drift.

Real daemon, real clients: OpenSSH sftp (slowed with -l, or stopped with SIGSTOP to play a
stalled client), curl-free HTTP through http.client, the admin API through urllib and the
`scriptsftp drain` command itself.
"""

from __future__ import annotations

import ftplib
import hashlib
import http.client
import io
import json
import os
import signal
import socket
import subprocess

import pytest

from adminkit import TOKEN, admin_toml, binding, call, get, token_hash, wait_for, write_script  # noqa: F401
from conftest import ALICE_PASSWORD, BIN, SSH_OPTS, paramiko_client, require_tool, wait_staging_state
from httpkit import HTTP_EXTRA, basic

FTP_EXTRA = '[ftp]\nenabled = true\nlisten = "127.0.0.1:0"\npassive_ports = "63100-63199"\n'

SCRIPT = """
import time

def on_pre_publish(event, api):
    end = time.time() + {hold}
    while time.time() < end:
        pass
    api.log("checked", path=event.path)
"""


def _start(daemons, token_hash, bindings: str = "", server_extra: str = ""):
    return daemons.start(admin_toml(token_hash, bindings=bindings) + HTTP_EXTRA, server_extra=server_extra)


def _popen_batch(d, key, commands: str, limit_kbit: int) -> subprocess.Popen:
    """OpenSSH sftp running ``commands`` at ``limit_kbit`` kbit/s, in its own process group."""
    require_tool("sftp")
    batch = d.root / f"batch-{os.urandom(4).hex()}"
    batch.write_text(commands)
    return subprocess.Popen(
        ["sftp", "-b", str(batch), "-l", str(limit_kbit), "-i", str(key.private), "-P", str(d.port), *SSH_OPTS,
         "alice@127.0.0.1"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True)


def _uploading(d, path: str) -> bool:
    return any(t["direction"] == "upload" and t["path"] == path for s in get(d, "/api/sessions")
               for t in s["transfers"])


def _drain_cli(d, *args: str) -> subprocess.Popen:
    env = dict(os.environ, SCRIPTSFTP_ADMIN_TOKEN=TOKEN)
    # the config says listen = 127.0.0.1:0: point the CLI at the port the daemon actually bound
    cfg = d.config.with_name("cli.toml")
    cfg.write_text(d.config.read_text().replace('listen = "127.0.0.1:0"\ntoken_hash',
                                                 f'listen = "127.0.0.1:{d.ports["admin"]}"\ntoken_hash'))
    return subprocess.Popen([str(BIN), "drain", "-c", str(cfg), *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def test_drain_lets_an_sftp_upload_finish_refuses_new_connections_and_exits_0(daemons, token_hash, tmp_path):
    d = _start(daemons, token_hash)
    home = d.home("alice")
    home.mkdir(parents=True, exist_ok=True)
    (home / "big.bin").write_bytes(b"old version")
    data = os.urandom(2 * 1024 * 1024)
    local = tmp_path / "big.bin"
    local.write_bytes(data)
    # an HTTP client with a kept-alive connection, idle when the drain starts
    keep = http.client.HTTPConnection("127.0.0.1", d.ports["http"], timeout=10)
    keep.request("OPTIONS", "/")
    keep.getresponse().read()
    sftp = _popen_batch(d, daemons.alice_key, f"put {local} /big.bin\n", 2000)  # 250 kB/s: about 8 s
    try:
        wait_for(lambda: _uploading(d, "/big.bin"), what="the upload under way")
        drain = _drain_cli(d, "--json")
        d.wait_log(r"draining \(admin API\): no new connections; [12] session\(s\) open")
        status, body, _ = call(d, "GET", "/healthz", token=None)  # checked against the OpenAPI document
        assert status == 503 and body["status"] == "draining" and body["sessions"] >= 1, body
        assert get(d, "/api/status")["draining"]["sessions_at_start"] >= 1
        assert "scriptsftp_draining 1.0" in get(d, "/metrics")
        for proto in ("sftp", "http"):
            assert _refused(d.ports[proto]), f"{proto} still accepts while draining"
        out, err = sftp.communicate(timeout=60)
        assert sftp.returncode == 0, (out, err, d.log_text()[-3000:])
        assert (home / "big.bin").read_bytes() == data  # completed and published
        assert d.proc.wait(30) == 0
        out, err = drain.communicate(timeout=30)
        assert drain.returncode == 0, (out, err)
        result = json.loads(out)
        assert result["stopped"] is True and result["ended_at_deadline"] == 0, result
    finally:
        if sftp.poll() is None:
            os.killpg(sftp.pid, signal.SIGKILL)
        keep.close()
    d.wait_log(r"upload /big\.bin ok bytes=2097152")
    d.wait_log(r"drained: every session ended after")
    d.wait_log(r"daemon: stopped")
    assert sorted(os.listdir(home)) == ["big.bin"]
    assert "Traceback" not in d.log_text()


def test_drain_keeps_ftp_sessions_and_their_passive_transfers_and_closes_idle_http_keepalives(
        daemons, token_hash):
    d = daemons.start(admin_toml(token_hash) + HTTP_EXTRA + FTP_EXTRA)
    home = d.home("alice")
    home.mkdir(parents=True, exist_ok=True)
    ftp = ftplib.FTP()
    ftp.connect("127.0.0.1", d.ports["ftp"], timeout=30)
    ftp.login("alice", ALICE_PASSWORD)
    web = socket.create_connection(("127.0.0.1", d.ports["http"]), timeout=10)
    web.sendall(f"PUT /a.txt HTTP/1.1\r\nHost: x\r\nAuthorization: {basic()}\r\nContent-Length: 2\r\n\r\nhi"
                .encode())
    assert web.recv(65536).startswith(b"HTTP/1.1 201")  # kept alive after this answer
    try:
        status, info, _ = call(d, "POST", "/api/drain?timeout=600")
        assert status == 202 and info["sessions"] == 2, info
        for proto in ("ftp", "http", "sftp"):
            assert _refused(d.ports[proto]), f"{proto} still accepts while draining"
        assert web.recv(100) == b""  # the idle kept-alive connection is closed, not left to its timeout
        # the FTP session goes on: passive data connections are its own, not new sessions
        ftp.storbinary("STOR b.txt", io.BytesIO(b"during the drain"))
        assert ftp.nlst() == ["a.txt", "b.txt"] or sorted(ftp.nlst()) == ["a.txt", "b.txt"]
        ftp.quit()
        assert d.proc.wait(30) == 0
    finally:
        web.close()
        ftp.close()
    assert (home / "b.txt").read_bytes() == b"during the drain"
    d.wait_log(r"drained: every session ended")


def test_drain_timeout_ends_a_stalled_upload_and_keeps_the_previous_version(daemons, token_hash, tmp_path):
    d = _start(daemons, token_hash)
    home = d.home("alice")
    home.mkdir(parents=True, exist_ok=True)
    (home / "stuck.bin").write_bytes(b"old version")
    local = tmp_path / "stuck.bin"
    local.write_bytes(os.urandom(4 * 1024 * 1024))
    sftp = _popen_batch(d, daemons.alice_key, f"put {local} /stuck.bin\n", 800)  # 100 kB/s: 40 s
    try:
        wait_for(lambda: _uploading(d, "/stuck.bin"), what="the upload under way")
        os.kill(sftp.pid, signal.SIGSTOP)  # a stalled client: connection open, nothing more sent
        drain = _drain_cli(d, "--timeout", "1")
        assert d.proc.wait(30) == 0
        out, err = drain.communicate(timeout=30)
        assert drain.returncode == 0, (out, err)
        assert "drained" in out and "ended at the deadline" in out, out
    finally:
        os.killpg(sftp.pid, signal.SIGKILL)
        sftp.wait()
    d.wait_log(r"drain timeout: ending 1 session\(s\) still open")
    d.wait_log(r"upload /stuck\.bin aborted")
    assert (home / "stuck.bin").read_bytes() == b"old version"
    assert os.listdir(home) == ["stuck.bin"]  # no staging file left
    assert "Traceback" not in d.log_text()


def test_sigusr2_drain_waits_for_a_running_pre_publish_check(daemons, token_hash, tmp_path):
    write_script(daemons, "check.py", SCRIPT.format(hold=3))
    d = _start(daemons, token_hash, bindings=binding("pre-publish", "check.py", allow='["read"]',
                                                                timeout="30.0", cpu_time="20.0"))
    home = d.home("alice")
    home.mkdir(parents=True, exist_ok=True)
    local = tmp_path / "report.csv"
    local.write_bytes(b"a,b\n1,2\n")
    sftp = _popen_batch(d, daemons.alice_key, f"put {local} /report.csv\n", 8000)
    try:
        wait_staging_state(d, "check")  # all bytes in, the script holds its verdict for 3 s
        d.signal(signal.SIGUSR2)
        d.wait_log(r"draining \(SIGUSR2\): no new connections; 1 session\(s\) open, waiting up to 300s")
        status, body, _ = call(d, "GET", "/healthz", token=None)
        assert status == 503 and body["status"] == "draining"
        assert not (home / "report.csv").exists()  # still being checked: nothing visible yet
        out, err = sftp.communicate(timeout=60)
        assert sftp.returncode == 0, (out, err)
        assert d.proc.wait(30) == 0
    finally:
        if sftp.poll() is None:
            os.killpg(sftp.pid, signal.SIGKILL)
    assert (home / "report.csv").read_bytes() == b"a,b\n1,2\n"
    d.wait_log(r"checked path=/report\.csv|checked.*report\.csv")
    d.wait_log(r"drained: every session ended")
    assert "Traceback" not in d.log_text()


def test_drain_of_an_idle_daemon_and_a_second_request_shortens_the_deadline(daemons, token_hash):
    d = _start(daemons, token_hash)
    idle = paramiko_client(d, "alice", key=daemons.alice_key)  # an idle session holds the drain
    try:
        status, first, _ = call(d, "POST", "/api/drain?timeout=600")
        assert status == 202 and first["sessions"] == 1, first
        status, again, _ = call(d, "POST", "/api/drain?timeout=0.5")
        assert status == 202 and again["started"] == first["started"] and again["deadline"] < first["deadline"]
        assert d.proc.wait(30) == 0
    finally:
        idle.get_channel().get_transport().close()
    d.wait_log(r"drain: deadline brought forward")
    d.wait_log(r"drain timeout: ending 1 session")


def test_drain_timeout_is_checked(daemons, token_hash):
    d = _start(daemons, token_hash)
    for bad in ("-1", "soon", "1e9"):
        status, body, _ = call(d, "POST", f"/api/drain?timeout={bad}")
        assert status == 400 and "timeout" in body["error"], (bad, status, body)
    assert call(d, "GET", "/healthz", token=None)[1]["status"] == "ok"  # nothing started


def test_status_publishes_node_config_hash_and_script_hashes(daemons, token_hash):
    write_script(daemons, "check.py", SCRIPT.format(hold=0))
    bindings = binding("pre-publish", "check.py", allow='["read"]')
    d = _start(daemons, token_hash, bindings=bindings)
    status = get(d, "/api/status")
    assert status["node"] == socket.gethostname()
    assert status["draining"] is None
    digest = hashlib.sha256((daemons.root / "scripts" / "check.py").read_bytes()).hexdigest()
    assert status["script_hashes"] == {"check.py": digest}
    status_, metrics, _ = call(d, "GET", "/metrics")
    assert status_ == 200
    assert f'scriptsftp_script_info{{node="{status["node"]}",script="check.py",sha256="{digest}"}} 1.0' in metrics
    assert f'config_hash="{status["config_hash"]}"' in metrics and "scriptsftp_draining 0.0" in metrics
    first = status["config_hash"]
    assert len(first) == 64
    # comments and the node's own name do not change the hash; a setting does
    text = d.config.read_text()
    d.config.write_text("# deployed by ansible\n" + text + '\n[cluster]\nnode = "node-b"\n')
    assert call(d, "POST", "/api/reload")[0] == 200
    status = get(d, "/api/status")
    assert status["config_hash"] == first
    assert status["pending_restart"] == ["cluster.node"]  # the name itself waits for a restart
    d.config.write_text(d.config.read_text().replace("grace_period = 5.0", "grace_period = 6.0"))
    assert call(d, "POST", "/api/reload")[0] == 200
    assert get(d, "/api/status")["config_hash"] != first

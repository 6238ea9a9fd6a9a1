"""Admin API: authentication, every endpoint, kick, reload, and the CLI commands that use it."""

from __future__ import annotations

import io
import os
import subprocess

import paramiko
import pytest

from adminkit import TOKEN, admin_toml, binding, call, get, token_hash, wait_for, write_script  # noqa: F401
from conftest import BIN, close_client, paramiko_client

VETO_V = """
def on_pre_upload(event, api):
    api.veto("version {v} says no")
"""


def test_auth_no_token_wrong_token_right_token(daemons, token_hash):
    d = daemons.start(admin_toml(token_hash))
    for path in ("/api/status", "/api/sessions", "/api/scripts", "/api/events", "/api/bans", "/metrics"):
        status, body, headers = call(d, "GET", path, token=None)
        assert status == 401 and "token" in body["error"], (path, status, body)
        assert headers.get("WWW-Authenticate", "").startswith("Bearer")
        assert call(d, "GET", path, token="not-the-token")[0] == 401
        assert call(d, "GET", path)[0] == 200, path
    assert call(d, "DELETE", "/api/sessions/x", token=None)[0] == 401
    assert call(d, "POST", "/api/reload", token="nope")[0] == 401
    # a scheme other than Bearer is no token
    assert call(d, "GET", "/api/status", token=None, headers={"Authorization": f"Basic {TOKEN}"})[0] == 401
    # health checks need no token
    status, body, _ = call(d, "GET", "/healthz", token=None)
    assert status == 200 and body["status"] == "ok"
    # tokens never reach the log
    d.wait_log(r"admin API: wrong token")
    assert TOKEN not in d.log_text() and "not-the-token" not in d.log_text()


def test_a_flood_of_wrong_tokens_is_refused_cheaply(daemons, token_hash):
    from concurrent.futures import ThreadPoolExecutor

    d = daemons.start(admin_toml(token_hash))
    assert call(d, "GET", "/api/status")[0] == 200  # the right token, verified once, is cached
    with ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(lambda i: call(d, "GET", "/api/status", token=f"guess-{i}")[0], range(40)))
    assert set(codes) == {401}
    assert call(d, "GET", "/api/status")[0] == 200


def test_status_sessions_and_kick_ends_a_live_sftp_session(daemons, token_hash, alice_key):
    d = daemons.start(admin_toml(token_hash))
    status = get(d, "/api/status")
    assert status["version"] and status["uptime"] >= 0
    names = {lst["name"] for lst in status["listeners"]}
    assert {"sftp", "admin"} <= names
    assert status["workers"] is None or "alive" in status["workers"]

    client = paramiko_client(d, key=alice_key)
    transport = client.get_channel().get_transport()
    try:
        client.putfo(io.BytesIO(b"x" * 1000), "/kept.txt")
        rows = wait_for(lambda: [s for s in get(d, "/api/sessions") if s["user"] == "alice"], what="alice's session")
        s = rows[0]
        assert s["protocol"] == "sftp" and s["remote_ip"] == "127.0.0.1" and s["bytes_in"] == 1000
        assert "sftp" in s["channels"]

        assert call(d, "DELETE", "/api/sessions/nosuchsession")[0] == 404
        status_code, body, _ = call(d, "DELETE", f"/api/sessions/{s['id']}")
        node = get(d, "/api/status")["node"]  # no [cluster]: the host name, on the session too
        assert s["node"] == node
        assert status_code == 200 and body == {"kicked": s["id"], "user": "alice", "node": node, "pending": False}
        wait_for(lambda: not transport.is_active(), what="the client to see the connection drop")
        with pytest.raises((OSError, EOFError, paramiko.SSHException)):
            client.listdir("/")
        d.wait_log(rf"sid={s['id']}.*session closed by an administrator")
        wait_for(lambda: not [x for x in get(d, "/api/sessions") if x["id"] == s["id"]], what="session gone")
    finally:
        transport.close()


def test_scripts_endpoint_and_reload_picks_up_a_changed_script(daemons, token_hash, alice_key):
    write_script(daemons, "gate.py", VETO_V.format(v=1))
    write_script(daemons, "crash.py", "def on_pre_mkdir(event, api):\n    x = 1\n    return 1 / 0\n")
    d = daemons.start(admin_toml(token_hash, scripts="reload = false",
                                 bindings=binding("pre-upload", "gate.py")
                                 + binding("pre-mkdir", "crash.py", on_error='"allow"')))
    scripts = {s["name"]: s for s in get(d, "/api/scripts")}
    assert scripts["gate.py"]["status"] == "ok" and len(scripts["gate.py"]["sha256"]) == 64
    assert scripts["gate.py"]["bindings"][0]["event"] == "pre-upload"
    first_sha, first_loaded = scripts["gate.py"]["sha256"], scripts["gate.py"]["loaded_at"]

    client = paramiko_client(d, key=alice_key)
    try:
        with pytest.raises(PermissionError, match="version 1 says no"):
            client.putfo(io.BytesIO(b"a"), "/a.txt")
        client.mkdir("/made")  # crash.py fails, on_error = allow
        crash = next(s for s in get(d, "/api/scripts") if s["name"] == "crash.py")
        assert crash["status"] == "error" and crash["last_error"]["line"] == 3
        assert "ZeroDivisionError" in crash["last_error"]["message"] and crash["last_error"]["event"] == "pre-mkdir"

        write_script(daemons, "gate.py", VETO_V.format(v=2))
        with pytest.raises(PermissionError, match="version 1 says no"):  # [scripts] reload = false: not yet
            client.putfo(io.BytesIO(b"a"), "/a.txt")
        status, body, _ = call(d, "POST", "/api/reload")
        assert status == 200 and body["ok"] is True, body
        with pytest.raises(PermissionError, match="version 2 says no"):
            client.putfo(io.BytesIO(b"a"), "/a.txt")
        gate = next(s for s in get(d, "/api/scripts") if s["name"] == "gate.py")
        assert gate["sha256"] != first_sha and gate["loaded_at"] > first_loaded

        # a broken script is refused by reload; the API says why, the old version keeps running
        write_script(daemons, "gate.py", "def on_pre_upload(event, api)\n    pass\n")
        status, body, _ = call(d, "POST", "/api/reload")
        assert status == 422 and body["ok"] is False and any("gate.py" in e for e in body["errors"]), body
        with pytest.raises(PermissionError, match="version 2 says no"):
            client.putfo(io.BytesIO(b"a"), "/a.txt")
    finally:
        close_client(client)


def test_events_endpoint_validates_its_filters(daemons, token_hash):
    d = daemons.start(admin_toml(token_hash))
    assert get(d, "/api/events?since=1h&user=alice&path=/inbox/*&decision=veto") == []
    for bad, word in (("since=yesterday", "since"), ("decision=maybe", "decision"), ("limit=0", "limit"),
                      ("limit=abc", "limit")):
        status, body, _ = call(d, "GET", f"/api/events?{bad}")
        assert status == 400 and word in body["error"], (bad, body)


def test_bans_endpoints(daemons, token_hash):
    d = daemons.start(admin_toml(token_hash))
    bans = get(d, "/api/bans")
    assert isinstance(bans, list)
    assert call(d, "DELETE", "/api/bans/203.0.113.77")[0] == 404  # not banned
    status, body, _ = call(d, "DELETE", "/api/bans/not-an-ip")
    assert status == 400 and "not an IP address" in body["error"]


def test_a_real_ban_is_listed_and_lifted(daemons, token_hash):
    d = daemons.start(admin_toml(token_hash, bindings="[defender]\nallow_list = []\nthreshold = 2\n"))
    transport = paramiko.Transport(("127.0.0.1", d.port))
    try:
        transport.start_client(timeout=10)
        with pytest.raises(paramiko.AuthenticationException):
            transport.auth_password("nosuchuser", "guess")
    finally:
        transport.close()
    bans = wait_for(lambda: [b for b in get(d, "/api/bans") if b["ip"] == "127.0.0.1"], what="the ban")
    assert bans[0]["banned_until"] > 0 and bans[0]["reason"]
    status, body, _ = call(d, "DELETE", "/api/bans/127.0.0.1")
    assert status == 200 and body == {"unbanned": "127.0.0.1"}
    assert get(d, "/api/bans") == []
    assert call(d, "DELETE", "/api/bans/127.0.0.1")[0] == 404
    d.wait_log(r"ban lifted by an administrator")


def test_non_loopback_admin_without_token_is_refused(daemons, tmp_path):
    cfg = daemons.write_config('[admin]\nenabled = true\nlisten = "0.0.0.0:0"\n')
    for cmd in ("check", "run"):
        proc = subprocess.run([str(BIN), cmd, "-c", str(cfg)], capture_output=True, text=True, timeout=60,
                              stdin=subprocess.DEVNULL)
        assert proc.returncode == 2, (cmd, proc.stdout, proc.stderr)
        assert "admin" in proc.stderr and "not a loopback address" in proc.stderr and "token_hash" in proc.stderr
    cfg = daemons.write_config('[admin]\nenabled = true\ntoken_hash = "plaintext"\n')
    proc = subprocess.run([str(BIN), "check", "-c", str(cfg)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "not an argon2id hash" in proc.stderr


def _cli(d, *args: str, token: str | None = TOKEN, token_file: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "SCRIPTSFTP_ADMIN_TOKEN"}
    if token is not None:
        env["SCRIPTSFTP_ADMIN_TOKEN"] = token
    extra = ["--token-file", token_file] if token_file else []
    # the config says listen = 127.0.0.1:0: point the CLI at the port the daemon actually bound
    cfg = d.config.with_name("cli.toml")
    cfg.write_text(d.config.read_text().replace('listen = "127.0.0.1:0"\ntoken_hash',
                                                 f'listen = "127.0.0.1:{d.ports["admin"]}"\ntoken_hash'))
    return subprocess.run([str(BIN), *args, "-c", str(cfg), *extra], capture_output=True, text=True, timeout=60,
                          env=env)


def test_cli_sessions_reload_events(daemons, token_hash, alice_key, tmp_path):
    write_script(daemons, "gate.py", VETO_V.format(v=1))
    d = daemons.start(admin_toml(token_hash, bindings=binding("pre-upload", "gate.py")))
    client = paramiko_client(d, key=alice_key)
    try:
        with pytest.raises(PermissionError):
            client.putfo(io.BytesIO(b"a"), "/blocked.bin")
        proc = _cli(d, "sessions")
        assert proc.returncode == 0, proc.stderr
        assert "alice" in proc.stdout and "sftp" in proc.stdout and proc.stdout.startswith("ID")

        proc = _cli(d, "events", "--user", "alice")
        assert proc.returncode == 0, proc.stderr
        assert "pre-upload user=alice /blocked.bin veto: version 1 says no" in proc.stdout
        assert "gate.py:on_pre_upload veto" in proc.stdout
        assert _cli(d, "events", "--user", "bob").stdout.strip() == "no matching events"

        token_file = tmp_path / "token"
        token_file.write_text(TOKEN + "\n")
        proc = _cli(d, "reload", token=None, token_file=str(token_file))
        assert proc.returncode == 0 and proc.stdout.strip() == "reloaded", proc.stderr
        d.wait_log(r"reload requested through the admin API")

        proc = _cli(d, "sessions", token="wrong")
        assert proc.returncode == 1 and "refused the token" in proc.stderr and "Traceback" not in proc.stderr
        proc = _cli(d, "sessions", token=None)
        assert proc.returncode == 1 and "SCRIPTSFTP_ADMIN_TOKEN" in proc.stderr
    finally:
        close_client(client)
    # the catalogue is what `events` without filters (or with --list / --markdown) prints
    for args in ([], ["--list"]):
        proc = subprocess.run([str(BIN), "events", *args], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and "pre-upload (can veto)" in proc.stdout
    proc = subprocess.run([str(BIN), "events", "--markdown"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "### `pre-upload` (can veto)" in proc.stdout


def test_cli_without_a_running_daemon_says_so(daemons, token_hash):
    cfg = daemons.write_config('[admin]\nenabled = true\nlisten = "127.0.0.1:9"\n')
    proc = subprocess.run([str(BIN), "sessions", "-c", str(cfg)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "cannot reach the admin API" in proc.stderr
    cfg = daemons.write_config("")
    proc = subprocess.run([str(BIN), "reload", "-c", str(cfg)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "[admin] is not enabled" in proc.stderr


def test_without_a_token_only_this_host_not_a_web_page_can_use_the_api(daemons):
    """No token_hash: the API trusts whoever reaches loopback. A web page in a browser on
    this host reaches loopback too: by DNS rebinding (Host: its own name) it could read
    sessions and events, kick and unban; by a plain cross-site form POST it could reload."""
    d = daemons.start(admin_toml(""))
    port = d.ports["admin"]
    assert call(d, "GET", "/api/status", token=None)[0] == 200
    assert call(d, "GET", "/api/sessions", token=None, headers={"Host": f"localhost:{port}"})[0] == 200
    for host in (f"rebind.attacker.example:{port}", "rebind.attacker.example", f"10.1.2.3:{port}"):
        status, body, _ = call(d, "GET", "/api/sessions", token=None, headers={"Host": host})
        assert status == 403, (host, status, body)
        assert call(d, "GET", "/", token=None, headers={"Host": host})[0] == 403
    status, body, _ = call(d, "POST", "/api/reload", token=None,
                           headers={"Origin": "https://attacker.example"})
    assert status == 403, (status, body)
    assert call(d, "POST", "/api/reload", token=None, headers={"Origin": "null"})[0] == 403
    assert call(d, "POST", "/api/reload", token=None, headers={"Origin": f"http://127.0.0.1:{port}"})[0] == 200
    assert call(d, "GET", "/healthz", token=None)[0] == 200

"""Refused operations leave a trace: a log line, an audit record, a count.

A partner's refused get, put, rm, mkdir and rename (and an HTTP 403) used to leave
nothing at info level, no audit record and no metric, although docs/admin.md said
permission refusals were in the log. Each is now one log line, a row of
``scriptsftp events --decision denied`` and a ``scriptsftp_refusals`` count.
"""

from __future__ import annotations

import io
import subprocess

import paramiko
import pytest

from adminkit import TOKEN, admin_toml, get, token_hash  # noqa: F401  (fixture)
from conftest import BIN, close_client, paramiko_client
from httpkit import HTTP_EXTRA, request


def test_every_refusal_is_logged_audited_and_counted(daemons, token_hash, bob_key):  # noqa: F811
    d = daemons.start(HTTP_EXTRA + admin_toml(token_hash))
    home = d.home("bob")
    (home / "inbox").mkdir(parents=True, exist_ok=True)
    (home / "readme.txt").write_text("read me\n")
    c = paramiko_client(d, "bob", key=bob_key)
    try:
        for attempt in (lambda: c.putfo(io.BytesIO(b"x"), "/up.txt"), lambda: c.mkdir("/newdir"),
                        lambda: c.remove("/readme.txt"), lambda: c.rename("/readme.txt", "/r2.txt"),
                        lambda: c.chmod("/readme.txt", 0o600)):
            with pytest.raises(IOError):
                attempt()
    finally:
        close_client(c)
    from conftest import BOB_PASSWORD
    assert request(d, "PUT", "/up2.txt", b"x", user="bob", password=BOB_PASSWORD).status == 403
    d.wait_log(r"user=bob proto=http .*\] upload /up2\.txt denied")
    rows = get(d, "/api/events?user=bob&decision=denied")
    got = {(r["name"], r["path"], r["protocol"]) for r in rows}
    assert {("upload", "/up.txt", "sftp"), ("mkdir", "/newdir", "sftp"), ("delete", "/readme.txt", "sftp"),
            ("rename", "/readme.txt", "sftp"), ("setstat", "/readme.txt", "sftp"),
            ("upload", "/up2.txt", "http")} <= got, got
    assert all(r["decided_by"] == "permission" and "permission denied" in r["reason"] for r in rows)
    for op, path in (("upload", "/up.txt"), ("mkdir", "/newdir"), ("delete", "/readme.txt"),
                     ("rename", "/readme.txt")):
        d.wait_log(rf"user=bob proto=sftp .*\] {op} {path} denied .*kind=permission")
    metrics = get(d, "/metrics")
    assert 'scriptsftp_refusals_total{kind="permission",operation="upload",protocol="sftp"} 1.0' in metrics
    # the CLI answers the question too
    token_file = d.root / "admin.token"
    token_file.write_text(TOKEN + "\n")
    cfg = d.config.with_name("cli.toml")  # the CLI needs the port the daemon actually bound
    cfg.write_text(d.config.read_text().replace('listen = "127.0.0.1:0"\ntoken_hash',
                                                f'listen = "127.0.0.1:{d.ports["admin"]}"\ntoken_hash'))
    out = subprocess.run([str(BIN), "events", "-c", str(cfg), "--decision", "denied", "--user", "bob",
                          "--token-file", str(token_file)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "upload user=bob /up.txt denied: /up.txt: permission denied (upload)" in out.stdout, out.stdout
    assert (home / "readme.txt").read_text() == "read me\n"


def test_policy_and_defender_refusals_are_audited(daemons, token_hash, alice_key):  # noqa: F811
    users = daemons.default_users().replace('home = "homes/bob"', 'home = "homes/bob"\ndisabled = true')
    d = daemons.start(admin_toml(token_hash), users=users)
    with pytest.raises(paramiko.AuthenticationException):
        paramiko_client(d, "bob", key=daemons.bob_key)
    rows = get(d, "/api/events?decision=denied")
    assert any(r["name"] == "login" and r["user"] == "bob" and r["decided_by"] == "policy" for r in rows), rows


def test_a_refused_download_and_a_filtered_upload_leave_a_trace(daemons, token_hash, bob_key):  # noqa: F811
    """The partner's refused get (permission) and an upload a filter refuses: a log line each,
    a denied record each (decided_by names the kind) and a count each."""
    from conftest import user_toml

    users = daemons.default_users().split("[[users]]\nname = \"bob\"")[0] + user_toml(
        "bob", keys=[bob_key], permissions='{ "/" = ["list"], "/inbox" = ["*"] }',
        filters='[{ path = "/inbox", denied = ["*.exe"] }]')
    d = daemons.start(admin_toml(token_hash), users=users)
    home = d.home("bob")
    (home / "inbox").mkdir(parents=True, exist_ok=True)
    (home / "readme.txt").write_text("read me\n")
    c = paramiko_client(d, "bob", key=bob_key)
    try:
        with pytest.raises(IOError):
            c.getfo("/readme.txt", io.BytesIO())
        with pytest.raises(IOError):
            c.putfo(io.BytesIO(b"MZ"), "/inbox/tool.exe")
        c.putfo(io.BytesIO(b"fine"), "/inbox/ok.txt")
    finally:
        close_client(c)
    d.wait_log(r"user=bob proto=sftp .*\] download /readme\.txt denied .*kind=permission")
    d.wait_log(r"user=bob proto=sftp .*\] upload /inbox/tool\.exe denied .*kind=filter")
    rows = get(d, "/api/events?user=bob&decision=denied")
    got = {(r["name"], r["path"], r["decided_by"]) for r in rows}
    assert {("download", "/readme.txt", "permission"), ("upload", "/inbox/tool.exe", "filter")} <= got, got
    assert not any(r["path"] == "/inbox/ok.txt" for r in rows)
    metrics = get(d, "/metrics")
    assert 'scriptsftp_refusals_total{kind="permission",operation="download",protocol="sftp"} 1.0' in metrics
    assert 'scriptsftp_refusals_total{kind="filter",operation="upload",protocol="sftp"} 1.0' in metrics
    assert not (home / "inbox" / "tool.exe").exists()


def test_a_defender_refusal_is_logged_audited_and_counted(daemons, token_hash):  # noqa: F811
    from test_defender import LEGIT_ONLY, defender_toml, refusal_text, sock_from

    d = daemons.start(admin_toml(token_hash) + defender_toml(allow_list=LEGIT_ONLY, max_connections_per_ip=1,
                                                             score_limit_exceeded=0))
    held = sock_from(d, "127.0.0.7")
    try:
        d.wait_log(r"connect 127\.0\.0\.7")
        assert "too many connections from 127.0.0.7 (limit 1)" in refusal_text(d, "127.0.0.7")
    finally:
        held.close()
    d.wait_log(r"connect refused: too many connections from 127\.0\.0\.7 \(limit 1\)")
    rows = [r for r in get(d, "/api/events?decision=denied") if r["decided_by"] == "defender"]
    assert rows and rows[0]["name"] == "connect" and rows[0]["remote_ip"] == "127.0.0.7", rows
    assert "too many connections from 127.0.0.7" in rows[0]["reason"]
    assert 'scriptsftp_refusals_total{kind="defender",operation="connect",protocol="sftp"} 1.0' in get(d, "/metrics")

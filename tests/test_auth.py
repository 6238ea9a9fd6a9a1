"""Who gets in: key types, passwords, and every login policy (disabled, IPs, protocols, max_sessions).

Real daemon, real clients: OpenSSH for what sysadmins' users run, paramiko
where a test needs to hold connections open or see the exact SSH exception.
"""

from __future__ import annotations

import subprocess

import paramiko
import pytest

from conftest import (
    ALICE_PASSWORD, SSH_OPTS, close_client, paramiko_client, require_tool, sftp_batch, sftp_batch_password,
    user_toml,
)


def _transport(daemon) -> paramiko.Transport:
    t = paramiko.Transport(("127.0.0.1", daemon.port))
    t.start_client(timeout=10)
    return t


# --- key types --------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed_daemon(module_daemons, alice_key, rsa_key, ecdsa_key, password_hashes):
    """One user per key type, plus alice (ed25519 + password)."""
    users = (
        user_toml("alice", keys=[alice_key], password_hash=password_hashes["alice"])
        + user_toml("rsa", keys=[rsa_key])
        + user_toml("ecdsa", keys=[ecdsa_key])
    )
    d = module_daemons.start(users=users)
    for name in ("alice", "rsa", "ecdsa"):
        d.home(name).mkdir(parents=True, exist_ok=True)
        (d.home(name) / "hello.txt").write_text(f"hello {name}\n")
    return d


@pytest.mark.parametrize("user,key_fixture", [("alice", "alice_key"), ("rsa", "rsa_key"), ("ecdsa", "ecdsa_key")])
def test_openssh_key_login_each_type(keyed_daemon, user, key_fixture, request, tmp_path):
    key = request.getfixturevalue(key_fixture)
    proc = sftp_batch(keyed_daemon, f"get hello.txt {tmp_path / 'h.txt'}\n", key, user, check=True)
    assert proc.returncode == 0
    assert (tmp_path / "h.txt").read_text() == f"hello {user}\n"
    keyed_daemon.wait_log(rf"\[sid=\w+ user={user} proto=sftp ip=127\.0\.0\.1\] login ok \(publickey\)")


def test_key_of_another_user_is_refused(keyed_daemon, rsa_key, tmp_path):
    """The RSA user's key is valid on this server but is not alice's."""
    proc = sftp_batch(keyed_daemon, "pwd\n", rsa_key, "alice")
    assert proc.returncode != 0
    assert "Permission denied" in proc.stderr


def test_unknown_key_is_refused(keyed_daemon, stranger_key):
    proc = sftp_batch(keyed_daemon, "pwd\n", stranger_key, "alice")
    assert proc.returncode != 0
    assert "Permission denied" in proc.stderr
    keyed_daemon.wait_log(r"public key not accepted for 'alice'")


def test_openssh_password_login(keyed_daemon, tmp_path):
    proc = sftp_batch_password(keyed_daemon, f"get hello.txt {tmp_path / 'h.txt'}\n", ALICE_PASSWORD, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "h.txt").read_text() == "hello alice\n"
    keyed_daemon.wait_log(r"user=alice proto=sftp ip=127\.0\.0\.1\] login ok \(password\)")


def test_openssh_wrong_password(keyed_daemon, tmp_path):
    proc = sftp_batch_password(keyed_daemon, "pwd\n", "not-the-password", tmp_path)
    assert proc.returncode != 0
    assert "Permission denied" in proc.stderr
    keyed_daemon.wait_log(r"login failed for 'alice' \(password\): wrong password")
    assert "not-the-password" not in keyed_daemon.log_text(), "a tried password must never be logged"


def test_password_for_key_only_user_is_refused(keyed_daemon, tmp_path):
    """The rsa user has no password: password auth is not even offered."""
    t = _transport(keyed_daemon)
    try:
        with pytest.raises(paramiko.BadAuthenticationType) as info:
            t.auth_password("rsa", "anything")
        assert info.value.allowed_types == ["publickey"]
    finally:
        t.close()


def test_paramiko_password_and_wrong_password(keyed_daemon):
    client = paramiko_client(keyed_daemon, "alice", password=ALICE_PASSWORD)
    try:
        assert client.open("hello.txt").read() == b"hello alice\n"
    finally:
        close_client(client)
    t = _transport(keyed_daemon)
    try:
        with pytest.raises(paramiko.AuthenticationException):
            t.auth_password("alice", ALICE_PASSWORD + "x")
        assert not t.is_authenticated()
    finally:
        t.close()


def test_unknown_user(keyed_daemon, alice_key, tmp_path):
    # password: fails like a wrong password, both methods offered (no user enumeration)
    t = _transport(keyed_daemon)
    try:
        with pytest.raises(paramiko.AuthenticationException) as info:
            t.auth_password("nobody", "whatever")
        assert not isinstance(info.value, paramiko.BadAuthenticationType)
    finally:
        t.close()
    keyed_daemon.wait_log(r"login failed for 'nobody' \(password\): unknown user")
    # key: a key that is valid for alice says nothing about 'nobody'
    proc = sftp_batch(keyed_daemon, "pwd\n", alice_key, "nobody")
    assert proc.returncode != 0
    assert "Permission denied" in proc.stderr


def test_auth_methods_do_not_reveal_users(keyed_daemon):
    """An unknown name is offered the same methods as a real user with key and password."""
    def allowed(name: str) -> list[str]:
        t = _transport(keyed_daemon)
        try:
            try:
                t.auth_none(name)
            except paramiko.BadAuthenticationType as exc:
                return sorted(exc.allowed_types)
            raise AssertionError("auth none succeeded")
        finally:
            t.close()

    assert allowed("nobody") == allowed("alice") == ["password", "publickey"]


# --- policy -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def policy_daemon(module_daemons, alice_key, bob_key, rsa_key, ecdsa_key, stranger_key, password_hashes):
    users = (
        user_toml("alice", keys=[alice_key], password_hash=password_hashes["alice"],
                  allowed_ips='["127.0.0.1/32", "::1"]')
        + user_toml("off", keys=[bob_key], password_hash=password_hashes["bob"], disabled="true")
        + user_toml("faraway", keys=[rsa_key], allowed_ips='["10.0.0.0/8", "192.168.1.7"]')
        + user_toml("ftponly", keys=[ecdsa_key], protocols='["ftp"]')
        + user_toml("sftponly", keys=[stranger_key], protocols='["sftp"]')
    )
    return module_daemons.start(users=users)


def test_allowed_ip_matches(policy_daemon, alice_key, tmp_path):
    proc = sftp_batch(policy_daemon, "pwd\n", alice_key, "alice")
    assert proc.returncode == 0, proc.stderr
    assert "Remote working directory: /" in proc.stdout


def test_disabled_user_with_right_key(policy_daemon, bob_key):
    proc = sftp_batch(policy_daemon, "pwd\n", bob_key, "off")
    assert proc.returncode != 0
    # the reason is sent as the SSH disconnect text, which OpenSSH prints
    assert "account disabled" in proc.stderr
    policy_daemon.wait_log(r"login failed for 'off' \(publickey\): account disabled")


def test_disabled_user_with_right_password(policy_daemon):
    from conftest import BOB_PASSWORD

    t = _transport(policy_daemon)
    try:
        with pytest.raises((paramiko.SSHException, EOFError)):
            t.auth_password("off", BOB_PASSWORD)
        assert not t.is_authenticated()
    finally:
        t.close()
    policy_daemon.wait_log(r"login failed for 'off' \(password\): account disabled")


def test_disallowed_ip(policy_daemon, rsa_key):
    proc = sftp_batch(policy_daemon, "pwd\n", rsa_key, "faraway")
    assert proc.returncode != 0
    assert "address 127.0.0.1 not allowed" in proc.stderr
    policy_daemon.wait_log(r"login failed for 'faraway' \(publickey\): address 127\.0\.0\.1 not allowed")


def test_protocol_ftp_only_cannot_use_sftp(policy_daemon, ecdsa_key):
    proc = sftp_batch(policy_daemon, "pwd\n", ecdsa_key, "ftponly")
    assert proc.returncode != 0
    assert "protocol sftp not allowed" in proc.stderr
    policy_daemon.wait_log(r"login failed for 'ftponly' \(publickey\): protocol sftp not allowed")


def test_protocol_sftp_only_cannot_exec_scp(policy_daemon, stranger_key):
    """Logged in over SSH, but the legacy scp exec channel is refused; SFTP works."""
    t = _transport(policy_daemon)
    try:
        t.auth_publickey("sftponly", paramiko.PKey.from_path(str(stranger_key.private)))
        chan = t.open_session(timeout=10)
        with pytest.raises(paramiko.SSHException):
            chan.exec_command("scp -t /upload.txt")
        policy_daemon.wait_log(r"scp refused: protocol scp not allowed for this user")
        sftp = paramiko.SFTPClient.from_transport(t)
        assert sftp.listdir(".") == []
    finally:
        t.close()


def test_scp_with_openssh_refused_for_sftp_only(policy_daemon, stranger_key, tmp_path):
    require_tool("scp")
    src = tmp_path / "f.txt"
    src.write_text("x")
    proc = subprocess.run(
        ["scp", "-O", "-i", str(stranger_key.private), "-P", str(policy_daemon.port), *SSH_OPTS, str(src),
         "sftponly@127.0.0.1:/f.txt"], capture_output=True, text=True, timeout=30,
    )
    assert proc.returncode != 0
    assert not (policy_daemon.home("sftponly") / "f.txt").exists()


def test_shell_and_other_commands_refused(keyed_daemon, alice_key):
    t = _transport(keyed_daemon)
    try:
        t.auth_publickey("alice", paramiko.PKey.from_path(str(alice_key.private)))
        for cmd in ("ls /", "sh -c id", "sftp-server"):
            chan = t.open_session(timeout=10)
            with pytest.raises(paramiko.SSHException):
                chan.exec_command(cmd)
        chan = t.open_session(timeout=10)
        with pytest.raises(paramiko.SSHException):
            chan.invoke_shell()
    finally:
        t.close()
    keyed_daemon.wait_log(r"exec refused: b'ls /'")


# --- max_sessions ------------------------------------------------------------------


def test_max_sessions(daemons, alice_key):
    d = daemons.start(users=user_toml("alice", keys=[alice_key], max_sessions="2"))
    first = paramiko_client(d, "alice", key=alice_key)
    second = paramiko_client(d, "alice", key=alice_key)
    try:
        t = _transport(d)
        try:
            with pytest.raises((paramiko.SSHException, EOFError)):
                t.auth_publickey("alice", paramiko.PKey.from_path(str(alice_key.private)))
            assert not t.is_authenticated()
        finally:
            t.close()
        d.wait_log(r"login failed for 'alice' \(publickey\): too many sessions for this user \(limit 2\)")
        proc = sftp_batch(d, "pwd\n", alice_key)
        assert proc.returncode != 0
        assert "too many sessions" in proc.stderr
        assert first.listdir("/") == [] and second.listdir("/") == []  # the two in are unaffected
    finally:
        close_client(first)
    # one left: a new session fits again once the server has seen the disconnect
    d.wait_log(r"user=alice proto=sftp ip=127\.0\.0\.1\] disconnect after")
    try:
        proc = sftp_batch(d, "pwd\n", alice_key)
        assert proc.returncode == 0, proc.stderr
    finally:
        close_client(second)


def test_protocol_scp_only_gets_scp_but_not_sftp(daemons, alice_key):
    """SFTP and SCP share the SSH listener: an scp-only user logs in, gets exec scp, no SFTP."""
    d = daemons.start(users=user_toml("alice", keys=[alice_key], protocols='["scp"]'))
    t = _transport(d)
    try:
        t.auth_publickey("alice", paramiko.PKey.from_path(str(alice_key.private)))
        assert t.is_authenticated()
        # the server closes the subsystem channel: paramiko says so as SSHException (EOF before
        # VERSION) or, when the close arrives before it sends INIT, as OSError
        with pytest.raises((paramiko.SSHException, OSError)):
            paramiko.SFTPClient.from_transport(t)
        d.wait_log(r"sftp refused: protocol sftp not allowed for this user")
        chan = t.open_session(timeout=10)
        chan.exec_command("scp -t /x.txt")  # accepted (raises if refused)
    finally:
        t.close()


def test_failed_login_log_lines(keyed_daemon):
    """One clear line per failure; the connection's end names no user it never had."""
    mark = len(keyed_daemon.lines)
    t = _transport(keyed_daemon)
    try:
        with pytest.raises(paramiko.AuthenticationException):
            t.auth_password("alice", "bad guess")
    finally:
        t.close()
    m = keyed_daemon.wait_log(r"WARNING +login: \[sid=(\w+) user=alice proto=sftp ip=127\.0\.0\.1\] "
                              r"login failed for 'alice' \(password\): wrong password$", start=mark)
    line = keyed_daemon.wait_log(rf"\[sid={m.group(1)} proto=sftp ip=127\.0\.0\.1\] disconnect after .*",
                                 start=mark).group(0)
    assert "user=" not in line, line
    assert "bad guess" not in keyed_daemon.log_text()

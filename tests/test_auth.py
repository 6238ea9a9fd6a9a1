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


def test_password_for_key_only_user_is_refused_like_a_wrong_password(keyed_daemon, tmp_path):
    """The rsa user has no password. Offering only publickey to that name (as before) told
    a stranger the user exists and has no password: it fails like any wrong password."""
    t = _transport(keyed_daemon)
    try:
        with pytest.raises(paramiko.AuthenticationException) as info:
            t.auth_password("rsa", "anything")
        assert not isinstance(info.value, paramiko.BadAuthenticationType)
    finally:
        t.close()
    keyed_daemon.wait_log(r"login failed for 'rsa' \(password\)")


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

    assert allowed("nobody") == allowed("alice") == allowed("rsa") == ["password", "publickey"]


def test_auth_none_probes_are_scored(daemons):
    """Enumeration by 'none' requests learns nothing (above); a connection that asks and
    leaves without trying to log in is still a probe the defender counts. (A second name
    on one connection is refused by paramiko itself, so a prober connects once per name.)"""
    d = daemons.start("[defender]\nallow_list = []\nthreshold = 3\nscore_protocol_error = 1\n")
    for name in ("root", "admin", "oracle"):
        t = _transport(d)
        try:
            with pytest.raises(paramiko.AuthenticationException):
                t.auth_none(name)
        finally:
            t.close()
    d.wait_log(r"banned 127\.0\.0\.1 .*auth 'none' only, no login attempt")

"""What the SSH listener negotiates: AES-GCM for OpenSSH clients that accept it, never CBC.

OpenSSH ranks aes-ctr before aes-gcm, so the server's KEXINIT waits for an OpenSSH
client's and offers only GCM when the client lists it (ServerTransport._ciphers_for).
"""

from __future__ import annotations

import re
import subprocess

import pytest

from conftest import SSH_OPTS, paramiko_client, require_tool


@pytest.fixture(scope="module")
def daemon(module_daemons):
    d = module_daemons.start()
    d.home().mkdir(parents=True, exist_ok=True)
    return d


def negotiated(daemon, key, *options: str) -> tuple[subprocess.CompletedProcess[str], dict[str, str]]:
    """Run `sftp -v` with ``options``; the cipher it reports for each direction."""
    require_tool("sftp")
    pairs = zip(SSH_OPTS[::2], SSH_OPTS[1::2])
    opts = [part for flag, value in pairs if value != "LogLevel=ERROR" for part in (flag, value)]
    proc = subprocess.run(
        ["sftp", "-v", "-b", "-", "-i", str(key.private), "-P", str(daemon.port), *opts, *options,
         "alice@127.0.0.1"],
        input="ls\n", text=True, capture_output=True, timeout=60,
    )
    found = dict(re.findall(r"kex: (server->client|client->server) cipher: (\S+)", proc.stderr))
    return proc, found


def test_openssh_defaults_get_aes_gcm_both_ways(daemon, alice_key) -> None:
    proc, found = negotiated(daemon, alice_key)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert found == {"server->client": "aes128-gcm@openssh.com", "client->server": "aes128-gcm@openssh.com"}


def test_openssh_client_without_gcm_keeps_its_choice(daemon, alice_key) -> None:
    proc, found = negotiated(daemon, alice_key, "-c", "aes256-ctr,chacha20-poly1305@openssh.com")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert set(found.values()) == {"aes256-ctr"}


def test_openssh_client_preferring_aes256_gcm_gets_it(daemon, alice_key) -> None:
    proc, found = negotiated(daemon, alice_key, "-c", "aes256-gcm@openssh.com,aes128-ctr")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert set(found.values()) == {"aes256-gcm@openssh.com"}


def test_cbc_is_refused(daemon, alice_key) -> None:
    proc, found = negotiated(daemon, alice_key, "-c", "aes128-cbc")
    assert proc.returncode != 0
    assert "no matching cipher found" in proc.stderr


def test_other_clients_get_the_usual_list_at_once(daemon, alice_key) -> None:
    """paramiko is not asked to speak first: its own preference (aes-ctr first) decides."""
    sftp = paramiko_client(daemon, key=alice_key)
    try:
        transport = sftp.get_channel().get_transport()
        assert transport.local_cipher == "aes128-ctr"
        assert sftp.listdir(".") is not None
    finally:
        sftp.get_channel().get_transport().close()

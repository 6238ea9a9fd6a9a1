"""Issue 18 under attack, through the real daemon: homes and folders set over the server's
own files (state_dir holds the host keys, the account database with every password hash,
the staging records). Whoever wrote the account (the file, the CLI, the API, a dump),
such a login is refused on every protocol before anything is made or served:

- FTP (ftplib): ``530 home directory unavailable: ask your administrator``;
- OpenSSH ``sftp``: the SSH disconnect message with the same text;

and the log says which path overlaps state_dir (the client is never told a server path).
"""

from __future__ import annotations

import ftplib

import pytest

from conftest import ALICE_PASSWORD, BOB_PASSWORD, sftp_batch, toml_str, user_toml

FTP_EXTRA = '[ftp]\nenabled = true\nlisten = "127.0.0.1:0"\npassive_ports = ""\n'
REFUSAL = "home directory unavailable: ask your administrator"


def _ftp_refusal(port: int, user: str, password: str) -> str:
    c = ftplib.FTP()
    c.connect("127.0.0.1", port, timeout=30)
    try:
        with pytest.raises(ftplib.error_perm) as caught:
            c.login(user, password)
        return str(caught.value)
    finally:
        c.close()


def test_a_home_or_folder_over_state_dir_refuses_the_login(daemons):
    users = (
        # alice's home holds state_dir (".": the directory of the config file and of state/)
        user_toml("alice", home=".", keys=[daemons.alice_key], password_hash=daemons.hashes["alice"])
        # bob's home is fine, but a folder he mounts is state_dir's host keys
        + user_toml("bob", keys=[daemons.bob_key], password_hash=daemons.hashes["bob"],
                    folders='{ "/keys" = "keys" }')
        + user_toml("carol", home="state/homes/carol", password_hash=daemons.hashes["alice"])
        + f'\n[[folders]]\nname = "keys"\npath = {toml_str("state/host_keys")}\n'
    )
    d = daemons.start(FTP_EXTRA, users=users)
    port = d.ports["ftp"]
    assert _ftp_refusal(port, "alice", ALICE_PASSWORD) == f"530 {REFUSAL}"
    assert _ftp_refusal(port, "bob", BOB_PASSWORD) == f"530 {REFUSAL}"
    assert _ftp_refusal(port, "carol", ALICE_PASSWORD) == f"530 {REFUSAL}"
    proc = sftp_batch(d, "ls\n", daemons.alice_key, "alice")
    assert proc.returncode != 0 and REFUSAL in proc.stderr, proc.stderr
    proc = sftp_batch(d, "get /keys/ssh_host_ed25519_key\n", daemons.bob_key, "bob")
    assert proc.returncode != 0 and REFUSAL in proc.stderr, proc.stderr
    d.wait_log(r"user=alice .*login refused: home \S+/srv overlaps the server's state directory \S+/srv/state$")
    d.wait_log(r"login refused: folder keys \S+ overlaps the server's state directory")
    d.wait_log(r"login refused: home \S*state/homes/carol overlaps the server's state directory")
    assert not (d.state_dir / "homes").exists()  # refused before anything is made

"""Homes made at login, with their ``home_folders``, through the real daemon and real clients.

What each client sees: a new user's first ``ls`` (OpenSSH sftp) or ``NLST`` (ftplib)
already shows /inbox /outbox /archive; a ``home_folders`` entry that is a symbolic link
planted in the home is left alone (never followed: nothing appears where it points) and
the login goes on; with ``[accounts] create_homes = false`` a missing home refuses the
login (FTP ``530 home directory missing: ask your administrator``, OpenSSH prints the same
as the disconnect message) and the log names the path.
"""

from __future__ import annotations

import ftplib
import os
import stat

import pytest

from conftest import ALICE_PASSWORD, sftp_batch, user_toml

FTP_EXTRA = '[ftp]\nenabled = true\nlisten = "127.0.0.1:0"\npassive_ports = ""\n'
FOLDERS = ["inbox", "outbox", "archive"]


def _users(daemons, accounts: str = "", alice: str = "") -> str:
    group = '[[groups]]\nname = "partners"\nhome_folders = ["/inbox", "/outbox", "/archive"]\n'
    return (accounts + group
            + user_toml("alice", keys=[daemons.alice_key], password_hash=daemons.hashes["alice"],
                        groups='["partners"]') + alice)


def _ftp(d) -> ftplib.FTP:
    c = ftplib.FTP()
    c.connect("127.0.0.1", d.ports["ftp"], timeout=30)
    c.login("alice", ALICE_PASSWORD)
    return c


def test_a_new_user_finds_their_home_folders_on_first_login(daemons, tmp_path):
    d = daemons.start(FTP_EXTRA, users=_users(daemons, '[accounts]\nhome_mode = 0o2770\n'))
    home = d.home("alice")
    assert not home.exists()
    proc = sftp_batch(d, "ls -1 /\n", daemons.alice_key, check=True)
    assert sorted(proc.stdout.split()[-3:]) == sorted(f"/{f}" for f in FOLDERS), proc.stdout
    for path in (home, *(home / f for f in FOLDERS)):
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o2770, path  # the configured mode, whatever the umask
    d.wait_log(r"made /, /inbox, /outbox, /archive for alice in \S+ \(mode 2770\)")
    # the next login (FTP) finds them and makes nothing
    mark = len(d.lines)
    c = _ftp(d)
    try:
        assert sorted(c.nlst()) == sorted(FOLDERS)
    finally:
        c.close()
    d.wait_log(r"user=alice proto=ftp .*login ok", start=mark)
    assert "made " not in "\n".join(d.lines[mark:])


def test_an_existing_home_keeps_its_mode_and_a_removed_folder_comes_back(daemons):
    d = daemons.start(FTP_EXTRA, users=_users(daemons))
    home = d.home("alice")
    (home / "inbox").mkdir(parents=True)
    home.chmod(0o711)
    c = _ftp(d)
    c.close()
    assert stat.S_IMODE(os.lstat(home).st_mode) == 0o711
    assert stat.S_IMODE(os.lstat(home / "outbox").st_mode) == 0o750  # [accounts] home_mode's default
    (home / "outbox").rmdir()
    sftp_batch(d, "ls /\n", daemons.alice_key, check=True)
    assert (home / "outbox").is_dir()  # checked at each login


def test_a_home_folder_planted_as_a_link_outside_is_not_followed(daemons, tmp_path):
    d = daemons.start(FTP_EXTRA, users=_users(daemons))
    home, outside = d.home("alice"), tmp_path / "outside"
    home.mkdir(parents=True)
    outside.mkdir()
    os.symlink(outside, home / "inbox")
    os.symlink(outside / "gone", home / "outbox")  # dangling: making it would make it outside
    proc = sftp_batch(d, "ls -1 /archive\n", daemons.alice_key, check=True)  # the login goes on
    assert proc.returncode == 0
    assert os.listdir(outside) == []
    assert os.path.islink(home / "inbox") and os.path.islink(home / "outbox") and (home / "archive").is_dir()
    d.wait_log(r"home folder /inbox of alice left alone: a symbolic link or a file is in the way")
    d.wait_log(r"home folder /outbox of alice left alone")


def test_without_create_homes_a_missing_home_refuses_the_login(daemons):
    d = daemons.start(FTP_EXTRA, users=_users(daemons, "[accounts]\ncreate_homes = false\n"))
    c = ftplib.FTP()
    c.connect("127.0.0.1", d.ports["ftp"], timeout=30)
    with pytest.raises(ftplib.error_perm, match="^530 home directory missing: ask your administrator$"):
        c.login("alice", ALICE_PASSWORD)
    c.close()
    proc = sftp_batch(d, "pwd\n", daemons.alice_key)
    assert proc.returncode != 0 and "home directory missing: ask your administrator" in proc.stderr, proc.stderr
    d.wait_log(r"home directory \S+/homes/alice does not exist \(create_homes is off\)")
    assert not d.home("alice").exists()
    d.home("alice").mkdir(parents=True)  # the administrator makes it: the next login works, and makes nothing
    sftp_batch(d, "pwd\n", daemons.alice_key, check=True)
    assert os.listdir(d.home("alice")) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root (CI runs as root)")
def test_as_root_a_made_home_belongs_to_home_owner(daemons):
    import pwd

    nobody = pwd.getpwnam("nobody")
    d = daemons.start(users=_users(daemons, '[accounts]\nhome_owner = "nobody"\n'))
    sftp_batch(d, "ls /\n", daemons.alice_key, check=True)
    for path in (d.home("alice"), d.home("alice") / "inbox"):
        st = os.lstat(path)
        assert (st.st_uid, st.st_gid) == (nobody.pw_uid, nobody.pw_gid), path
    assert os.lstat(d.home("alice").parent).st_uid == 0  # nothing outside the home is chowned

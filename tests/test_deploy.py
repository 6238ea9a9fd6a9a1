"""Deployment files and the state_dir backup: the unit parses, a backup of a live daemon restores."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest

from conftest import BIN, DaemonFactory, IN_CI

ROOT = Path(__file__).resolve().parent.parent


def test_systemd_unit_verifies(tmp_path: Path):
    tool = shutil.which("systemd-analyze")
    if tool is None:
        if IN_CI:
            pytest.fail("systemd-analyze is not installed")
        pytest.skip("systemd-analyze is not installed")
    unit = (ROOT / "conf" / "scriptsftp.service").read_text()
    # verify checks that ExecStart exists: point it at this install
    unit = unit.replace("/opt/scriptsftp/venv/bin/scriptsftp", str(BIN))
    (tmp_path / "scriptsftp.service").write_text(unit)
    proc = subprocess.run([tool, "verify", str(tmp_path / "scriptsftp.service")], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and "scriptsftp.service" not in proc.stderr, proc.stderr
    for must in ("NoNewPrivileges=yes", "ProtectSystem=strict", "AmbientCapabilities=CAP_NET_BIND_SERVICE",
                 "SystemCallFilter=@system-service", "ExecReload=/bin/kill -HUP $MAINPID", "User=scriptsftp"):
        assert must in unit


def test_backup_of_a_running_daemon_restores_bans_and_host_keys(daemons: DaemonFactory, tmp_path: Path):
    from test_defender import LEGIT_ONLY, defender_toml, fail_password, refusal_text

    extra = defender_toml(allow_list=LEGIT_ONLY, threshold=2)
    d = daemons.start(extra)
    fail_password(d, "127.0.0.2", tries=2)
    d.wait_log(r"banned 127\.0\.0\.2")
    dest = tmp_path / "backup"
    proc = subprocess.run([str(BIN), "backup", "-c", str(d.config), str(dest)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "defender.db (sqlite)" in proc.stdout
    assert (dest / "host_keys").is_dir()
    with sqlite3.connect(dest / "defender.db") as db:  # the ban is in the copy, WAL included
        assert db.execute("SELECT ip FROM hosts").fetchall() == [("127.0.0.2",)]
    again = subprocess.run([str(BIN), "backup", "-c", str(d.config), str(dest)], capture_output=True, text=True,
                           timeout=60)
    assert again.returncode == 1 and "not empty" in again.stderr
    # restore: stop, replace state_dir, start: the ban and the host key are back
    host_key = (d.state_dir / "host_keys" / "ssh_host_ed25519_key").read_bytes()
    assert d.stop() == 0
    shutil.rmtree(d.state_dir)
    shutil.copytree(dest, d.state_dir)
    d2 = daemons.start(extra, config=d.config)
    assert (d2.state_dir / "host_keys" / "ssh_host_ed25519_key").read_bytes() == host_key
    assert "is banned until" in refusal_text(d2, "127.0.0.2")

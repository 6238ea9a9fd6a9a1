"""A generated first password never goes into the log (issue: raw banner inside JSON logs).

The test harness starts the daemon with stderr on a pipe, as systemd or a log collector
would: the password must then be in a 0600 file under state_dir, the log only says where,
and every log line stays valid JSON."""

from __future__ import annotations

import json
import stat

from argon2 import PasswordHasher

from conftest import toml_str


def test_a_generated_password_goes_to_a_private_file_not_the_log(daemons):
    users = f"""
[[users]]
name = "demo"
home = "homes/demo"
permissions = {{ "/" = ["*"] }}
password_hash_file = {toml_str("state/demo.passwd")}
generate_password = true
"""
    path = daemons.write_config(users=users)
    path.write_text(path.read_text().replace('log_level = "info"', 'log_level = "info"\nlog_format = "json"'))
    d = daemons.start(config=path)
    note = d.state_dir / "generated-passwords" / "demo.txt"
    password = note.read_text().strip()
    assert stat.S_IMODE(note.stat().st_mode) == 0o600
    assert PasswordHasher().verify((d.state_dir / "demo.passwd").read_text().strip(), password)
    d.wait_log(r"generated a password for user 'demo'")
    log = d.log_text()
    assert password not in log
    for line in log.splitlines():
        json.loads(line)  # no raw banner between JSON lines


def test_on_a_terminal_the_password_is_shown_there_and_no_file_is_written(daemons):
    """stderr a TTY (an admin's first `make run`): the banner is printed there, once."""
    import os
    import pty
    import re
    import select
    import signal
    import subprocess
    import time

    from conftest import BIN

    users = f"""
[[users]]
name = "demo"
home = "homes/demo"
permissions = {{ "/" = ["*"] }}
password_hash_file = {toml_str("state/demo.passwd")}
generate_password = true
"""
    path = daemons.write_config(users=users)
    master, slave = pty.openpty()
    proc = subprocess.Popen([str(BIN), "run", "-c", str(path)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=slave, cwd=daemons.root)
    os.close(slave)
    out = b""
    try:
        deadline = time.monotonic() + 60
        while b" ready" not in out:
            assert time.monotonic() < deadline and proc.poll() is None, out.decode(errors="replace")
            if select.select([master], [], [], 0.5)[0]:
                try:
                    out += os.read(master, 65536)
                except OSError:
                    break
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        os.close(master)
    text = out.decode(errors="replace")
    m = re.search(r"generated a password for user 'demo':\s+(\S+)", text)
    assert m, text
    assert PasswordHasher().verify((daemons.root / "state" / "demo.passwd").read_text().strip(), m.group(1))
    assert not (daemons.root / "state" / "generated-passwords").exists()
    assert text.count(m.group(1)) == 1  # shown once, in the banner only

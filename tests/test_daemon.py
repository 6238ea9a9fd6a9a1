"""The daemon as a process: reload on SIGHUP, graceful stop on SIGTERM/SIGINT, refusals at start."""

from __future__ import annotations

import os
import signal
import socket
import subprocess

import paramiko
import pytest

from conftest import BIN, close_client, paramiko_client, user_toml


def _users(daemons, alice_perms: str, bob_perms: str, bob_disabled: bool = False, extra: str = "") -> str:
    return (
        user_toml("alice", keys=[daemons.alice_key], permissions=alice_perms)
        + user_toml("bob", keys=[daemons.bob_key], permissions=bob_perms,
                    **({"disabled": "true"} if bob_disabled else {}))
        + extra
    )


ALL = '{ "/" = ["*"] }'
READ = '{ "/" = ["list", "download"] }'


def _upload(client, path: str, data: bytes = b"data") -> None:
    with client.open(path, "w") as f:
        f.write(data)


def _refused(client, path: str) -> None:
    with pytest.raises(PermissionError):
        _upload(client, path)


# --- SIGHUP ----------------------------------------------------------------------------


def test_sighup_applies_new_permissions_to_live_sessions(daemons):
    d = daemons.start(users=_users(daemons, ALL, READ))
    for u in ("alice", "bob"):
        d.home(u).mkdir(parents=True, exist_ok=True)
    (d.home("alice") / "keep-reading.bin").write_bytes(os.urandom(100_000))
    alice = paramiko_client(d, "alice", key=daemons.alice_key)
    bob = paramiko_client(d, "bob", key=daemons.bob_key)
    try:
        _upload(alice, "/before.txt")
        _refused(bob, "/before.txt")
        reading = alice.open("keep-reading.bin")
        first = reading.read(1000)

        daemons.write_config(users=_users(daemons, READ, ALL))
        mark = len(d.lines)
        d.signal(signal.SIGHUP)
        d.wait_log(r"configuration reloaded \(2 users\)", start=mark)

        # the same connections, now with the new rights
        _refused(alice, "/after.txt")
        _upload(bob, "/after.txt", b"bob now may")
        assert (d.home("bob") / "after.txt").read_bytes() == b"bob now may"
        assert not (d.home("alice") / "after.txt").exists()
        # a file opened before the reload keeps working (reading is still allowed)
        assert first + reading.read() == (d.home("alice") / "keep-reading.bin").read_bytes()
        reading.close()
        assert alice.get_channel().get_transport().is_active()
        assert "closing session" not in d.log_text()
    finally:
        close_client(alice)
        close_client(bob)


def test_sighup_with_broken_config_keeps_the_running_one(daemons):
    d = daemons.start(users=_users(daemons, ALL, READ))
    d.home("alice").mkdir(parents=True, exist_ok=True)
    alice = paramiko_client(d, "alice", key=daemons.alice_key)
    try:
        text = d.config.read_text()
        d.config.write_text(text.replace('log_level = "info"', 'log_level = "info"\nbogus = 1'))
        mark = len(d.lines)
        d.signal(signal.SIGHUP)
        m = d.wait_log(r"reload refused: (.*)", start=mark)
        line = next(i for i, t in enumerate(d.config.read_text().splitlines(), 1) if t.startswith("bogus"))
        assert m.group(1) == f"{d.config}:{line}: server.bogus: unknown key"
        _upload(alice, "/still.txt")  # old rules still in force
        assert d.proc.poll() is None
        # a later good reload works
        d.config.write_text(text)
        mark = len(d.lines)
        d.signal(signal.SIGHUP)
        d.wait_log(r"configuration reloaded", start=mark)
    finally:
        close_client(alice)


def test_sighup_disabling_a_user_closes_their_sessions_and_adds_new_users(daemons, stranger_key):
    d = daemons.start(users=_users(daemons, ALL, ALL))
    d.home("bob").mkdir(parents=True, exist_ok=True)
    bob = paramiko_client(d, "bob", key=daemons.bob_key)
    alice = paramiko_client(d, "alice", key=daemons.alice_key)
    try:
        f = bob.open("/unfinished.txt", "w")
        f.write(b"half")
        f.flush()
        with pytest.raises(paramiko.AuthenticationException):
            paramiko_client(d, "carol", key=stranger_key)
        daemons.write_config(users=_users(daemons, ALL, ALL, bob_disabled=True,
                                          extra=user_toml("carol", keys=[stranger_key])))
        mark = len(d.lines)
        d.signal(signal.SIGHUP)
        d.wait_log(r"closing session of removed or disabled user bob", start=mark)
        d.wait_log(r"upload /unfinished\.txt aborted", start=mark)
        assert not (d.home("bob") / "unfinished.txt").exists()
        with pytest.raises((IOError, EOFError, paramiko.SSHException)):
            bob.listdir("/")
        assert alice.listdir("/") is not None  # others untouched
        carol = paramiko_client(d, "carol", key=stranger_key)
        close_client(carol)
    finally:
        close_client(alice)
        bob.get_channel().get_transport().close()


# --- SIGTERM / SIGINT ------------------------------------------------------------------


def test_sigterm_lets_a_running_transfer_finish(daemons):
    d = daemons.start(users=_users(daemons, ALL, READ))
    home = d.home("alice")
    home.mkdir(parents=True, exist_ok=True)
    (home / "big.bin").write_bytes(b"old")
    client = paramiko_client(d, "alice", key=daemons.alice_key)
    chunks = [os.urandom(256 * 1024) for _ in range(8)]
    f = client.open("big.bin", "w")
    for c in chunks[:4]:
        f.write(c)
    f.flush()
    d.signal(signal.SIGTERM)
    d.wait_log(r"stopping: no new connections; 1 open")
    # no new connections: refused at once (one that slipped in before the listener
    # closed must be hung up on at once, not left waiting for the grace period)
    for _ in range(100):
        try:
            s = socket.create_connection(("127.0.0.1", d.port), timeout=5)
        except ConnectionRefusedError:
            break
        with s:
            s.settimeout(2)
            assert s.recv(100) == b""
    else:
        pytest.fail("the listener kept accepting after SIGTERM")
    # ...but the running transfer goes on and is published
    for c in chunks[4:]:
        f.write(c)
    f.close()
    assert (home / "big.bin").read_bytes() == b"".join(chunks)
    assert d.proc.wait(20) == 0
    d.wait_log(r"upload /big\.bin ok bytes=2097152")
    d.wait_log(r"daemon: stopped")
    assert "Traceback" not in d.log_text()


def test_sigterm_grace_period_expires_and_aborts(daemons):
    path = daemons.write_config(users=_users(daemons, ALL, READ))
    path.write_text(path.read_text().replace("grace_period = 5.0", "grace_period = 0.3"))
    d = daemons.start(config=path)
    home = d.home("alice")
    home.mkdir(parents=True, exist_ok=True)
    (home / "stuck.bin").write_bytes(b"old version")
    client = paramiko_client(d, "alice", key=daemons.alice_key)
    try:
        f = client.open("stuck.bin", "w")
        f.write(b"never finished")
        f.flush()
        d.signal(signal.SIGTERM)
        assert d.proc.wait(20) == 0
    finally:
        client.get_channel().get_transport().close()
    d.wait_log(r"upload /stuck\.bin aborted")
    assert (home / "stuck.bin").read_bytes() == b"old version"
    assert os.listdir(home) == ["stuck.bin"]


def test_signals_right_after_ready_are_handled(daemons):
    """'ready' promises the handlers are in place: a SIGHUP at once reloads, never kills."""
    for _ in range(3):
        d = daemons.start()
        d.signal(signal.SIGHUP)
        d.wait_log(r"configuration reloaded")
        assert d.proc.poll() is None
        d.signal(signal.SIGTERM)
        assert d.proc.wait(20) == 0


def test_sigint_stops_an_idle_daemon(daemons):
    d = daemons.start()
    d.signal(signal.SIGINT)
    assert d.proc.wait(20) == 0
    d.wait_log(r"stopping: no new connections; 0 open")
    d.wait_log(r"daemon: stopped")


# --- refusals at start ----------------------------------------------------------------


@pytest.mark.skipif(os.geteuid() != 0, reason="needs to run as root")
def test_refuses_to_run_as_root_without_allow_root(daemons):
    path = daemons.write_config()
    path.write_text(path.read_text().replace("allow_root = true", "allow_root = false"))
    proc = subprocess.run([str(BIN), "run", "-c", str(path)], capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 2
    assert "refusing to run as root" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (daemons.root / "state" / "staging.db").exists()
    # the command-line flag is the explicit override
    proc = subprocess.Popen([str(BIN), "run", "--allow-root", "-c", str(path)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:
            if "ready" in line:
                break
        else:
            pytest.fail("daemon with --allow-root did not start")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0


def test_bad_config_exits_2_without_traceback(daemons):
    path = daemons.write_config(users='[[users]]\nname = "alice"\nhome = "h"\npermissions = { "/" = ["jump"] }\n')
    proc = subprocess.run([str(BIN), "run", "-c", str(path)], capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"{path}:")
    assert ": users[0].permissions: unknown permission 'jump'" in lines[0]


def test_port_in_use_is_a_clear_error(daemons):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        path = daemons.write_config()
        path.write_text(path.read_text().replace('listen = "127.0.0.1:0"', f'listen = "127.0.0.1:{port}"'))
        proc = subprocess.run([str(BIN), "run", "-c", str(path)], capture_output=True, text=True, timeout=60,
                              stdin=subprocess.DEVNULL)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert "cannot start" in proc.stderr and "in use" in proc.stderr


def test_group_readable_host_key_is_refused(daemons, tmp_path):
    from scriptsftp.server.support.keys import ensure_host_keys

    keys = ensure_host_keys(tmp_path / "hk")
    keys[0].chmod(0o640)
    path = daemons.write_config(sftp_extra=f'host_keys = ["{keys[0]}"]')
    proc = subprocess.run([str(BIN), "run", "-c", str(path)], capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "host key is readable by others (mode 640); chmod 600 it" in proc.stderr


def test_client_reset_after_login_is_an_info_line(daemon, alice_key):
    """A logged-in client whose connection is reset (killed, link dropped) ends its own
    session; paramiko logs 'Socket exception' at ERROR, we at INFO (below paramiko's level)."""
    import struct

    sftp = paramiko_client(daemon, key=alice_key)
    assert sftp.listdir(".") is not None
    mark = len(daemon.lines)
    raw = sftp.get_channel().get_transport().sock
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST
    raw.close()
    daemon.wait_log(r"disconnect after", start=mark, timeout=30)
    with daemon._cond:
        text = "\n".join(daemon.lines[mark:])
    assert " ERROR " not in text, text


def test_port_scan_costs_one_info_line_not_a_traceback(daemon):
    """A TCP connect that closes before the SSH banner (scanner, health check) is the
    client's problem: paramiko logs it as ERROR with a traceback; we log one info line."""
    mark = len(daemon.lines)
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=10):
        pass
    daemon.wait_log(r"ssh handshake failed", start=mark, timeout=30)
    with daemon._cond:
        text = "\n".join(daemon.lines[mark:])
    assert "Traceback" not in text and " ERROR " not in text, text


def test_a_port_in_use_is_named_with_its_holder_before_anything_is_made(daemons):
    """'cannot start: [Errno 98] Address already in use' named neither listener nor port,
    and host keys, passwords and workers were made before it."""
    import socket as _socket
    import subprocess as _subprocess

    from conftest import BIN

    holder = _socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        path = daemons.write_config(f'[ftp]\nenabled = true\nlisten = "127.0.0.1:{port}"\n')
        proc = _subprocess.run([str(BIN), "run", "-c", str(path)], capture_output=True, text=True, timeout=60,
                               cwd=daemons.root)
    finally:
        holder.close()
    assert proc.returncode == 1
    assert f"cannot start: [ftp] listen 127.0.0.1:{port}: address already in use (held by pid {os.getpid()} " \
        in proc.stderr, proc.stderr
    assert not (daemons.root / "state" / "staging.db").exists()
    assert "ssh worker" not in proc.stderr

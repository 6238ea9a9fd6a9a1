"""Pieces that every login runs, made cheaper for connection latency: they must still
give exactly what they gave before (the home's real path, the same log line)."""

from __future__ import annotations

import logging
import os
import sys

import pytest

from scriptsftp.server.support.logs import TextFormatter
from scriptsftp.server.core.storage import LocalStorage as Storage


def test_storage_home_is_the_real_path_through_a_symlink(tmp_path):
    real = tmp_path / "disk" / "alice"
    real.mkdir(parents=True)
    (tmp_path / "homes").mkdir()
    (tmp_path / "homes" / "alice").symlink_to(real)
    s = Storage(tmp_path / "homes" / "alice")
    try:
        assert s.home == real.resolve()
        assert s.host_to_virtual(str(real / "a" / "b"), ()) == ("a", "b")
    finally:
        s.close()


def test_storage_creates_a_missing_home(tmp_path):
    home = tmp_path / "new" / "bob"
    s = Storage(home)
    try:
        assert home.is_dir()
        assert s.home == home.resolve()
    finally:
        s.close()


def test_storage_home_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(OSError):
        Storage(tmp_path / "f")


def test_storage_home_without_proc_falls_back(tmp_path, monkeypatch):
    real_readlink = os.readlink

    def no_proc(path, *a, **kw):
        if str(path).startswith("/proc/"):
            raise FileNotFoundError(path)
        return real_readlink(path, *a, **kw)

    monkeypatch.setattr(os, "readlink", no_proc)
    (tmp_path / "h").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "h")
    s = Storage(tmp_path / "link")
    try:
        assert s.home == (tmp_path / "h").resolve()
    finally:
        s.close()


def _record(msg: str, args: tuple = (), exc_info=None, **extra: object) -> logging.LogRecord:
    return logging.getLogger("scriptsftp.session").makeRecord(
        "scriptsftp.session", logging.INFO, __file__, 1, msg, args, exc_info, extra=extra)


def test_text_line_layout():
    rec = _record("list %s %s", ("/a b", "ok"), sid="s1", user="", proto="sftp", ip="::1", op="list",
                  path="/a b", result="ok", entries=10, reason="two words", empty="", _hidden=1)
    line = TextFormatter().format(rec)
    head, _, rest = line.partition(" INFO    session: ")
    assert len(head) == len("2024-01-01T00:00:00+0000")  # local time with its offset
    # empty head fields are left out; op/path/result are in the message; values with spaces quoted
    assert rest == '[sid=s1 proto=sftp ip=::1] list /a b ok entries=10 reason="two words" empty=""'


def test_text_line_without_context_and_with_traceback():
    try:
        raise ValueError("boom")
    except ValueError:
        rec = _record("plain", exc_info=sys.exc_info())
    line = TextFormatter().format(rec)
    first, _, tb = line.partition("\n")
    assert first.endswith(" INFO    session: plain")
    assert tb.startswith("Traceback") and tb.endswith("ValueError: boom")


def test_text_timestamp_follows_the_record_time():
    f = TextFormatter()
    a, b = _record("x"), _record("x")
    a.created, b.created = 1_700_000_000.2, 1_700_000_061.9
    first, second = f.format(a), f.format(b)
    assert first[:19] != second[:19]
    assert f.format(a)[:19] == first[:19]


def test_handshake_timeout_without_a_timer_thread():
    """paramiko's handshake timeout still ends a client that stops after its banner, and
    no threading.Timer is started for it."""
    import socket
    import threading
    import time

    import paramiko

    from scriptsftp.server.frontends.ssh.server import ServerTransport

    def timers() -> set[threading.Thread]:
        return {x for x in threading.enumerate() if isinstance(x, threading.Timer)}

    before = timers()  # paramiko clients of earlier tests that never finished a handshake keep theirs
    ours, theirs = socket.socketpair()
    t = ServerTransport(ours)
    t.handshake_timeout = 0.5
    t.add_server_key(paramiko.RSAKey.generate(2048))
    failed: list[BaseException] = []

    def serve() -> None:
        try:
            t.start_server(server=paramiko.ServerInterface())
        except BaseException as exc:  # noqa: BLE001 - the test looks at it
            failed.append(exc)

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    try:
        theirs.sendall(b"SSH-2.0-stalled\r\n")
        assert theirs.recv(100).startswith(b"SSH-2.0-")
        assert not timers() - before
        t0 = time.monotonic()
        th.join(10)
        assert 0.4 < time.monotonic() - t0 < 5
        assert failed and not t.is_active()
    finally:
        t.close()
        theirs.close()


def test_closing_a_transport_wakes_its_thread_at_once():
    """The transport thread waits for the socket in 1 s slices (ServerTransport._active_check_timeout,
    not paramiko's 0.1 s, so idle sessions cost nothing); close() must not leave the client's
    connection open until the slice ends."""
    import socket
    import threading
    import time

    import paramiko

    from scriptsftp.server.frontends.ssh.server import ServerTransport

    assert ServerTransport._active_check_timeout >= 1.0
    ours, theirs = socket.socketpair()
    t = ServerTransport(ours)
    t.handshake_timeout = 30
    t.add_server_key(paramiko.RSAKey.generate(2048))
    th = threading.Thread(target=lambda: t.start_server(server=paramiko.ServerInterface()), daemon=True)
    th.start()
    try:
        theirs.sendall(b"SSH-2.0-stalled\r\n")
        assert theirs.recv(100).startswith(b"SSH-2.0-")
        theirs.settimeout(0.3)
        try:
            while theirs.recv(65536):  # our KEXINIT; then the transport thread waits for the client
                pass
        except socket.timeout:
            pass
        theirs.settimeout(10)
        t0 = time.monotonic()
        t.close()
        assert theirs.recv(100) == b""  # EOF, not a timeout
        th.join(5)
        assert time.monotonic() - t0 < 0.5 and not t.is_alive()  # without the shutdown: ~0.7 s (1 s - 0.3 s)
    finally:
        t.close()
        theirs.close()

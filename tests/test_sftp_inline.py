"""READ and WRITE answered by the transport thread (SFTPHandler._pump), everything else by the
SFTP thread: order, flow control, key exchange and the idle timeout must not notice the split."""

from __future__ import annotations

import os
import threading
import time

import paramiko
import pytest

from conftest import paramiko_client


@pytest.fixture(scope="module")
def daemon(module_daemons):
    d = module_daemons.start(sftp_extra="idle_timeout = 1.5")
    d.home().mkdir(parents=True, exist_ok=True)
    return d


def _client(daemon, key, **transport_kw) -> paramiko.SFTPClient:
    transport = paramiko.Transport(("127.0.0.1", daemon.port), **transport_kw)
    transport.start_client(timeout=10)
    transport.auth_publickey("alice", paramiko.PKey.from_path(str(key.private)))
    return paramiko.SFTPClient.from_transport(transport)


def _close(sftp: paramiko.SFTPClient) -> None:
    sftp.get_channel().get_transport().close()


def test_pipelined_writes_then_other_requests_keep_their_order(daemon, alice_key) -> None:
    """200 WRITEs in flight (answered inline), then CLOSE, STAT and RENAME (answered by the
    SFTP thread) right behind them: the file must be whole when CLOSE publishes it."""
    data = os.urandom(200 * 32768)
    sftp = paramiko_client(daemon, key=alice_key)
    try:
        with sftp.open("order.bin", "wb") as f:
            f.set_pipelined(True)
            for i in range(200):
                f.write(data[i * 32768:(i + 1) * 32768])
        assert sftp.stat("order.bin").st_size == len(data)
        sftp.rename("order.bin", "order2.bin")
        with sftp.open("order2.bin", "rb") as f:
            f.prefetch()
            assert f.read() == data
    finally:
        _close(sftp)
    assert (daemon.home() / "order2.bin").read_bytes() == data


def test_small_client_window_falls_back_without_deadlock(daemon, alice_key) -> None:
    """A 64 KiB client window cannot hold a 255 KiB READ reply: the transport thread must leave
    such READs to the SFTP thread (waiting for window there is safe) and go on reading."""
    data = os.urandom(5 * 2**20 + 17)
    (daemon.home() / "win.bin").write_bytes(data)
    sftp = _client(daemon, alice_key, default_window_size=65536, default_max_packet_size=32768)
    try:
        with sftp.open("win.bin", "rb") as f:
            f.prefetch()
            assert f.read() == data
    finally:
        _close(sftp)


def test_key_exchanges_during_transfers_both_ways(daemon, alice_key) -> None:
    """The client rekeys every MiB; while a key exchange runs the transport thread must not
    answer (it would wait for itself), the SFTP thread takes over."""
    data = os.urandom(8 * 2**20)
    sftp = paramiko_client(daemon, key=alice_key)
    transport = sftp.get_channel().get_transport()
    transport.packetizer.REKEY_BYTES = 2**20
    try:
        with sftp.open("rekey.bin", "wb") as f:
            f.set_pipelined(True)
            f.write(data)
        with sftp.open("rekey.bin", "rb") as f:
            f.prefetch()
            assert f.read() == data
    finally:
        _close(sftp)
    assert daemon.log_text().count("idle timeout") == 0


def test_idle_session_is_closed_busy_one_is_not(daemon, alice_key) -> None:
    """idle_timeout = 1.5 s counts from the last request answered by either thread."""
    (daemon.home() / "busy.bin").write_bytes(os.urandom(65536))
    start = len(daemon.lines)
    busy, idle = paramiko_client(daemon, key=alice_key), paramiko_client(daemon, key=alice_key)
    try:
        done = threading.Event()
        closed_at: list[float] = []

        def wait_closed() -> None:
            idle.get_channel().recv_exit_status()  # the server's exit-status, sent as it closes
            closed_at.append(time.monotonic())
            done.set()

        opened = time.monotonic()
        threading.Thread(target=wait_closed, daemon=True).start()
        with busy.open("busy.bin", "rb") as f:
            while not done.is_set() or time.monotonic() - opened < 3.0:  # READs only: all inline
                f.seek(0)
                assert len(f.read(65536)) == 65536
                if time.monotonic() - opened > 15:
                    break
        assert done.is_set(), "the idle session was never closed"
        assert 1.2 <= closed_at[0] - opened < 10
        assert busy.listdir(".")  # the busy one, past 3 s of READs, is still served
    finally:
        _close(busy)
        _close(idle)
    assert "\n".join(daemon.lines[start:]).count("sftp idle timeout") == 1


def test_concurrent_pipelined_uploads_with_held_replies(daemon, alice_key) -> None:
    """With several connections busy, status replies wait until their connection has nothing
    more to read (sftp._crowded): every upload must still complete whole, none may stall."""
    blobs = [os.urandom(3 * 2**20 + i) for i in range(4)]
    errors: list[BaseException] = []

    def upload(i: int) -> None:
        try:
            sftp = paramiko_client(daemon, key=alice_key)
            try:
                with sftp.open(f"crowd{i}.bin", "wb") as f:
                    f.set_pipelined(True)
                    for pos in range(0, len(blobs[i]), 30000):  # curl's WRITE size
                        f.write(blobs[i][pos:pos + 30000])
            finally:
                _close(sftp)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=upload, args=(i,)) for i in range(len(blobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and not any(t.is_alive() for t in threads)
    for i, blob in enumerate(blobs):
        assert (daemon.home() / f"crowd{i}.bin").read_bytes() == blob


def test_malformed_write_is_answered_and_the_session_goes_on(daemon, alice_key) -> None:
    """A WRITE whose data length runs past its message skips the direct path
    (SFTPHandler._answer_direct) and gets the generic parse; a WRITE or READ on an
    unknown handle gets a status; none ends the session."""
    from paramiko.sftp import CMD_READ, CMD_STATUS, CMD_WRITE

    sftp = paramiko_client(daemon, key=alice_key)
    try:
        with sftp.open("bad.bin", "wb") as f:
            for req, handle, declared, data in ((9001, f.handle, 100, b"0123456789"),
                                                (9002, b"no-such-handle", 5, b"abcde")):
                msg = paramiko.Message()
                msg.add_int(req)
                msg.add_string(handle)
                msg.add_int64(0)
                msg.add_int(declared)
                sftp._send_packet(CMD_WRITE, paramiko.Message(msg.asbytes() + data))
                t, reply = sftp._read_packet()
                answer = paramiko.Message(reply)
                assert (t, answer.get_int()) == (CMD_STATUS, req)
                if handle == b"no-such-handle":
                    assert answer.get_int() != 0
        msg = paramiko.Message()
        msg.add_int(9003)
        msg.add_string(b"no-such-handle")
        msg.add_int64(0)
        msg.add_int(100)
        sftp._send_packet(CMD_READ, msg)
        t, reply = sftp._read_packet()
        answer = paramiko.Message(reply)
        assert (t, answer.get_int()) == (CMD_STATUS, 9003) and answer.get_int() != 0
        assert sftp.listdir(".")
    finally:
        _close(sftp)


def test_crowded_means_another_connection_was_served_just_now() -> None:
    from scriptsftp.server.frontends.ssh.channels import ReplyPacing

    pacing = ReplyPacing()
    a, b = object(), object()
    pacing.crowded(a)
    assert pacing.crowded(b)  # a was answered a moment ago
    assert not pacing.crowded(b)  # only b since
    pacing._at -= 1.0
    assert not pacing.crowded(a)  # b, but long ago

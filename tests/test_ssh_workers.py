"""SSH in worker processes (``[sftp] processes``): the daemon decides, workers move bytes.

The rest of the suite runs with ``processes = 2`` (conftest); here: the
in-process listener (``processes = 1``), a worker that dies mid-upload, a daemon
that dies under its workers, and the core's end of a link fed by a hostile worker.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import socket
import struct
import subprocess
import threading
import time

import paramiko
import pytest

from conftest import ALICE_PASSWORD, SSH_OPTS, close_client, paramiko_client, require_tool, sftp_batch, user_toml

STAGING = ".scriptsftp-part-"


def worker_pids(d) -> list[int]:
    return [int(p) for p in re.findall(r"ssh worker \d+ started \(pid (\d+)\)", d.log_text())]


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # exited, not yet reaped by init
    except FileNotFoundError:
        return True


def wait_until(condition, timeout: float = 20.0, what: str = "condition") -> None:
    """Bounded poll where there is no event to wait on (process exit seen from outside)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def open_files(pid: int) -> set[str]:
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            continue
    return out


def holder_of(pids: list[int], name_part: str) -> int:
    """The process that has a file whose path contains ``name_part`` open."""
    for pid in pids:
        if any(name_part in f for f in open_files(pid)):
            return pid
    raise AssertionError(f"no worker has {name_part} open")


def test_in_process_listener_serves_sftp_and_scp(daemons, alice_key, tmp_path):
    require_tool("scp")
    d = daemons.start(sftp_extra="processes = 1")
    assert "ssh worker" not in d.log_text()
    src = tmp_path / "a.txt"
    src.write_bytes(os.urandom(300_000))
    sftp_batch(d, f"put {src} a.txt\nrename a.txt b.txt\nget b.txt {tmp_path / 'back.txt'}\n", alice_key, check=True)
    assert (tmp_path / "back.txt").read_bytes() == src.read_bytes() == (d.home() / "b.txt").read_bytes()
    subprocess.run(["scp", "-O", "-P", str(d.port), "-i", str(alice_key.private), *SSH_OPTS, str(src),
                    "alice@127.0.0.1:c.txt"], check=True, capture_output=True, timeout=60)
    assert (d.home() / "c.txt").read_bytes() == src.read_bytes()


def test_worker_killed_mid_upload_drops_only_its_connections(daemons, alice_key):
    d = daemons.start(sftp_extra="processes = 2")
    pids = worker_pids(d)
    assert len(pids) == 2
    home = d.home()
    home.mkdir(parents=True, exist_ok=True)
    (home / "f.bin").write_bytes(b"old version")
    victim_client = paramiko_client(d, key=alice_key)
    f = victim_client.open("f.bin", "w")
    f.write(b"x" * 200_000)
    f.flush()
    staged = [n for n in os.listdir(home) if n.startswith(STAGING)]
    assert len(staged) == 1
    victim = holder_of(pids, staged[0])
    bystander = paramiko_client(d, key=alice_key)  # the other worker serves the fewest connections
    assert holder_of(pids, staged[0]) == victim
    try:
        os.kill(victim, signal.SIGKILL)
        d.wait_log(rf"ssh worker \d \(pid {victim}\) exited")
        d.wait_log(r"upload /f.bin aborted")
        assert (home / "f.bin").read_bytes() == b"old version"
        assert not [n for n in os.listdir(home) if n.startswith(STAGING)]
        with pytest.raises((OSError, EOFError, paramiko.SSHException)):
            f.write(b"y" * 100_000)
            f.close()
        assert bystander.listdir(".") == ["f.bin"]  # its worker lives on
        replacement = d.wait_log(r"ssh worker \d started \(pid (\d+)\)", start=len(d.lines) - 20)
        assert int(replacement[1]) not in pids
        fresh = paramiko_client(d, key=alice_key)
        with fresh.open("g.bin", "w") as g:
            g.write(b"after")
        assert (home / "g.bin").read_bytes() == b"after"
        close_client(fresh)
    finally:
        close_client(bystander)
        victim_client.get_channel().get_transport().close()


def listening_socket(port: int) -> str:
    """``socket:[inode]`` of the IPv4 socket listening on ``port``, as /proc/PID/fd shows it."""
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":  # 0A: LISTEN
                return f"socket:[{fields[9]}]"
    raise AssertionError(f"nothing listens on {port}")


def test_workers_follow_the_daemon_not_signals(daemons, alice_key):
    d = daemons.start(sftp_extra="processes = 2")
    pids = worker_pids(d)
    listening = listening_socket(d.port)
    assert listening in open_files(d.proc.pid)
    for pid in pids:  # accepting is the core's: workers hold no listening socket
        assert listening not in open_files(pid)
    for pid in pids:  # a Ctrl-C reaches the whole process group: the daemon decides
        os.kill(pid, signal.SIGINT)
        os.kill(pid, signal.SIGTERM)
    c = paramiko_client(d, key=alice_key)
    assert c.listdir(".") == []
    close_client(c)
    assert not any(gone(p) for p in pids)
    d.proc.kill()  # no clean-up at all: the workers notice the daemon is gone
    d.proc.wait()
    wait_until(lambda: all(gone(p) for p in pids), what="workers to exit after the daemon")


# --- the core's end of a link, fed by a worker that breaks the rules -------------------------


@pytest.fixture
def link(tmp_path, password_hashes, alice_key):
    from scriptsftp.server.support.config import load_config
    from scriptsftp.server.frontends.ssh.core_link import CoreLink
    from scriptsftp.server.contract.dispatch import NullDispatcher
    from scriptsftp.server.core.accounts import TomlAccountSource
    from scriptsftp.server.core.login import LoginCore
    from scriptsftp.server.core.session import UploadPolicy

    cfg = tmp_path / "scriptsftp.toml"
    cfg.write_text(user_toml("alice", password_hash=password_hashes["alice"], keys=[alice_key]))
    (tmp_path / "homes" / "alice").mkdir(parents=True)
    core = LoginCore(TomlAccountSource.from_config(load_config(cfg)), NullDispatcher(), staging=None,
                     uploads=UploadPolicy(atomic=False), failure_delay=0)
    links = []

    def open_link() -> tuple[socket.socket, threading.Thread]:
        ours, theirs = socket.socketpair()
        cl = CoreLink(core, ours, ("192.0.2.7", 5555), 22, kick=lambda reason: None)
        t = threading.Thread(target=cl.serve, daemon=True)
        t.start()
        links.append((ours, theirs, t))
        return theirs, t

    sock, t = open_link()
    core.open_link = open_link  # a second worker connection to the same core
    yield core, sock, t
    for ours, theirs, t in links:
        theirs.close()
        t.join(5)
        ours.close()


def answer(sock: socket.socket) -> dict:
    size = struct.unpack("!I", sock.recv(4, socket.MSG_WAITALL))[0]
    return json.loads(sock.recv(size, socket.MSG_WAITALL))


def ask(sock: socket.socket, message: object) -> dict:
    payload = json.dumps(message).encode()
    sock.sendall(struct.pack("!I", len(payload)) + payload)
    return answer(sock)


def test_core_link_answers_only_what_a_worker_may_ask(link):
    core, sock, thread = link
    assert answer(sock)["ok"]["allowed"]  # the connect decision comes first, unasked
    assert ask(sock, {"op": "connect", "args": []})["error"][0] == "Failure"  # once only
    (conn,) = core.connections()
    assert conn.remote_ip == "192.0.2.7"  # the address the core accepted, never the worker's word
    for bad in ({"op": "open_session", "args": ["sftp"]},  # not logged in
                {"op": "call", "args": [1, "__class__", [], {}]},
                {"op": "__init__", "args": []}, {"args": []}, ["connect"],
                {"op": "close_handle", "args": [99, -1]}):
        assert ask(sock, bad)["error"][0] in ("Failure", "PermissionDenied"), bad
    assert ask(sock, {"op": "check_password", "args": ["nobody", {"not": "a string"}]}) == {"ok": False}
    # a login is taken from the worker only after the core accepted those credentials itself
    finish = {"op": "finish_login", "args": ["alice", "password"]}
    assert ask(sock, finish)["error"][0] == "Failure"
    assert ask(sock, {"op": "check_password", "args": ["alice", "wrong"]}) == {"ok": False}
    assert ask(sock, finish)["error"][0] == "Failure"
    assert ask(sock, {"op": "finish_login", "args": ["alice", "publickey"]})["error"][0] == "Failure"
    assert not conn.user
    assert ask(sock, {"op": "check_password", "args": ["alice", ALICE_PASSWORD]}) == {"ok": True}
    assert ask(sock, finish)["ok"][0] is True
    assert conn.user == "alice"
    sock.sendall(struct.pack("!I", 64 << 20))  # a message far over the limit ends the link
    thread.join(5)
    assert not thread.is_alive()
    assert core.connections() == []  # and the connection with it


# --- the worker template and recycling ------------------------------------------------------


def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def own_memory_kb(pid: int) -> int:
    """Private (unshared) memory: what the process costs beyond what it shares with others."""
    total = 0
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                total += int(line.split()[1])
    return total


def template_pid(d) -> int:
    return int(d.wait_log(r"ssh worker template started \(pid (\d+)\)")[1])


def replace_by_killing(d, pid: int) -> int:
    """Kill a worker; the pid of the one started in its place."""
    mark = len(d.lines)
    os.kill(pid, signal.SIGKILL)
    d.wait_log(rf"ssh worker \d \(pid {pid}\) exited", start=mark)
    return int(d.wait_log(r"ssh worker \d started \(pid (\d+)\)", start=mark)[1])


def test_replacements_are_forked_from_the_template_and_share_its_memory(daemons, alice_key):
    d = daemons.start(sftp_extra="processes = 2")
    pids = worker_pids(d)
    template = template_pid(d)
    assert parent_of(template) == d.proc.pid
    assert listening_socket(d.port) not in open_files(template)  # accepting stays the core's
    replacement = replace_by_killing(d, pids[0])
    assert parent_of(replacement) == template
    c = paramiko_client(d, key=alice_key)
    c.listdir(".")
    c2 = paramiko_client(d, key=alice_key)  # the fewest connections: one of them is the replacement's
    c2.listdir(".")
    # a new program imports everything itself (~40 MB of its own); a forked one shares it
    assert own_memory_kb(replacement) < 25_000, own_memory_kb(replacement)
    close_client(c)
    close_client(c2)

    # the template gone: later workers start as new programs, and serve
    os.kill(template, signal.SIGKILL)
    d.wait_log(rf"ssh worker template \(pid {template}\) exited")
    program = replace_by_killing(d, pids[1])
    with open(f"/proc/{program}/cmdline", "rb") as f:
        cmdline = f.read()
    assert b"scriptsftp.server.frontends.ssh.worker_process" in cmdline, (cmdline, d.lines[-15:])
    fresh = [paramiko_client(d, key=alice_key) for _ in range(2)]
    for f2 in fresh:
        assert f2.listdir(".") == []
        close_client(f2)


def settled(d, pids: list[int]) -> None:
    """Wait until the pool has taken each worker's size after its start (what growth counts from)."""
    for pid in pids:
        d.wait_log(rf"ssh worker \d \(pid {pid}\) settled at")


def test_a_worker_that_grew_is_retired_once_its_connections_end(daemons, alice_key):
    d = daemons.start(sftp_extra="processes = 2\nworker_max_growth = 65536")
    pids = worker_pids(d)
    settled(d, pids)
    home = d.home()
    old = paramiko_client(d, key=alice_key)
    with old.open("big.bin", "w") as f:  # grows its worker's heap by more than 64 KiB (measured: ~0.2 MB)
        f.write(os.urandom(8 << 20))
    with old.open("up.bin", "w") as f:
        f.write(b"x")
        f.flush()
        staged = [n for n in os.listdir(home) if n.startswith(STAGING)]
        grown = holder_of(pids, staged[0])
    d.wait_log(rf"ssh worker \d \(pid {grown}\) grew by [\d.]+ MB .*retiring it once its 1 connection\(s\) end")
    assert not gone(grown)
    # new connections go elsewhere; the old one is served on as before
    new = paramiko_client(d, key=alice_key)
    with new.open("new.bin", "w") as g:
        g.write(b"y")
        g.flush()
        staged = [n for n in os.listdir(home) if n.startswith(STAGING)]
        assert len(staged) == 1
        serving = holder_of([p for p in worker_pids(d) if not gone(p)], staged[0])
        assert serving != grown
    with old.open("after.bin", "w") as h:
        h.write(b"still served")
    assert (home / "after.bin").read_bytes() == b"still served"
    close_client(old)
    d.wait_log(rf"ssh worker \d \(pid {grown}\) retired: its last connection ended")
    wait_until(lambda: gone(grown), what="the retired worker to exit")
    assert f"(pid {grown}) exited with code" not in d.log_text()  # no error, no restart of it
    assert new.listdir(".")
    close_client(new)


def signed_request(key: paramiko.PKey, name: str, session_id: bytes) -> list:
    """What a client signs to log in by key (RFC 4252 section 7), as a worker forwards it."""
    from paramiko.common import cMSG_USERAUTH_REQUEST
    from paramiko.message import Message

    m = Message()
    m.add_string(session_id)
    m.add_byte(cMSG_USERAUTH_REQUEST)
    m.add_string(name)
    m.add_string("ssh-connection")
    m.add_string("publickey")
    m.add_boolean(True)
    m.add_string(key.get_name())
    m.add_string(key.asbytes())
    sig = key.sign_ssh_data(m.asbytes())
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    return [b64(session_id), "ssh-connection", key.get_name(), b64(sig.asbytes())]


def test_a_key_login_is_taken_only_with_a_signature_the_core_verified(link, alice_key):
    """A worker taken over knows users' public keys (they are not secret): that alone must
    not log it in. The core checks the client's signature itself, and a signature is good
    on one connection only."""
    core, sock, _ = link
    answer(sock)
    key = paramiko.Ed25519Key.from_private_key_file(str(alice_key.private))
    blob = base64.b64encode(key.asbytes()).decode()
    finish = {"op": "finish_login", "args": ["alice", "publickey"]}
    # the client asks whether its key would do (no signature yet): yes, but no login from it
    assert ask(sock, {"op": "key_allowed", "args": ["alice", key.get_name(), blob]}) == {"ok": True}
    assert ask(sock, finish)["error"][0] == "Failure"
    # a forged or mangled signature, a signature for another user, junk in place of a proof
    session_id = os.urandom(32)
    good = signed_request(key, "alice", session_id)
    forged = good[:3] + [base64.b64encode(os.urandom(83)).decode()]
    for bad in (forged, signed_request(key, "bob", session_id), ["x", "y"], [good[0], 1, 2, 3],
                good[:2] + ["rsa-sha2-256"] + good[3:]):
        assert ask(sock, {"op": "key_allowed", "args": ["alice", key.get_name(), blob, bad]}) == {"ok": False}, bad
        assert ask(sock, finish)["error"][0] == "Failure"
    assert not core.connections()[0].user
    # the client's real signature logs in
    assert ask(sock, {"op": "key_allowed", "args": ["alice", key.get_name(), blob, good]}) == {"ok": True}
    assert ask(sock, finish)["ok"][0] is True
    # the same signature replayed by a worker on another connection is refused
    other, _ = core.open_link()
    answer(other)
    assert ask(other, {"op": "key_allowed", "args": ["alice", key.get_name(), blob, good]}) == {"ok": False}
    assert ask(other, finish)["error"][0] == "Failure"
    fresh = signed_request(key, "alice", os.urandom(32))  # a new connection's own signature is fine
    assert ask(other, {"op": "key_allowed", "args": ["alice", key.get_name(), blob, fresh]}) == {"ok": True}
    assert ask(other, finish)["ok"][0] is True


def test_an_idle_worker_that_grew_a_little_is_retired_at_once(daemons, alice_key):
    """A pause in the traffic gives back what a burst left: with no connection there is
    nothing to drain, so a quarter of the growth is enough."""
    d = daemons.start(sftp_extra=f"processes = 2\nworker_max_growth = {4 << 20}")
    pids = worker_pids(d)
    settled(d, pids)
    idle_retired = re.compile(r"ssh worker \d \(pid (\d+)\) grew by [\d.]+ MB .*and has no connection\): "
                              r"retiring it once its 0 connection\(s\) end")

    def upload(i: int) -> None:
        c = paramiko_client(d, key=alice_key)
        with c.open(f"p{i}.bin", "w") as f:
            f.write(os.urandom(4 << 20))
        close_client(c)

    # bursts of eight at once add ~0.3-1 MB of heap to each worker (measured), until one
    # idle worker is past 1 MiB (a quarter of 4 MiB), short of 4 MiB
    m = None
    for _ in range(12):
        burst = [threading.Thread(target=upload, args=(i,)) for i in range(8)]
        for t in burst:
            t.start()
        for t in burst:
            t.join(120)
        deadline = time.monotonic() + 4.5  # the pool checks every 2 s
        while m is None and time.monotonic() < deadline:
            m = idle_retired.search(d.log_text())
            time.sleep(0.1)
        if m is not None:
            break
    assert m is not None, "no idle worker was retired"
    retired = int(m[1])
    assert retired in pids
    d.wait_log(rf"ssh worker \d \(pid {retired}\) retired: its last connection ended")
    wait_until(lambda: gone(retired), what="the idle worker to exit")
    assert "1 connection(s) end" not in d.log_text()  # no worker was past 2 MiB while it served
    again = paramiko_client(d, key=alice_key)
    assert len(again.listdir(".")) == 8
    close_client(again)


def test_a_template_child_is_watched_past_descriptor_1024():
    """Under attack the daemon holds 2,000+ descriptors, so a worker's pidfd is numbered past
    1024, where select() raises ValueError: a pool that polled with it could no longer hand
    connections to workers (seen in the soak bench: honest clients stalled)."""
    from scriptsftp.server.frontends.ssh.zygote import TemplateChild

    class Template:  # what TemplateChild asks of the template: nothing reported yet
        def exit_code(self, pid):
            return None

        def wait_exit_code(self, pid, timeout):
            return None

        def forget(self, pid):
            pass

    held = []
    try:
        while not held or held[-1] <= 1100:
            held.append(os.open("/dev/null", os.O_RDONLY))
        child = subprocess.Popen(["sleep", "30"])
        watched = TemplateChild(child.pid, Template())
        assert watched._pidfd is not None and watched._pidfd > 1024
        assert watched.poll() is None
        with pytest.raises(subprocess.TimeoutExpired):
            watched.wait(0.05)
        child.kill()
        child.wait()  # reaped by its parent, as the template reaps its children
        assert watched.wait(5) == -1  # ended; its code was not reported
        assert watched.poll() == -1
    finally:
        for fd in held:
            os.close(fd)


def test_a_hand_over_that_fails_does_not_end_accepting():
    """Any failure handing one connection over (it once was a ValueError) must leave the
    listener accepting the next: the accept thread is the only one."""
    from scriptsftp.server.frontends.ssh.server import accept_forever

    listener = socket.create_server(("127.0.0.1", 0))
    stopping = threading.Event()
    served: list[tuple] = []
    second = threading.Event()

    def accepted(client: socket.socket, addr: tuple) -> None:
        if not served:
            served.append(addr)
            raise ValueError("a bug in the hand-over")
        served.append(addr)
        client.close()
        second.set()

    t = threading.Thread(target=accept_forever, args=(listener, stopping, accepted), daemon=True)
    t.start()
    try:
        first = socket.create_connection(listener.getsockname())
        assert first.recv(1) == b""  # closed by the listener after the failure, not left hanging
        socket.create_connection(listener.getsockname()).close()
        assert second.wait(10) and len(served) == 2
        assert t.is_alive()
    finally:
        stopping.set()
        listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        t.join(5)

"""Fault injection: every protocol x every fault, one invariant (docs/architecture.md rule 7).

An upload over an existing file is interrupted by a fault; afterwards the file is
exactly the old version or exactly the new one, byte for byte, never anything
else, no ``.scriptsftp-part-*`` file is left anywhere in the home, and after the
daemon is stopped and started again on the same state_dir no staging record and
no staging file survives.

Protocols: SFTP in-process (``[sftp] processes = 1``) and in worker processes
(``processes = 2``), scp in legacy mode (``scp -O``) and in SFTP mode (``scp -s``),
FTP, explicit FTPS, HTTP PUT and WebDAV (a locked resource written with ``If:``),
each driven by the real command-line client (OpenSSH sftp/scp, curl) run as its own
process group. Where the reply matters on a full disk, FTP uses a small ftplib client
instead of curl: curl stops at the failed send and never reads the ``452`` that says why.

Faults:

- ``enospc``: the home is a small tmpfs; a 24 MiB upload over a 4 MiB file
  runs out of space half way. Afterwards a smaller upload fits, without restart.
- ``client-kill``: the client (its whole process group) gets SIGKILL mid-upload.
- ``client-stall``: the client (its whole process group) gets SIGSTOP mid-upload, its
  connections left open and silent; the daemon gives up after ``[server] stall_timeout``.
- ``daemon-kill``: the daemon gets SIGKILL mid-upload.
- ``worker-kill``: the SSH worker process serving the upload gets SIGKILL
  (only SFTP/scp with ``processes = 2``).
- ``state-full``: state_dir is a small tmpfs, filled up before the upload; once
  the filler is deleted the daemon takes uploads again by itself.

Beside the matrix: below ``[uploads] min_free_space`` every protocol refuses an upload
before its first byte, with the reply docs/faults.md gives (no root needed).

The full-disk faults mount tmpfs, so they need root: they skip elsewhere, but
fail in CI (where the tests run as root). tests/test_stall.py covers stalls in more
detail (downloads, the replies, idle SSH connections).
"""

from __future__ import annotations

import errno
import ftplib
import hashlib
import http.client
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import (
    ALICE_PASSWORD, IN_CI, SSH_OPTS, DaemonFactory, close_client, paramiko_client, require_tool, user_toml,
)
from httpkit import HTTP_EXTRA, basic, request
from test_ftp import ftp_section, tls_files  # noqa: F401  (tls_files: a fixture used here)

STAGING = ".scriptsftp-part-"
MiB = 1024 * 1024
OLD_SIZE = 4 * MiB  # the file every case overwrites
BIG_SIZE = 24 * MiB  # the interrupted upload (larger than the full-disk tmpfs)
SMALL_SIZE = 2 * MiB  # uploads that fit (state-full case, recovery after a full disk)
HOME_TMPFS = "16m"
STATE_TMPFS = "16m"
RATE_KBIT = 32_000  # throttled clients: ~4 MB/s, so a fault surely lands mid-transfer
STAGED_BEFORE_FAULT = 1 * MiB  # how far the staged file grows before the fault strikes
STALL = 3  # [server] stall_timeout of the rigs: far longer than any pause of a throttled client

SSH_PROTOCOLS = ("sftp-p1", "sftp-p2", "scp-legacy", "scp-sftp")
PROTOCOLS = (*SSH_PROTOCOLS, "ftp", "ftps", "http", "webdav")
WORKER_PROTOCOLS = ("sftp-p2", "scp-legacy", "scp-sftp")  # SSH served by worker processes
FAULTS = ("enospc", "client-kill", "client-stall", "daemon-kill", "worker-kill", "state-full")

CASES = [
    pytest.param(proto, fault, id=f"{proto}-{fault}")
    for fault in FAULTS
    for proto in PROTOCOLS
    if fault != "worker-kill" or proto in WORKER_PROTOCOLS
]


# --- helpers -------------------------------------------------------------------------------


def file_sha(path: Path) -> str | None:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(MiB):
                h.update(chunk)
    except FileNotFoundError:
        return None
    return h.hexdigest()


def part_files(home: Path) -> list[Path]:
    """Every staging file anywhere under ``home``."""
    out = []
    for root, _dirs, files in os.walk(home):
        out += [Path(root) / n for n in files if n.startswith(STAGING)]
    return out


def staged_records(state_dir: Path) -> list[tuple]:
    with sqlite3.connect(state_dir / "staging.db") as con:
        return con.execute("SELECT id, user, directory, staging_name, final_name, state FROM staged").fetchall()


def wait_until(condition, timeout: float = 30.0, what: str = "condition"):
    """Bounded poll where there is no event to wait on (a file growing, a process gone)."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def worker_pids(d) -> list[int]:
    return [int(p) for p in re.findall(r"ssh worker \d+ started \(pid (\d+)\)", d.log_text())]


def holder_of(pids: list[int], name_part: str, timeout: float = 10.0) -> int:
    """The live process that has a file whose path contains ``name_part`` open.

    Polled: the core opens the staging file and hands its descriptor to the worker in
    the open's answer, so the file can exist (and, opened without truncation, already
    hold the old content) a moment before any worker has it."""

    def holder() -> int | None:
        for pid in pids:
            try:
                fds = os.listdir(f"/proc/{pid}/fd")
            except FileNotFoundError:
                continue
            for fd in fds:
                try:
                    if name_part in os.readlink(f"/proc/{pid}/fd/{fd}"):
                        return pid
                except OSError:
                    continue
        return None

    return wait_until(holder, timeout, what=f"a worker (of {pids}) to have {name_part} open")


def require_tmpfs(what: str, mounted: bool) -> None:
    """Full-disk cases mount tmpfs: root only. Skip on a laptop, fail in CI (tests run as root there)."""
    if not mounted:
        msg = f"{what} needs root and a tmpfs mount (" + ("mount failed" if os.geteuid() == 0 else "not root") + ")"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)


def mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
                          capture_output=True)
    return done.returncode == 0


def umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(directory: Path) -> Path:
    """A filler file taking every free byte of ``directory``'s file system."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as f:
        for block in (MiB, 4096, 512, 1):
            chunk = b"\0" * block
            try:
                while True:
                    f.write(chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
    return filler


# --- daemons -------------------------------------------------------------------------------


class Rig:
    """One daemon config (all front ends) and the daemon currently running on it.

    ``restart`` stops it (SIGTERM) and starts a new one on the same config and
    state_dir; tests share a rig and simply carry on with the restarted daemon."""

    def __init__(self, root: Path, keys, hashes, host_keys, tls, *, processes: int) -> None:
        self.root = root
        srv = root / "srv"
        # state_dir and the full-disk user's home are small file systems of their own (as root)
        self.state_tmpfs = mount_tmpfs(srv / "state", STATE_TMPFS)
        self.home_tmpfs = mount_tmpfs(srv / "homes" / "tiny", HOME_TMPFS)
        self.mounts = [m for m, ok in ((srv / "state", self.state_tmpfs), (srv / "homes" / "tiny", self.home_tmpfs))
                       if ok]
        alice_key, bob_key = keys
        self.factory = DaemonFactory(root, alice_key, bob_key, hashes, host_keys)
        users = "".join(user_toml(u, keys=[alice_key], password_hash=hashes["alice"]) for u in ("alice", "tiny"))
        # no free-space reserve: the disk really fills mid-upload (the reserve refuses uploads up front)
        self.config = self.factory.write_config(
            ftp_section("explicit", *tls) + HTTP_EXTRA + "\n[uploads]\nmin_free_space = 0\n", users=users,
            server_extra=f"stall_timeout = {STALL}", sftp_extra=f"processes = {processes}")
        for u in ("alice", "tiny"):
            (srv / "homes" / u).mkdir(parents=True, exist_ok=True)
        try:
            self.d = self.factory.start(config=self.config)
        except BaseException:
            self.close()
            raise

    def restart(self) -> None:
        self.d.stop()
        self.d = self.factory.start(config=self.config)

    def ensure_running(self) -> None:
        if self.d.proc.poll() is not None:
            self.d = self.factory.start(config=self.config)

    def close(self) -> None:
        try:
            self.factory.close()
        finally:
            for m in reversed(self.mounts):
                umount(m)


@pytest.fixture(scope="module")
def rigs(tmp_path_factory, alice_key, bob_key, password_hashes, host_keys, tls_files):
    made: dict[int, Rig] = {}

    def get(processes: int) -> Rig:
        if processes not in made:
            made[processes] = Rig(tmp_path_factory.mktemp(f"faults-p{processes}"), (alice_key, bob_key),
                                  password_hashes, host_keys, tls_files, processes=processes)
        rig = made[processes]
        rig.ensure_running()
        return rig

    yield get
    for rig in made.values():
        rig.close()


@dataclass
class Payloads:
    old: Path
    big: Path
    small: Path


@pytest.fixture(scope="module")
def payloads(tmp_path_factory) -> Payloads:
    d = tmp_path_factory.mktemp("payloads")
    p = Payloads(d / "old.bin", d / "big.bin", d / "small.bin")
    for path, size in ((p.old, OLD_SIZE), (p.big, BIG_SIZE), (p.small, SMALL_SIZE)):
        path.write_bytes(os.urandom(size))
    return p


# --- clients -------------------------------------------------------------------------------


class Upload:
    """A real client uploading ``src`` to ``/name`` as ``user``, running as its own process group."""

    def __init__(self, rig: Rig, proto: str, user: str, src: Path, name: str, tmp: Path, *,
                 throttle: bool, ftp_reply: bool = False) -> None:
        self.proto, self.name = proto, name
        d = rig.d
        key = str(rig.factory.alice_key.private)
        stdin = subprocess.DEVNULL
        if proto.startswith("sftp"):
            require_tool("sftp")
            batch = tmp / f"{name}.batch"
            batch.write_text(f"put {src} {name}\n")
            cmd = ["sftp", *(["-l", str(RATE_KBIT)] if throttle else []), "-b", str(batch), "-i", key,
                   "-P", str(d.port), *SSH_OPTS, f"{user}@127.0.0.1"]
        elif proto.startswith("scp"):
            require_tool("scp")
            mode = "-O" if proto == "scp-legacy" else "-s"
            cmd = ["scp", mode, *(["-l", str(RATE_KBIT)] if throttle else []), "-i", key, "-P", str(d.port),
                   *SSH_OPTS, str(src), f"{user}@127.0.0.1:{name}"]
        else:
            require_tool("curl")
            rate = ["--limit-rate", f"{RATE_KBIT // 8}K"] if throttle else []
            common = ["curl", "-sS", "-v", *rate, "-T", str(src), "-u", f"{user}:{ALICE_PASSWORD}"]
            if proto in ("ftp", "ftps") and ftp_reply:
                # curl stops at a failed send and never reads the reply that says why: this client does
                cmd = [sys.executable, "-c", FTPLIB_CLIENT, str(d.ports["ftp"]), user, ALICE_PASSWORD, name,
                       str(src), "tls" if proto == "ftps" else "plain"]
            elif proto in ("ftp", "ftps"):
                tls = ["--ssl-reqd", "-k"] if proto == "ftps" else []
                cmd = [*common, *tls, f"ftp://127.0.0.1:{d.ports['ftp']}/{name}"]
            else:
                headers = []
                if proto == "webdav":  # what a WebDAV client does: lock the resource, write with the token
                    lock = request(d, "LOCK", f"/{name}", LOCK_BODY, {"Depth": "0", "Timeout": "Second-600"},
                                   user=user)
                    assert lock.status in (200, 201), lock
                    headers = ["-H", f"If: ({lock.headers['lock-token']})"]
                cmd = [*common, *headers, "--fail", "-o", "/dev/null", "-w", "HTTP-STATUS %{http_code}\n",
                       f"http://127.0.0.1:{d.ports['http']}/{name}"]
        self.proc = subprocess.Popen(cmd, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     start_new_session=True)
        self.out = self.err = ""

    def wait(self, timeout: float = 60) -> int:
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            out, err = self.proc.communicate()
            self.out, self.err = out.decode("utf-8", "replace"), err.decode("utf-8", "replace")
            raise AssertionError(f"{self.proto} client did not finish in {timeout}s\n" + self.seen()) from None
        self.out, self.err = out.decode("utf-8", "replace"), err.decode("utf-8", "replace")
        return self.proc.returncode

    def kill(self) -> None:
        """kill -9 the client and whatever it started (the ssh under sftp/scp)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def seen(self) -> str:
        return f"{self.proto} client exit {self.proc.returncode}\nstdout: {self.out[-2000:]}\nstderr: {self.err[-3000:]}"


FTPLIB_CLIENT = r"""
import ftplib, ssl, sys
port, user, password, name, src, mode = sys.argv[1:]
if mode == "tls":
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    ftp = ftplib.FTP_TLS(context=ctx, timeout=60)
else:
    ftp = ftplib.FTP(timeout=60)
ftp.connect("127.0.0.1", int(port))
ftp.login(user, password)
if mode == "tls":
    ftp.prot_p()
ftp.voidcmd("TYPE I")
try:
    conn = ftp.transfercmd("STOR " + name)
    print("STOR", flush=True)
except ftplib.all_errors as exc:
    print("REPLY", exc)
    sys.exit(1)
sent = True
with open(src, "rb") as f:
    try:
        while chunk := f.read(65536):
            conn.sendall(chunk)
        if mode == "tls":
            conn.unwrap()
    except OSError as exc:
        print("SEND", exc, flush=True)
        sent = False
    finally:
        conn.close()
ftp.sock.settimeout(5)  # the reply is due at once: do not hang the suite when it never comes
try:
    print("REPLY", ftp.voidresp())
except ftplib.all_errors as exc:
    print("REPLY", exc)
    sys.exit(1)
sys.exit(0 if sent else 1)
"""

LOCK_BODY = (b'<?xml version="1.0" encoding="utf-8"?><D:lockinfo xmlns:D="DAV:"><D:lockscope><D:exclusive/>'
             b'</D:lockscope><D:locktype><D:write/></D:locktype><D:owner>faults</D:owner></D:lockinfo>')


def ftp_reply(up: Upload) -> list[str]:
    """The FTP replies the client printed (curl -v: ``< 452 ...``; the ftplib client: ``REPLY 452 ...``)."""
    return re.findall(r"^(?:< |REPLY )(\d{3}[ -].*)$", up.err + up.out, re.M)


def http_status(up: Upload) -> int:
    m = re.search(r"HTTP-STATUS (\d{3})", up.out)
    return int(m.group(1)) if m else 0


def assert_refused_for_space(up: Upload, scp_says: str) -> None:
    """What the client sees when the server runs out of space (docs/faults.md): a failure, with
    the right code: OpenSSH exits 1 (scp -O prints the server's reason), FTP 452, HTTP 507."""
    assert up.proc.returncode != 0, "the client believes the upload succeeded\n" + up.seen()
    if up.proto in SSH_PROTOCOLS:
        assert up.proc.returncode == 1, up.seen()
        if up.proto == "scp-legacy":
            assert scp_says in up.err, up.seen()
    elif up.proto in ("ftp", "ftps"):
        assert any(r.startswith("452") for r in ftp_reply(up)), "no 452 reply\n" + up.seen()
    elif up.proto in ("http", "webdav"):
        assert http_status(up) == 507, "not 507 Insufficient Storage\n" + up.seen()


def wait_staged(home: Path, minimum: int = STAGED_BEFORE_FAULT) -> Path:
    def big_enough():
        for p in part_files(home):
            try:
                if p.stat().st_size >= minimum:
                    return p
            except FileNotFoundError:
                continue
        return None
    return wait_until(big_enough, what=f"a staged upload to pass {minimum} bytes")


def outcome(d, name: str, start: int, timeout: float = 30) -> str:
    """The daemon's verdict on the upload of /name (aborted, ok, rejected...)."""
    return d.wait_log(rf"upload /{re.escape(name)} (\w+)", start=start, timeout=timeout).group(1)


# --- the invariant -------------------------------------------------------------------------


def assert_old_or_new(rig: Rig, user: str, name: str, old: str, new: str, *, settled: bool = True) -> None:
    """Rule 7 after a fault: ``name`` is exactly the old or exactly the new version; nothing
    staged is left in the home; and across a restart on the same state_dir no staging
    record or file survives. ``settled``: the daemon is alive and has finished with the
    upload, so there must be nothing left *before* the restart either (after a daemon
    crash the leftovers are the restart's to clean)."""

    def check(when: str, d) -> None:
        home = d.home(user)
        got = file_sha(home / name)
        assert got is not None, f"{when}: /{name} vanished"
        assert got in (old, new), (f"{when}: /{name} is neither the old nor the new version "
                                   f"({(home / name).stat().st_size} bytes)\n" + d.log_text()[-3000:])
        left = part_files(home)
        assert not left, f"{when}: staging files left in the home: {left}\n" + d.log_text()[-3000:]

    if settled:
        check("before restart", rig.d)
        assert staged_records(rig.d.state_dir) == [], "staging records left before restart"
    rig.restart()
    check("after restart", rig.d)
    assert staged_records(rig.d.state_dir) == [], "staging records survived a restart"


# --- the matrix ----------------------------------------------------------------------------


@pytest.mark.parametrize(("proto", "fault"), CASES)
def test_fault_leaves_old_or_new(proto, fault, rigs, payloads, tmp_path):
    full_disk = fault in ("enospc", "state-full")
    if full_disk and os.geteuid() != 0:
        require_tmpfs(f"the {fault} case", False)
    rig = rigs(1 if proto == "sftp-p1" else 2)
    if fault == "enospc":
        require_tmpfs("the full-disk case", rig.home_tmpfs)
    elif fault == "state-full":
        require_tmpfs("the state_dir-full case", rig.state_tmpfs)
    user = "tiny" if fault == "enospc" else "alice"
    name = f"{proto}-{fault}.bin"
    home = rig.d.home(user)
    if fault == "enospc":  # the small file system holds only this case's files
        for entry in home.iterdir():
            entry.unlink()
    for stale in (home / name, home / "after.bin"):
        stale.unlink(missing_ok=True)
    (home / name).write_bytes(payloads.old.read_bytes())
    old = file_sha(payloads.old)
    FAULT_CASES[fault](rig, proto, user, name, payloads, tmp_path, old)


def case_enospc(rig, proto, user, name, payloads, tmp, old):
    d, home = rig.d, rig.d.home(user)
    new = file_sha(payloads.big)
    mark = len(d.lines)
    up = Upload(rig, proto, user, payloads.big, name, tmp, throttle=False, ftp_reply=True)
    up.wait()
    verdict = outcome(d, name, mark)
    # nothing to free but the failed upload itself: a smaller one fits at once, no restart
    recover(rig, proto, user, payloads, tmp)
    assert_old_or_new(rig, user, name, old, new)
    assert file_sha(rig.d.home(user) / name) == old  # the new version cannot fit in the tmpfs
    assert verdict in ("aborted", "rejected", "failed"), f"an upload that hit ENOSPC was logged as {verdict}"
    assert_refused_for_space(up, "no space left on device")
    (rig.d.home(user) / "after.bin").unlink()


def recover(rig, proto, user, payloads, tmp) -> None:
    up = Upload(rig, proto, user, payloads.small, "after.bin", tmp, throttle=False, ftp_reply=True)
    assert up.wait() == 0, "the daemon did not recover from a full disk by itself\n" + up.seen()
    assert file_sha(rig.d.home(user) / "after.bin") == file_sha(payloads.small)


def case_client_kill(rig, proto, user, name, payloads, tmp, old):
    d = rig.d
    mark = len(d.lines)
    up = Upload(rig, proto, user, payloads.big, name, tmp, throttle=True)
    try:
        wait_staged(d.home(user))
    finally:
        up.kill()
    assert up.wait() == -signal.SIGKILL
    verdict = outcome(d, name, mark)
    assert_old_or_new(rig, user, name, old, file_sha(payloads.big))
    assert verdict == "aborted", f"a killed client's upload was logged as {verdict}"


def case_client_stall(rig, proto, user, name, payloads, tmp, old):
    d = rig.d
    mark = len(d.lines)
    up = Upload(rig, proto, user, payloads.big, name, tmp, throttle=True)
    try:
        wait_staged(d.home(user))
        os.killpg(up.proc.pid, signal.SIGSTOP)  # frozen: its connections stay open, and silent
        verdict = d.wait_log(rf'upload /{re.escape(name)} (\w+) .*reason="stalled: no data for {STALL:g} s"',
                             start=mark, timeout=STALL + 30).group(1)
    finally:
        up.kill()  # SIGKILL ends a stopped process too
    up.wait()
    assert_old_or_new(rig, user, name, old, file_sha(payloads.big))
    assert file_sha(rig.d.home(user) / name) == old
    assert verdict == "aborted", f"a stalled client's upload was logged as {verdict}"


def case_daemon_kill(rig, proto, user, name, payloads, tmp, old):
    d = rig.d
    workers = worker_pids(d)
    up = Upload(rig, proto, user, payloads.big, name, tmp, throttle=True)
    try:
        wait_staged(d.home(user))
        d.kill()
        wait_until(lambda: all(gone(p) for p in workers), what="the workers to follow the daemon")
        code = up.wait()
    finally:
        up.kill()
    assert code != 0, "the client believes an upload cut by a daemon crash succeeded\n" + up.seen()
    assert file_sha(d.home(user) / name) == old
    assert_old_or_new(rig, user, name, old, file_sha(payloads.big), settled=False)


def case_worker_kill(rig, proto, user, name, payloads, tmp, old):
    d = rig.d
    mark = len(d.lines)
    up = Upload(rig, proto, user, payloads.big, name, tmp, throttle=True)
    try:
        staged = wait_staged(d.home(user))
        victim = holder_of(worker_pids(d), staged.name)
        os.kill(victim, signal.SIGKILL)
        d.wait_log(rf"ssh worker \d+ \(pid {victim}\) exited", start=mark)
        code = up.wait()
    finally:
        up.kill()
    verdict = outcome(d, name, mark)
    assert_old_or_new(rig, user, name, old, file_sha(payloads.big))
    assert verdict == "aborted", f"an upload whose worker died was logged as {verdict}"
    assert code != 0, "the client believes an upload cut by a worker crash succeeded\n" + up.seen()


def case_state_full(rig, proto, user, name, payloads, tmp, old):
    d = rig.d
    new = file_sha(payloads.small)
    filler = fill(d.state_dir)
    try:
        up = Upload(rig, proto, user, payloads.small, name, tmp, throttle=False, ftp_reply=True)
        # the reply comes once the daemon is done (a refusal at open logs no "upload" line). Refused
        # when the staging record cannot be written; SQLite may still find room in its WAL, and then
        # the upload may succeed: both are fine, as long as the file matches what the client was told
        code = up.wait()
        if code != 0:
            assert_refused_for_space(up, "state storage is full")
        got = file_sha(d.home(user) / name)
        assert got == (new if code == 0 else old), (
            f"client exit {code} but the file is {'new' if got == new else 'old' if got == old else 'other'}\n"
            + up.seen())
    finally:
        filler.unlink()
    recover(rig, proto, user, payloads, tmp)
    assert_old_or_new(rig, user, name, old, new)
    (rig.d.home(user) / "after.bin").unlink()


FAULT_CASES = {
    "enospc": case_enospc,
    "client-kill": case_client_kill,
    "client-stall": case_client_stall,
    "daemon-kill": case_daemon_kill,
    "worker-kill": case_worker_kill,
    "state-full": case_state_full,
}


# --- the free-space reserve: refused before any byte, on every protocol ----------------------


@pytest.mark.parametrize("processes", [1, 2])
def test_below_the_free_space_reserve_every_protocol_refuses_up_front(daemons, alice_key, tmp_path, processes):
    """``[uploads] min_free_space`` larger than any disk: every upload is refused when it starts,
    with what docs/faults.md says each client sees, and the old version stays. No root needed."""
    require_tool("scp")
    d = daemons.start('[ftp]\nenabled = true\nlisten = "127.0.0.1:0"\npassive_ports = ""\n' + HTTP_EXTRA
                      + '\n[uploads]\nmin_free_space = "1000TiB"\n', sftp_extra=f"processes = {processes}")
    home = d.home("alice")
    home.mkdir(parents=True, exist_ok=True)
    (home / "keep.bin").write_bytes(b"old")
    nearly_full = "/keep.bin: the server's storage is nearly full; try again later"

    c = paramiko_client(d, key=alice_key)  # SFTP: the OPEN fails with the reason
    try:
        with pytest.raises(IOError, match=re.escape(nearly_full)):
            c.open("/keep.bin", "w")
    finally:
        close_client(c)

    local = tmp_path / "local.bin"
    local.write_bytes(b"new" * 1000)
    proc = subprocess.run(["scp", "-O", "-i", str(alice_key.private), "-P", str(d.port), *SSH_OPTS, str(local),
                           "alice@127.0.0.1:/keep.bin"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and nearly_full in proc.stderr, proc.stderr

    f = ftplib.FTP()
    f.connect("127.0.0.1", d.ports["ftp"], timeout=30)
    try:
        f.login("alice", ALICE_PASSWORD)
        f.voidcmd("TYPE I")
        with pytest.raises(ftplib.error_temp, match="^452 " + re.escape(nearly_full)):
            f.transfercmd("STOR /keep.bin")  # the reply to STOR, before a data connection is used
        assert f.voidcmd("NOOP").startswith("200")
    finally:
        f.close()

    conn = http.client.HTTPConnection("127.0.0.1", d.ports["http"], timeout=30)
    try:  # HTTP: 507 before the body (the client waits for 100-continue and sends nothing)
        conn.putrequest("PUT", "/keep.bin")
        conn.putheader("Authorization", basic())
        conn.putheader("Content-Length", "3000")
        conn.putheader("Expect", "100-continue")
        conn.endheaders()
        r = conn.getresponse()
        assert r.status == 507 and nearly_full in r.read().decode(), r.status
    finally:
        conn.close()

    assert (home / "keep.bin").read_bytes() == b"old"
    assert part_files(home) == []
    assert staged_records(d.state_dir) == []

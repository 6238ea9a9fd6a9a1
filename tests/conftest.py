"""Shared fixtures: a real scriptsftp daemon on 127.0.0.1 and real clients.

Every test that needs a server gets its own daemon (its own config, state dir
and homes under tmp_path) started as a subprocess exactly as a sysadmin would
start it (`scriptsftp run -c FILE`), listening on a free port that the test
reads from the daemon's "listening sftp on" log line.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

BIN = Path(sys.executable).with_name("scriptsftp")
IN_CI = os.environ.get("CI", "").lower() == "true"

ALICE_PASSWORD = "alice-Secret-1"
BOB_PASSWORD = "bob-Secret-2"


def require_tool(name: str) -> str:
    """Path of a client tool; skip without it on a laptop, fail in CI."""
    path = shutil.which(name)
    if path is None:
        msg = f"{name} is not installed (make test installs it when run as root)"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@dataclass
class Keys:
    private: Path
    public_line: str


def _keygen(directory: Path, name: str, kind: str = "ed25519") -> Keys:
    require_tool("ssh-keygen")
    path = directory / name
    args = ["ssh-keygen", "-q", "-t", kind, "-N", "", "-f", str(path)]
    if kind == "rsa":
        args += ["-b", "3072"]
    subprocess.run(args, check=True)
    return Keys(path, (directory / f"{name}.pub").read_text().strip())


@pytest.fixture(scope="session")
def keydir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("keys")


@pytest.fixture(scope="session")
def alice_key(keydir: Path) -> Keys:
    return _keygen(keydir, "alice")


@pytest.fixture(scope="session")
def bob_key(keydir: Path) -> Keys:
    return _keygen(keydir, "bob")


@pytest.fixture(scope="session")
def stranger_key(keydir: Path) -> Keys:
    return _keygen(keydir, "stranger")


@pytest.fixture(scope="session")
def host_keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Host keys generated once per run (RSA-3072 generation costs ~1 s per daemon otherwise)."""
    from scriptsftp.server.support.keys import ensure_host_keys

    directory = tmp_path_factory.mktemp("hostkeys") / "host_keys"
    ensure_host_keys(directory)
    return directory


@pytest.fixture(scope="session", autouse=True)
def worker_accounts() -> None:
    """As root, daemons run their workers as scriptsftp-sandbox and scriptsftp-worker: create
    them if missing, as `make run` does (kept afterwards: other runs on the machine use them)."""
    if os.geteuid() == 0:
        subprocess.run([str(Path(__file__).resolve().parent.parent / "tools" / "worker-accounts.sh")],
                       check=True, stdout=subprocess.DEVNULL)


@pytest.fixture(scope="session")
def password_hashes() -> dict[str, str]:
    from scriptsftp.server.core.passwords import hash_password

    return {"alice": hash_password(ALICE_PASSWORD), "bob": hash_password(BOB_PASSWORD)}


@dataclass
class Daemon:
    """A running `scriptsftp run` subprocess and what it printed."""

    proc: subprocess.Popen
    root: Path
    config: Path
    lines: list[str] = field(default_factory=list)
    port: int = 0
    #: port of each front end by protocol name ("sftp", "ftp", "http", "admin")
    ports: dict[str, int] = field(default_factory=dict)
    _cond: threading.Condition = field(default_factory=threading.Condition)

    def home(self, user: str = "alice") -> Path:
        return self.root / "homes" / user

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    def log_text(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def wait_log(self, pattern: str, timeout: float = 30.0, start: int = 0) -> re.Match[str]:
        """Block until a log line matches ``pattern`` (an event, not a sleep). The deadline is
        generous: it only bounds a failure, and a loaded machine (parallel workers, other
        users) can take many seconds for what takes milliseconds on an idle one."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines[start:]:
                    m = rx.search(line)
                    if m:
                        return m
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.proc.poll() is not None and not self._reader_alive:
                    raise AssertionError(f"no log line matching {pattern!r}; log:\n" + "\n".join(self.lines[-60:]))
                self._cond.wait(min(remaining, 0.5))

    _reader_alive: bool = True

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self._reader_alive = False
            self._cond.notify_all()

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def toml_str(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class DaemonFactory:
    """Writes a config under tmp_path and starts daemons on it."""

    def __init__(self, tmp_path: Path, alice_key: Keys, bob_key: Keys, hashes: dict[str, str],
                 host_keys: Path | None = None) -> None:
        self.root = tmp_path / "srv"
        self.root.mkdir(exist_ok=True)
        if host_keys is not None:
            shutil.copytree(host_keys, self.root / "state" / "host_keys", dirs_exist_ok=True)
        self.alice_key, self.bob_key, self.hashes = alice_key, bob_key, hashes
        self.daemons: list[Daemon] = []

    def default_users(self) -> str:
        return f"""
[[users]]
name = "alice"
password_hash = {toml_str(self.hashes['alice'])}
public_keys = [{toml_str(self.alice_key.public_line)}]
home = "homes/alice"
permissions = {{ "/" = ["*"] }}

[[users]]
name = "bob"
password_hash = {toml_str(self.hashes['bob'])}
public_keys = [{toml_str(self.bob_key.public_line)}]
home = "homes/bob"
permissions = {{ "/" = ["list", "download"], "/inbox" = ["*"] }}
"""

    def write_config(self, extra: str = "", *, users: str | None = None, server_extra: str = "",
                     sftp_extra: str = "") -> Path:
        text = f"""
[server]
state_dir = "state"
allow_root = true
log_level = "info"
login_failure_delay = 0.05
grace_period = 5.0
{server_extra}

[sftp]
listen = "127.0.0.1:0"
{sftp_extra}

[scripts]
dir = "scripts"
{extra}
{self.default_users() if users is None else users}
"""
        if not re.search(r"^processes\s*=", sftp_extra, re.M):
            # SSH in worker processes, as "auto" gives on any machine with 2+ CPUs, whatever
            # this one has; test_ssh_workers.py covers processes = 1
            text = text.replace("[sftp]\n", "[sftp]\nprocesses = 2\n", 1)
        path = self.root / "scriptsftp.toml"
        path.write_text(text)
        (self.root / "scripts").mkdir(exist_ok=True)
        return path

    def start(self, extra: str = "", *, config: Path | None = None, wait: bool = True, **kw: str) -> Daemon:
        path = config or self.write_config(extra, **kw)
        proc = subprocess.Popen(
            [str(BIN), "run", "-c", str(path)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, cwd=self.root,
        )
        d = Daemon(proc, self.root, path)
        threading.Thread(target=d._read, daemon=True).start()
        self.daemons.append(d)
        if wait:
            d.wait_log(r"scriptsftp \S+ ready", timeout=120)  # a start takes ~1 s idle, far more loaded
            # every front end logs "listening <proto> on host:port" before "ready"
            for proto, port in re.findall(r"listening (\w+) on \S+:(\d+)", d.log_text()):
                d.ports.setdefault(proto, int(port))
            d.port = d.ports.get("sftp", 0)
        return d

    def close(self) -> None:
        for d in self.daemons:
            d.stop()


@pytest.fixture
def daemons(tmp_path: Path, alice_key: Keys, bob_key: Keys, password_hashes: dict[str, str], host_keys: Path):
    factory = DaemonFactory(tmp_path, alice_key, bob_key, password_hashes, host_keys)
    yield factory
    factory.close()


@pytest.fixture
def daemon(daemons: DaemonFactory) -> Daemon:
    """A daemon with the default users (alice: everything; bob: read-only but /inbox)."""
    return daemons.start()


# --- PostgreSQL ------------------------------------------------------------------


@pytest.fixture(scope="session")
def pg():
    """A throwaway PostgreSQL cluster for the whole session (tests/pgkit.py): a temp dir, a free
    port, stopped and removed at the end; never the system's cluster. Skips on a laptop without
    PostgreSQL, fails in CI (make test installs Debian's postgresql package as root)."""
    from pgkit import PgCluster, PostgresMissing, find_bindir, sweep_leftovers

    try:
        bindir = find_bindir()
    except PostgresMissing as exc:
        if IN_CI:
            pytest.fail(str(exc))
        pytest.skip(str(exc))
    sweep_leftovers()
    cluster = PgCluster.start(bindir)
    yield cluster
    cluster.stop()


@pytest.fixture
def pg_dsn(pg) -> str:
    """A new empty database in the session's cluster, for one test (dropped once the test's
    daemons have stopped: pgkit's retire_database)."""
    dsn = pg.new_database()
    yield dsn
    pg.retire_database(dsn)


ACCOUNT_ENGINES = ["sqlite", "postgresql"]


@pytest.fixture(params=ACCOUNT_ENGINES)
def accounts_database(request: pytest.FixtureRequest) -> str:
    """``[accounts] database`` for one test, once per engine: "" (SQLite in state_dir) and the
    URL of a new database in the session's PostgreSQL cluster (dropped after the test). A test
    that takes it runs on both engines; put it in the config (``accounts_toml``) or open
    ``stores.sql.open_database(url, sqlite_path)`` with it."""
    if request.param == "sqlite":
        return ""
    cluster = request.getfixturevalue("pg")
    dsn = cluster.new_database()
    request.addfinalizer(lambda: cluster.retire_database(dsn))
    return dsn


def accounts_toml(database: str) -> str:
    """The ``[accounts]`` table naming ``database`` (empty: SQLite in state_dir)."""
    return f"\n[accounts]\ndatabase = {toml_str(database)}\n"


# --- clients -------------------------------------------------------------------

SSH_OPTS = [
    "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
    "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "ConnectTimeout=10",
]


def sftp_batch(daemon: Daemon, commands: str, key: Keys, user: str = "alice", *, cwd: Path | None = None,
               check: bool = False, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run OpenSSH `sftp -b -` with ``commands``; returns the completed process."""
    require_tool("sftp")
    proc = subprocess.run(
        ["sftp", "-b", "-", "-i", str(key.private), "-P", str(daemon.port), *SSH_OPTS, f"{user}@127.0.0.1"],
        input=commands, text=True, capture_output=True, cwd=cwd, timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"sftp failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}\n--- server log:\n"
                             + daemon.log_text()[-4000:])
    return proc


def paramiko_client(daemon: Daemon, user: str = "alice", *, key: Keys | None = None, password: str | None = None):
    """A connected paramiko SFTPClient (caller closes .get_channel().get_transport())."""
    import paramiko

    transport = paramiko.Transport(("127.0.0.1", daemon.port))
    transport.start_client(timeout=10)
    if key is not None:
        transport.auth_publickey(user, paramiko.PKey.from_path(str(key.private)))
    else:
        transport.auth_password(user, password or "")
    return paramiko.SFTPClient.from_transport(transport)


# --- shared helpers for the core end-to-end suites -------------------------------


@pytest.fixture(scope="module")
def module_daemons(tmp_path_factory: pytest.TempPathFactory, alice_key: Keys, bob_key: Keys,
                   password_hashes: dict[str, str], host_keys: Path):
    """A DaemonFactory shared by one test module (for daemons that read-only tests can share)."""
    factory = DaemonFactory(tmp_path_factory.mktemp("mod"), alice_key, bob_key, password_hashes, host_keys)
    yield factory
    factory.close()


@pytest.fixture(scope="session")
def rsa_key(keydir: Path) -> Keys:
    return _keygen(keydir, "rsa3072", "rsa")


@pytest.fixture(scope="session")
def ecdsa_key(keydir: Path) -> Keys:
    return _keygen(keydir, "ecdsa", "ecdsa")


def user_toml(name: str, *, home: str | None = None, keys: list[Keys] = (), password_hash: str = "",
              permissions: str = '{ "/" = ["*"] }', **extra: str) -> str:
    """One [[users]] entry; ``extra`` values are TOML literals (``protocols='["sftp"]'``)."""
    lines = ["[[users]]", f"name = {toml_str(name)}", f"home = {toml_str(home or 'homes/' + name)}",
             f"permissions = {permissions}"]
    if keys:
        lines.append("public_keys = [" + ", ".join(toml_str(k.public_line) for k in keys) + "]")
    if password_hash:
        lines.append(f"password_hash = {toml_str(password_hash)}")
    lines += [f"{k} = {v}" for k, v in extra.items()]
    return "\n" + "\n".join(lines) + "\n"


def askpass_env(tmp_path: Path, password: str) -> dict[str, str]:
    """Environment making OpenSSH read ``password`` from an SSH_ASKPASS script (no tty needed)."""
    secret = tmp_path / "askpass.secret"
    secret.write_text(password)
    script = tmp_path / "askpass.sh"
    script.write_text(f"#!/bin/sh\ncat {secret}\n")
    script.chmod(0o700)
    env = dict(os.environ)
    env.update(SSH_ASKPASS=str(script), SSH_ASKPASS_REQUIRE="force", DISPLAY=env.get("DISPLAY", ":0"))
    return env


PASSWORD_OPTS = [
    "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
    "-o", "BatchMode=no", "-o", "PreferredAuthentications=password", "-o", "PubkeyAuthentication=no",
    "-o", "NumberOfPasswordPrompts=1", "-o", "ConnectTimeout=10",
]


def sftp_batch_password(daemon: Daemon, commands: str, password: str, tmp_path: Path, user: str = "alice",
                        *, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """OpenSSH `sftp -b -` logging in with a password given through SSH_ASKPASS."""
    require_tool("sftp")
    return subprocess.run(
        # the -o options go before -b: `sftp -b` adds BatchMode=yes and ssh keeps the first value given
        ["sftp", *PASSWORD_OPTS, "-b", "-", "-P", str(daemon.port), f"{user}@127.0.0.1"],
        input=commands, text=True, capture_output=True, timeout=timeout, env=askpass_env(tmp_path, password),
        start_new_session=True,  # no controlling tty: askpass is the only way to ask
    )


def close_client(client) -> None:
    """Close a paramiko SFTPClient and its transport."""
    transport = client.get_channel().get_transport()
    try:
        client.close()
    finally:
        transport.close()


def sftp_put(client, path: str, data: bytes) -> None:
    """Upload ``data`` with paramiko and raise what the server answers to CLOSE.

    paramiko's ``SFTPFile.close()`` swallows the CLOSE status, which is where a
    pre-publish veto arrives; this sends CLOSE itself so the test sees it."""
    from paramiko.sftp import CMD_CLOSE

    f = client.open(path, "w")
    try:
        f.write(data)
        f.flush()
    except BaseException:
        f.close()
        raise
    f._closed = True
    client._request(CMD_CLOSE, f.handle)


def sftp_event_walk(client) -> None:
    """The file operations the protocol-parity suites compare, over SFTP, under /w: mkdir,
    upload, download, rename, an upload a pre-publish script vetoes ("VETO-ME"), delete, rmdir.
    The client stays open; the caller closes it."""
    import pytest

    client.mkdir("/w")
    sftp_put(client, "/w/a.txt", b"0123456789")
    assert client.open("/w/a.txt").read() == b"0123456789"
    client.rename("/w/a.txt", "/w/b.txt")
    with pytest.raises(PermissionError, match="no VETO-ME here"):
        sftp_put(client, "/w/b.txt", b"VETO-ME")
    client.remove("/w/b.txt")
    client.rmdir("/w")


def wait_staging_state(d: Daemon, state: str = "check", timeout: float = 30.0) -> None:
    """Block until an upload's staging record reaches ``state`` ("check": all bytes in,
    pre-publish running). No log line marks the start of a sync check, so this reads
    the record in state_dir (a bounded poll)."""
    import sqlite3

    def current() -> str | None:
        with sqlite3.connect(d.state_dir / "staging.db") as con:
            row = con.execute("SELECT state FROM staged").fetchone()
        return row[0] if row else None

    deadline = time.monotonic() + timeout
    while current() != state:
        assert time.monotonic() < deadline, f"no upload reached staging state {state!r}"
        time.sleep(0.02)


def plant_hostile_home(home: Path, outside: Path, secret: bytes, marker: bytes) -> None:
    """The traversal suites' world: a secret and a marker in ``outside`` (beside the
    homes), and in ``home`` the links a careless admin or another process might plant
    on the host (absolute and relative links out, a loop) plus a staging-named file."""
    outside.mkdir()
    (outside / "secret.txt").write_bytes(secret)
    (outside / "marker.txt").write_bytes(marker)
    home.mkdir(parents=True)
    (home / "sub").mkdir()
    (home / "sub" / "inside.txt").write_text("inside\n")
    os.symlink("/etc", home / "etc_link")
    os.symlink(str(outside), home / "abs_out")
    os.symlink(str(outside / "secret.txt"), home / "secret_link")
    os.symlink("../../outside", home / "rel_out")
    os.symlink("../../outside/secret.txt", home / "sub" / "rel_secret")
    os.symlink("loop_b", home / "loop_a")
    os.symlink("loop_a", home / "loop_b")
    (home / ".scriptsftp-part-planted").write_bytes(b"staged bytes\n")

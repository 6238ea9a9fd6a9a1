"""A throwaway PostgreSQL cluster for the tests and benches: never the system's cluster.

One cluster per test session (initdb costs about a second, so it is paid once): its data
directory, log and unix socket live in one temp dir, the server listens on a free port of
127.0.0.1, and ``stop()`` shuts it down and removes the dir. Each test that wants a clean
slate asks ``new_database()`` for its own database (a template copy, tens of milliseconds).

initdb and the postmaster refuse to run as root, so as root the cluster runs as the
``postgres`` account that Debian's package creates (``nobody`` without it); the temp dir is
made outside pytest's root-only tmp tree and handed to that account. Durability is switched
off (fsync, synchronous_commit, full_page_writes): a test cluster is never recovered.

Used by tests/conftest.py (the ``pg`` fixture) and bench/login_accounts_bench.py; imports
only the standard library and, for ``new_database``, psycopg (a runtime dependency).
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

#: the role the tests connect as (not a superuser: what a deployment would hand the daemon)
ROLE = "scriptsftp"
#: a database the cluster's owner uses to create and drop the tests' databases
ADMIN_DB = "postgres"
#: the temp dirs' prefix, and the file in each naming the process that started the cluster
PREFIX = "scriptsftp-pg-"
OWNER_FILE = "started-by.pid"


class PostgresMissing(RuntimeError):
    """No PostgreSQL server binaries on this machine (Debian: the ``postgresql`` package)."""


def find_bindir() -> Path:
    """The newest installed server's bin dir. Debian keeps initdb and pg_ctl off PATH, in
    /usr/lib/postgresql/VERSION/bin; elsewhere they are usually on PATH."""
    def version(path: str) -> tuple[int, ...]:
        name = Path(path).parent.parent.name
        return tuple(int(p) for p in name.split(".") if p.isdigit())

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=version)
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("initdb")
    if on_path and shutil.which("pg_ctl"):
        return Path(on_path).parent
    raise PostgresMissing("PostgreSQL server binaries (initdb, pg_ctl) are not installed "
                          "(make test installs Debian's postgresql package when run as root)")


def _run_as() -> pwd.struct_passwd | None:
    """The account the cluster runs as: None (ourselves) unless we are root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise PostgresMissing("running as root and neither a postgres nor a nobody account exists "
                          "to run the test cluster as (initdb refuses root)")


def _cluster_parent(owner: pwd.struct_passwd | None) -> str:
    """Where the cluster's temp dir goes: $TMPDIR unless the cluster's account could not reach
    it (a root-only TMPDIR) or the socket's path would pass the kernel's 107 bytes."""
    parent = Path(tempfile.gettempdir()).resolve()
    if len(str(parent)) > 60:
        return "/tmp"
    if owner is not None and any(not os.stat(p).st_mode & 0o001 for p in [parent, *parent.parents]):
        return "/tmp"
    return str(parent)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PgCluster:
    """A running throwaway cluster. ``dsn`` reaches its ``scriptsftp`` database as the
    ``scriptsftp`` role over TCP with a password, as a daemon's ``[accounts] database`` would."""

    bindir: Path
    root: Path
    port: int
    password: str
    owner: pwd.struct_passwd | None
    _admin: Any = None
    _retired: list[str] = field(default_factory=list)  # dropped at the next new_database

    @property
    def datadir(self) -> Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        return self.root

    @property
    def logfile(self) -> Path:
        return self.root / "postgres.log"

    def dsn_for(self, database: str) -> str:
        return f"postgresql://{ROLE}:{quote(self.password, safe='')}@127.0.0.1:{self.port}/{quote(database)}"

    @property
    def dsn(self) -> str:
        return self.dsn_for(ROLE)

    # --- the cluster's life ---------------------------------------------------------

    @classmethod
    def start(cls, bindir: Path | None = None) -> "PgCluster":
        """initdb in a new temp dir and start the server on a free port (retried once if
        another process took the port between our probe and the server's bind)."""
        bindir = bindir or find_bindir()
        owner = _run_as()
        root = Path(tempfile.mkdtemp(prefix=PREFIX, dir=_cluster_parent(owner)))
        try:
            (root / OWNER_FILE).write_text(f"{os.getpid()}\n")  # for sweep_leftovers, if we die
            if owner is not None:
                os.chown(root, owner.pw_uid, owner.pw_gid)
            cluster = cls(bindir, root, 0, secrets.token_urlsafe(18), owner)
            cluster._initdb()
            for attempt in range(3):
                cluster.port = _free_port()
                if cluster._pg_ctl_start():
                    break
                if attempt == 2:
                    raise RuntimeError("PostgreSQL test cluster did not start; its log:\n" + cluster._log_tail())
            cluster._create_role_and_db()
            return cluster
        except BaseException:
            _kill_leftover(root, bindir, owner)
            shutil.rmtree(root, ignore_errors=True)
            raise

    def stop(self) -> None:
        """Stop the server (immediate: nothing to keep) and remove its dir."""
        try:
            if self._admin is not None:
                self._admin.close()
            if (self.datadir / "postmaster.pid").exists():
                self._run([str(self.bindir / "pg_ctl"), "stop", "-D", str(self.datadir), "-m", "immediate", "-w",
                           "-t", "30"], check=False)
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def stop_server(self) -> None:
        """Stop the server (fast: clients are cut off), keeping the cluster for start_server."""
        if self._admin is not None:
            self._admin.close()
            self._admin = None
        self._run([str(self.bindir / "pg_ctl"), "stop", "-D", str(self.datadir), "-m", "fast", "-w", "-t", "30"])

    def start_server(self) -> None:
        """Start a stopped server again, on the same port."""
        if not self._pg_ctl_start():
            raise RuntimeError("PostgreSQL test cluster did not start again; its log:\n" + self._log_tail())

    def restart(self) -> None:
        """Stop the server (fast: clients are cut off) and start it again on the same port, as
        an upgrade or a failover does to the clients of a real one."""
        self.stop_server()
        self.start_server()

    def new_database(self, prefix: str = "t") -> str:
        """A new empty database owned by the test role; returns its DSN. It sorts text by ICU's
        en-US, as a server set up in English does (not by code point, as C and SQLite do), so
        a statement that leaves order to the collation shows it; without ICU, the cluster's."""
        import psycopg

        for retired in self._retired:
            self.drop_database(retired)
        self._retired.clear()
        name = f"{prefix}_{secrets.token_hex(6)}"
        try:
            self.psql(f'CREATE DATABASE "{name}" OWNER {ROLE} TEMPLATE template0 '
                      "LOCALE_PROVIDER icu ICU_LOCALE 'en-US'")
        except psycopg.errors.FeatureNotSupported:  # a server built without ICU
            self.psql(f'CREATE DATABASE "{name}" OWNER {ROLE} TEMPLATE template0')
        return self.dsn_for(name)

    def retire_database(self, dsn: str) -> None:
        """Drop ``dsn`` at the next :meth:`new_database`, not now. A test's fixtures are torn
        down in reverse order of setup, so a database fixture set up after the daemons' fixture
        would be dropped under daemons still running: each would then stop only after its
        pools' connection timeouts (seconds per node). By the next test every daemon of this
        one has stopped."""
        self._retired.append(dsn)

    def drop_database(self, dsn: str) -> None:
        """Drop a database made by new_database, whoever is still connected to it."""
        name = dsn.rsplit("/", 1)[1]
        self.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def psql(self, sql: str) -> str:
        """Run one statement as the cluster's superuser over the unix socket; returns the rows
        as psql -At prints them. One connection is kept for the session: a psql process per
        statement costs a few hundred milliseconds on a busy machine."""
        import psycopg

        if self._admin is None or self._admin.closed:
            self._admin = psycopg.connect(host=str(self.socket_dir), port=self.port, user=self._superuser(),
                                          dbname=ADMIN_DB, autocommit=True)
        cur = self._admin.execute(sql)
        rows = cur.fetchall() if cur.description else []
        return "".join("|".join("" if v is None else str(v) for v in row) + "\n" for row in rows)

    # --- steps ------------------------------------------------------------------------

    def _initdb(self) -> None:
        pwfile = self.root / "superuser.pw"
        pwfile.write_text(secrets.token_urlsafe(18) + "\n")
        if self.owner is not None:
            os.chown(pwfile, self.owner.pw_uid, self.owner.pw_gid)
        # local (unix socket, only the owner can reach it: the dir is 0700) trusts; TCP wants a password
        self._run([str(self.bindir / "initdb"), "-D", str(self.datadir), "--no-sync", "-E", "UTF8",
                   "--locale=C", "-U", self._superuser(), "--auth-local=trust", "--auth-host=scram-sha-256",
                   f"--pwfile={pwfile}"])
        pwfile.unlink()

    def _pg_ctl_start(self) -> bool:
        options = (f"-p {self.port} -k {self.socket_dir} -c listen_addresses=127.0.0.1 -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200 "
                   "-c shared_buffers=32MB -c jit=off")
        proc = self._run([str(self.bindir / "pg_ctl"), "start", "-D", str(self.datadir), "-l", str(self.logfile),
                          "-w", "-t", "30", "-o", options], check=False)
        return proc.returncode == 0

    def _create_role_and_db(self) -> None:
        password = self.password.replace("'", "''")
        self.psql(f"CREATE ROLE {ROLE} LOGIN PASSWORD '{password}'")
        self.psql(f"CREATE DATABASE {ROLE} OWNER {ROLE} TEMPLATE template0")

    def _superuser(self) -> str:
        return self.owner.pw_name if self.owner is not None else pwd.getpwuid(os.geteuid()).pw_name

    def _run(self, args: list[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(args, capture_output=True, text=True, cwd=self.root, timeout=60,
                              **_as_owner(self.owner))
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:2])} failed ({proc.returncode}): {proc.stderr.strip()}\n"
                               + self._log_tail())
        return proc

    def _log_tail(self) -> str:
        try:
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-20:])
        except OSError:
            return "(no server log)"


def _as_owner(owner: pwd.struct_passwd | None) -> dict[str, object]:
    """subprocess arguments that drop root to the cluster's account (its own groups only)."""
    if owner is None:
        return {}
    env = {"PATH": "/usr/bin:/bin", "HOME": owner.pw_dir or "/", "LC_ALL": "C"}
    return {"user": owner.pw_uid, "group": owner.pw_gid, "extra_groups": [], "env": env}


def sweep_leftovers() -> list[Path]:
    """Stop and remove the clusters whose starter died without stopping them (a test run
    killed by a timeout or ^C twice): the postmaster outlives pytest otherwise. Clusters of
    live runs, ours or other users', are left alone."""
    swept: list[Path] = []
    parents = {Path(tempfile.gettempdir()).resolve(), Path("/tmp")}
    for root in sorted(p for parent in parents for p in parent.glob(PREFIX + "*")):
        try:
            pid = int((root / OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue  # not one of ours, or being made right now
        try:
            os.kill(pid, 0)
            continue  # its run is alive
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # alive, someone else's
        owner = pwd.getpwuid(root.stat().st_uid) if os.geteuid() == 0 and root.stat().st_uid != 0 else None
        try:
            _kill_leftover(root, find_bindir(), owner)
        except (OSError, subprocess.SubprocessError, PostgresMissing):
            continue
        shutil.rmtree(root, ignore_errors=True)
        swept.append(root)
    return swept


def _kill_leftover(root: Path, bindir: Path, owner: pwd.struct_passwd | None) -> None:
    """A half-started cluster (start failed after pg_ctl) must not outlive its dir."""
    if (root / "data" / "postmaster.pid").exists():
        subprocess.run([str(bindir / "pg_ctl"), "stop", "-D", str(root / "data"), "-m", "immediate", "-w"],
                       capture_output=True, timeout=60, cwd=root, **_as_owner(owner))


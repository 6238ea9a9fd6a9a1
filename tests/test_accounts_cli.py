"""The account commands as a help desk's script runs them: the real `scriptsftp` command in a
subprocess against a config in a temp dir, with and without a running daemon.

What a script relies on is asserted exactly: the exit status of every kind of refusal (0 ok,
1 not found, 2 usage, 3 exists, 4 in use, 5 invalid; docs/accounts.md "Command line"), one
line on stderr, the JSON printed, a password that never reaches the process list or a file,
and an export that imports back byte for byte. With a daemon: a user added by the command
logs in with OpenSSH sftp at once, and disabling them ends their open session. Tests taking
``config`` or ``accounts_database`` run twice: on SQLite and on the session's PostgreSQL cluster;
an export from SQLite imports into PostgreSQL byte for byte.
"""

from __future__ import annotations

import json
import os
import pty
import select
import stat
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import BIN, Keys, close_client, paramiko_client, require_tool, sftp_batch, sftp_batch_password, \
    toml_str

PASSWORD = "cli-Secret-7f3e9a"
ACCOUNTS = '[accounts]\nhome_base = "homes"\nwatch_interval = 0.2\n\n[[groups]]\nname = "staff"\n'


def run(config: Path, *args: str, stdin: str | None = None, check: bool = False,
        cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(BIN), *args, "-c", str(config)], input=stdin, capture_output=True, text=True,
                          timeout=120, cwd=cwd, stdin=None if stdin is not None else subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise AssertionError(f"scriptsftp {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}")
    return proc


def refused(proc: subprocess.CompletedProcess[str], code: int, *words: str) -> str:
    """The command failed with ``code`` and said so in one line naming ``words``."""
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    line = proc.stderr.strip()
    assert "\n" not in line and line.startswith("scriptsftp: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for w in words:
        assert w in line, (w, line)
    return line


def as_json(proc: subprocess.CompletedProcess[str]) -> Any:
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def accounts_in(database: str) -> str:
    """ACCOUNTS with ``[accounts] database`` (empty: SQLite in state_dir)."""
    return ACCOUNTS.replace("[accounts]\n", f"[accounts]\ndatabase = {toml_str(database)}\n")


@pytest.fixture
def config(daemons, accounts_database: str) -> Path:
    """A config (not started): alice, bob and the group staff in the file, [accounts] home_base = homes;
    once with the database on SQLite, once on PostgreSQL (conftest's accounts_database)."""
    return daemons.write_config(accounts_in(accounts_database))


@pytest.fixture
def sqlite_config(daemons) -> Path:
    """The same config, on SQLite only: for what is about the file in state_dir."""
    return daemons.write_config(ACCOUNTS)


# --- without a daemon ----------------------------------------------------------------------------

def test_add_show_set_list_delete_a_user(config: Path, alice_key: Keys):
    added = as_json(run(config, "user", "add", "carol", "--json", "--key", alice_key.public_line, "--group",
                        "staff", "--perm", "/=list,download", "--perm", "/inbox=*", "--quota-size", "10GiB",
                        "--quota-files", "1000", "--home-folder", "/inbox", "--home-folder", "/outbox",
                        "--expires", "2099-12-31", "--protocol", "sftp", "--allowed-ip", "127.0.0.0/8"))
    assert added["origin"] == "database" and added["status"] == "active"
    assert added["home"] == str(config.parent / "homes" / "carol")
    assert added["permissions"] == {"/": ["list", "download"], "/inbox": ["*"]}
    assert added["quota_size"] == 10 * 2**30 and added["quota_files"] == 1000
    assert added["home_folders"] == ["/inbox", "/outbox"] and added["expires"] == "2099-12-31"
    home = config.parent / "homes" / "carol"  # made at once, with its home folders, 0750
    assert [stat.S_IMODE((home / d).stat().st_mode) for d in ("", "inbox", "outbox")] == [0o750] * 3
    assert added["usage"] == {"size": 0, "files": 0, "quota_size": 10 * 2**30, "quota_files": 1000}
    assert added["password"] is False and added["created_by"] == added["updated_by"]
    assert added["created_by"].startswith("cli:")
    fingerprint = subprocess.run(["ssh-keygen", "-lf", str(alice_key.private) + ".pub"], capture_output=True,
                                 text=True, check=True).stdout.split()[1]
    assert [k["fingerprint"] for k in added["keys"]] == [fingerprint]
    assert "password_hash" not in added

    # only what is given changes; a PATH= removes that path; --unset puts a key back
    changed = as_json(run(config, "user", "set", "carol", "--json", "--perm", "/inbox=", "--perm", "/out=upload",
                          "--unset", "quota-size", "--expires", "never", "--max-sessions", "2"))
    assert changed["permissions"] == {"/": ["list", "download"], "/out": ["upload"]}
    assert "quota_size" not in changed and changed["quota_files"] == 1000
    assert "expires" not in changed and changed["max_sessions"] == 2
    assert changed["groups"] == ["staff"] and changed["keys"] == added["keys"]

    text = run(config, "user", "show", "carol", check=True).stdout
    assert text.startswith("user carol (the account database)\n") and "status:" in text and fingerprint in text

    rows = as_json(run(config, "user", "list", "--json"))
    assert [(r["name"], r["origin"].rsplit(":", 1)[0]) for r in rows] == [
        ("alice", str(config)), ("bob", str(config)), ("carol", "database")]
    assert [r["home"] for r in rows] == [str(config.parent / "homes" / n) for n in ("alice", "bob", "carol")]
    table = run(config, "user", "list", check=True).stdout.splitlines()
    assert table[0].split()[:2] == ["NAME", "STATUS"] and table[3].split()[:2] == ["carol", "active"]

    shown = as_json(run(config, "user", "show", "alice", "--json"))  # the file's users are shown too
    assert shown["origin"] == f"{config}:{_line_of(config, ALICE)}"

    assert run(config, "user", "disable", "carol", "--reason", "left the company").returncode == 0
    shown = as_json(run(config, "user", "show", "carol", "--json"))
    assert shown["status"] == "disabled" and shown["disabled_reason"] == "left the company"
    assert run(config, "user", "enable", "carol").returncode == 0
    assert as_json(run(config, "user", "show", "carol", "--json"))["status"] == "active"

    deleted = as_json(run(config, "user", "delete", "carol", "--json"))
    assert deleted == {"name": "carol", "deleted": True, "home": str(config.parent / "homes" / "carol")}
    refused(run(config, "user", "show", "carol"), 1, "no user 'carol'")


ALICE = 'name = "alice"'


def test_a_home_is_made_without_following_a_planted_link(config: Path, tmp_path: Path):
    outside = tmp_path / "outside"
    outside.mkdir()
    home = tmp_path / "existing"
    home.mkdir(mode=0o700)
    (home / "inbox").symlink_to(outside)
    proc = in_process(config, "user", "add", "dave", "--home", str(home), "--home-folder", "/inbox",
                      "--home-folder", "/outbox")
    assert proc.returncode == 0, proc.stderr
    assert "home folder /inbox left alone" in proc.stderr and "made " + str(home) + " with /outbox" in proc.stdout
    assert list(outside.iterdir()) == []
    assert stat.S_IMODE(home.stat().st_mode) == 0o700  # an existing home keeps its mode
    # with [accounts] create_homes = false nothing is made (the login refuses a missing home)
    config.write_text(config.read_text().replace("[accounts]\n", "[accounts]\ncreate_homes = false\n"))
    proc = in_process(config, "user", "add", "erin", "--home-folder", "/inbox")
    assert proc.returncode == 0 and not (config.parent / "homes" / "erin").exists()


def _line_of(config: Path, text: str) -> int:
    return next(i for i, line in enumerate(config.read_text().splitlines(), 1) if line.strip() == text)


def in_process(config: Path, *args: str, stdin: str | None = None,
               check: bool = False) -> subprocess.CompletedProcess[str]:
    """The same command run by click's test runner in this process (no interpreter start, so a
    long table of refusals stays quick); the result looks like :func:`run`'s."""
    from click.testing import CliRunner

    from scriptsftp.server.cli import main

    result = CliRunner().invoke(main, [*args, "-c", str(config)], input=stdin, catch_exceptions=False)
    if check and result.exit_code != 0:
        raise AssertionError(f"scriptsftp {' '.join(args)} exited {result.exit_code}:\n{result.output}")
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)


def test_refusals_a_script_meets_exit_with_their_status_and_one_line(config: Path, alice_key: Keys):
    """The cases a provisioning script hits most, through the real command."""
    assert run(config, "user", "add", "carol", "--key", alice_key.public_line).returncode == 0
    refused(run(config, "user", "add", "carol"), 3, "'carol'", "already exists")
    refused(run(config, "user", "add", "alice"), 3, f"{config}:{_line_of(config, ALICE)}")
    refused(run(config, "user", "add", "dave", "--group", "nogroup"), 5, "unknown group 'nogroup'")
    refused(run(config, "user", "add", "dave", "--key", "ssh-ed25519 AAAAnotakey"), 5, "dave", "key")
    refused(run(config, "user", "add", "dave", "--perm", "/inbox=list,fly"), 5, "'fly'", "/inbox")
    refused(run(config, "user", "show", "nobody"), 1, "'nobody'")
    refused(run(config, "group", "delete", "staff"), 3, str(config))
    assert run(config, "user", "add", "x", "--no-such-option").returncode == 2


@pytest.fixture(scope="module")
def refusal_config(module_daemons) -> Path:
    """One database for the whole table: carol in group partners with folder drop mounted."""
    config = module_daemons.write_config(ACCOUNTS)
    drop = config.parent / "drop"
    for args in (("group", "add", "partners"), ("folder", "add", "drop", "--path", str(drop)),
                 ("user", "add", "carol", "--key", module_daemons.alice_key.public_line, "--group", "partners",
                  "--folder", "/drop=drop")):
        assert in_process(config, *args).returncode == 0
    return config


REFUSALS: list[tuple[tuple[str, ...], int, tuple[str, ...]]] = [
    # 1: not found
    (("user", "show", "nobody"), 1, ("'nobody'",)),
    (("user", "set", "nobody", "--quota-files", "1"), 1, ("'nobody'",)),
    (("user", "delete", "nobody"), 1, ("'nobody'",)),
    (("user", "disable", "nobody"), 1, ("'nobody'",)),
    (("user", "enable", "nobody"), 1, ("'nobody'",)),
    (("user", "key", "add", "nobody", "ALICE_KEY"), 1, ("'nobody'",)),
    (("user", "key", "remove", "carol", "SHA256:nosuchkey"), 1, ("carol", "SHA256:nosuchkey")),
    (("group", "delete", "nobody"), 1, ("'nobody'",)),
    (("group", "set", "nobody", "--quota-files", "1"), 1, ("'nobody'",)),
    (("folder", "show", "nobody"), 1, ("'nobody'",)),
    (("accounts", "import", "/nonexistent/dump.json"), 1, ("dump.json",)),
    # 2: usage
    (("user", "set", "carol"), 2, ("nothing to change",)),
    (("group", "set", "partners"), 2, ("nothing to change",)),
    (("folder", "add", "nopath"), 2, ("--path",)),
    (("user", "passwd", "carol"), 2, ("--password-stdin",)),
    # 3: exists, in the database or in the file (FILE:LINE)
    (("user", "add", "carol"), 3, ("'carol'", "already exists")),
    (("user", "add", "alice"), 3, ("CONFIG:",)),
    (("user", "set", "alice", "--quota-files", "1"), 3, ("CONFIG:", "change it there")),
    (("user", "disable", "bob"), 3, ("CONFIG:",)),
    (("user", "passwd", "bob", "--password-stdin"), 3, ("CONFIG:",)),
    (("user", "key", "add", "carol", "ALICE_KEY"), 3, ("already has the key",)),
    (("group", "add", "partners"), 3, ("'partners'",)),
    (("group", "add", "staff"), 3, ("CONFIG:",)),
    (("folder", "add", "drop", "--path", "/tmp"), 3, ("'drop'",)),
    # 4: in use
    (("group", "delete", "partners"), 4, ("'partners'", "carol")),
    (("folder", "delete", "drop"), 4, ("'drop'", "carol")),
    # 5: invalid values and references
    (("user", "add", "dave", "--group", "nogroup"), 5, ("unknown group 'nogroup'",)),
    (("user", "add", "dave", "--folder", "/x=nofolder"), 5, ("unknown folder 'nofolder'",)),
    (("user", "add", "dave", "--folder", "/=drop"), 5, ("'/'",)),
    (("user", "add", "dave", "--key", "ssh-ed25519 AAAAnotakey"), 5, ("dave", "key")),
    (("user", "add", "dave", "--key", "x" * 10000), 5, ("dave", "key")),
    (("user", "key", "add", "carol", "not a key"), 5, ("carol",)),
    (("user", "key", "remove", "carol", "not a fingerprint"), 5, ("carol",)),
    (("user", "add", "dave", "--perm", "/inbox=list,fly"), 5, ("'fly'", "/inbox")),
    (("user", "add", "dave", "--perm", "inbox=list"), 5, ("inbox",)),
    (("user", "add", "dave", "--perm", "list"), 5, ("--perm", "PATH=PERMS")),
    (("user", "add", "dave", "--perm", "/a\x00b=list"), 5, ("permissions",)),
    (("user", "add", "dave", "--perm", "/a\x01b=list"), 5, ("control characters",)),
    (("user", "add", "dave", "--home-folder", "/.scriptsftp-part-x"), 5, ("home_folders",)),
    (("user", "add", "dave", "--folder", "/" + "x" * 300 + "=drop"), 5, ("too long",)),
    (("user", "set", "carol", "--perm", "/never-set="), 5, ("/never-set",)),
    (("user", "add", "dave", "--quota-size", "10XB"), 5, ("quota_size",)),
    (("user", "add", "dave", "--quota-files", "-1"), 5, ("quota_files",)),
    (("user", "add", "dave", "--max-sessions", "many"), 5, ("max_sessions",)),
    (("user", "add", "dave", "--protocol", "gopher"), 5, ("protocols",)),
    (("user", "add", "dave", "--expires", "someday"), 5, ("expires",)),
    (("user", "add", "dave", "--allowed-ip", "10.0.0.300"), 5, ("10.0.0.300",)),
    (("user", "add", "dave", "--home-folder", "inbox"), 5, ("home_folders",)),
    (("user", "set", "carol", "--unset", "home"), 5, ("home",)),
    (("user", "set", "carol", "--unset", "nonsense"), 5, ("nonsense",)),
    (("user", "add", "x" * 65), 5, ("not a valid user name",)),
    (("user", "add", "../../etc"), 5, ("not a valid user name",)),
    (("user", "add", "a\nb"), 5, ("not a valid user name",)),
    (("user", "add", "ab\n"), 5, ("not a valid user name",)),
    (("folder", "add", "a b", "--path", "/tmp"), 5, ("not a valid folder name",)),
    (("group", "add", "partners2", "--folder", "/d=nofolder"), 5, ("nofolder",)),
]


@pytest.mark.parametrize(("args", "code", "words"), REFUSALS,
                         ids=[" ".join(a)[:60].encode("unicode_escape").decode() for a, _, _ in REFUSALS])
def test_every_refusal_has_its_exit_status_and_one_line(refusal_config: Path, module_daemons, args, code, words):
    key = module_daemons.alice_key.public_line
    args = tuple(a.replace("ALICE_KEY", key) for a in args)
    words = tuple(w.replace("CONFIG", str(refusal_config)) for w in words)
    before = in_process(refusal_config, "accounts", "export", "-").stdout
    refused(in_process(refusal_config, *args, stdin="pw\n" if "--password-stdin" in args else None), code, *words)
    assert in_process(refusal_config, "accounts", "export", "-").stdout == before  # a refusal changes nothing


def test_a_config_that_does_not_load_exits_2(tmp_path: Path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[server]\nno_such_key = 1\n")
    proc = run(bad, "user", "list")
    assert proc.returncode == 2 and "no_such_key" in proc.stderr and "Traceback" not in proc.stderr


def test_an_unreachable_database_exits_6_without_its_password(sqlite_config: Path):
    config = sqlite_config
    url = "postgresql://acct:Pg-secret-3@127.0.0.1:1/none"  # nothing listens on port 1
    config.write_text(config.read_text().replace("[accounts]\n", f'[accounts]\ndatabase = "{url}"\n'))
    line = refused(in_process(config, "user", "list"), 6, "cannot be used")
    assert "Pg-secret-3" not in line


def test_a_password_never_reaches_the_process_list_or_a_file(config: Path, daemons):
    proc = subprocess.Popen([str(BIN), "user", "add", "carol", "--password-stdin", "-c", str(config)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        cmdline = b""
        while b"--password-stdin" not in cmdline and time.monotonic() < deadline:  # until exec is done
            cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
            time.sleep(0.01)
        environ = Path(f"/proc/{proc.pid}/environ").read_bytes()
        out, err = proc.communicate(PASSWORD + "\n", timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert PASSWORD.encode() not in cmdline and PASSWORD.encode() not in environ
    assert b"--password-stdin" in cmdline
    shown = as_json(run(config, "user", "show", "carol", "--json"))
    assert shown["password"] is True and shown["password_changed"] is not None
    assert as_json(run(config, "user", "set", "carol", "--json", "--password-stdin", stdin="Other-pw-2\n"))[
        "password_changed"] >= shown["password_changed"]
    run(config, "user", "passwd", "carol", "--password-stdin", stdin=PASSWORD + "\n", check=True)
    # neither the database, its WAL, nor anything else under the config dir holds the password
    for path in config.parent.rglob("*"):
        if path.is_file():
            assert PASSWORD.encode() not in path.read_bytes(), path
            assert b"Other-pw-2" not in path.read_bytes(), path
    # without --password-stdin and without a terminal, passwd refuses rather than read argv or hang
    refused(run(config, "user", "passwd", "carol"), 2, "--password-stdin")
    refused(run(config, "user", "passwd", "carol", "--password-stdin", stdin=""), 5, "no password")
    refused(run(config, "user", "passwd", "carol", "--password-stdin", stdin="\n"), 5, "empty password")


def _read_until(fd: int, text: bytes, timeout: float = 60) -> bytes:
    """What the terminal showed, up to and including ``text`` (bounded, never a sleep)."""
    seen = b""
    deadline = time.monotonic() + timeout
    while text not in seen:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise AssertionError(f"no {text!r} on the terminal; it showed {seen!r}")
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: the other side closed
            chunk = b""
        if not chunk:
            raise AssertionError(f"the terminal closed before {text!r}; it showed {seen!r}")
        seen += chunk
    return seen


def test_passwd_asks_twice_on_a_terminal_and_echoes_nothing(config: Path):
    run(config, "user", "add", "carol", check=True)
    pid, fd = pty.fork()
    if pid == 0:  # the child: the command on a terminal of its own
        os.execv(str(BIN), [str(BIN), "user", "passwd", "carol", "-c", str(config)])
    try:
        shown = _read_until(fd, b"Password: ")
        os.write(fd, PASSWORD.encode() + b"\n")
        shown += _read_until(fd, b"Again: ")
        os.write(fd, PASSWORD.encode() + b"\n")
        shown += _read_until(fd, b"changed the password of user carol")
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0
    assert PASSWORD.encode() not in shown  # not echoed
    assert as_json(run(config, "user", "show", "carol", "--json"))["password"] is True


def test_export_imports_into_a_fresh_database_byte_for_byte(sqlite_config: Path, alice_key: Keys, bob_key: Keys,
                                                            tmp_path: Path, daemons):
    config = sqlite_config
    run(config, "folder", "add", "drop", "--path", str(tmp_path / "drop"), "--quota-files", "50",
        "--perm", "/=list,upload", "--description", "partners' drop — ünïcode", check=True)
    run(config, "group", "add", "partners", "--folder", "/drop=drop", "--bandwidth-up", "1MiB", check=True)
    run(config, "user", "add", "carol", "--key", alice_key.public_line, "--key", bob_key.public_line,
        "--group", "partners", "--password-stdin", stdin=PASSWORD + "\n", check=True)
    run(config, "user", "add", "dave", "--expires", "2031-02-03T04:05:06", "--perm", "/=*", check=True)
    run(config, "user", "disable", "dave", "--reason", "on leave", check=True)
    dump = tmp_path / "accounts.json"
    assert run(config, "accounts", "export", str(dump)).returncode == 0
    assert stat.S_IMODE(dump.stat().st_mode) == 0o600  # it holds password hashes
    first = dump.read_bytes()
    assert run(config, "accounts", "export", "-", check=True).stdout.encode() == first
    exported = json.loads(first)
    assert [u["name"] for u in exported["users"]] == ["carol", "dave"]
    assert exported["users"][0]["password_hash"].startswith("$argon2id$")

    # a fresh database: another state_dir
    fresh = config.with_name("fresh.toml")
    fresh.write_text(config.read_text().replace('state_dir = "state"', 'state_dir = "state-fresh"'))
    counts = as_json(run(fresh, "accounts", "import", str(dump), "--json"))
    assert stat.S_IMODE((config.parent / "state-fresh").stat().st_mode) == 0o700  # made as the daemon makes it
    assert counts.get("added") == 4
    again = tmp_path / "again.json"
    run(fresh, "accounts", "export", str(again), check=True)
    assert again.read_bytes() == first

    # all or nothing: a dump with a bad last entry leaves the database as it was
    broken = json.loads(first)
    broken["users"].append({"name": "eve", "home": "/tmp/eve", "groups": ["nogroup"]})
    third = config.with_name("third.toml")
    third.write_text(config.read_text().replace('state_dir = "state"', 'state_dir = "state-third"'))
    refused(run(third, "accounts", "import", "-", stdin=json.dumps(broken)), 5, "nogroup")
    assert as_json(run(third, "accounts", "export", "-"))["users"] == []
    # an existing name: refused (3) without --replace, replaced with it
    refused(run(fresh, "accounts", "import", str(dump)), 3, "already exists")
    assert as_json(run(fresh, "accounts", "import", str(dump), "--replace", "--json")).get("replaced") == 4
    refused(run(fresh, "accounts", "import", "-", stdin="{not json"), 5, "not JSON")
    refused(run(fresh, "accounts", "import", "-", stdin="[]"), 5)


def test_an_export_from_sqlite_imports_into_postgresql_byte_for_byte(sqlite_config: Path, pg_dsn: str,
                                                                      alice_key: Keys, tmp_path: Path):
    """Moving SQLite -> PostgreSQL is an export, a change of [accounts] database and an import."""
    config = sqlite_config
    run(config, "group", "add", "partners", "--quota-size", "1GiB", check=True)
    run(config, "user", "add", "carol", "--key", alice_key.public_line, "--group", "partners", "--group", "staff",
        "--password-stdin", stdin=PASSWORD + "\n", check=True)
    dump = run(config, "accounts", "export", "-", check=True).stdout
    on_pg = config.with_name("pg.toml")
    on_pg.write_text(config.read_text().replace("[accounts]\n", f"[accounts]\ndatabase = {toml_str(pg_dsn)}\n"))
    assert as_json(run(on_pg, "accounts", "import", "-", "--json", stdin=dump)) == {"added": 2, "replaced": 0}
    assert run(on_pg, "accounts", "export", "-", check=True).stdout == dump
    assert as_json(run(on_pg, "user", "show", "carol", "--json"))["groups"] == ["partners", "staff"]


def test_db_upgrade_reports_what_it_applied(config: Path):
    first = as_json(run(config, "db", "upgrade", "--json"))
    assert first["before"] == 0 and first["applied"] and first["schema"] == first["applied"][-1]
    second = run(config, "db", "upgrade", check=True)
    assert "up to date" in second.stdout
    assert as_json(run(config, "db", "upgrade", "--json"))["applied"] == []


def test_keys_are_added_and_removed_by_fingerprint(config: Path, alice_key: Keys, bob_key: Keys):
    in_process(config, "user", "add", "carol", check=True)
    added = as_json(in_process(config, "user", "key", "add", "carol", alice_key.public_line, "--json"))["added"]
    from_stdin = as_json(in_process(config, "user", "key", "add", "carol", "-", "--json",
                             stdin=f"# a comment\n{bob_key.public_line}\n\n"))["added"]
    keys = as_json(in_process(config, "user", "show", "carol", "--json"))["keys"]
    assert [k["fingerprint"] for k in keys] == added + from_stdin
    in_process(config, "user", "key", "remove", "carol", added[0], check=True)
    in_process(config, "user", "key", "remove", "carol", bob_key.public_line, check=True)  # a key line works too
    assert as_json(in_process(config, "user", "show", "carol", "--json"))["keys"] == []


def test_groups_and_folders(config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    made = as_json(in_process(config, "folder", "add", "drop", "--path", "drop", "--quota-size", "5GiB", "--json"))
    assert made["path"] == str(tmp_path / "drop")  # relative to where the command runs
    assert made["usage"] == {"size": 0, "files": 0}
    as_json(in_process(config, "group", "add", "partners", "--folder", "/drop=drop", "--home-folder", "/inbox",
                "--password-max-age", "90", "--json"))
    changed = as_json(in_process(config, "group", "set", "partners", "--json", "--folder", "/drop=",
                                 "--quota-files", "9"))
    assert changed.get("folders", {}) == {} and changed["home_folders"] == ["/inbox"]
    assert changed["quota_files"] == 9 and changed["password_max_age"] == 90
    names = [(g["name"], g["origin"]) for g in as_json(in_process(config, "group", "list", "--json"))]
    assert ("partners", "database") in names
    assert as_json(in_process(config, "folder", "list", "--json"))[0]["name"] == "drop"
    in_process(config, "folder", "delete", "drop", check=True)  # unmounted now: free to go
    in_process(config, "group", "delete", "partners", check=True)
    refused(in_process(config, "group", "show", "partners"), 1, "'partners'")


def cpu_of(config: Path, *args: str, out: Path) -> tuple[int, float]:
    """Run the command with its output in ``out``; its exit status and the CPU seconds it
    used, from wait4 on that one process (not wall time: the machine may be busy)."""
    with out.open("w") as sink:
        proc = subprocess.Popen([str(BIN), *args, "-c", str(config)], stdin=subprocess.DEVNULL, stdout=sink)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_utime + usage.ru_stime


def test_user_list_stays_fast_with_10000_users(sqlite_config: Path, alice_key: Keys, password_hashes,
                                               tmp_path: Path):
    """Listing 10,000 users costs at most about a second of CPU more than listing two."""
    config = sqlite_config
    listing = tmp_path / "list.txt"
    code, small = cpu_of(config, "user", "list", out=listing)
    assert code == 0
    users = [{"name": f"u{i:05d}", "home": f"/srv/h/u{i:05d}", "password_hash": password_hashes["alice"],
              "public_keys": [alice_key.public_line], "permissions": {"/": ["*"]}} for i in range(10_000)]
    dump = tmp_path / "big.json"
    dump.write_text(json.dumps({"format": "scriptsftp-accounts", "version": 1, "users": users}))
    run(config, "accounts", "import", str(dump), check=True)
    code, big = cpu_of(config, "user", "list", out=listing)
    assert code == 0
    assert len(listing.read_text().splitlines()) == 1 + 2 + 10_000
    assert big - small < 1.5, f"user list: {small:.2f} s of CPU for 2 users, {big:.2f} s for 10,002"


# --- with a daemon -------------------------------------------------------------------------------

def test_a_user_added_while_the_daemon_runs_logs_in_at_once(daemons, accounts_database: str, alice_key: Keys,
                                                            tmp_path: Path):
    require_tool("sftp")
    d = daemons.start(accounts_in(accounts_database))
    run(d.config, "user", "add", "carol", "--key", alice_key.public_line, "--perm", "/=*", "--password-stdin",
        stdin=PASSWORD + "\n", check=True)
    # the very first try, right after the command returns: no reload, no wait, no retry
    proc = sftp_batch(d, "mkdir inbox\nls\n", alice_key, user="carol")
    assert proc.returncode == 0, proc.stderr + d.log_text()[-3000:]
    assert (d.home("carol") / "inbox").is_dir()
    assert sftp_batch_password(d, "ls\n", PASSWORD, tmp_path, user="carol").returncode == 0
    # a new password: the old one is refused at once, the new one works
    run(d.config, "user", "passwd", "carol", "--password-stdin", stdin="Brand-new-9\n", check=True)
    assert sftp_batch_password(d, "ls\n", PASSWORD, tmp_path, user="carol").returncode != 0
    assert sftp_batch_password(d, "ls\n", "Brand-new-9", tmp_path, user="carol").returncode == 0
    # neither password is in the daemon's log, its audit trail or any database of state_dir
    for secret in (PASSWORD, "Brand-new-9"):
        assert secret not in d.log_text()
        for path in d.state_dir.rglob("*"):
            if path.is_file():
                assert secret.encode() not in path.read_bytes(), path


def test_disabling_a_user_ends_their_open_session(daemons, accounts_database: str, alice_key: Keys):
    d = daemons.start(accounts_in(accounts_database))
    run(d.config, "user", "add", "carol", "--key", alice_key.public_line, "--perm", "/=*", check=True)
    client = paramiko_client(d, "carol", key=alice_key)
    try:
        assert client.listdir(".") == []
        run(d.config, "user", "disable", "carol", "--reason", "offboarded", check=True)
        transport = client.get_channel().get_transport()
        deadline = time.monotonic() + 10  # watch_interval is 0.2 s; the bound allows a busy machine
        while transport.is_active() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not transport.is_active(), d.log_text()[-3000:]
    finally:
        close_client(client)
    proc = sftp_batch(d, "ls\n", alice_key, user="carol")
    assert proc.returncode != 0
    run(d.config, "user", "enable", "carol", check=True)
    assert sftp_batch(d, "ls\n", alice_key, user="carol").returncode == 0


def test_a_deleted_user_cannot_log_in_and_their_files_stay(daemons, accounts_database: str, alice_key: Keys):
    d = daemons.start(accounts_in(accounts_database))
    run(d.config, "user", "add", "carol", "--key", alice_key.public_line, "--perm", "/=*", check=True)
    assert sftp_batch(d, "mkdir kept\n", alice_key, user="carol").returncode == 0
    run(d.config, "user", "delete", "carol", check=True)
    assert sftp_batch(d, "ls\n", alice_key, user="carol").returncode != 0
    assert (d.home("carol") / "kept").is_dir()

"""Config validation and the CLI around it: every problem as `FILE:LINE: KEY: what is wrong`, exit 2.

The error corpus runs through the real `scriptsftp check` command (in-process
with click's runner, so the many cases stay fast); a few cases run the installed
executable as a subprocess to prove there is no traceback and the exit status is
what a shell sees.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import BIN, toml_str

from scriptsftp.server.cli import main


@pytest.fixture(scope="module")
def pubkey(tmp_path_factory) -> str:
    from conftest import _keygen

    return _keygen(tmp_path_factory.mktemp("cfgkeys"), "k").public_line


@pytest.fixture(scope="module")
def short_rsa(tmp_path_factory) -> str:
    from conftest import require_tool

    require_tool("ssh-keygen")
    path = tmp_path_factory.mktemp("short") / "rsa1024"
    subprocess.run(["ssh-keygen", "-q", "-t", "rsa", "-b", "1024", "-N", "", "-f", str(path)], check=True)
    return Path(f"{path}.pub").read_text().strip()


def base(pubkey: str) -> str:
    return f"""\
[server]
state_dir = "state"

[sftp]
listen = "127.0.0.1:0"

[[groups]]
name = "partners"
permissions = {{ "/" = ["list", "download"] }}

[[users]]
name = "alice"
home = "homes/alice"
public_keys = [{toml_str(pubkey)}]
groups = ["partners"]
permissions = {{ "/" = ["*"] }}
"""


def check(tmp_path: Path, text: str) -> tuple[int, list[str], str, Path]:
    path = tmp_path / "scriptsftp.toml"
    path.write_text(text)
    result = CliRunner().invoke(main, ["check", "-c", str(path)])
    return result.exit_code, result.stderr.splitlines(), result.stdout, path


def line_of(text: str, needle: str, nth: int = 1) -> int:
    hits = [i for i, line in enumerate(text.splitlines(), start=1) if needle in line]
    return hits[nth - 1]


def test_valid_config_passes(tmp_path, pubkey):
    code, err, out, path = check(tmp_path, base(pubkey))
    assert (code, err) == (0, [])
    assert out.strip() == f"{path}: OK (1 users, 1 groups, 0 bindings)"


# (name, text appended to the valid base, needle on the offending line, key, message pattern)
CASES = [
    ("unknown key", '[uploads]\natomic = true\natomik = false\n', "atomik", "uploads.atomik", r"unknown key"),
    ("unknown section", '[ftpd]\nlisten = "x"\n', "[ftpd]", "ftpd", r"unknown key"),
    ("unknown user key", None, "homedir", "users[1].homedir", r"unknown key"),
    ("wrong type", '[scripts]\nworkers = "4"\n', "workers", "scripts.workers", r"valid integer"),
    ("wrong type bool", '[uploads]\natomic = "yes"\n', "atomic", "uploads.atomic", r"valid boolean"),
    ("out of range", '[scripts]\nworkers = 0\n', "workers", "scripts.workers", r"greater than or equal to 1"),
    ("bad enum", '[uploads]\non_restart = "ignore"\n', "on_restart", "uploads.on_restart",
     r"Input should be 'recheck' or 'discard'"),
    ("bad enum log", '[admin]\nenabled = true\nlisten = "127.0.0.1:1"\n', None, None, None),  # valid: control
    ("bad permission name", None, "fly", 'users[1].permissions', r"unknown permission 'fly' for '/inbox'"),
    ("bad CIDR", None, "10.0.0.0/33", "users[1].allowed_ips", r"'10\.0\.0\.0/33' is not an IP address or CIDR"),
    ("bad public key", None, "AAAA!!", "users[1].public_keys", r"key 0: the key data is not valid base64"),
    ("bad key type", None, "ssh-dss", "users[1].public_keys", r"key 0: key type 'ssh-dss' is not accepted"),
    ("duplicate user", None, 'name = "alice"', "users[1].name", r"user 'alice' is defined twice"),
    ("unknown group", None, '"nobody"', "users[1].groups", r"unknown group 'nobody'"),
    ("duplicate group", '[[groups]]\nname = "partners"\n', 'name = "partners"', "groups[1].name",
     r"group 'partners' is defined twice"),
    ("bad filter policy", None, "maybe", "users[1].filters[0].policy", r"Input should be 'deny' or 'hide'"),
    ("bad protocol", None, '"gopher"', "users[1].protocols[1]", r"Input should be 'sftp', 'scp', 'ftp' or 'http'"),
    ("bad listen", '[http]\nlisten = "localhost"\n', "localhost", "http.listen", r"is not HOST:PORT"),
    ("not argon2", None, "password_hash", "users[1].password_hash", r"must be an argon2id hash"),
    ("bad user name", None, 'name = "bad name"', "users[1].name", r"not a valid user name"),
    ("user name ending in a newline", None, 'name = "bob\\n"', "users[1].name", r"not a valid user name"),
    ("control character in a path", None, r"\u0001", "users[1].permissions",
     r"name contains control characters"),
    ("staging name in a path", None, "home_folders", "users[1].home_folders", r"names the server.s staging files"),
    ("missing home", None, "[[users]]", "users[1].home", r"Field required"),
    ("unknown event", '[[bindings]]\nevent = "pre-lunch"\nscript = "x.py"\n', "pre-lunch", "bindings[0].event",
     r"unknown event 'pre-lunch'"),
]

USER_EXTRA = {
    "unknown user key": 'name = "bob"\nhome = "h/bob"\nhomedir = "x"\n',
    "bad permission name": 'name = "bob"\nhome = "h/bob"\npermissions = { "/" = ["list"], "/inbox" = ["upload", "fly"] }\n',
    "bad CIDR": 'name = "bob"\nhome = "h/bob"\nallowed_ips = ["127.0.0.1", "10.0.0.0/33"]\n',
    "bad public key": 'name = "bob"\nhome = "h/bob"\npublic_keys = ["ssh-ed25519 AAAA!!"]\n',
    "bad key type": 'name = "bob"\nhome = "h/bob"\npublic_keys = ["ssh-dss AAAAB3NzaC1kc3MAAACBAP8="]\n',
    "duplicate user": 'name = "alice"\nhome = "h/alice2"\n',
    "unknown group": 'name = "bob"\nhome = "h/bob"\ngroups = ["partners", "nobody"]\n',
    "bad filter policy": 'name = "bob"\nhome = "h/bob"\nfilters = [{ path = "/", denied = ["*.x"], policy = "maybe" }]\n',
    "bad protocol": 'name = "bob"\nhome = "h/bob"\nprotocols = ["sftp", "gopher"]\n',
    "not argon2": 'name = "bob"\nhome = "h/bob"\npassword_hash = "hunter2"\n',
    "bad user name": 'name = "bad name"\nhome = "h/bob"\n',
    "user name ending in a newline": 'name = "bob\\n"\nhome = "h/bob"\n',
    "control character in a path": 'name = "bob"\nhome = "h/bob"\npermissions = { "/a\\u0001b" = ["list"] }\n',
    "staging name in a path": 'name = "bob"\nhome = "h/bob"\nhome_folders = ["/.scriptsftp-part-x"]\n',
    "missing home": 'name = "bob"\n',
}


@pytest.mark.parametrize("name,extra,needle,key,message", CASES, ids=[c[0] for c in CASES])
def test_error_names_file_line_and_key(tmp_path, pubkey, name, extra, needle, key, message):
    text = base(pubkey) + "\n" + (extra if extra is not None else "[[users]]\n" + USER_EXTRA[name])
    code, err, _out, path = check(tmp_path, text)
    if key is None:
        assert (code, err) == (0, [])
        return
    assert code == 2
    expected_line = line_of(text, needle, 2 if name == "duplicate group" or name == "duplicate user" or
                            name == "missing home" else 1)
    assert len(err) == 1, err
    m = re.fullmatch(rf"{re.escape(str(path))}:(\d+): {re.escape(key)}: (.*)", err[0])
    assert m, err[0]
    assert int(m.group(1)) == expected_line, err[0]
    assert re.search(message, m.group(2)), err[0]


def test_short_rsa_key_refused(tmp_path, pubkey, short_rsa):
    text = base(pubkey) + f'\n[[users]]\nname = "bob"\nhome = "h/bob"\npublic_keys = [{toml_str(short_rsa)}]\n'
    code, err, _, path = check(tmp_path, text)
    assert code == 2
    assert err == [f"{path}:{line_of(text, 'ssh-rsa')}: users[1].public_keys: key 0: "
                   "RSA keys shorter than 2048 bits are refused"]


def test_toml_syntax_error_reports_its_line(tmp_path, pubkey):
    text = base(pubkey) + '\n[uploads]\natomic = true\nquarantine = "q\n'
    code, err, _, path = check(tmp_path, text)
    assert code == 2
    assert len(err) == 1
    assert err[0].startswith(f"{path}:{line_of(text, 'quarantine')}: (syntax): "), err


def test_duplicate_table_is_a_syntax_error(tmp_path, pubkey):
    text = base(pubkey) + '\n[server]\nlog_level = "debug"\n'
    code, err, _, path = check(tmp_path, text)
    assert code == 2
    assert err[0].startswith(f"{path}:{line_of(text, '[server]', 2)}: (syntax): "), err


def test_several_errors_all_reported_in_file_order(tmp_path, pubkey):
    text = f"""\
[server]
state_dir = "state"
bogus = 1
log_level = "loud"

[sftp]
max_handles = "many"

[[groups]]
name = "g"
permissions = {{ "/" = ["list", "fly"] }}

[[users]]
name = "alice"
home = "h/alice"
public_keys = [{toml_str(pubkey)}, "ssh-ed25519 AAAAnotbase64!!"]
allowed_ips = ["10.0.0.0/33"]
groups = ["nope"]

[[users]]
name = "alice"
home = "h/alice2"
filters = [{{ path = "/", denied = ["*.x"], policy = "maybe" }}]
"""
    code, err, _, path = check(tmp_path, text)
    assert code == 2
    p = str(path)
    assert err == [
        f"{p}:3: server.bogus: unknown key",
        f"{p}:4: server.log_level: Input should be 'debug', 'info', 'warning' or 'error'",
        f"{p}:7: sftp.max_handles: Input should be a valid integer",
        f"{p}:11: groups[0].permissions: unknown permission 'fly' for '/' (known: list, download, upload, "
        "overwrite, delete, rename, mkdir, rmdir, setstat, symlink, or '*')",
        f"{p}:16: users[0].public_keys: key 1: the key data is not valid base64",
        f"{p}:17: users[0].allowed_ips: '10.0.0.0/33' is not an IP address or CIDR network",
        f"{p}:18: users[0].groups: unknown group 'nope'",
        f"{p}:21: users[1].name: user 'alice' is defined twice",
        f"{p}:23: users[1].filters[0].policy: Input should be 'deny' or 'hide'",
    ]


def test_missing_and_unreadable_files(tmp_path):
    result = CliRunner().invoke(main, ["check", "-c", str(tmp_path / "nope.toml")])
    assert result.exit_code == 2
    assert result.stderr.strip() == f"{tmp_path / 'nope.toml'}:1: (file): cannot read: No such file or directory"
    bad = tmp_path / "latin1.toml"
    bad.write_bytes(b'[server]\nstate_dir = "caf\xe9"\n')
    result = CliRunner().invoke(main, ["check", "-c", str(bad)])
    assert result.exit_code == 2
    assert result.stderr.startswith(f"{bad}:1: (file): not UTF-8")


def test_config_from_environment_and_default(tmp_path, pubkey):
    cfg = tmp_path / "elsewhere.toml"
    cfg.write_text(base(pubkey))
    env = {**os.environ, "SCRIPTSFTP_CONFIG": str(cfg)}
    proc = subprocess.run([str(BIN), "check"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert str(cfg) in proc.stdout
    env.pop("SCRIPTSFTP_CONFIG")
    proc = subprocess.run([str(BIN), "check"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"{tmp_path / 'conf' / 'scriptsftp.toml'}:1: (file): cannot read: " \
                                  "No such file or directory"


# --- real processes: exit codes and no tracebacks ------------------------------------------


@pytest.mark.parametrize("command", ["check", "run"])
def test_bad_config_exit_2_no_traceback(tmp_path, command):
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[server]\nstate_dir = "s"\nlog_level = 3\n\n[[users]]\nname = "x"\n')
    proc = subprocess.run([str(BIN), command, "-c", str(cfg)], capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.splitlines() == [
        f"{cfg}:3: server.log_level: Input should be 'debug', 'info', 'warning' or 'error'",
        f"{cfg}:5: users[0].home: Field required",
    ]
    assert not (tmp_path / "s").exists()  # nothing created from a config that was refused


def test_init_writes_a_config_that_checks_and_refuses_to_overwrite(tmp_path):
    target = tmp_path / "site"
    proc = subprocess.run([str(BIN), "init", str(target)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert (target / "scriptsftp.toml").is_file()
    assert (target / "scripts").is_dir() and (target / "data").is_dir()
    assert str(target / "scriptsftp.toml") in proc.stdout
    proc = subprocess.run([str(BIN), "check", "-c", str(target / "scriptsftp.toml")], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "OK (1 users" in proc.stdout
    (target / "scriptsftp.toml").write_text("# mine\n")
    proc = subprocess.run([str(BIN), "init", str(target)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "already exists" in proc.stderr
    assert (target / "scriptsftp.toml").read_text() == "# mine\n"


def test_hash_password(tmp_path):
    from argon2 import PasswordHasher

    proc = subprocess.run([str(BIN), "hash-password", "--stdin"], input="s3cret pass\n", capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    digest = proc.stdout.strip()
    assert digest.startswith("$argon2id$")
    assert PasswordHasher().verify(digest, "s3cret pass")
    assert "s3cret" not in proc.stdout + proc.stderr
    proc = subprocess.run([str(BIN), "hash-password", "--stdin"], input="\n", capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    assert "empty password refused" in proc.stderr
    assert proc.stdout == ""


def test_events_lists_every_event_with_fields():
    proc = subprocess.run([str(BIN), "events"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    names = re.findall(r"^(\S+) \((can veto|cannot veto)\)", proc.stdout, re.M)
    expected = ["connect", "pre-login", "post-login", "login-failed", "user-locked", "disconnect", "pre-upload",
                "pre-publish",
                "post-upload", "upload-failed", "pre-download", "post-download", "pre-delete", "post-delete",
                "pre-rename", "post-rename", "pre-mkdir", "post-mkdir", "pre-rmdir", "post-rmdir", "schedule",
                "startup", "shutdown", "script-error", "quota-threshold"]
    assert sorted(n for n, _ in names) == sorted(expected)
    veto = {n for n, v in names if v == "can veto"}
    assert veto == {n for n in expected if n.startswith("pre-")} | {"connect"}
    fields = dict(zip([n for n, _ in names], re.findall(r"^    (.*)$", proc.stdout, re.M)))
    for n in expected:
        for f in ("name", "time", "session_id", "protocol", "remote_ip"):
            assert f"{f}: " in fields[n], (n, fields[n])
    assert "target: " in fields["pre-rename"]
    assert "path: " in fields["pre-upload"] and "size: " in fields["pre-upload"]
    assert "folder: " in fields["pre-upload"] and "percent: " in fields["quota-threshold"]


def test_version_and_help():
    proc = subprocess.run([str(BIN), "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and re.fullmatch(r"scriptsftp, version \S+\n", proc.stdout)
    proc = subprocess.run([str(BIN), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    for cmd in ("run", "check", "init", "hash-password", "events"):
        assert cmd in proc.stdout

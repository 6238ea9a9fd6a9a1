"""Load and validate the one TOML config file.

The whole file is validated at once (pydantic, strict, unknown keys rejected)
and every problem is reported as ``FILE:LINE: KEY: what is wrong`` so a
sysadmin fixes them in one pass. ``scriptsftp check`` and ``scriptsftp run``
both go through :func:`load_config`; nothing else reads the file.

Relative paths inside the file are relative to the file's own directory, so a
config dir can be moved as a whole.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import tomli
from pydantic import ByteSize, Field, ValidationError, field_validator, model_validator

# The scripting sections are declared in the contract (the engine reads them without importing
# this module); they are composed into Config below and re-exported from here ("X as X").
from scriptsftp.server.contract.errors import FsError, NotFound
from scriptsftp.server.contract.paths import split
from scriptsftp.server.contract.script_settings import (
    CAPABILITIES as CAPABILITIES,
    COMMAND_NAMED as COMMAND_NAMED,
    COMMAND_PLACEHOLDER as COMMAND_PLACEHOLDER,
    Binding as Binding,
    CommandSection as CommandSection,
    ConfigError as ConfigError,
    NotifySection as NotifySection,
    PositiveFloat as PositiveFloat,
    PositiveInt as PositiveInt,
    ScriptsSection as ScriptsSection,
    SmtpSection as SmtpSection,
    StrictModel as _Model,
    WebhookSection as WebhookSection,
    check_cron as check_cron,
    command_template_problems as command_template_problems,
    command_template_warnings as command_template_warnings,
)
from scriptsftp.server.support.tomlpos import KeyLines, format_loc

MAX_CONFIG_BYTES = 4 * 1024 * 1024
PERMISSIONS = (
    "list", "download", "upload", "overwrite", "delete", "rename",
    "mkdir", "rmdir", "setstat", "symlink",
)
PROTOCOLS = ("sftp", "scp", "ftp", "http")


def _check_listen(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{value!r} is not HOST:PORT (port 0 picks a free port)")
    return value


def _listen_list(value: str | list[str]) -> list[str]:
    values = [value] if isinstance(value, str) else value
    return [_check_listen(v) for v in values]


def _listen_validator(cls: type, value: str | list[str]) -> str | list[str]:
    """``listen`` of [ftp], [http], [admin]: the same HOST:PORT rule as [sftp]."""
    _listen_list(value)
    return value


class ServerSection(_Model):
    state_dir: str = "../var"
    log_format: Literal["text", "json"] = "text"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    grace_period: Annotated[float, Field(ge=0)] = 10.0
    """Seconds running transfers get to finish after SIGTERM before sessions are closed."""
    drain_timeout: Annotated[float, Field(ge=0)] = 300.0
    """Seconds a drain (SIGUSR2, or `scriptsftp drain` without --timeout) lets open sessions
    finish before it ends those left, discarding their unfinished uploads, and stops."""
    allow_root: bool = False
    """`run` refuses to start as root unless this is true."""
    allow_root_workers: bool = False
    """Discouraged. When the daemon runs as root and the worker accounts ([scripts] user,
    [sftp] worker_user) do not exist, run workers as root instead of refusing to start."""
    login_failure_delay: Annotated[float, Field(ge=0, le=30)] = 1.0
    """Seconds a failed login waits before its answer (on a timer: costs the server nothing)."""
    password_cache: Annotated[float, Field(ge=0, le=86400)] = 60.0
    """Seconds a verified password is remembered (as a keyed hash), for every protocol; 0: verify each login."""
    preauth_timeout: PositiveFloat = 30.0
    """Seconds a connection may take to log in (SSH auth, FTP USER/PASS, an HTTP request with
    credentials) before it is closed: idle sockets must not hold connection slots."""
    audit_retention_days: Annotated[float, Field(ge=0)] = 90.0
    """Audit trail (state_dir/audit.sqlite3): rows older than this are deleted; 0 = keep by size only."""
    audit_max_mb: Annotated[float, Field(gt=0)] = 256.0
    """Audit trail: past this size the oldest rows are deleted."""
    stall_timeout: Annotated[float, Field(ge=0)] = 120.0
    """Seconds a transfer (any protocol, either direction) may move no byte before it is
    aborted (an upload discarded); 0: never."""
    max_handles_per_user: Annotated[int, Field(ge=1, le=1 << 20)] = 1024
    """Files and directory listings one user may hold open at once, over all their connections
    and protocols: each holds a descriptor, and the daemon has one descriptor table."""
    max_sessions_per_user: Annotated[int, Field(ge=0, le=1 << 20)] = 100
    """Sessions one user may hold at once (a logged-in connection, and each SSH channel beyond
    a connection's first) when their account sets no max_sessions; 0 = unlimited."""


class SftpSection(_Model):
    enabled: bool = True
    listen: str | list[str] = "127.0.0.1:2222"
    host_keys: list[str] = []
    max_handles: Annotated[int, Field(ge=1, le=65536)] = 256
    max_channels_per_connection: Annotated[int, Field(ge=1, le=1024)] = 10
    """SSH channels (SFTP, SCP, or not yet either) open at once on one connection."""
    max_queued_bytes: Annotated[ByteSize, Field(ge=2**20, le=2**30)] = ByteSize(16 * 2**20)
    """Request bytes an SFTP channel may hold unanswered while its client takes none of the
    replies; past it the channel is closed (a client that sends but never reads)."""
    max_packet: Annotated[int, Field(ge=32768, le=262144)] = 262144
    """Largest SFTP READ/WRITE accepted and advertised via limits@openssh.com."""
    window_size: Annotated[int, Field(ge=2**20, le=2**30)] = 64 * 2**20
    idle_timeout: Annotated[float, Field(ge=0)] = 900.0
    login_grace: PositiveFloat | None = None
    """Seconds an SSH connection may take to authenticate; unset: [server] preauth_timeout."""
    banner: str = ""
    processes: Annotated[int, Field(ge=1, le=64)] | Literal["auto"] = "auto"
    """Processes that serve SSH connections: "auto" is one per CPU; 1 serves them in the daemon itself."""
    worker_user: str = ""
    """Account the SSH worker processes run as when the daemon runs as root; empty:
    "scriptsftp-worker". Ignored when the daemon is not root (it cannot switch)."""
    worker_max_growth: Annotated[ByteSize, Field(ge=0, le=2**40)] = ByteSize(8 * 2**20)
    """Heap (anonymous resident memory) an SSH worker may gain over its size 3 s after its
    start before it is replaced: it takes no new connection and exits once its last one
    ends; an idle worker goes at a quarter of it; 0 = never."""

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str | list[str]) -> str | list[str]:
        _listen_list(v)
        return v


class FtpSection(_Model):
    enabled: bool = False
    listen: str | list[str] = "127.0.0.1:2121"
    passive_ports: str = "60000-60099"
    masquerade_address: str = ""
    active_mode: bool = False
    tls: Literal["off", "explicit", "implicit"] = "off"
    certificate: str = ""
    private_key: str = ""
    idle_timeout: PositiveFloat = 300.0
    """Seconds a control connection may send no command before it is closed (421); a
    running transfer is [server] stall_timeout's."""

    _listen = field_validator("listen")(_listen_validator)

    @field_validator("passive_ports")
    @classmethod
    def _passive_ports(cls, v: str) -> str:
        if v == "":
            return v  # any free port
        m = re.fullmatch(r"(\d{1,5})-(\d{1,5})", v)
        if not m or not 1024 <= int(m[1]) <= int(m[2]) <= 65535:
            raise ValueError(f"{v!r} is not LOW-HIGH with 1024 <= LOW <= HIGH <= 65535 (or \"\" for any free port)")
        return v

    @field_validator("masquerade_address")
    @classmethod
    def _masquerade(cls, v: str) -> str:
        if v:
            try:
                ipaddress.IPv4Address(v)
            except ValueError:
                raise ValueError(f"{v!r} is not an IPv4 address (PASV replies carry IPv4 only)") from None
        return v

    @model_validator(mode="after")
    def _tls_files(self) -> "FtpSection":
        if self.tls != "off" and not (self.certificate and self.private_key):
            raise ValueError(f"tls = {self.tls!r} needs certificate and private_key (PEM files)")
        return self


class HttpSection(_Model):
    enabled: bool = False
    listen: str | list[str] = "127.0.0.1:8080"
    certificate: str = ""
    private_key: str = ""
    max_upload_size: Annotated[int, Field(ge=0)] = 0
    """Largest PUT body in bytes (413 beyond it); 0: no limit."""
    idle_timeout: PositiveFloat = 120.0
    """Seconds a kept-alive connection may wait for its next request before it is closed."""

    _listen = field_validator("listen")(_listen_validator)


LEGACY_TOKEN_NAME = "admin"
"""What ``[admin] token_hash`` is called: a write token, and the actor of the changes made with it."""


def _check_token_hash(v: str) -> str:
    if v and not v.startswith("$argon2id$"):
        raise ValueError("not an argon2id hash (make one with `scriptsftp hash-password`)")
    return v


class AdminToken(_Model):
    """One named bearer token of the admin API (``[[admin.tokens]]``). Only its argon2id hash
    is kept; its name is the actor recorded for every account change made with it."""

    name: str
    token_hash: Annotated[str, Field(min_length=1)]
    scope: Literal["read", "write"] = "read"
    """read: GET requests only (status, sessions, events, accounts); write: everything."""

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.@-]{0,63}", v):
            raise ValueError(f"{v!r} is not a valid token name (letters, digits, _ . @ -; at most 64)")
        return v

    @field_validator("token_hash")
    @classmethod
    def _hash(cls, v: str) -> str:
        return _check_token_hash(v)


class AdminSection(_Model):
    enabled: bool = False
    listen: str = "127.0.0.1:8081"
    token_hash: str = ""
    """The hash of a write token named "admin" (kept from before named tokens; ``tokens`` may sit beside it)."""
    tokens: list[AdminToken] = []
    """Named tokens with a scope; any of them makes the API require a token."""
    idle_timeout: PositiveFloat = 60.0
    """Seconds a kept-alive admin connection may wait for its next request before it is closed."""

    _listen = field_validator("listen")(_listen_validator)

    def all_tokens(self) -> list[AdminToken]:
        """Every token the API accepts: ``token_hash`` as the write token "admin", then ``tokens``."""
        legacy = [AdminToken(name=LEGACY_TOKEN_NAME, token_hash=self.token_hash, scope="write")] \
            if self.token_hash else []
        return legacy + list(self.tokens)

    @model_validator(mode="after")
    def _token_needed(self) -> "AdminSection":
        # server/ops/admin.py: the API can kick sessions and reload; off loopback it needs a token.
        if self.token_hash:
            try:
                _check_token_hash(self.token_hash)
            except ValueError as exc:
                raise ValueError(f"token_hash: {exc}") from None
        names = [t.name for t in self.all_tokens()]
        for name in sorted({n for n in names if names.count(n) > 1}):
            taken = " (token_hash is the token named \"admin\")" if name == LEGACY_TOKEN_NAME and self.token_hash else ""
            raise ValueError(f"tokens: the name {name!r} is used twice{taken}")
        if self.enabled and not names and not is_loopback(self.listen):
            raise ValueError(f"listen {self.listen!r} is not a loopback address: set token_hash or tokens "
                             "(`scriptsftp hash-password`) or listen on 127.0.0.1")
        return self


def is_loopback(listen: str) -> bool:
    """True for ``127.x.x.x:PORT``, ``[::1]:PORT`` and ``localhost:PORT``."""
    host = listen.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class DefenderSection(_Model):
    """Automatic bans per source address, connection rate limits and caps (server/ops/defender.py)."""

    enabled: bool = True
    """Scores and bans; the connection caps and rate limit apply even when false."""
    threshold: Annotated[int, Field(ge=1)] = 15
    observation_window: PositiveFloat = 1800.0
    ban_time: PositiveFloat = 1800.0
    ban_time_multiplier: Annotated[float, Field(ge=1, le=100)] = 2.0
    max_ban_time: PositiveFloat = 7 * 86400.0
    score_login_failed: Annotated[int, Field(ge=0)] = 1
    score_unknown_user: Annotated[int, Field(ge=0)] = 2
    score_protocol_error: Annotated[int, Field(ge=0)] = 1
    score_connect_vetoed: Annotated[int, Field(ge=0)] = 3
    score_limit_exceeded: Annotated[int, Field(ge=0)] = 3
    allow_list: list[str] = ["127.0.0.0/8", "::1"]
    """Never banned, never rate limited (the global cap still applies)."""
    max_connections: Annotated[int, Field(ge=0)] = 1000
    """0 = unlimited."""
    max_connections_per_ip: Annotated[int, Field(ge=0)] = 20
    max_preauth_connections: Annotated[int, Field(ge=0)] = 256
    """Connections not logged in yet, all addresses together; 0 = no separate cap. When it is
    reached, a new connection closes the one that has waited longest to log in."""
    rate_per_ip: Annotated[float, Field(ge=0)] = 10.0
    """New connections per second per address (token bucket); 0 = unlimited."""
    burst_per_ip: Annotated[int, Field(ge=1)] = 20
    ipv6_prefix: Annotated[int, Field(ge=32, le=128)] = 64
    """IPv6 clients are scored, rate limited, capped and banned per network of this prefix
    length: one host usually holds a whole /64, and rotating addresses in it must not help."""
    user_max_failures: Annotated[int, Field(ge=0)] = 20
    """Failed password logins for one user, from any addresses not allow-listed, within
    observation_window; then password logins for that user are locked for user_lock_time
    (keys still work). Against guessing one account from many addresses. 0 = off."""
    user_lock_time: PositiveFloat = 900.0

    @field_validator("allow_list")
    @classmethod
    def _nets(cls, v: list[str]) -> list[str]:
        return _check_networks(v)

    @model_validator(mode="after")
    def _times(self) -> "DefenderSection":
        if self.max_ban_time < self.ban_time:
            raise ValueError("max_ban_time is below ban_time")
        return self


class UploadsSection(_Model):
    atomic: bool = True
    quarantine: str = ""
    on_restart: Literal["recheck", "discard"] = "recheck"
    fsync: bool = True
    """Flush each upload to disk before publishing it, and the directory after."""
    min_free_space: Annotated[ByteSize, Field(ge=0)] = ByteSize(32 * 2**20)
    """Free space kept on the homes' and state_dir's filesystems: uploads are refused below it."""


class Filter(_Model):
    path: str = "/"
    denied: list[str] = []
    allowed: list[str] = []
    policy: Literal["deny", "hide"] = "deny"

    @field_validator("path")
    @classmethod
    def _vpath(cls, v: str) -> str:
        return _check_vpath(v)


def _check_vpath(v: str) -> str:
    """A virtual path the Session can take: the account database's rows meet no other
    check before build_record normalizes them (a control character there raised at
    every login of the user, "/.." passed as a mount point and became "/")."""
    if not v.startswith("/") or "\x00" in v:
        raise ValueError(f"{v[:80]!r} must be a virtual path starting with '/'")
    try:
        split(v)
    except NotFound:
        raise ValueError(f"{v[:80]!r} names the server's staging files, which no client can reach") from None
    except FsError as exc:
        raise ValueError(f"{v[:80]!r}: {exc.message}") from None
    return v


def _check_dir(v: str) -> str:
    """A home or a folder's directory: "" would be the configuration file's directory
    (its keys and password files), and a NUL no system call takes."""
    if not v.strip() or "\x00" in v:
        raise ValueError(f"{v!r} must name a directory")
    return v


def _check_permissions(perms: dict[str, list[str]]) -> dict[str, list[str]]:
    for vpath, names in perms.items():
        _check_vpath(vpath)
        for name in names:
            if name != "*" and name not in PERMISSIONS:
                raise ValueError(
                    f"unknown permission {name!r} for {vpath!r} (known: {', '.join(PERMISSIONS)}, or '*')"
                )
    return perms


def _check_networks(nets: list[str]) -> list[str]:
    for net in nets:
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError:
            raise ValueError(f"{net!r} is not an IP address or CIDR network") from None
    return nets


#: \Z, not $: "$" also matches before a final newline, and "alice\n" is not alice
USER_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.@-]{0,63}\Z")
FOLDER_NAME = USER_NAME

#: the largest count a limit may hold: a SQL BIGINT, and a float the token bucket and the
#: quota arithmetic compute with (10**400 from a JSON dump raised OverflowError at login)
COUNT_MAX = 2**63 - 1
#: days a password may last: a few centuries, so its end is still a date
PASSWORD_DAYS_MAX = 1_000_000

#: a size in bytes, written as a number or "10GiB", "500MB"; 0 means no limit
Bytes = Annotated[ByteSize, Field(ge=0, le=COUNT_MAX)]
#: a count (files, sessions); 0 means no limit
Count = Annotated[int, Field(ge=0, le=COUNT_MAX)]


class _Access(_Model):
    """What users and groups share: where they may go and from where, and their limits.

    For the limits and lists below, None means "not set here": a user's own value wins,
    else the first of their groups (in the order listed) that sets it, else the default."""

    permissions: dict[str, list[str]] = {}
    protocols: list[Literal["sftp", "scp", "ftp", "http"]] | None = None
    allowed_ips: list[str] | None = None
    filters: list[Filter] = []
    setstat_mode: Literal["refuse", "ignore", "times"] | None = None
    """Without the setstat permission: "refuse" a mode or time change; "ignore" it (answer
    success, change nothing); "times" (default) apply time changes, ignore mode changes.
    Clients set times after every upload (rclone, WinSCP, FileZilla, scp -p)."""
    quota_size: Bytes | None = None
    """Bytes the home may hold (published files; virtual folders count apart); 0: no limit."""
    quota_files: Count | None = None
    """Files the home may hold; 0: no limit."""
    bandwidth_up: Bytes | None = None
    """Bytes/s of uploads over all the user's sessions and protocols together; 0: no limit."""
    bandwidth_down: Bytes | None = None
    """Bytes/s of downloads over all the user's sessions and protocols together; 0: no limit."""
    transfer_up_daily: Bytes | None = None
    """Bytes the user may upload per day (UTC); 0: no limit."""
    transfer_down_daily: Bytes | None = None
    """Bytes the user may download per day (UTC); 0: no limit."""
    home_folders: list[str] | None = None
    """Directories made in the home when the account is created and checked at each login."""
    folders: dict[str, str] = {}
    """Virtual folders: virtual path -> folder name (``[[folders]]`` or `scriptsftp folder add`).
    Groups' mounts add up; the user's own entry for a path replaces a group's."""
    password_max_age: Annotated[int, Field(ge=0, le=PASSWORD_DAYS_MAX)] | None = None
    """Days a password stays valid after it is set; 0: forever (default: [accounts] password_max_age)."""

    @field_validator("home_folders")
    @classmethod
    def _home_folders(cls, v: list[str] | None) -> list[str] | None:
        return v if v is None else [_check_vpath(p) for p in v]

    @field_validator("folders")
    @classmethod
    def _mounts(cls, v: dict[str, str]) -> dict[str, str]:
        for vpath, name in v.items():
            _check_vpath(vpath)
            if not split(vpath):  # "/", but also "//", "/.." and "/a/.."
                raise ValueError("a folder cannot be mounted at '/' (that is the home)")
            if not FOLDER_NAME.match(name):
                raise ValueError(f"{name!r} is not a valid folder name")
        return v

    @field_validator("permissions")
    @classmethod
    def _perm(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        return _check_permissions(v)

    @field_validator("allowed_ips")
    @classmethod
    def _nets(cls, v: list[str] | None) -> list[str] | None:
        return v if v is None else _check_networks(v)


class Group(_Access):
    name: Annotated[str, Field(min_length=1)]




class User(_Access):
    name: str
    password_hash: str = ""
    password_hash_file: str = ""
    """A file holding the hash (one line); useful with secret stores."""
    generate_password: bool = False
    """With password_hash_file: on first start, create a random password, store
    only its hash in that file and print the password once."""
    public_keys: list[str] = []
    home: str
    groups: list[str] = []
    max_sessions: Count = 0
    """Sessions at once; 0 = [server] max_sessions_per_user applies."""
    disabled: bool = False
    disabled_reason: str = ""
    """Shown to the client where the protocol carries it (FTP 530, HTTP 403) and in the log."""
    require_tls: bool = False
    expires: datetime.date | datetime.datetime | None = None
    """The account refuses logins from this date (00:00 UTC) or time on."""

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not USER_NAME.match(v):
            raise ValueError(f"{v!r} is not a valid user name (letters, digits, _ . @ -; at most 64)")
        return v

    @field_validator("home")
    @classmethod
    def _home(cls, v: str) -> str:
        return _check_dir(v)

    @field_validator("password_hash")
    @classmethod
    def _hash(cls, v: str) -> str:
        if v and not v.startswith("$argon2id$"):
            raise ValueError("must be an argon2id hash from `scriptsftp hash-password` (starts with $argon2id$)")
        return v

    @field_validator("public_keys")
    @classmethod
    def _keys(cls, v: list[str]) -> list[str]:
        from scriptsftp.server.support.keys import parse_public_key  # late: pulls in paramiko

        for i, line in enumerate(v):
            try:
                parse_public_key(line)
            except ValueError as exc:
                raise ValueError(f"key {i}: {exc}") from None
        return v

    @model_validator(mode="after")
    def _secrets(self) -> "User":
        if self.password_hash and self.password_hash_file:
            raise ValueError("set password_hash or password_hash_file, not both")
        if self.generate_password and not self.password_hash_file:
            raise ValueError("generate_password needs password_hash_file (where the hash is kept)")
        return self


class Folder(_Model):
    """A directory outside every home, mounted into users' trees at a virtual path
    (``folders = { "/shared" = "NAME" }`` on a user or group)."""

    name: str
    path: str
    """The directory on the server; relative paths are relative to the config file."""
    quota_size: Bytes = ByteSize(0)
    """Bytes the folder may hold, over every user who mounts it; 0: no limit."""
    quota_files: Count = 0
    """Files the folder may hold; 0: no limit."""
    permissions: dict[str, list[str]] = {}
    """Permissions inside the folder, by path relative to its root ("/" is the folder
    itself); a user's or group's own entry for a path below the mount point wins."""
    description: str = ""

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not FOLDER_NAME.match(v):
            raise ValueError(f"{v!r} is not a valid folder name (letters, digits, _ . @ -; at most 64)")
        return v

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        return _check_dir(v)

    @field_validator("permissions")
    @classmethod
    def _perm(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        return _check_permissions(v)


class AccountsSection(_Model):
    """Where accounts beyond the file's ``[[users]]`` live, and the policies of all accounts."""

    database: str = ""
    """Empty: SQLite (accounts.sqlite3 in state_dir); or "postgresql://user@host/db"."""
    watch_interval: Annotated[float, Field(gt=0, le=60)] = 0.5
    """Seconds between the daemon's looks for account changes made by the CLI, the API or
    another node (disabling a user ends their sessions within this time)."""
    kick_on_disable: bool = True
    """Disabling, expiring or deleting a user ends their open sessions."""
    password_max_age: Annotated[int, Field(ge=0, le=PASSWORD_DAYS_MAX)] = 0
    """Days a password stays valid after it is set, for users and groups that do not say; 0: forever."""
    quota_thresholds: list[Annotated[int, Field(gt=0, le=100)]] = [80, 95]
    """Percentages of a quota whose crossing raises the ``quota-threshold`` event."""
    create_homes: bool = True
    """Make a missing home (and its ``home_folders``) at account creation and at login."""
    home_mode: Annotated[int, Field(ge=0, le=0o7777)] = 0o750
    """Mode of homes and home_folders made by the server (TOML takes 0o750)."""
    home_owner: str = ""
    """User (name or uid) that owns the homes the server makes, when it runs as root; empty: the daemon's."""
    home_base: str = "../data"
    """Where `scriptsftp user add` puts a new user's home without --home (the API requires home):
    ``home_base/NAME``; relative to the config file's directory, like ``state_dir``."""

    @field_validator("database")
    @classmethod
    def _database(cls, v: str) -> str:
        if v and not v.startswith(("postgresql://", "postgres://")):
            raise ValueError("must be empty (SQLite in state_dir) or a postgresql:// URL")
        return v


class ClusterSection(_Model):
    """Several daemons acting as one server (docs/cluster.md): this node's name, the
    PostgreSQL database they share, and the load balancers allowed to tell a client's
    address. Empty (the default): one node, state in state_dir."""

    node: str = ""
    """This node's name in logs, the audit trail and ``cluster status``; empty: the host name."""
    database: str = ""
    """The PostgreSQL database the nodes share ("postgresql://user@host/db"); empty: none."""
    staging_lease: Annotated[float, Field(ge=1, le=3600)] = 15.0
    """Seconds an upload in progress stays this node's without the node renewing it (it
    renews every third of that); after it, a surviving node discards or rechecks the upload
    (docs/cluster.md, "Staging on shared storage")."""
    trusted_proxies: list[str] = []
    """Networks of the load balancers whose connections carry a PROXY protocol header
    (required on SSH and FTP; on HTTP, a header or else ``X-Forwarded-For``) naming the real
    client; from anywhere else a PROXY header is refused and ``X-Forwarded-For`` ignored
    (server/support/proxy_protocol.py, docs/cluster.md)."""

    @field_validator("node")
    @classmethod
    def _node(cls, v: str) -> str:
        if v and not USER_NAME.match(v):
            raise ValueError("letters, digits and _ . @ - only, at most 64 characters")
        return v

    @field_validator("database")
    @classmethod
    def _database(cls, v: str) -> str:
        if v and not v.startswith(("postgresql://", "postgres://")):
            raise ValueError("must be empty (one node) or a postgresql:// URL")
        return v

    @field_validator("trusted_proxies")
    @classmethod
    def _proxies(cls, v: list[str]) -> list[str]:
        return _check_networks(v)


class Config(_Model):
    server: ServerSection = ServerSection()
    sftp: SftpSection = SftpSection()
    ftp: FtpSection = FtpSection()
    http: HttpSection = HttpSection()
    admin: AdminSection = AdminSection()
    uploads: UploadsSection = UploadsSection()
    defender: DefenderSection = DefenderSection()
    scripts: ScriptsSection = ScriptsSection()
    notify: NotifySection = NotifySection()
    commands: dict[str, CommandSection] = {}
    accounts: AccountsSection = AccountsSection()
    cluster: ClusterSection = ClusterSection()
    folders: list[Folder] = []
    groups: list[Group] = []
    users: list[User] = []
    bindings: list[Binding] = []



class LoadedConfig:
    """A validated config plus where it came from (to resolve relative paths)."""

    def __init__(self, path: Path, model: Config, key_lines: KeyLines) -> None:
        self.path = path
        self.model = model
        self.key_lines = key_lines

    @property
    def base(self) -> Path:
        return self.path.parent

    def resolve(self, value: str) -> Path:
        """A path from the config, made absolute against the config's directory."""
        p = Path(os.path.expanduser(value))
        return p if p.is_absolute() else (self.base / p).resolve()

    def where(self, loc: tuple[Any, ...]) -> str:
        line = self.key_lines.line_of(loc)
        return f"{self.path}:{line or 1}: {format_loc(loc)}"


def default_config_path() -> Path:
    return Path(os.environ.get("SCRIPTSFTP_CONFIG") or "conf/scriptsftp.toml")


def load_config(path: Path | str) -> LoadedConfig:
    """Parse and validate; raise :class:`ConfigError` with every problem found."""
    path = Path(path).absolute()
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError([f"{path}:1: (file): cannot read: {exc.strerror or exc}"]) from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError([f"{path}:1: (file): larger than {MAX_CONFIG_BYTES} bytes"])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}:1: (file): not UTF-8 ({exc.reason} at byte {exc.start})"]) from None
    try:
        data = tomli.loads(text)
    except tomli.TOMLDecodeError as exc:
        line = getattr(exc, "lineno", None) or 1
        msg = getattr(exc, "msg", None) or str(exc)
        raise ConfigError([f"{path}:{line}: (syntax): {msg}"]) from None
    key_lines = KeyLines(text)
    # Validation errors and cross-section problems are reported together, in file
    # order, so one pass over the file fixes everything.
    found: list[tuple[tuple[Any, ...], str]] = []
    model: Config | None = None
    try:
        model = Config.model_validate(data)
    except ValidationError as exc:
        for err in exc.errors():
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown key"
            found.append((tuple(err["loc"]), msg))
    found += _cross_check(data)
    if found:
        lines = [(key_lines.line_of(loc) or 1, format_loc(loc), msg) for loc, msg in found]
        lines.sort(key=lambda p: p[0])  # stable: same line keeps the validator's order
        raise ConfigError([f"{path}:{line}: {key}: {msg}" for line, key, msg in lines]) from None
    assert model is not None
    return LoadedConfig(path, model, key_lines)


def _cross_check(data: dict[str, Any]) -> list[tuple[tuple[Any, ...], str]]:
    """Rules that span sections: names defined once, references that resolve.

    Runs on the raw TOML (which strict validation never coerces), so it also
    works when validation failed; entries too malformed to read are left to
    the validation errors."""

    def entries(section: str) -> list[tuple[int, dict[str, Any]]]:
        items = data.get(section)
        return [(i, e) for i, e in enumerate(items) if isinstance(e, dict)] if isinstance(items, list) else []

    def names(value: Any) -> list[str]:
        return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []

    problems: list[tuple[tuple[Any, ...], str]] = []
    seen: set[str] = set()
    for i, group in entries("groups"):
        name = group.get("name")
        if not isinstance(name, str):
            continue
        if name in seen:
            problems.append((("groups", i, "name"), f"group {name!r} is defined twice"))
        seen.add(name)
    folders: set[str] = set()
    for i, folder in entries("folders"):
        name = folder.get("name")
        if isinstance(name, str):
            if name in folders:
                problems.append((("folders", i, "name"), f"folder {name!r} is defined twice"))
            folders.add(name)
    for section in ("groups", "users"):
        for i, entry in entries(section):
            mounts = entry.get("folders")
            for vpath, folder_name in (mounts.items() if isinstance(mounts, dict) else ()):
                if isinstance(folder_name, str) and folder_name not in folders:
                    problems.append(((section, i, "folders", vpath), f"unknown folder {folder_name!r}"))
    users: set[str] = set()
    for i, user in entries("users"):
        name = user.get("name")
        if isinstance(name, str):
            if name in users:
                problems.append((("users", i, "name"), f"user {name!r} is defined twice"))
            users.add(name)
        for g in names(user.get("groups")):
            if g not in seen:
                problems.append((("users", i, "groups"), f"unknown group {g!r}"))
    for i, binding in entries("bindings"):
        for g in names(binding.get("groups")):
            if g not in seen:
                problems.append((("bindings", i, "groups"), f"unknown group {g!r}"))
    return problems

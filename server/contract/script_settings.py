"""The scripting side of the config: what the engine reads, as pydantic models.

``[scripts]``, ``[notify]`` (SMTP, webhooks), ``[commands]`` and ``[[bindings]]`` are
declared here, in the contract, so that ``scriptsftp.scripting`` can read its
settings without importing ``server/support``; ``server/support/config.py``
composes them into the whole :class:`~scriptsftp.server.support.config.Config`,
so ``load_config`` validates them in the same pass and ``scriptsftp check`` names
file, key and line exactly as for any other section.

The engine never sees the loader itself: it is handed a :class:`ScriptConfig`, the
few things of a loaded config it uses (``LoadedConfig`` has them all).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping, Protocol, Sequence

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from scriptsftp.server.contract.events import EVENT_TYPES, VETOABLE

CAPABILITIES = ("read", "fs", "fs_admin", "own_file", "store", "notify", "run")
#: Placeholders of a [commands] argv template (scripting/commands.py fills them).
COMMAND_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_]*|[0-9]+)\}")
COMMAND_NAMED = ("path", "vpath", "user")


def command_template_problems(argv: list[str]) -> list[str]:
    """Why a [commands] argv template is unusable (empty: fine)."""
    problems = []
    for i, item in enumerate(argv):
        if "\x00" in item:
            problems.append(f"argv[{i}] contains a NUL byte")
        if item == "{args}":
            continue
        for m in COMMAND_PLACEHOLDER.finditer(item):
            name = m.group(1)
            if name is not None and not name.isdigit() and name not in COMMAND_NAMED:
                problems.append(f"argv[{i}]: unknown placeholder {{{name}}} "
                                "(known: {path} {vpath} {user} {0} {1}..., and {args} as a whole element)")
        rest = COMMAND_PLACEHOLDER.sub("", item)
        if "{" in rest or "}" in rest:
            problems.append(f"argv[{i}]: unbalanced brace (write {{{{ or }}}} for a literal one)")
    if argv and "{" in argv[0]:
        problems.append("argv[0] (the program) cannot be a placeholder")
    return problems


def command_template_warnings(name: str, argv: list[str]) -> list[str]:
    """Templates that work but invite option injection: a script-filled argument standing
    where the program still reads options (no ``--`` element before it)."""
    warnings = []
    for i, item in enumerate(argv[1:], start=1):
        if item == "--":
            break
        m = COMMAND_PLACEHOLDER.match(item)
        if item == "{args}" or (m is not None and m.group(1) is not None and m.group(1).isdigit()):
            warnings.append(f"[commands.{name}] argv[{i}] ({item}) is filled by a script before any '--': "
                            "the program would read a value starting with '-' as an option. Such values are "
                            "refused unless allow_dash_args = true; put \"--\" before it")
    return warnings


def check_cron(expr: str) -> str:
    """A 5-field cron expression (minute granularity), or ValueError saying why not."""
    from datetime import datetime

    from cronsim import CronSim, CronSimError

    if len(expr.split()) != 5:
        raise ValueError(f"{expr!r}: a cron expression has 5 fields (minute hour day month weekday)")
    try:
        it = CronSim(expr, datetime.now())
        next(it)
    except CronSimError as exc:
        raise ValueError(f"{expr!r}: invalid cron expression ({exc})") from None
    except StopIteration:
        raise ValueError(f"{expr!r}: this cron expression never fires") from None
    return expr


class ConfigError(Exception):
    """A config that cannot be used; ``problems`` are ready-to-print lines.

    Raised by ``load_config`` and by the script engine (a bound script that does not
    compile), so it lives here, where both sides may import it."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class StrictModel(BaseModel):
    """Every config model: strict types, unknown keys rejected, immutable once loaded."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)




PositiveFloat = Annotated[float, Field(gt=0)]
PositiveInt = Annotated[int, Field(gt=0)]


class ScriptsSection(StrictModel):
    dir: str = "../scripts"
    user: str = ""
    """Account the script workers run as when the daemon runs as root; empty:
    "scriptsftp-sandbox". Ignored when the daemon is not root (it cannot switch)."""
    workers: Annotated[int, Field(ge=1, le=64)] = 2
    login_reserve: Annotated[int, Field(ge=0, le=63)] = 1
    """Workers that only connect and pre-login handlers may take (at most workers - 1), so
    no binding another user triggers can make a login wait."""
    nice: Annotated[int, Field(ge=0, le=19)] = 10
    """How many steps below the daemon's CPU priority the script workers run (0: the same).
    When CPU is short the kernel then gives it to transfers and logins first, and a
    CPU-bound script takes only what they leave; on an idle machine scripts run at full
    speed all the same. Workers started after a reload get a new value."""
    timeout: PositiveFloat = 5.0
    cpu_time: PositiveFloat = 2.0
    memory_mb: Annotated[int, Field(ge=32, le=65536)] = 256
    reload: bool = True
    async_queue: Annotated[int, Field(ge=1)] = 10000
    fs_admin_root: str = ""
    """Directory that bindings granted ``fs_admin`` reach as ``admin:/...`` (archive, quarantine)."""
    schedule_tick: Annotated[float, Field(ge=0.05, le=60)] = 60.0
    """For tests only: real seconds per scheduler minute (60 = follow the wall clock)."""


class SmtpSection(StrictModel):
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 25
    starttls: bool = False
    username: str = ""
    password: str = ""
    sender: str = "scriptsftp@localhost"
    ca_file: str = ""
    """CA bundle to verify the server's STARTTLS certificate (default: the system's)."""
    timeout: PositiveFloat = 30.0

    @model_validator(mode="after")
    def _tls_for_auth(self) -> "SmtpSection":
        if self.password and not self.starttls and self.host not in ("127.0.0.1", "::1", "localhost"):
            raise ValueError("a password is only sent over STARTTLS (set starttls = true) "
                             "unless the SMTP server is on localhost")
        return self


class WebhookSection(StrictModel):
    url: str
    timeout: PositiveFloat = 10.0
    headers: dict[str, str] = {}

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        from urllib.parse import urlsplit

        try:
            u = urlsplit(v)
            u.port  # noqa: B018 - raises on a bad port
        except ValueError as exc:
            raise ValueError(f"{v!r} is not a URL ({exc})") from None
        if u.scheme not in ("http", "https") or not u.hostname or any(c in v for c in " \r\n\x00"):
            raise ValueError(f"{v!r} is not an http:// or https:// URL")
        return v

    @field_validator("headers")
    @classmethod
    def _headers(cls, v: dict[str, str]) -> dict[str, str]:
        for name, value in v.items():
            if not re.fullmatch(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+", name):
                raise ValueError(f"{name!r} is not a valid header name")
            if any(c in value for c in "\r\n\x00"):
                raise ValueError(f"header {name!r}: the value must be one line")
        return v


class NotifySection(StrictModel):
    smtp: SmtpSection = SmtpSection()
    webhooks: dict[str, WebhookSection] = {}
    max_attempts: Annotated[int, Field(ge=1, le=100)] = 10
    retry_delay: PositiveFloat = 30.0
    """Seconds before the first retry; doubles after each failure (at most an hour)."""
    lease: Annotated[float, Field(ge=1, le=86400)] = 300.0
    """Seconds a node's claim on a message it delivers lasts (the database's clock): a
    message claimed by a node that died is delivered by another one after it. Longer than
    any delivery (each webhook's timeout, the SMTP timeout), or a slow delivery would be
    made twice."""

    @model_validator(mode="after")
    def _lease_outlasts_deliveries(self) -> "NotifySection":
        slowest = max([self.smtp.timeout, *(h.timeout for h in self.webhooks.values())])
        if self.lease <= slowest:
            raise ValueError(f"lease ({self.lease:g}s) must be longer than the slowest delivery's timeout "
                             f"({slowest:g}s): a delivery outlasting its lease is made again by another node")
        return self


class CommandSection(StrictModel):
    argv: Annotated[list[str], Field(min_length=1)]
    timeout: PositiveFloat = 60.0
    max_output: PositiveInt = 65536
    stdin: Literal["null", "file"] = "null"
    """"file": the event's file, opened by the server, is the command's standard input."""
    allow_dash_args: bool = False
    """Script arguments may start with "-". Off: such an argument is refused, since the
    program would read it as an option (``--file=/etc/secret``), whatever the template."""

    @field_validator("argv")
    @classmethod
    def _template(cls, v: list[str]) -> list[str]:
        problems = command_template_problems(v)
        if problems:
            raise ValueError("; ".join(problems))
        return v


class Binding(StrictModel):
    event: str
    script: Annotated[str, Field(min_length=1)]
    function: str = ""
    users: list[str] = ["*"]
    groups: list[str] = []
    paths: list[str] = []
    protocols: list[Literal["sftp", "scp", "ftp", "http"]] = []
    min_size: Annotated[int, Field(ge=0)] = 0
    max_size: Annotated[int, Field(ge=0)] = 0
    """0 = no upper bound."""
    order: int = 100
    mode: Literal["sync", "async"] = "sync"
    timeout: PositiveFloat | None = None
    cpu_time: PositiveFloat | None = None
    on_error: Literal["deny", "allow"] | None = None
    allow: list[Literal["read", "fs", "fs_admin", "own_file", "store", "notify", "run"]] = []
    cron: str = ""

    @field_validator("cron")
    @classmethod
    def _cron(cls, v: str) -> str:
        return check_cron(v) if v else v

    @field_validator("allow")
    @classmethod
    def _allow(cls, v: list[str]) -> list[str]:
        for modifier in ("fs_admin", "own_file"):
            if modifier in v and "fs" not in v:
                raise ValueError(f"'{modifier}' extends 'fs': grant both (allow = [\"fs\", \"{modifier}\", ...])")
        return v

    @field_validator("event")
    @classmethod
    def _event(cls, v: str) -> str:
        if v not in EVENT_TYPES:
            raise ValueError(f"unknown event {v!r} (see `scriptsftp events`)")
        return v

    @field_validator("script")
    @classmethod
    def _script(cls, v: str) -> str:
        if v.startswith("/") or ".." in Path(v).parts:
            raise ValueError("must be a path relative to [scripts] dir, without '..'")
        return v

    @model_validator(mode="after")
    def _rules(self) -> "Binding":
        if self.mode == "async" and self.event in VETOABLE and self.event != "pre-publish":
            raise ValueError(f"mode = 'async' is only for post-events and pre-publish; {self.event!r} "
                             "must decide before the operation, so it runs sync")
        if self.event == "schedule" and not self.cron:
            raise ValueError("a schedule binding needs cron = '...'")
        if self.cron and self.event != "schedule":
            raise ValueError("cron is only for event = 'schedule'")
        if self.max_size and self.max_size < self.min_size:
            raise ValueError("max_size is below min_size")
        return self

    @property
    def handler(self) -> str:
        return self.function or "on_" + self.event.replace("-", "_")

    @property
    def error_policy(self) -> str:
        return self.on_error or ("deny" if self.event in VETOABLE else "allow")


class UserGroups(Protocol):
    """A user as bindings see it: a name and the groups it belongs to."""

    @property
    def name(self) -> str: ...

    @property
    def groups(self) -> Sequence[str]: ...


class ScriptSections(Protocol):
    """The sections of the config the engine reads (``Config`` has them)."""

    @property
    def scripts(self) -> ScriptsSection: ...

    @property
    def notify(self) -> NotifySection: ...

    @property
    def commands(self) -> Mapping[str, CommandSection]: ...

    @property
    def bindings(self) -> Sequence[Binding]: ...

    @property
    def users(self) -> Sequence[UserGroups]: ...


class ScriptConfig(Protocol):
    """A loaded config as the engine uses it (``LoadedConfig`` satisfies it): its sections,
    where the file is (paths in it are relative to it) and where a key sits in it (messages)."""

    @property
    def path(self) -> Path: ...

    @property
    def model(self) -> ScriptSections: ...

    def resolve(self, value: str) -> Path:
        """A path from the config, made absolute against the config's directory."""
        ...

    def where(self, loc: tuple[Any, ...]) -> str:
        """``FILE:LINE: KEY`` of a key, for messages."""
        ...

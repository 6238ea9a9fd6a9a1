"""The shapes of the admin API's JSON, as pydantic models, so /api/openapi.json is generated
from them (openapi.py) instead of copied by hand.

The account bodies are not here: they are the configuration's own models (``config.User``,
``Group``, ``Folder``), so a key the file accepts is one the API accepts, with the same
validation and the same messages. What is here are the replies of the other endpoints and
the bits the account endpoints add around the config models (stamps, keys, passwords).
The handlers build plain dicts; tests/test_admin_accounts.py and tests/test_openapi.py
validate every reply they receive against the document, which is how a drift between a
handler and its model shows.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Reply(BaseModel):
    # Replies may grow a field without breaking a client: the document says so (no
    # additionalProperties: false), only the request bodies are strict.
    model_config = ConfigDict(extra="allow")


class ErrorReply(_Reply):
    """Every refusal: a sentence for a human, and per field what is wrong with a body."""

    error: str
    fields: dict[str, str] = Field(default_factory=dict,
                                   description="Per field of the request body (dotted path), what is wrong.")


class Health(_Reply):
    status: Literal["ok", "degraded", "draining"]
    reason: str = ""
    since: float | None = Field(None, description="draining: Unix time the drain started.")
    sessions: int | None = Field(None, description="draining: client connections still open.")


class Drain(_Reply):
    """A drain under way: no listener accepts; open sessions end by themselves until the deadline."""

    started: float = Field(description="Unix time the drain started.")
    deadline: float = Field(description="Unix time the sessions left are ended and the daemon stops.")
    sessions_at_start: int
    sessions: int = Field(description="Client connections (SFTP, SCP, FTP, HTTP) still open.")
    checks: int = Field(description="Background (async) pre-publish checks still running.")


class ListenerInfo(_Reply):
    name: str
    bound: list[str]
    active: int


class ClusterNode(_Reply):
    """One node's row in the node registry (docs/cluster.md, "Which nodes run what")."""

    node: str
    version: str
    config_hash: str
    script_hashes: dict[str, str]
    started_at: float
    heartbeat_age: float = Field(description="Seconds since the node's last heartbeat, by the database's clock.")
    alive: bool = Field(description="heartbeat_age is at most down_after.")
    draining: bool
    listeners: list[dict[str, Any]] = Field(description="[{name, bound: [host:port]}] as the node bound them.")


class ClusterDrift(_Reply):
    """Where the alive nodes differ; each part empty when they agree."""

    versions: dict[str, list[str]] = Field(description="scriptsftp version -> nodes, when more than one.")
    config_hashes: dict[str, list[str]] = Field(description="config_hash -> nodes, when more than one.")
    scripts: dict[str, dict[str, str | None]] = Field(
        description="Script name -> node -> its SHA-256 (null: not run there), for each script that differs.")


class Cluster(_Reply):
    nodes: list[ClusterNode] = Field(default_factory=list)
    down: list[str] = Field(default_factory=list, description="Nodes whose heartbeat is older than down_after.")
    down_after: float | None = None
    drift: ClusterDrift | None = None
    ok: bool | None = Field(None, description="Every node alive and no drift.")
    error: str | None = Field(None, description="Only this, when the registry cannot be read (database away).")


class Status(_Reply):
    version: str
    started: float
    uptime: float
    config: str
    pending_restart: list[str] = Field(description="Keys changed in the file that wait for a restart.")
    listeners: list[ListenerInfo]
    sessions: int
    workers: dict[str, Any] | None
    scripts: int
    audit: dict[str, int] | None
    outbox: dict[str, int] | None
    node: str = Field(description="[cluster] node, else the host name.")
    config_hash: str = Field(description="SHA-256 of the running configuration's values, [cluster] node and "
                                         "ftp masquerade_address left out: equal on nodes that run the same "
                                         "settings, whatever the comments and layout of their files.")
    script_hashes: dict[str, str] = Field(description="SHA-256 of each bound script's running version, by name.")
    draining: Drain | None = Field(description="The drain under way, or null.")
    cluster: Cluster | None = Field(None, description="With [cluster] database: every node of the node "
                                                      "registry and the drift between them; else null.")


class Transfer(_Reply):
    path: str
    direction: Literal["upload", "download"]
    bytes: int
    seconds: float


class SessionInfo(_Reply):
    id: str
    protocol: str
    remote_ip: str
    user: str | None
    started: float
    seconds: float
    channels: list[str]
    bytes_in: int
    bytes_out: int
    transfers: list[Transfer]
    node: str = Field(description="The node that holds it ([cluster] node, else the host name).")
    last_activity: float | None = Field(None, description="Another node's session: Unix time its bytes last "
                                                          "moved (as of that node's last sync, every 5 s).")


class Kicked(_Reply):
    kicked: str
    user: str | None
    node: str = Field(description="The node that held the session.")
    pending: bool = Field(description="Another node's session that was not seen gone within 3 s; that node "
                                      "ends it when it next looks, if it is alive.")


class ScriptBinding(_Reply):
    event: str
    function: str | None
    order: int
    mode: str
    paths: list[str]
    users: list[str]


class ScriptError(_Reply):
    message: str
    line: int | None
    time: float | None
    kind: str | None
    event: str | None


class ScriptInfo(_Reply):
    name: str
    status: Literal["ok", "error", "missing"]
    sha256: str | None
    loaded_at: float | None
    functions: list[str]
    bindings: list[ScriptBinding]
    last_error: ScriptError | None


class ReloadResult(_Reply):
    ok: bool
    errors: list[str]
    pending_restart: list[str]


class ScriptRun(_Reply):
    time: float
    script: str
    function: str
    mode: str
    verdict: str
    reason: str
    duration: float
    error_kind: str | None
    error_line: int | None
    logs: list[Any]
    queued: float


class AuditEvent(_Reply):
    id: str
    time: float
    name: str
    session_id: str
    protocol: str
    remote_ip: str
    user: str
    path: str
    target: str
    size: int | None
    decision: str
    reason: str
    decided_by: str
    node: str = Field(description="The node that recorded the event ([cluster] node, else its host name); "
                                  "empty for events recorded before nodes were named.")
    runs: list[ScriptRun]


class Ban(_Reply):
    ip: str = Field(description="An address, a network, or user:NAME for a user's password lock.")
    score: float
    banned_until: float
    ban_count: int
    reason: str


class Unbanned(_Reply):
    unbanned: str


class LoginLink(_Reply):
    path: str
    url: str
    expires_in: float


# --- around the account models ------------------------------------------------------------


class Stamps(_Reply):
    """When and by whom an account entry was made and last changed (``api:TOKEN``, ``cli:USER``, ``import``)."""

    created_at: float
    created_by: str
    updated_at: float
    updated_by: str


class UserStamps(Stamps):
    password_changed: float | None
    last_login: float | None
    has_password: bool


class PasswordBody(BaseModel):
    """A new password (hashed by the server with argon2id; never stored or logged as sent),
    or a hash made elsewhere with ``scriptsftp hash-password``."""

    model_config = ConfigDict(extra="forbid")

    password: str | None = Field(default=None, min_length=1, max_length=1024)
    password_hash: str | None = None


class DisableBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str = Field(default="", max_length=1000,
                        description="Shown to the client where the protocol carries it, and logged.")


class KeyBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    key: str = Field(max_length=16384, description='One OpenSSH public key line, e.g. "ssh-ed25519 AAAA… comment".')


class KeyInfo(_Reply):
    fingerprint: str = Field(description='"SHA256:…" as ssh-keygen -l prints it.')
    key: str


#: every model the document's components hold, by the name it has there
REPLY_MODELS: tuple[type[BaseModel], ...] = (
    ErrorReply, Health, Drain, Status, SessionInfo, Kicked, ScriptInfo, ReloadResult, AuditEvent, Ban, Unbanned,
    LoginLink, UserStamps, Stamps, PasswordBody, DisableBody, KeyBody, KeyInfo,
)

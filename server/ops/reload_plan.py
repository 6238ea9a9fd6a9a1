"""What a config reload (SIGHUP) applies live and what waits for a restart, key by key.

docs/architecture.md rule 8: "reloaded" means enforced. Every key of the config models is
classified here as applied live or needing a restart; a key in neither set is a
bug that tests/test_reload_contract.py catches, so a new key cannot be forgotten.
A live key may still need a restart while the running config reads it at start
somewhere (:data:`RESTART_WHEN`: ``preauth_timeout`` as SSH's login grace).
Whatever is live must actually be applied: by :meth:`Daemon._apply_settings` for
values held outside the config, else by being read from the daemon's config
where it is used.

A reload never half-applies a restart key: the daemon runs the *effective*
config, which is the new file with every restart key put back to the value the
daemon started with. What differs between the file and the effective config is
"pending restart", logged per key, shown by ``/api/status`` and by
``scriptsftp check --against-running``, which reads the fingerprint the daemon
writes to ``state_dir/running.json`` (per-key SHA-256, so no secret is copied).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel, ValidationError

from scriptsftp.server.support.config import Config, ConfigError, LoadedConfig

RUNNING_FILE = "running.json"

#: Keys (dotted paths; a collection is one key) that a reload applies at once.
LIVE = frozenset({
    "server.log_format", "server.log_level", "server.grace_period", "server.drain_timeout",
    "server.login_failure_delay",
    "server.password_cache", "server.audit_retention_days", "server.audit_max_mb", "server.preauth_timeout",
    "server.max_handles_per_user", "server.max_sessions_per_user",
    "http.max_upload_size", "admin.token_hash", "admin.tokens",
    "defender.enabled", "defender.threshold", "defender.observation_window", "defender.ban_time",
    "defender.ban_time_multiplier", "defender.max_ban_time", "defender.score_login_failed",
    "defender.score_unknown_user", "defender.score_protocol_error", "defender.score_connect_vetoed",
    "defender.score_limit_exceeded", "defender.allow_list", "defender.max_connections",
    "defender.max_connections_per_ip", "defender.rate_per_ip", "defender.burst_per_ip",
    "defender.max_preauth_connections", "defender.ipv6_prefix", "defender.user_max_failures",
    "defender.user_lock_time",
    "scripts.timeout", "scripts.cpu_time", "scripts.fs_admin_root", "scripts.schedule_tick",
    "scripts.nice",
    "notify.smtp.host", "notify.smtp.port", "notify.smtp.starttls", "notify.smtp.username",
    "notify.smtp.password", "notify.smtp.sender", "notify.smtp.ca_file", "notify.smtp.timeout",
    "notify.webhooks", "notify.max_attempts", "notify.retry_delay", "notify.lease",
    "commands", "groups", "users", "bindings", "folders",
    "accounts.watch_interval", "accounts.kick_on_disable", "accounts.password_max_age",
    "accounts.quota_thresholds", "accounts.create_homes", "accounts.home_mode", "accounts.home_owner",
    "accounts.home_base",
})

#: Keys whose new value is used only after a restart (listeners, processes, paths opened at start).
RESTART = frozenset({
    "server.state_dir", "server.allow_root", "server.allow_root_workers", "server.stall_timeout",
    "sftp.enabled", "sftp.listen", "sftp.host_keys", "sftp.max_handles", "sftp.max_packet",
    "sftp.window_size", "sftp.idle_timeout", "sftp.login_grace", "sftp.banner", "sftp.processes",
    "sftp.max_channels_per_connection", "sftp.max_queued_bytes", "sftp.worker_user", "sftp.worker_max_growth",
    "ftp.enabled", "ftp.listen", "ftp.passive_ports", "ftp.masquerade_address", "ftp.active_mode",
    "ftp.tls", "ftp.certificate", "ftp.private_key", "ftp.idle_timeout",
    "http.enabled", "http.listen", "http.certificate", "http.private_key", "http.idle_timeout",
    "admin.enabled", "admin.listen", "admin.idle_timeout",
    "uploads.atomic", "uploads.quarantine", "uploads.on_restart", "uploads.fsync", "uploads.min_free_space",
    "scripts.dir", "scripts.user", "scripts.workers", "scripts.login_reserve", "scripts.memory_mb",
    "scripts.reload", "scripts.async_queue",
    "accounts.database", "cluster.node", "cluster.database", "cluster.trusted_proxies",
    "cluster.staging_lease",
})

def _ssh_reads_preauth_timeout(running: Config) -> bool:
    return running.sftp.enabled and running.sftp.login_grace is None


#: Live keys that need a restart while the running config uses them at start somewhere:
#: ``preauth_timeout`` reaches new FTP and HTTP connections at once, but SSH takes it at start
#: as its login grace when ``[sftp] login_grace`` is unset. Applying it to FTP and HTTP only
#: would be half-applied, so then it waits for the restart like the rest.
RESTART_WHEN: dict[str, Callable[[Config], bool]] = {"server.preauth_timeout": _ssh_reads_preauth_timeout}


def needs_restart(key: str, running: Config) -> bool:
    """Whether a change of ``key`` waits for a restart, given what runs."""
    condition = RESTART_WHEN.get(key)
    return key in RESTART or (condition is not None and condition(running))


#: Sections that do nothing unless ``enabled = true`` (``check`` warns about keys set there otherwise).
SWITCHED_SECTIONS = ("sftp", "ftp", "http", "admin")


def _section_model(annotation: Any) -> type[BaseModel] | None:
    """The model class of a nested section field (not of a list or dict of entries)."""
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def config_keys(model: type[BaseModel] = Config, prefix: str = "") -> list[str]:
    """Every key of the config, from the pydantic models: nested sections are walked,
    lists and tables of entries (users, bindings, commands, webhooks) are one key each."""
    keys: list[str] = []
    hints = typing.get_type_hints(model)
    for name in model.model_fields:
        sub = _section_model(hints.get(name))
        keys += config_keys(sub, f"{prefix}{name}.") if sub is not None else [prefix + name]
    return keys


def key_label(key: str) -> str:
    """How a log line names a key: ``[ftp] tls``, ``[notify.smtp] host``, ``[[users]]``."""
    section, _, name = key.rpartition(".")
    if not section:
        return f"[[{key}]]" if key in ("users", "groups", "bindings", "folders") else f"[{key}]"
    return f"[{section}] {name}"


def _get(model: BaseModel, key: str) -> Any:
    value: Any = model
    for part in key.split("."):
        value = getattr(value, part)
    return value


def _json(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, list):
        return [_json(v) for v in value]
    if isinstance(value, dict):
        return {k: _json(v) for k, v in value.items()}
    return value


def values(model: Config) -> dict[str, Any]:
    """Key -> JSON-able value, for every key of :func:`config_keys`."""
    return {key: _json(_get(model, key)) for key in config_keys()}


def fingerprints(model: Config) -> dict[str, str]:
    """Key -> SHA-256 of its value: comparable across processes, and reveals no secret."""
    return {k: hashlib.sha256(json.dumps(v, sort_keys=True).encode()).hexdigest()
            for k, v in values(model).items()}


#: Keys that differ from node to node on purpose: left out of :func:`config_hash`, so that
#: nodes deployed with the same file and their own names compare equal.
NODE_LOCAL_KEYS = frozenset({"cluster.node", "ftp.masquerade_address"})


def config_hash(model: Config) -> str:
    """SHA-256 of the configuration as the daemon runs it (``/api/status`` ``config_hash``):
    every key's value but :data:`NODE_LOCAL_KEYS`, so comments, layout and key order do not
    count, and two nodes that run the same settings show the same hash."""
    keys = {k: v for k, v in fingerprints(model).items() if k not in NODE_LOCAL_KEYS}
    return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()


def _with_value(model: BaseModel, key: str, value: Any) -> BaseModel:
    head, _, rest = key.partition(".")
    if not rest:
        return model.model_copy(update={head: value})
    return model.model_copy(update={head: _with_value(getattr(model, head), rest, value)})


@dataclass(frozen=True)
class ReloadPlan:
    """The outcome of comparing the running config with a newly read file."""

    effective: LoadedConfig
    """What the daemon runs after the reload: the file, restart keys kept at their running value."""
    applied: list[str]
    """Live keys whose value changes now."""
    pending_restart: list[str]
    """Restart keys whose file value differs from the running one."""


def plan_reload(running: LoadedConfig, new: LoadedConfig) -> ReloadPlan:
    """Split the changes; raise ConfigError when the live part cannot run with the
    restart part held back (e.g. dropping ``[admin] token_hash`` while the running
    ``listen`` is not loopback): then nothing is applied."""
    old_values, new_values = values(running.model), values(new.model)
    changed = [k for k in config_keys() if old_values[k] != new_values[k]]
    pending = [k for k in changed if needs_restart(k, running.model)]
    model: BaseModel = new.model
    for key in pending:
        model = _with_value(model, key, _get(running.model, key))
    try:
        effective = Config.model_validate(model.model_dump(mode="python"), strict=False)
    except ValidationError as exc:
        raise ConfigError([
            f"{new.path}: {'.'.join(map(str, e['loc']))}: {e['msg'].removeprefix('Value error, ')} "
            f"(with the running values of {', '.join(key_label(k) for k in pending)}, "
            "which need a restart): restart to apply this file" for e in exc.errors()]) from None
    applied = [k for k in changed if k not in pending]
    return ReloadPlan(LoadedConfig(new.path, effective, new.key_lines), applied, pending)


# --- state_dir/running.json: what `check --against-running` compares with ---------------------------


def write_running(state_dir: Path, cfg: LoadedConfig, pending_restart: list[str]) -> None:
    """Record what this process runs (atomically, 0600): pid, config path, per-key fingerprints."""
    data = {"pid": os.getpid(), "config": str(cfg.path), "written": time.time(),
            "keys": fingerprints(cfg.model), "pending_restart": pending_restart,
            "restart_keys": [k for k in config_keys() if needs_restart(k, cfg.model)]}
    tmp = state_dir / f".{RUNNING_FILE}.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(tmp, state_dir / RUNNING_FILE)


def read_running(state_dir: Path) -> dict[str, Any] | None:
    """The running daemon's record, or None when there is none or its process is gone."""
    try:
        data = json.loads((state_dir / RUNNING_FILE).read_text())
        os.kill(int(data["pid"]), 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return data  # alive, under another user
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return data


def compare_with_running(cfg: LoadedConfig, running: dict[str, Any]) -> list[tuple[str, str]]:
    """(key, "restart" or "reload") for each key where the file differs from the running daemon."""
    theirs: dict[str, str] = running.get("keys", {})
    restart = set(running.get("restart_keys", RESTART))
    out = []
    for key, digest in fingerprints(cfg.model).items():
        if theirs.get(key) != digest:
            out.append((key, "restart" if key in restart else "reload"))
    return out

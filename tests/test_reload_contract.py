"""The reload contract, key by key (docs/architecture.md rule 8): changing any config key by SIGHUP either
takes effect or is logged as needing a restart; nothing is silent.

The keys come from the pydantic models in server/support/config.py, so a key added there without a
place in server/ops/reload_plan.py (LIVE or RESTART) or without a way to change it here fails
these tests. That a live key really takes effect is shown for the ones with a visible effect
in test_reload.py (bindings, users, limits, log settings) and the suites of their features.
"""

from __future__ import annotations

import datetime
import json
import signal
import typing
from typing import Any

import pytest
from pydantic import BaseModel

from conftest import Daemon, DaemonFactory
from test_scripting import write_script

from scriptsftp.server.support import config as C
from scriptsftp.server.support.config import load_config
from scriptsftp.server.ops.reload_plan import LIVE, RESTART, config_keys, key_label, needs_restart

# --- a TOML writer for the config dict (tomli reads; nothing in the project writes TOML) ---------


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, datetime.date):
        return v.isoformat()
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(v)


def to_toml(data: dict[str, Any], prefix: str = "") -> str:
    """Scalars and lists inline, sub-tables as [a.b], lists of tables as [[a]]."""
    out, tables = [], []
    for k, v in data.items():
        if isinstance(v, dict) and (not v or all(isinstance(x, dict) for x in v.values())) and k != "permissions":
            tables.append((k, v))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v) and k != "filters":
            tables.append((k, v))
        else:
            out.append(f"{json.dumps(k) if '.' in k else k} = {_value(v)}")
    text = "\n".join(out) + "\n"
    for k, v in tables:
        name = f"{prefix}{k}"
        if isinstance(v, list):
            for item in v:
                text += f"\n[[{name}]]\n" + to_toml(item, name + ".")
        else:
            text += f"\n[{name}]\n" + to_toml(v, name + ".")
    return text


# --- the base config and one change per key -----------------------------------------------------


def base_config(daemons: DaemonFactory) -> dict[str, Any]:
    user = {"home": "homes/alice", "permissions": {"/": ["*"]}, "public_keys": [daemons.alice_key.public_line]}
    return {
        "server": {"state_dir": "state", "allow_root": True, "log_level": "info", "login_failure_delay": 0.05,
                   "grace_period": 5.0},
        "sftp": {"listen": "127.0.0.1:0", "processes": 1},
        "ftp": {"certificate": "ftp.pem", "private_key": "ftp.key"},
        "admin": {"tokens": [{"name": "reader", "token_hash": daemons.hashes["alice"], "scope": "read"}]},
        "scripts": {"dir": "scripts"},
        "notify": {"webhooks": {"hook": {"url": "http://127.0.0.1:9/x"}}},
        "commands": {"echo": {"argv": ["/bin/echo", "--", "{0}"]}},
        "folders": [{"name": "shared", "path": "shared"}],
        "groups": [{"name": "staff"}],
        "users": [{"name": "alice", **user, "password_hash": daemons.hashes["alice"], "groups": ["staff"]}],
        "bindings": [{"event": "post-upload", "script": "ok.py"}],
    }


#: Values for keys whose type has no obvious "other value" (strings, lists, bounded numbers).
CHANGES: dict[str, Any] = {
    "server.state_dir": "state2", "server.log_format": "json", "server.log_level": "debug",
    "server.allow_root": False, "server.login_failure_delay": 0.1, "server.max_sessions_per_user": 50,
    "sftp.listen": "127.0.0.1:1", "sftp.host_keys": ["hk"], "sftp.max_packet": 65536, "sftp.banner": "hi",
    "sftp.processes": 2, "sftp.login_grace": 20.0, "sftp.worker_user": "nobody", "scripts.user": "nobody",
    "ftp.listen": "127.0.0.1:1", "ftp.passive_ports": "61000-61010", "ftp.masquerade_address": "10.0.0.1",
    "ftp.tls": "explicit", "ftp.certificate": "other.pem", "ftp.private_key": "other.key",
    "http.listen": "127.0.0.1:1", "http.certificate": "c.pem", "http.private_key": "k.pem",
    "admin.listen": "127.0.0.1:1", "admin.token_hash": "ALICE_HASH",
    "admin.tokens": [{"name": "reader", "token_hash": "BOB_HASH", "scope": "read"}],
    "uploads.quarantine": "quarantine", "uploads.on_restart": "discard",
    "defender.allow_list": ["127.0.0.0/8"],
    "scripts.dir": "scripts2", "scripts.fs_admin_root": "adminroot", "scripts.schedule_tick": 30.0,
    "notify.smtp.host": "127.0.0.2", "notify.smtp.username": "u", "notify.smtp.password": "p",
    "notify.smtp.sender": "x@example.org", "notify.smtp.ca_file": "ca.pem",
    "notify.webhooks": {"hook": {"url": "http://127.0.0.1:9/y"}},
    "commands": {"echo": {"argv": ["/bin/echo", "{0}"]}},
    "groups": [{"name": "staff"}, {"name": "other"}],
    "users": "CHANGE_ENTRY", "bindings": "CHANGE_ENTRY",
    "folders": "CHANGE_ENTRY",
    "accounts.database": "postgresql://scriptsftp@127.0.0.1:1/none", "accounts.home_owner": "nobody",
    "accounts.home_base": "homes2",
    "accounts.quota_thresholds": [50],
    "cluster.node": "node-b", "cluster.database": "postgresql://scriptsftp@127.0.0.1:1/none",
    "cluster.trusted_proxies": ["10.0.0.0/8"], "cluster.staging_lease": 30.0,
}

#: One change per field of each kind of entry (users, groups, folders, bindings, commands, webhooks, admin tokens).
ENTRY_CHANGES: dict[str, dict[str, Any]] = {
    "users": {"name": "alice2", "password_hash": "BOB_HASH", "password_hash_file": "hashfile",
              "generate_password": True, "public_keys": [], "home": "homes/alice2", "groups": [],
              "permissions": {"/": ["list"]}, "protocols": ["sftp"], "allowed_ips": ["127.0.0.0/8"],
              "filters": [{"path": "/", "denied": ["*.tmp"]}], "max_sessions": 3, "disabled": True,
              "require_tls": True, "setstat_mode": "refuse", "quota_size": 1000, "quota_files": 10,
              "bandwidth_up": 1000, "bandwidth_down": 1000, "transfer_up_daily": 10**6,
              "transfer_down_daily": 10**6, "home_folders": ["/inbox"], "folders": {"/shared": "shared"},
              "password_max_age": 30, "disabled_reason": "left", "expires": datetime.date(2030, 1, 1)},
    "groups": {"name": "staff2", "permissions": {"/": ["list"]}, "protocols": ["sftp"],
               "allowed_ips": ["127.0.0.0/8"], "filters": [{"path": "/", "denied": ["*.tmp"]}],
               "setstat_mode": "ignore", "quota_size": 1000, "quota_files": 10,
               "bandwidth_up": 1000, "bandwidth_down": 1000, "transfer_up_daily": 10**6,
               "transfer_down_daily": 10**6, "home_folders": ["/inbox"], "folders": {"/shared": "shared"},
               "password_max_age": 30},
    "folders": {"name": "shared2", "path": "shared2", "quota_size": 1000, "quota_files": 10,
                "permissions": {"/": ["list"]}, "description": "partners' drop"},
    "bindings": {"event": "post-download", "script": "ok2.py", "function": "on_post_upload", "users": ["alice"],
                 "groups": ["staff"], "paths": ["/in/**"], "protocols": ["sftp"], "min_size": 1,
                 "max_size": 10, "order": 5, "mode": "async", "timeout": 3.0, "cpu_time": 1.0,
                 "on_error": "deny", "allow": ["store"], "cron": "*/5 * * * *"},
    "commands": {"argv": ["/bin/true"], "timeout": 5.0, "max_output": 10, "stdin": "file",
                 "allow_dash_args": True},
    "notify.webhooks": {"url": "http://127.0.0.1:9/z", "timeout": 3.0, "headers": {"X-A": "b"}},
    "admin.tokens": {"name": "reader2", "token_hash": "BOB_HASH", "scope": "write"},
}
ENTRY_MODELS = {"users": C.User, "groups": C.Group, "folders": C.Folder, "bindings": C.Binding,
                "commands": C.CommandSection,
                "notify.webhooks": C.WebhookSection, "admin.tokens": C.AdminToken}


def _default(key: str) -> Any:
    model: type[BaseModel] = C.Config
    *sections, name = key.split(".")
    for s in sections:
        model = typing.get_type_hints(model)[s]
    return model.model_fields[name].get_default(call_default_factory=True)


def changed_value(key: str, current: Any) -> Any:
    """Another valid value for ``key``: from CHANGES, else derived from the current one."""
    if key in CHANGES:
        return CHANGES[key]
    if isinstance(current, bool):
        return not current
    if isinstance(current, (int, float)):
        return current + 1
    raise AssertionError(f"no way to change {key!r} ({current!r}): add it to CHANGES")


def _get(data: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        data = data.get(part, {}) if isinstance(data, dict) else {}
    return data


def _set(data: dict[str, Any], key: str, value: Any) -> None:
    *sections, name = key.split(".")
    for s in sections:
        data = data.setdefault(s, {})
    data[name] = value


def _resolve(daemons: DaemonFactory, value: Any) -> Any:
    if isinstance(value, list):
        return [_resolve(daemons, v) for v in value]
    if isinstance(value, dict):
        return {k: _resolve(daemons, v) for k, v in value.items()}
    return {"ALICE_HASH": daemons.hashes["alice"], "BOB_HASH": daemons.hashes["bob"]}.get(value, value) \
        if isinstance(value, str) else value


def variants(daemons: DaemonFactory) -> list[tuple[str, str, dict[str, Any]]]:
    """(what changed, the key the log names, the config) for every key and every entry field."""
    out = []
    for key in config_keys():
        data = base_config(daemons)
        value = CHANGES.get(key)
        if value == "CHANGE_ENTRY":
            continue  # covered field by field below
        current = _get(data, key) if _get(data, key) != {} else _default(key)
        _set(data, key, _resolve(daemons, changed_value(key, current)))
        out.append((key, key, data))
    for collection, fields in ENTRY_CHANGES.items():
        for field, value in fields.items():
            data = base_config(daemons)
            entries = _get(data, collection)
            entry = entries["hook"] if collection == "notify.webhooks" else (
                entries["echo"] if collection == "commands" else entries[0])
            entry[field] = _resolve(daemons, value)
            _make_valid(data, collection, field, entry)
            out.append((f"{collection}[].{field}", collection, data))
    return out


def _make_valid(data: dict[str, Any], collection: str, field: str, entry: dict[str, Any]) -> None:
    """The few entry fields that cannot change alone without making the config invalid."""
    if collection == "users" and field in ("password_hash_file", "generate_password"):
        entry.pop("password_hash")
        entry["password_hash_file"] = "hashfile"
    if collection == "groups" and field == "name":
        data["users"][0]["groups"] = [entry["name"]]
    if collection == "bindings" and field == "event":
        entry["function"] = "on_post_upload"  # the script defines only that one
    if collection == "bindings" and field == "cron":
        entry.update(event="schedule", function="on_post_upload")


# --- the tests -----------------------------------------------------------------------------------


def test_every_key_is_either_live_or_needs_a_restart():
    keys = config_keys()
    assert set(keys) == LIVE | RESTART, {"unclassified": set(keys) - LIVE - RESTART,
                                         "unknown": (LIVE | RESTART) - set(keys)}
    assert not LIVE & RESTART


def test_every_entry_field_has_a_change():
    for collection, model in ENTRY_MODELS.items():
        assert collection in LIVE
        assert set(model.model_fields) == set(ENTRY_CHANGES[collection]), collection


OK_SCRIPT = "def on_post_upload(event, api):\n    pass\n"


def test_every_key_changed_by_sighup_is_applied_or_logged_as_needing_a_restart(daemons: DaemonFactory):
    write_script(daemons, "ok.py", OK_SCRIPT)
    write_script(daemons, "ok2.py", OK_SCRIPT)
    (daemons.root / "hashfile").write_text(daemons.hashes["alice"] + "\n")
    path = daemons.root / "scriptsftp.toml"
    path.write_text(to_toml(base_config(daemons)))
    d: Daemon = daemons.start(config=path)
    running = load_config(path).model
    silent = []
    for what, key, data in variants(daemons):
        path.write_text(to_toml(data))
        mark = len(d.lines)
        d.signal(signal.SIGHUP)
        m = d.wait_log(r"configuration reloaded|configuration not reloaded", start=mark)
        assert "not reloaded" not in m.group(0), (what, d.lines[mark:])
        expected = "takes effect after a restart" if needs_restart(key, running) else "applied"
        label = key_label(key)
        said = [x for x in d.lines[mark:] if f"{label} changed: " in x]
        if not any(expected in x for x in said):
            silent.append((what, expected, said))
    assert not silent, silent
    assert d.proc.poll() is None

"""The ``scriptsftp`` command. Bad configs exit 2 with ``FILE:LINE: KEY: problem`` lines, never a traceback."""

from __future__ import annotations

import getpass
import importlib.resources
import json
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import click

from scriptsftp.server import __version__
from scriptsftp.server.support.config import ConfigError, LoadedConfig, default_config_path, load_config
from scriptsftp.server.contract.events import EVENT_TYPES, describe_fields

if TYPE_CHECKING:
    from scriptsftp.server.ops.defender import Defender

CONFIG_HELP = "config file (default: $SCRIPTSFTP_CONFIG, else ./conf/scriptsftp.toml)"


def _load(path: str | None) -> LoadedConfig:
    try:
        return load_config(Path(path) if path else default_config_path())
    except ConfigError as exc:
        for line in exc.problems:
            click.echo(line, err=True)
        sys.exit(2)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="scriptsftp")
def main() -> None:
    """scriptsftp: a scriptable SFTP/SCP file transfer server."""


@main.command()
@click.option("-c", "--config", "config_path", help=CONFIG_HELP)
@click.option("--allow-root", is_flag=True, help="run even as root (same as [server] allow_root = true)")
def run(config_path: str | None, allow_root: bool) -> None:
    """Run the daemon in the foreground, logging to stderr."""
    from scriptsftp.server.support import logs
    from scriptsftp.server.support import memory
    from scriptsftp.server.daemon import Daemon, refuse_root

    memory.limit_arenas()
    cfg = _load(config_path)
    logs.setup(cfg.model.server.log_format, cfg.model.server.log_level)
    refusal = refuse_root(cfg)
    if refusal and not allow_root:
        click.echo(f"scriptsftp: {refusal}", err=True)
        sys.exit(2)
    try:
        daemon = Daemon(cfg)
        daemon.start()
    except ConfigError as exc:  # e.g. a bound script that does not compile
        for line in exc.problems:
            click.echo(line, err=True)
        sys.exit(2)
    except OSError as exc:  # e.g. address in use, unreadable host key
        click.echo(f"scriptsftp: cannot start: {exc}", err=True)
        sys.exit(1)
    except ValueError as exc:
        click.echo(f"scriptsftp: cannot start: {exc}", err=True)
        sys.exit(2)
    daemon.serve_forever()


@main.command()
@click.option("-c", "--config", "config_path", help=CONFIG_HELP)
@click.option("--against-running", is_flag=True,
              help="also compare with what the running daemon loaded (state_dir/running.json); exit 1 if it differs")
def check(config_path: str | None, against_running: bool) -> None:
    """Validate the config (and compile every bound script); exit 0 or 2."""
    cfg = _load(config_path)
    problems: list[str] = []
    if cfg.model.bindings:
        try:
            from scriptsftp.scripting.engine import check_scripts
        except ImportError:
            pass
        else:
            from scriptsftp.server.support.worker_accounts import AccountError, script_worker_account

            try:   # untrusted source is compiled as the account `run` would use
                account = script_worker_account(cfg.model.scripts.user,
                                                allow_root=cfg.model.server.allow_root_workers)
            except AccountError as e:
                problems = [str(e)]
            else:
                problems = check_scripts(cfg, user=account.uid if account else None,
                                         group=account.gid if account else None)
    for line in problems:
        click.echo(line, err=True)
    if problems:
        sys.exit(2)
    m = cfg.model
    from scriptsftp.server.support.config import command_template_warnings
    for name, spec in m.commands.items():
        for line in command_template_warnings(name, spec.argv):
            click.echo(f"{cfg.path}: warning: {line}", err=True)
    for line in disabled_section_warnings(cfg):
        click.echo(f"{cfg.path}: warning: {line}", err=True)
    click.echo(f"{cfg.path}: OK ({len(m.users)} users, {len(m.groups)} groups, {len(m.bindings)} bindings)")
    if against_running and not _against_running(cfg):
        sys.exit(1)


def disabled_section_warnings(cfg: LoadedConfig) -> list[str]:
    """Keys set in a section that is off: ``[ftp] listen = ...`` without ``enabled = true``
    starts no FTP listener, and nothing else would say so."""
    from scriptsftp.server.ops.reload_plan import SWITCHED_SECTIONS

    out = []
    for name in SWITCHED_SECTIONS:
        section = getattr(cfg.model, name)
        keys = sorted(section.model_fields_set - {"enabled"})
        if keys and not section.enabled:
            how = "enabled = false" if "enabled" in section.model_fields_set else "enabled is not set (default false)"
            out.append(f"[{name}] sets {', '.join(keys)} but {how}: no {name} listener is started")
    return out


def _against_running(cfg: LoadedConfig) -> bool:
    """Print how the file differs from what the running daemon loaded; True if it does not."""
    from scriptsftp.server.ops.reload_plan import compare_with_running, key_label, read_running

    state_dir = cfg.resolve(cfg.model.server.state_dir)
    running = read_running(state_dir)
    if running is None:
        click.echo(f"{cfg.path}: no running daemon found ({state_dir}/running.json is missing or its process is gone)")
        return False
    if Path(running.get("config", "")) != cfg.path:
        click.echo(f"{cfg.path}: note: the daemon (pid {running['pid']}) runs {running.get('config')}")
    diffs = compare_with_running(cfg, running)
    for key, how in diffs:
        action = ("takes effect after a restart" if how == "restart"
                  else "applied by a reload (kill -HUP or `scriptsftp reload`)")
        click.echo(f"{cfg.path}: {key_label(key)} differs from the running daemon (pid {running['pid']}): {action}")
    if not diffs:
        click.echo(f"{cfg.path}: the running daemon (pid {running['pid']}) runs this configuration")
    return not diffs


@main.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
def init(directory: Path) -> None:
    """Write a commented starter config dir (config, scripts/, data/)."""
    target = directory / "scriptsftp.toml"
    if target.exists():
        click.echo(f"scriptsftp: {target} already exists; not overwriting", err=True)
        sys.exit(2)
    directory.mkdir(parents=True, exist_ok=True)
    starter = importlib.resources.files("scriptsftp.server").joinpath("starter.toml").read_text()
    target.write_text(starter)
    (directory / "scripts").mkdir(exist_ok=True)
    (directory / "data").mkdir(exist_ok=True)
    click.echo(f"wrote {target}; start with: scriptsftp run -c {target}")


@main.command("hash-password")
@click.option("--stdin", "from_stdin", is_flag=True, help="read the password from standard input")
def hash_password_cmd(from_stdin: bool) -> None:
    """Print an argon2id hash for a [[users]] password_hash."""
    from scriptsftp.server.core.passwords import hash_password

    if from_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            click.echo("scriptsftp: passwords differ", err=True)
            sys.exit(2)
    if not password:
        click.echo("scriptsftp: empty password refused", err=True)
        sys.exit(2)
    click.echo(hash_password(password))


def _admin_options(fn):  # noqa: ANN001, ANN202 - click decorator
    fn = click.option("--token-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
                      help="file holding the admin token (default: $SCRIPTSFTP_ADMIN_TOKEN)")(fn)
    return click.option("-c", "--config", "config_path", help=CONFIG_HELP + "; [admin] listen is used")(fn)


def _admin(config_path: str | None, token_file: Path | None, method: str, path: str, params: dict | None = None):
    """Call the running daemon's admin API; exit 1 with a clear message on failure."""
    from scriptsftp.server.ops.admin_client import AdminClient, AdminError, base_url, read_token

    cfg = _load(config_path)
    if not cfg.model.admin.enabled:
        click.echo(f"scriptsftp: [admin] is not enabled in {cfg.path}", err=True)
        sys.exit(2)
    try:
        return AdminClient(base_url(cfg.model.admin.listen), read_token(token_file)).call(method, path, params)
    except AdminError as exc:
        click.echo(f"scriptsftp: {exc}", err=True)
        sys.exit(1)


@main.command()
@click.option("--markdown", is_flag=True, help="print the catalogue as Markdown (for docs/events.md)")
@click.option("--list", "as_list", is_flag=True, help="print the catalogue (also what no filter option does)")
@click.option("--user", default=None, help="filter: recent events of this user (from the daemon's audit trail)")
@click.option("--path", "vpath", default=None, help="filter: virtual path, or a glob like '/inbox/*'")
@click.option("--since", default=None, help="filter: Unix time, ISO 8601 time or an age: 30m, 12h, 7d")
@click.option("--decision", type=click.Choice(["allow", "veto", "error", "done", "denied"]), default=None,
              help="filter; denied: refused by the server itself (permission, filter, limit, policy, defender)")
@click.option("--event", "event_name", default=None, help="filter: event name, e.g. pre-upload")
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print the API's JSON")
@_admin_options
def events(markdown: bool, as_list: bool, user: str | None, vpath: str | None, since: str | None,
           decision: str | None, event_name: str | None, limit: int, as_json: bool, config_path: str | None,
           token_file: Path | None) -> None:
    """List event names and their fields; with a filter option, recent events from the audit trail.

    Without --user, --path, --since, --decision or --event this prints the
    event catalogue (as --list does). With any of them it asks the running
    daemon's admin API: each event, its decision and reason, and the
    scripts that ran with their verdicts, durations and log lines."""
    if not (as_list or markdown) and any(v is not None for v in (user, vpath, since, decision, event_name)):
        from scriptsftp.server.ops.admin_client import format_events

        rows = _admin(config_path, token_file, "GET", "/api/events", {
            "user": user, "path": vpath, "since": since, "decision": decision, "event": event_name,
            "limit": limit})
        if as_json:
            click.echo(json.dumps(rows, indent=2))
        else:
            for line in format_events(rows) or ["no matching events"]:
                click.echo(line)
        return
    for name, cls in EVENT_TYPES.items():
        fields = describe_fields(cls)
        veto = "can veto" if cls.can_veto else "cannot veto"
        if markdown:
            click.echo(f"### `{name}` ({veto})\n\n{cls.summary}\n")
            click.echo("| field | type |\n|---|---|")
            for f, t in fields:
                click.echo(f"| `{f}` | `{t}` |")
            click.echo()
        else:
            click.echo(f"{name} ({veto}): {cls.summary}")
            click.echo("    " + ", ".join(f"{f}: {t}" for f, t in fields))


@main.command()
@click.option("--json", "as_json", is_flag=True, help="print the API's JSON")
@_admin_options
def sessions(as_json: bool, config_path: str | None, token_file: Path | None) -> None:
    """List open sessions of the running daemon (admin API)."""
    from scriptsftp.server.ops.admin_client import format_sessions

    rows = _admin(config_path, token_file, "GET", "/api/sessions")
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for line in format_sessions(rows):
        click.echo(line)


@main.command()
@click.argument("session_id")
@_admin_options
def kick(session_id: str, config_path: str | None, token_file: Path | None) -> None:
    """Close one session of the running daemon (its id from `scriptsftp sessions`)."""
    result = _admin(config_path, token_file, "DELETE", f"/api/sessions/{session_id}")
    where = f" on {result['node']}" if result.get("node") else ""
    if result.get("pending"):  # another node's session, not seen gone yet
        click.echo(f"asked {result['node']} to close session {result['kicked']} of {result.get('user') or '-'}; "
                   "not closed yet")
        return
    click.echo(f"closed session {result['kicked']} of {result.get('user') or '-'}{where}")


@main.command()
@_admin_options
def reload(config_path: str | None, token_file: Path | None) -> None:
    """Make the running daemon reload its config and scripts (as SIGHUP does); exit 1 with the problems."""
    result = _admin(config_path, token_file, "POST", "/api/reload")
    click.echo("reloaded")
    from scriptsftp.server.ops.reload_plan import key_label

    pending = result.get("pending_restart", []) if isinstance(result, dict) else []
    for key in pending:
        click.echo(f"{key_label(key)} changed: takes effect after a restart")


def _defender(cfg: LoadedConfig) -> "Defender":
    """The defender's bans, where the daemon keeps them (state_dir, or the cluster's shared
    database); a database that cannot be opened: one line, exit 6."""
    from scriptsftp.server.ops.defender import Defender
    from scriptsftp.server.stores import StateStores
    from scriptsftp.server.stores.sql import redact_url

    stores = StateStores.for_config(cfg)
    try:
        return Defender(stores, cfg.model.defender)
    except Exception as exc:  # sqlite3.Error, psycopg's OperationalError, a pool timeout
        where = redact_url(stores.url) if stores.url else str(stores.path("bans"))
        click.echo(f"scriptsftp: cannot open the bans database {where}: {redact_url(' '.join(str(exc).split()))}",
                   err=True)
        sys.exit(6)


@main.command()
@click.option("--timeout", type=click.FloatRange(0, 604800), default=None,
              help="seconds open sessions get to end before those left are ended (default: [server] drain_timeout)")
@click.option("--no-wait", is_flag=True, help="start the drain and return at once (its state as JSON with --json)")
@click.option("--json", "as_json", is_flag=True, help="print the outcome as JSON")
@_admin_options
def drain(timeout: float | None, no_wait: bool, as_json: bool, config_path: str | None,
          token_file: Path | None) -> None:
    """Take the running daemon out of service: stop accepting on every listener (/healthz answers
    503 "draining"), let open sessions end, then the daemon exits 0; those still open at the timeout
    are ended, their unfinished uploads discarded. Waits until the daemon has exited; exit 1 if the
    drain cannot start or the daemon does not stop."""
    import time as _time

    from scriptsftp.server.ops import admin_client
    from scriptsftp.server.ops.reload_plan import read_running

    if no_wait:
        result = _admin(config_path, token_file, "POST", "/api/drain", {"timeout": timeout})
        click.echo(json.dumps(result, indent=2) if as_json else
                   f"draining: {result['sessions']} session(s) open; the daemon stops by "
                   f"{_time.strftime('%H:%M:%S', _time.localtime(result['deadline']))}")
        return
    cfg = _load(config_path)
    if not cfg.model.admin.enabled:
        click.echo(f"scriptsftp: [admin] is not enabled in {cfg.path} (send SIGUSR2 to drain)", err=True)
        sys.exit(2)
    running = read_running(cfg.resolve(cfg.model.server.state_dir))
    pid = int(running["pid"]) if running else None
    client = admin_client.AdminClient(admin_client.base_url(cfg.model.admin.listen), None, timeout=10.0)
    say = (lambda line: None) if as_json else click.echo
    try:
        client.token = admin_client.read_token(token_file)
        result = admin_client.drain(client, timeout, pid, say)
    except admin_client.AdminError as exc:
        click.echo(f"scriptsftp: {exc}", err=True)
        sys.exit(1)
    if as_json:
        click.echo(json.dumps(result, indent=2))


@main.command()
@click.option("-c", "--config", "config_path", help=CONFIG_HELP)
def bans(config_path: str | None) -> None:
    """List addresses the defender has banned (read from state_dir; the daemon may run)."""
    import time as _time

    cfg = _load(config_path)
    d = _defender(cfg)
    try:
        for b in d.bans():
            until = _time.strftime("%Y-%m-%d %H:%M:%S UTC", _time.gmtime(b["banned_until"]))
            click.echo(f"{b['ip']}\tuntil {until}\tban #{b['ban_count']}\t{b['reason']}")
    finally:
        d.close()


@main.command()
@click.option("-c", "--config", "config_path", help=CONFIG_HELP)
@click.argument("ip")
def unban(config_path: str | None, ip: str) -> None:
    """Lift a ban at once (also in a running daemon: bans live in state_dir); exit 1 if IP was not banned."""
    cfg = _load(config_path)
    d = _defender(cfg)
    try:
        lifted = d.unban(ip)
    finally:
        d.close()
    click.echo(f"{ip}: " + ("unbanned" if lifted else "was not banned"))
    sys.exit(0 if lifted else 1)


@main.command()
@click.option("-c", "--config", "config_path", help=CONFIG_HELP)
@click.argument("dest", type=click.Path(file_okay=False, path_type=Path))
def backup(config_path: str | None, dest: Path) -> None:
    """Copy state_dir to DEST consistently, even while the daemon runs (see docs/deploy.md)."""
    from scriptsftp.server.ops.backup import backup_state

    cfg = _load(config_path)
    try:
        written = backup_state(cfg.resolve(cfg.model.server.state_dir), dest)
    except (ValueError, OSError) as exc:
        click.echo(f"scriptsftp: backup failed: {exc}", err=True)
        sys.exit(1)
    for name in written:
        click.echo(name)
    click.echo(f"backed up {len(written)} files to {dest}")


from scriptsftp.server.ops.accounts_cli import COMMANDS as ACCOUNT_COMMANDS  # noqa: E402 - after main

for _command in ACCOUNT_COMMANDS:  # user, group, folder, accounts, db
    main.add_command(_command)


@main.group()
def script() -> None:
    """Work with scripts without a running server."""


#: events whose scripts read the file they are about (api.file)
FILE_EVENTS = frozenset({"pre-publish", "post-upload", "pre-download", "post-download", "upload-failed"})


@script.command("test")
@click.argument("script_path", metavar="SCRIPT", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--event", "event_name", required=True, help="event name, e.g. pre-upload (see `scriptsftp events`)")
@click.option("--user", default="alice", show_default=True)
@click.option("--path", "vpath", default=None, help="virtual path the event is about")
@click.option("--target", default=None, help="rename target")
@click.option("--size", type=int, default=None, help="size in bytes (default: size of --file)")
@click.option("--file", "local_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="a local file to stand for the uploaded/downloaded file (api.file)")
@click.option("--protocol", default="sftp", show_default=True, type=click.Choice(["sftp", "scp", "ftp", "http"]))
@click.option("--remote-ip", default="127.0.0.1", show_default=True)
@click.option("--function", default=None, help="handler name (default: on_<event>)")
@click.option("--allow", "caps", default="read,store", show_default=True,
              help="capabilities granted, comma-separated (read fs store notify run)")
@click.option("--timeout", type=float, default=5.0, show_default=True)
@click.option("--cpu-time", type=float, default=2.0, show_default=True)
def script_test(script_path: Path, event_name: str, user: str, vpath: str | None, target: str | None,
                size: int | None, local_file: Path | None, protocol: str, remote_ip: str, function: str | None,
                caps: str, timeout: float, cpu_time: float) -> None:
    """Run SCRIPT in the sandbox against a synthetic event; print decision and log lines.

    Exit status: 0 allowed, 1 vetoed, 3 the script failed, 2 bad arguments."""
    from scriptsftp.scripting.testing import build_event, run_script
    from scriptsftp.server.stores import StateStores

    if size is None and local_file is not None:
        size = local_file.stat().st_size
    fields = {"user": user, "protocol": protocol, "remote_ip": remote_ip, "path": vpath, "target": target,
              "size": size}
    try:
        event = build_event(event_name, **fields)
    except ValueError as exc:
        click.echo(f"scriptsftp: {exc}", err=True)
        sys.exit(2)
    capabilities = frozenset(c.strip() for c in caps.split(",") if c.strip())
    if local_file is None and "read" in capabilities and event_name in FILE_EVENTS:
        click.echo(f"note:     no --file: the script's api.file has nothing to read; pass --file LOCAL "
                   f"(the bytes a {event_name} script would see)", err=True)
    with tempfile.TemporaryDirectory(prefix="scriptsftp-test-") as tmp:  # api.store: a throwaway one
        run = run_script(script_path, event, function=function, capabilities=capabilities, file=local_file,
                         timeout=timeout, cpu_time=cpu_time, state_dir=Path(tmp), stores=StateStores(Path(tmp)))
    click.echo(f"event:    {event_name} " + " ".join(f"{k}={v!r}" for k, v in run.event.items()
                                                   if k not in ("name", "time") and v not in (None, "")))
    r = run.result
    for line in r.logs:
        extra = " ".join(f"{k}={v}" for k, v in (line.fields or {}).items())
        click.echo(f"log:      {line.message}" + (f" {extra}" if extra else ""))
    if run.store:
        for k, v in sorted(run.store.items()):
            click.echo(f"store:    {k} = {v!r}")
    if r.verdict == "allow":
        click.echo(f"decision: allow ({r.duration * 1000:.1f} ms)")
        sys.exit(0)
    if r.verdict == "veto":
        click.echo(f"decision: veto: {r.reason}")
        sys.exit(1)
    where = f"{script_path.name}:{r.error_line}: " if r.error_line and not r.reason.startswith(script_path.name) else ""
    click.echo(f"decision: error ({r.error_kind}): {where}{r.reason}")
    sys.exit(3)


from scriptsftp.server.ops.quota_cli import quota  # noqa: E402  (its own module: `scriptsftp quota ...`)

main.add_command(quota)

from scriptsftp.server.ops.cluster_cli import cluster  # noqa: E402  (its own module: `scriptsftp cluster ...`)

main.add_command(cluster)

__all__ = ["main"]

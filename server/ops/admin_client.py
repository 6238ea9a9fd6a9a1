"""The CLI's side of the admin API: `scriptsftp sessions`, `reload`, `kick`, `drain`, `events --user ...`.

Stdlib only (urllib), so the commands start fast. The address comes from
``[admin] listen`` in the config (a wildcard address is reached through
loopback); the token from ``$SCRIPTSFTP_ADMIN_TOKEN`` or ``--token-file``,
never from the command line, where other users could read it in ``ps``.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

TOKEN_ENV = "SCRIPTSFTP_ADMIN_TOKEN"


class AdminError(Exception):
    """A message for the user (no traceback): cannot connect, 401, 4xx/5xx with the server's reason."""


class AdminGone(AdminError):
    """Nothing listens on the admin address (connection refused): no daemon, or it stopped."""


def base_url(listen: str) -> str:
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def read_token(token_file: Path | None) -> str | None:
    if token_file is not None:
        try:
            return token_file.read_text().strip() or None
        except OSError as exc:
            raise AdminError(f"cannot read token file {token_file}: {exc.strerror or exc}") from None
    return os.environ.get(TOKEN_ENV) or None


class AdminClient:
    def __init__(self, base: str, token: str | None, timeout: float = 30.0) -> None:
        self.base = base.rstrip("/")
        self.token = token
        self.timeout = timeout

    def call(self, method: str, path: str, params: dict[str, Any] | None = None) -> Any:
        query = {k: v for k, v in (params or {}).items() if v not in (None, "")}
        url = self.base + path + ("?" + urllib.parse.urlencode(query) if query else "")
        req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            try:
                body = json.loads(exc.read() or b"{}")
            except ValueError:
                body = {}
            if exc.code == 401:
                hint = "" if self.token else f" (set ${TOKEN_ENV} or use --token-file)"
                raise AdminError(f"admin API refused the token: {body.get('error', 'unauthorized')}{hint}") from None
            if isinstance(body, dict) and "errors" in body:  # reload refused: the problems, one a line
                raise AdminError("\n".join(body["errors"]) or f"HTTP {exc.code}") from None
            raise AdminError(f"admin API: HTTP {exc.code}: {body.get('error', exc.reason)}") from None
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, ConnectionRefusedError):
                raise AdminGone(f"cannot reach the admin API at {self.base}: {exc.reason} "
                                "(is [admin] enabled and the daemon running?)") from None
            raise AdminError(f"cannot reach the admin API at {self.base}: {exc.reason} "
                             "(is [admin] enabled and the daemon running?)") from None
        except ConnectionRefusedError as exc:
            raise AdminGone(f"cannot reach the admin API at {self.base}: {exc}") from None
        except (TimeoutError, ConnectionError) as exc:
            raise AdminError(f"cannot reach the admin API at {self.base}: {exc}") from None


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def format_sessions(rows: list[dict[str, Any]]) -> list[str]:
    out = [f"{'ID':<14} {'NODE':<12} {'USER':<16} {'PROTO':<6} {'ADDRESS':<16} {'SINCE':<19} {'IN':>10} {'OUT':>10}"
           "  TRANSFERS"]
    for s in rows:
        transfers = ", ".join(f"{t['direction']} {t['path']}" for t in s.get("transfers", []))
        out.append(f"{s['id']:<14} {s.get('node') or '-':<12} {s['user'] or '-':<16} {s['protocol']:<6} {s['remote_ip']:<16} "
                   f"{_when(s['started']):<19} {s['bytes_in']:>10} {s['bytes_out']:>10}  {transfers}")
    return out


def format_events(rows: list[dict[str, Any]]) -> list[str]:
    out = []
    for e in rows:
        target = f" -> {e['target']}" if e.get("target") else ""
        reason = f": {e['reason']}" if e.get("reason") else ""
        node = f" node={e['node']}" if e.get("node") else ""
        out.append(f"{_when(e['time'])} {e['name']} user={e['user'] or '-'} {e['path']}{target} "
                   f"{e['decision']}{reason} [{e['id']}]{node}")
        for r in e.get("runs", []):
            line = f" line {r['error_line']}" if r.get("error_line") else ""
            why = f": {r['reason']}" if r.get("reason") else ""
            out.append(f"    {r['script']}:{r['function']} {r['verdict']}{why}{line} ({r['duration'] * 1000:.1f} ms{_queued(r)})")
            for lg in r.get("logs", []):
                fields = " ".join(f"{k}={v}" for k, v in (lg.get("fields") or {}).items())
                out.append(f"        log: {lg['message']}" + (f" {fields}" if fields else ""))
    return out


def _queued(run: dict) -> str:
    """The part of a run's duration spent waiting for a script worker, when it matters."""
    q = float(run.get("queued") or 0.0)
    return f", {q * 1000:.1f} ms of it waiting for a worker" if q >= 0.001 else ""


# --- scriptsftp drain ---------------------------------------------------------------------------

#: how long `drain` waits past the deadline for the daemon to end what is left and exit
DRAIN_EXIT_MARGIN = 60.0


def _process_gone(pid: int | None) -> bool:
    """Whether the daemon's process has exited (a zombie not yet reaped counts as exited)."""
    if pid is None:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, under another user
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def drain(client: AdminClient, timeout: float | None, pid: int | None, say: Any, poll: float = 0.5) -> dict[str, Any]:
    """Start a drain and follow it to the daemon's exit; ``say`` gets each progress line.
    ``pid``: the daemon's process (from state_dir/running.json) when known, awaited too.
    Returns what `drain --json` prints; AdminError when the drain cannot start or the
    daemon is still up :data:`DRAIN_EXIT_MARGIN` seconds past the deadline."""
    before = client.call("GET", "/api/status")
    info = client.call("POST", "/api/drain", {"timeout": timeout})
    node, started_at = before.get("node"), before.get("started")
    t0 = time.monotonic()
    say(f"draining {node}: no new connections; {info['sessions']} session(s) open, "
        f"waiting up to {max(0.0, info['deadline'] - time.time()):.0f}s for them to end")
    shown = (info["sessions"], info["checks"])
    deadline = info["deadline"]
    while True:
        time.sleep(poll)
        try:
            status = client.call("GET", "/api/status")
        except AdminGone:
            break
        except AdminError:
            if time.time() > deadline + DRAIN_EXIT_MARGIN:
                raise
            continue  # a busy moment; the next poll tells
        if status.get("started") != started_at:  # a new daemon (a supervisor restarted it)
            break
        d = status.get("draining") or {}
        deadline = d.get("deadline", deadline)
        now = (d.get("sessions", 0), d.get("checks", 0))
        if now != shown:
            say(f"{now[0]} session(s) open, {now[1]} upload check(s) running, "
                f"{max(0.0, deadline - time.time()):.0f}s left")
            shown = now
        if time.time() > deadline + DRAIN_EXIT_MARGIN:
            raise AdminError(f"the daemon still answers {DRAIN_EXIT_MARGIN:.0f}s after the drain's deadline")
    end = time.monotonic() + DRAIN_EXIT_MARGIN
    while not _process_gone(pid) and time.monotonic() < end:
        time.sleep(0.1)
    if not _process_gone(pid):
        raise AdminError(f"the admin API closed but process {pid} has not exited")
    # the sessions open at the last look, if the daemon stopped at the deadline (its log's "drain
    # timeout: ending N session(s)" line has the exact count)
    ended = shown[0] if time.time() >= deadline else 0
    say(f"drained {node}: the daemon stopped after {time.monotonic() - t0:.1f}s"
        + (f"; {ended} session(s) were ended at the deadline" if ended else ""))
    return {"node": node, "stopped": True, "seconds": round(time.monotonic() - t0, 1),
            "sessions_at_start": info["sessions_at_start"], "ended_at_deadline": ended}

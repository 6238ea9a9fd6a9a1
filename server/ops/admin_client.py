"""The CLI's side of the admin API: `scriptsftp sessions`, `reload`, `kick`, `events --user ...`.

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
            raise AdminError(f"cannot reach the admin API at {self.base}: {exc.reason} "
                             "(is [admin] enabled and the daemon running?)") from None
        except (TimeoutError, ConnectionError) as exc:
            raise AdminError(f"cannot reach the admin API at {self.base}: {exc}") from None


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def format_sessions(rows: list[dict[str, Any]]) -> list[str]:
    out = [f"{'ID':<14} {'USER':<16} {'PROTO':<6} {'ADDRESS':<16} {'SINCE':<19} {'IN':>10} {'OUT':>10}  TRANSFERS"]
    for s in rows:
        transfers = ", ".join(f"{t['direction']} {t['path']}" for t in s.get("transfers", []))
        out.append(f"{s['id']:<14} {s['user'] or '-':<16} {s['protocol']:<6} {s['remote_ip']:<16} "
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

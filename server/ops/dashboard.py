"""The read-only dashboard: plain server-rendered HTML, no JavaScript.

Every value rendered here may come from an attacker (user names, paths, IP
strings, script log lines, veto reasons), so every one goes through
:func:`html.escape` via :func:`_e`; nothing is ever inserted raw. The page is
served with a Content-Security-Policy that allows no script at all.
"""

from __future__ import annotations

import html
import time
from typing import TYPE_CHECKING, Any, Iterable
from urllib.parse import urlencode

if TYPE_CHECKING:
    from scriptsftp.server.ops.accounts_page import AccountRow, AccountsPage

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.3em}h2{font-size:1.1em;margin-top:1.6em}
table{border-collapse:collapse;width:100%}th,td{border:1px solid #ccc;padding:3px 6px;text-align:left;
vertical-align:top}th{background:#f3f3f3}.veto,.error,.missing{color:#a00;font-weight:bold}
.ok,.allow{color:#070}.muted{color:#777}code{font-size:12px}form.filters input{margin-right:.6em}
nav a{margin-right:1em}.pager a,.pager span{margin-right:.8em}
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _when(ts: Any) -> str:
    if not isinstance(ts, (int, float)):
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _size(n: Any) -> str:
    if not isinstance(n, int):
        return ""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _table(headers: Iterable[str], rows: list[str], empty: str) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join(rows) if rows else f'<tr><td colspan="{len(list(headers))}" class="muted">{_e(empty)}</td></tr>'
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _doc(title: str, body: str) -> str:
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
            f'<meta name="referrer" content="no-referrer"><style>{_STYLE}</style></head><body>{body}</body></html>')


def render_login(message: str = "") -> str:
    msg = f'<p class="error">{_e(message)}</p>' if message else ""
    return _doc("scriptsftp: log in", f"""<h1>scriptsftp admin</h1>{msg}
<form method="post" action="/login"><label>Admin token <input type="password" name="token" autocomplete="off"
 autofocus></label> <button type="submit">Log in</button></form>
<p class="muted">The token whose argon2id hash is <code>[admin] token_hash</code>.</p>""")


_NAV = ('<nav><a href="/">Overview</a><a href="/accounts">Accounts</a></nav>'
        '<form method="post" action="/logout"><button type="submit">Log out</button></form>')


def render_dashboard(*, status: dict[str, Any], sessions: list[dict[str, Any]], scripts: list[dict[str, Any]],
                     events: list[dict[str, Any]], filters: dict[str, str], error: str = "") -> str:
    parts = [f"<h1>scriptsftp {_e(status.get('version'))}</h1>"]
    listeners = ", ".join(f"{_e(lst['name'])} {_e(' '.join(lst['bound']))}" for lst in status.get("listeners", []))
    workers = status.get("workers") or {}
    parts.append(f'<p id="status">up {_e(int(status.get("uptime", 0)))} s; listening: {listeners}; '
                 f'script workers: {_e(workers.get("alive", "-"))} alive, {_e(workers.get("busy", "-"))} busy, '
                 f'{_e(workers.get("restarts", "-"))} restarts</p>')
    parts.append(_NAV)

    rows = []
    for s in sessions:
        transfers = "<br>".join(f"{_e(t['direction'])} {_e(t['path'])} ({_e(_size(t['bytes']))})"
                                for t in s.get("transfers", []))
        rows.append(f'<tr class="session" data-id="{_e(s["id"])}"><td><code>{_e(s["id"])}</code></td>'
                    f'<td>{_e(s["user"]) or "<span class=muted>(not logged in)</span>"}</td>'
                    f'<td>{_e(s.get("node", ""))}</td><td>{_e(s["protocol"])}</td><td>{_e(s["remote_ip"])}</td>'
                    f'<td>{_e(_when(s["started"]))}</td>'
                    f'<td>{_e(_size(s["bytes_in"]))}</td><td>{_e(_size(s["bytes_out"]))}</td><td>{transfers}</td></tr>')
    parts.append(f"<h2>Sessions ({len(sessions)})</h2>")
    parts.append(_table(["id", "user", "node", "protocol", "address", "since", "in", "out", "transfers"], rows,
                        "no open sessions"))

    rows = []
    for sc in scripts:
        err = sc.get("last_error") or {}
        err_text = ""
        if err:
            where = f" (line {err['line']})" if err.get("line") else ""
            when = f" at {_when(err.get('time'))}" if err.get("time") else ""
            err_text = f"{_e(err.get('message'))}<span class=muted>{_e(where)}{_e(when)}</span>"
        binds = "<br>".join(f"{_e(b['event'])} → {_e(b['function'])}()" for b in sc.get("bindings", []))
        digest = (sc.get("sha256") or "")[:12]
        rows.append(f'<tr class="script"><td>{_e(sc["name"])}</td><td class="{_e(sc["status"])}">'
                    f'{_e(sc["status"])}</td><td><code>{_e(digest)}</code></td><td>{_e(_when(sc.get("loaded_at")))}'
                    f'</td><td>{binds}</td><td>{err_text}</td></tr>')
    parts.append(f"<h2>Scripts ({len(scripts)})</h2>")
    parts.append(_table(["script", "status", "sha256", "loaded", "bindings", "last error"], rows, "no bound scripts"))

    parts.append("<h2>Recent events</h2>")
    parts.append('<form class="filters" method="get" action="/">'
                 f'<label>user <input name="user" value="{_e(filters.get("user"))}"></label>'
                 f'<label>path <input name="path" value="{_e(filters.get("path"))}" placeholder="/inbox/*"></label>'
                 f'<label>decision <input name="decision" value="{_e(filters.get("decision"))}" size="6"></label>'
                 f'<label>since <input name="since" value="{_e(filters.get("since"))}" placeholder="24h" size="8">'
                 '</label><button type="submit">Filter</button></form>')
    if error:
        parts.append(f'<p class="error">{_e(error)}</p>')
    rows = []
    for ev in events:
        runs = "<br>".join(
            f"{_e(r['script'])}:{_e(r['function'])} <span class=\"{_e(r['verdict'])}\">{_e(r['verdict'])}</span> "
            f"{_e(round(r['duration'] * 1000, 1))} ms"
            + (f" line {_e(r['error_line'])}" if r.get("error_line") else "")
            + "".join(f"<br><span class=muted>log: {_e(line.get('message'))}</span>" for line in r.get("logs", []))
            for r in ev.get("runs", []))
        link = "/?" + urlencode({"user": ev["user"]}) if ev.get("user") else ""
        user = f'<a href="{_e(link)}">{_e(ev["user"])}</a>' if link else ""
        rows.append(f'<tr class="event" data-id="{_e(ev["id"])}"><td>{_e(_when(ev["time"]))}</td>'
                    f'<td>{_e(ev["name"])}</td><td>{user}</td><td>{_e(ev["path"])}'
                    + (f" → {_e(ev['target'])}" if ev.get("target") else "")
                    + f'</td><td class="{_e(ev["decision"])}">{_e(ev["decision"])}</td><td>{_e(ev["reason"])}</td>'
                    f'<td>{runs}</td><td><code>{_e(ev["id"])}</code></td></tr>')
    parts.append(_table(["time", "event", "user", "path", "decision", "reason", "scripts", "id"], rows,
                        "no events match"))
    return _doc("scriptsftp admin", "".join(parts))


# --- accounts ---------------------------------------------------------------------------------

#: the CSS class of each account state (red for what refuses logins)
_STATE_CLASS = {"active": "ok", "disabled": "veto", "expired": "veto", "password expired": "error",
                "removed": "missing"}


def _quota_use(row: AccountRow) -> str:
    """'1.5 MiB of 10.0 GiB (15%) · 3 of 100 files (3%)'; a part without a limit shows the use alone."""
    if row.used is None:
        return '<span class="muted">—</span>'
    size, files = row.used
    size_text = _size(size)
    if row.quota.size:
        size_text += f" of {_size(row.quota.size)} ({size * 100 // row.quota.size}%)"
    files_text = f"{files} of {row.quota.files} files ({files * 100 // row.quota.files}%)" if row.quota.files \
        else f"{files} files"
    return f"{_e(size_text)} · {_e(files_text)}"


def _last_login(row: AccountRow) -> str:
    now = f"connected now ({row.connections})" if row.connections else ""
    if row.last_login is not None:
        when = _e(_when(row.last_login))
        return f"{when}<br><span class=ok>{_e(now)}</span>" if now else when
    return f"<span class=ok>{_e(now)}</span>" if now else '<span class="muted">—</span>'


def _page_link(page: AccountsPage, number: int, text: str) -> str:
    query = {"page": str(number), **({"q": page.query} if page.query else {})}
    return f'<a href="/accounts?{_e(urlencode(query))}">{_e(text)}</a>'


def render_accounts(page: AccountsPage) -> str:
    """The accounts page: read-only, one page of users by name (ops/accounts_page.py)."""
    parts = ["<h1>Accounts</h1>", _NAV,
             '<form class="filters" method="get" action="/accounts">'
             f'<label>name contains <input name="q" value="{_e(page.query)}" maxlength="64"></label>'
             '<button type="submit">Search</button></form>']
    rows = []
    for row in page.rows:
        detail = f"<br><span class=muted>{_e(row.detail)}</span>" if row.detail else ""
        rows.append(f'<tr class="account" data-name="{_e(row.name)}"><td>{_e(row.name)}</td><td>{_e(row.origin)}</td>'
                    f'<td class="{_STATE_CLASS.get(row.state, "")}">{_e(row.state)}{detail}</td>'
                    f"<td>{_quota_use(row)}</td><td>{_last_login(row)}</td></tr>")
    parts.append(f'<h2 id="count">{_e(page.total)} user{"" if page.total == 1 else "s"}'
                 + (f" matching {_e(repr(page.query))}" if page.query else "") + "</h2>")
    parts.append(_table(["user", "source", "status", "quota use", "last login"], rows,
                        "no user matches" if page.query else "no users"))
    pager = [f'<span id="page">page {_e(page.page)} of {_e(page.pages)}</span>']
    if page.page > 1:
        pager.append(_page_link(page, 1, "« first"))
        pager.append(_page_link(page, page.page - 1, "‹ previous"))
    if page.page < page.pages:
        pager.append(_page_link(page, page.page + 1, "next ›"))
        pager.append(_page_link(page, page.pages, "last »"))
    parts.append(f'<p class="pager">{"".join(pager)}</p>')
    return _doc("scriptsftp: accounts", "".join(parts))

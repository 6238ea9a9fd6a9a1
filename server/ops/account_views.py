"""What the account commands print: one account as a dict (``--json``) and as text.

Users, groups and folders from the configuration file and from the database are shown
the same way, with ``origin`` saying where each is defined (``FILE:LINE`` or
``database``), so a help desk sees one list. A password hash is never shown here (the
export carries hashes; ``show`` says only whether a password is set and when).
Times are epoch seconds in JSON, ``YYYY-MM-DD HH:MM:SS UTC`` in text.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from pydantic import BaseModel

from scriptsftp.server.support.config import User
from scriptsftp.server.core.accounts import UserRecord, epoch_of
from scriptsftp.server.ops.account_edits import definition

DATABASE = "database"


@dataclass(frozen=True)
class Stamps:
    """Who made an entry and who changed it last (the file's entries have none)."""

    created_at: float | None = None
    created_by: str = ""
    updated_at: float | None = None
    updated_by: str = ""

    @classmethod
    def of(cls, stored: Any) -> "Stamps":
        return cls(stored.created_at, stored.created_by, stored.updated_at, stored.updated_by)

    def as_dict(self) -> dict[str, Any]:
        return {"created_at": self.created_at, "created_by": self.created_by or None,
                "updated_at": self.updated_at, "updated_by": self.updated_by or None}


def status_of(user: User, now: float) -> str:
    """``disabled``, ``expired`` or ``active``: what a login would meet first."""
    if user.disabled:
        return "disabled"
    expires = epoch_of(user.expires)
    if expires is not None and now >= expires:
        return "expired"
    return "active"


def user_view(user: User, origin: str, *, stamps: Stamps = Stamps(), password_changed: float | None = None,
              last_login: float | None = None, record: UserRecord | None = None,
              usage: tuple[int, int] | None = None, now: float | None = None) -> dict[str, Any]:
    """A user as ``user show --json`` prints it: status first, the definition's keys as set
    (limits not set are inherited from groups), keys with their fingerprints, history, and
    what the home holds against the quota in force (their own or their groups')."""
    from scriptsftp.server.support.keys import fingerprint, parse_public_key  # late: pulls in paramiko

    now = time.time() if now is None else now
    view: dict[str, Any] = {"name": user.name, "origin": origin, "status": status_of(user, now)}
    body = definition(user)
    body.pop("name", None)
    body.pop("public_keys", None)
    view.update(body)
    view["password"] = bool(user.password_hash) or bool(record and record.password_hash)
    view["password_changed"] = password_changed
    max_age = record.password_max_age if record is not None else (user.password_max_age or 0)
    view["password_expires"] = (password_changed + max_age * 86400
                                if password_changed is not None and max_age and view["password"] else None)
    view["keys"] = [{"fingerprint": fingerprint(parse_public_key(line)), "line": line} for line in user.public_keys]
    if usage is not None:
        quota = record.account.quota if record is not None else None
        view["usage"] = {"size": usage[0], "files": usage[1],
                         "quota_size": quota.size if quota else 0, "quota_files": quota.files if quota else 0}
    view.update(stamps.as_dict())
    view["last_login"] = last_login
    return view


def user_row(user: User, origin: str, *, last_login: float | None, now: float,
             home: str | None = None) -> dict[str, Any]:
    """A user as one line of ``user list``: what a help desk scans for, nothing that costs
    a key parse (10,000 users list in well under a second). ``home``: the file's, resolved."""
    return {"name": user.name, "origin": origin, "status": status_of(user, now),
            "disabled_reason": user.disabled_reason or None, "groups": list(user.groups),
            "keys": len(user.public_keys), "password": bool(user.password_hash or user.password_hash_file),
            "home": home or user.home, "last_login": last_login}


def entry_view(model: BaseModel, origin: str, stamps: Stamps = Stamps(),
               usage: tuple[int, int] | None = None) -> dict[str, Any]:
    """A group or folder as ``show --json`` prints it (a folder with what it holds)."""
    body = definition(model)
    view: dict[str, Any] = {"name": body.pop("name"), "origin": origin}
    view.update(body)
    if usage is not None:
        view["usage"] = {"size": usage[0], "files": usage[1]}
    view.update(stamps.as_dict())
    return view


# --- text ----------------------------------------------------------------------------------------

def when(ts: float | None, never: str = "never") -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts)) if ts else never


def _text(value: Any) -> str:
    if isinstance(value, dict):
        return "  ".join(f"{k}={_text(v)}" for k, v in value.items())
    if isinstance(value, list):
        return ",".join(_text(v) for v in value) if all(not isinstance(v, dict) for v in value) \
            else "; ".join(_text(v) for v in value)
    if value is True:
        return "yes"
    if value is False:
        return "no"
    return str(value)


_TIMES = ("created_at", "updated_at", "last_login", "password_changed", "password_expires")


def show_lines(kind: str, view: dict[str, Any]) -> list[str]:
    """``KIND NAME (origin)`` then one ``key: value`` line per key set."""
    origin = "the account database" if view["origin"] == DATABASE else view["origin"]
    lines = [f"{kind} {view['name']} ({origin})"]
    rest = {k: v for k, v in view.items() if k not in ("name", "origin", "keys") and k not in _TIMES
            and not k.endswith("_by") and v not in (None, "", [], {})}
    if view.get("status") == "disabled" and view.get("disabled_reason"):
        rest["status"] = f"disabled: {view['disabled_reason']}"
        rest.pop("disabled_reason", None)
        rest.pop("disabled", None)
    if "password" in view:
        rest["password"] = ("set " + when(view.get("password_changed"), "(date unknown)")
                            if view["password"] else "none")
        if view.get("password_expires"):
            rest["password"] += f", expires {when(view['password_expires'])}"
    for key, value in rest.items():
        lines.append(f"  {key + ':':<21}{_text(value)}")
    for key in view.get("keys", []):
        kind_, _, rest_ = key["line"].partition(" ")
        comment = rest_.strip().partition(" ")[2]
        lines.append(f"  {'key:':<21}{key['fingerprint']} {kind_} {comment}".rstrip())
    if view.get("created_at") is not None:
        lines.append(f"  {'created:':<21}{when(view['created_at'])} by {view.get('created_by') or '?'}")
        lines.append(f"  {'updated:':<21}{when(view['updated_at'])} by {view.get('updated_by') or '?'}")
    if "last_login" in view:
        lines.append(f"  {'last login:':<21}{when(view['last_login'])}")
    return lines


def table_lines(rows: Sequence[dict[str, Any]], columns: Iterable[tuple[str, str]]) -> list[str]:
    """Rows as aligned columns under a header (``(key, HEADER)`` pairs); empty cells are ``-``."""
    cols = list(columns)
    cells = [[_cell(key, row.get(key)) for key, _ in cols] for row in rows]
    widths = [max([len(h), *(len(c[i]) for c in cells)]) for i, (_, h) in enumerate(cols)]
    out = ["  ".join(h.ljust(w) for (_, h), w in zip(cols, widths)).rstrip()]
    out += ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in cells]
    return out


def _cell(key: str, value: Any) -> str:
    if key in _TIMES:
        return when(value, "-")
    if value in (None, "", [], {}):
        return "-"
    return _text(value)

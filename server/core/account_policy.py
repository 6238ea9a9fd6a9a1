"""Whether an account may be used now: disabled, expired, or its password too old.

Pure functions of a :class:`~.accounts.UserRecord` and a clock, so the login decision,
the kick of a changed or expiring account and the dashboard's status column all say the
same thing in the same words. The texts are fit for the client (FTP 530, HTTP 403, the
SSH disconnect message): they name the date and what to do, never a secret.
"""

from __future__ import annotations

import time

from scriptsftp.server.core.accounts import UserRecord

DAY = 86400.0
#: how much of an admin's ``disabled_reason`` reaches a client and a log line
REASON_MAX = 200


def _date(epoch: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(epoch))


def one_line(text: str) -> str:
    """An admin's free text as one bounded printable line (it goes into protocol replies)."""
    return " ".join("".join(c if c.isprintable() else " " for c in text).split())[:REASON_MAX]


def disabled_text(rec: UserRecord) -> str:
    reason = one_line(rec.disabled_reason)
    return f"account disabled: {reason}" if reason else "account disabled"


def expired(rec: UserRecord, now: float) -> bool:
    return rec.expires is not None and now >= rec.expires


def password_expires_at(rec: UserRecord) -> float | None:
    """When the password stops opening the account; None: never, or unknown (a password
    whose change time is not recorded, as for every user of the TOML file)."""
    if not rec.password_max_age or rec.password_changed is None or not rec.password_hash:
        return None
    return rec.password_changed + rec.password_max_age * DAY


def unusable(rec: UserRecord | None, now: float) -> str | None:
    """Why no one may be logged in as this account any more (gone, disabled, expired), or
    None. What ends open sessions: a password that aged meanwhile does not (it was good
    when it was proven), so that is :func:`login_refusal`'s alone."""
    if rec is None:
        return "account removed"
    if rec.disabled:
        return disabled_text(rec)
    if expired(rec, now):
        assert rec.expires is not None
        return f"account expired on {_date(rec.expires)}"
    return None


def login_refusal(rec: UserRecord, method: str, now: float) -> str | None:
    """Why a login with proven credentials (``method``: "password", "publickey") is
    refused by the account's own state, or None. A password past its max age refuses
    password logins only: a key still opens the account."""
    refusal = unusable(rec, now)
    if refusal is not None:
        return refusal
    until = password_expires_at(rec) if method == "password" else None
    if until is not None and now >= until:
        return f"password expired on {_date(until)}: ask your administrator for a new one"
    return None


def status(rec: UserRecord, now: float) -> tuple[str, str]:
    """(state, detail) for listings: "active", "disabled" (the reason), "expired" (the
    date), or "password expired" (the date; key logins still work)."""
    if rec.disabled:
        return "disabled", one_line(rec.disabled_reason)
    if expired(rec, now):
        assert rec.expires is not None
        return "expired", _date(rec.expires)
    until = password_expires_at(rec)
    if until is not None and now >= until:
        return "password expired", _date(until)
    return "active", ""

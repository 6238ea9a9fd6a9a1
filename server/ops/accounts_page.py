"""What the dashboard's accounts page shows: one page of users, from the file and the
database, with their state, quota use and last login.

The page must stay fast with 10,000 users in the database, so only names are listed
whole (one indexed read of one column, and the file's names in memory); everything
else is read for the users of the page shown, each by primary key: the merged record
(state, quota), the stored user (last login) and the usage ledger. A page costs the
same with 10 users or 10,000.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Protocol

from scriptsftp.server.core import account_policy
from scriptsftp.server.core.accounts import UserRecord
from scriptsftp.server.core.limits import Quota
from scriptsftp.server.stores.accounts_db import StoredUser

PER_PAGE = 50
#: a search longer than any account name finds nothing: no need to read it whole
QUERY_MAX = 64


class AccountLookup(Protocol):
    """The accounts as the page reads them (the daemon's AdminView provides it)."""

    def file_user_names(self) -> Iterable[str]: ...

    def database_user_names(self) -> Iterable[str]: ...

    def record(self, name: str) -> UserRecord | None: ...  # merged with groups and folders

    def stored_user(self, name: str) -> StoredUser | None: ...  # the database's row (last login)

    def usage(self, scope: str) -> tuple[int, int] | None: ...  # the ledger: (bytes, files); None: no ledger


@dataclass(frozen=True)
class AccountRow:
    name: str
    origin: str  # "file" | "database"
    state: str  # account_policy.status: "active", "disabled", "expired", "password expired"; "removed"
    detail: str  # the reason, the date
    used: tuple[int, int] | None  # (bytes, files) in the ledger; None: not known
    quota: Quota
    last_login: float | None
    connections: int  # open now


@dataclass(frozen=True)
class AccountsPage:
    rows: list[AccountRow]
    total: int  # users matching the query
    page: int  # 1-based, within 1..pages
    pages: int
    query: str


def accounts_page(lookup: AccountLookup, connected: Mapping[str, int], *, page: int, query: str, now: float,
                  per_page: int = PER_PAGE) -> AccountsPage:
    """Page ``page`` (clamped to the pages there are) of the users whose name contains
    ``query`` (any case), by name."""
    query = query.strip()[:QUERY_MAX]
    origin = {name: "database" for name in lookup.database_user_names()}
    origin.update({name: "file" for name in lookup.file_user_names()})  # the file wins, as at login
    needle = query.casefold()
    names = sorted(n for n in origin if needle in n.casefold()) if needle else sorted(origin)
    pages = max(1, -(-len(names) // per_page))
    page = min(max(1, page), pages)
    rows = [_row(lookup, name, origin[name], connected.get(name, 0), now)
            for name in names[(page - 1) * per_page:page * per_page]]
    return AccountsPage(rows, len(names), page, pages, query)


def _row(lookup: AccountLookup, name: str, origin: str, connections: int, now: float) -> AccountRow:
    rec = lookup.record(name)
    if rec is None:  # deleted between the listing and now
        return AccountRow(name, origin, "removed", "", None, Quota(), None, connections)
    state, detail = account_policy.status(rec, now)
    stored = lookup.stored_user(name) if origin == "database" else None
    return AccountRow(name, origin, state, detail, lookup.usage(f"user:{name}"), rec.account.quota,
                      stored.last_login if stored is not None else None, connections)

"""The dashboard's accounts page (/accounts): users of the file and of the database, with
their state, quota use and last login, one page at a time, and as fast with 10,000 users
as with a handful. Real daemon, real HTTP (urllib with the bearer token, as a script
would; the cookie login is test_dashboard.py's)."""

from __future__ import annotations

import html
import re
import time
import urllib.parse

from adminkit import TOKEN, admin_toml, call, token_hash  # noqa: F401  (fixture)
from conftest import close_client, paramiko_client

EVIL = "<img src=x onerror=alert(1)>"
USERS = 10_000


def _db(d):
    from scriptsftp.server.stores.accounts_db import AccountDb
    from scriptsftp.server.stores.sql import SqliteDatabase

    return AccountDb(SqliteDatabase(d.root / "state" / "accounts.sqlite3"))


def _page(d, query: str = "") -> tuple[str, float]:
    started = time.monotonic()
    status, body, headers = call(d, "GET", "/accounts" + query, token=TOKEN)
    took = time.monotonic() - started
    assert status == 200, body
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    return body, took


def _row(page: str, name: str) -> str:
    match = re.search(rf'<tr class="account" data-name="{re.escape(html.escape(name, quote=True))}">(.*?)</tr>', page)
    assert match, f"no row for {name!r}"
    return match.group(1)


def test_the_accounts_page_lists_file_and_database_users_with_state_quota_and_last_login(
        daemons, token_hash, alice_key):  # noqa: F811
    d = daemons.start(admin_toml(token_hash))
    db = _db(d)
    try:
        users = [{"name": f"u{i:05d}", "home": f"homes/u{i:05d}"} for i in range(USERS)]
        users[1].update(quota_size=10240, quota_files=10)
        users[2].update(disabled=True, disabled_reason=EVIL)
        users[3].update(expires="2020-01-01")
        db.import_({"format": "scriptsftp-accounts", "version": 1, "users": users}, "test")
        db.set_usage("user:u00001", 1536, 3)
        db.record_login("u00001", 1_800_000_000.0)
    finally:
        db.close()
    alice = paramiko_client(d, "alice", key=alice_key)
    try:
        small, _ = _page(d, "?q=alice")
        first, first_took = _page(d)
        deep, deep_took = _page(d, "?page=150")
    finally:
        close_client(alice)

    assert f"{USERS + 2} users" in first and f"page 1 of {-(-(USERS + 2) // 50)}" in first
    # the file's users come first by name, then the database's; 50 to a page
    assert first.count('<tr class="account"') == 50
    assert "<td>file</td>" in _row(first, "alice") and "connected now (1)" in _row(first, "alice")
    assert "<td>database</td>" in _row(first, "u00000") and "—" in _row(first, "u00000")
    # quota use from the ledger against the account's quota; the last login the database dated
    row = _row(first, "u00001")
    assert "1.5 KiB of 10.0 KiB (15%) · 3 of 10 files (30%)" in html.unescape(row)
    assert time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(1_800_000_000)) in row
    # state, with the reason or the date; what an admin typed is text, never markup
    row = _row(first, "u00002")
    assert 'class="veto">disabled' in row and "<img" not in first and html.escape(EVIL) in row
    assert 'class="veto">expired' in _row(first, "u00003") and "2020-01-01" in _row(first, "u00003")
    assert 'class="ok">active' in _row(first, "u00004")
    # deep pages cost what the first does: nothing is read whole but the names
    # page 150: names 7450..7499 by order (alice and bob first): u07448..u07497
    assert '"u07448"' in deep and '"u07497"' in deep and '"u07447"' not in deep and '"u07498"' not in deep
    assert 'id="page">page 150 of' in deep
    assert deep_took < max(1.0, 3 * first_took), (first_took, deep_took)
    assert first_took < 2.0, first_took
    assert "1 user matching" in small


def test_search_and_paging_are_bounded_and_escaped(daemons, token_hash):  # noqa: F811
    d = daemons.start(admin_toml(token_hash))
    db = _db(d)
    try:
        db.import_({"format": "scriptsftp-accounts", "version": 1,
                    "users": [{"name": f"p{i:03d}", "home": f"homes/p{i:03d}"} for i in range(120)]}, "test")
    finally:
        db.close()
    page, _ = _page(d, "?q=P04")  # any case
    assert "10 users matching" in page and page.count('<tr class="account"') == 10
    page, _ = _page(d, "?page=99999")  # past the end: the last page
    assert 'id="page">page 3 of 3' in page and page.count('<tr class="account"') == 22  # 120 + alice + bob
    page, _ = _page(d, "?page=-1&q=" + urllib.parse.quote(EVIL))
    assert "no user matches" in page and "<img" not in page and html.escape(EVIL) in page
    next_link = _page(d, "?q=p")[0]
    assert 'href="/accounts?page=2&amp;q=p"' in next_link
    # without the token or the cookie: the login form, no names
    status, body, _ = call(d, "GET", "/accounts", token=None)
    assert status == 401 and 'name="token"' in body and "p000" not in body

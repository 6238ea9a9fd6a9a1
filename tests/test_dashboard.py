"""The dashboard at /: logins (form, cookie, one-time link), escaping, and a real render in headless Chromium."""

from __future__ import annotations

import http.cookiejar
import io
import subprocess
import urllib.error
import urllib.parse
import urllib.request

import pytest

from adminkit import TOKEN, admin_toml, binding, call, token_hash, write_script  # noqa: F401
from conftest import close_client, paramiko_client, require_tool

EVIL = "<img src=x onerror=alert(1)>.exe"


def chromium_dom(url: str, tmp_path) -> str:
    exe = require_tool("chromium")
    profile = tmp_path / "chromium-profile"
    proc = subprocess.run(
        [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", "--dump-dom", url],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_dashboard_in_chromium_lists_an_open_session_and_escapes_what_users_control(
        daemons, token_hash, alice_key, tmp_path):
    write_script(daemons, "gate.py", """
        def on_pre_upload(event, api):
            if event.path.endswith(".exe"):
                api.log("refusing <b>" + event.path + "</b>")
                api.veto("no executables: " + event.path)
    """)
    d = daemons.start(admin_toml(token_hash, bindings=binding("pre-upload", "gate.py")))
    client = paramiko_client(d, key=alice_key)
    try:
        with pytest.raises(PermissionError):
            client.putfo(io.BytesIO(b"MZ"), "/" + EVIL)
        sid = next(s["id"] for s in call(d, "GET", "/api/sessions")[1] if s["user"] == "alice")

        status, link, _ = call(d, "POST", "/api/login-link")
        assert status == 200 and link["url"].startswith("http://127.0.0.1:")
        dom = chromium_dom(link["url"], tmp_path)
        # the session open right now
        assert f'data-id="{sid}"' in dom and ">alice<" in dom
        # the script and the vetoed event, with reason and the script's verdict
        assert "gate.py" in dom and "no executables: /" in dom and "veto" in dom
        # attacker-controlled text is shown as text, never as markup
        assert "<img" not in dom and "&lt;img src=x onerror=alert(1)&gt;.exe" in dom
        assert "<b>" not in dom and "refusing &lt;b&gt;" in dom
        # the link was for one use only
        again = chromium_dom(link["url"], tmp_path / "second")
        assert "this login link is unknown, used or expired" in again and sid not in again
    finally:
        close_client(client)


def _opener():
    jar = http.cookiejar.CookieJar()
    return urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar)), jar


def _open(opener, url: str, data: bytes | None = None, headers: dict | None = None) -> tuple[int, str]:
    req = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with opener.open(req, timeout=30) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_login_form_cookie_header_filters_and_logout(daemons, token_hash, alice_key, bob_key):
    write_script(daemons, "gate.py", """
        def on_pre_mkdir(event, api):
            api.veto("no dirs for " + event.user)
    """)
    d = daemons.start(admin_toml(token_hash, bindings=binding("pre-mkdir", "gate.py")))
    for user, key in (("alice", alice_key), ("bob", bob_key)):
        (d.home(user) / "inbox").mkdir(parents=True, exist_ok=True)
        c = paramiko_client(d, user, key=key)
        try:
            with pytest.raises(PermissionError):
                c.mkdir(f"/inbox/{user}-dir")
        finally:
            close_client(c)
    base = f"http://127.0.0.1:{d.ports['admin']}"
    opener, jar = _opener()
    status, page = _open(opener, base + "/")
    assert status == 401 and 'name="token"' in page and "no dirs" not in page
    status, page = _open(opener, base + "/login", urllib.parse.urlencode({"token": "wrong"}).encode())
    assert status == 401 and "wrong token" in page
    status, page = _open(opener, base + "/login", urllib.parse.urlencode({"token": TOKEN}).encode())
    assert status == 200 and "no dirs for alice" in page and "no dirs for bob" in page
    cookie = next(c for c in jar if c.name == "scriptsftp_admin")
    assert cookie.value != TOKEN and cookie.has_nonstandard_attr("HttpOnly")
    # filter by user and by path glob
    status, page = _open(opener, base + "/?user=bob")
    assert "no dirs for bob" in page and "no dirs for alice" not in page
    status, page = _open(opener, base + "/?" + urllib.parse.urlencode({"path": "/inbox/alice-*"}))
    assert "no dirs for alice" in page and "no dirs for bob" not in page
    status, page = _open(opener, base + "/?since=never")
    assert status == 200 and "since=" in page and "use Unix seconds" in page
    # the bearer header works for the page as well, without a cookie
    status, page = _open(_opener()[0], base + "/", headers={"Authorization": f"Bearer {TOKEN}"})
    assert status == 200 and "Sessions" in page
    status, _ = _open(opener, base + "/logout", b"")
    status, page = _open(opener, base + "/")
    assert status == 401
    _, _, headers = call(d, "GET", "/", token=TOKEN)
    assert "default-src 'none'" in headers["Content-Security-Policy"]

"""The admin API's scoped tokens, and its account routes (users, groups, folders, keys).

Every answer received here goes through adminkit.call, which validates it against the
daemon's /api/openapi.json (openapi_check.py).
"""

from __future__ import annotations

import subprocess

import pytest

from adminkit import TOKEN, admin_toml, call, get, token_hash, wait_for  # noqa: F401  (token_hash: a fixture)
from conftest import BIN, toml_str

READ_TOKEN = "reader-token-1b2c"
WRITE_TOKEN = "provisioning-token-9d8e"


@pytest.fixture(scope="session")
def scoped_hashes() -> dict[str, str]:
    from scriptsftp.server.core.passwords import hash_password

    return {"reader": hash_password(READ_TOKEN), "provisioning": hash_password(WRITE_TOKEN)}


def tokens_toml(hashes: dict[str, str]) -> str:
    return (f'[[admin.tokens]]\nname = "helpdesk"\nscope = "read"\ntoken_hash = {toml_str(hashes["reader"])}\n\n'
            f'[[admin.tokens]]\nname = "provisioning"\nscope = "write"\n'
            f'token_hash = {toml_str(hashes["provisioning"])}\n\n')


# --- scoped tokens -------------------------------------------------------------------------------


def test_a_read_token_may_only_read_a_write_token_may_do_everything(daemons, token_hash, scoped_hashes):  # noqa: F811
    d = daemons.start(admin_toml(token_hash, bindings=tokens_toml(scoped_hashes)))
    for token in (READ_TOKEN, WRITE_TOKEN, TOKEN):
        for path in ("/api/status", "/api/sessions", "/api/scripts", "/api/events", "/api/bans",
                     "/api/openapi.json", "/metrics"):
            assert call(d, "GET", path, token=token)[0] == 200, (token, path)
    # the read token: every other method is 403, before the route is even looked at
    for method, path in (("POST", "/api/reload"), ("DELETE", "/api/sessions/nosuch"), ("DELETE", "/api/bans/10.0.0.1"),
                         ("POST", "/api/login-link")):
        status, body, _ = call(d, method, path, token=READ_TOKEN)
        assert status == 403, (method, path, status, body)
        assert body["error"] == "token 'helpdesk' is read-only (scope \"read\": GET requests only)"
    d.wait_log(r"read-only token 'helpdesk' refused POST /api/reload")
    # the write tokens, named or the old token_hash ("admin"), may
    assert call(d, "POST", "/api/reload", token=WRITE_TOKEN)[0] == 200
    assert call(d, "POST", "/api/reload", token=TOKEN)[0] == 200
    assert call(d, "DELETE", "/api/sessions/nosuch", token=WRITE_TOKEN)[0] == 404
    # no token, a wrong one, one of another scheme: 401
    assert call(d, "GET", "/api/status", token=None)[0] == 401
    assert call(d, "GET", "/api/status", token=READ_TOKEN + "x")[0] == 401
    assert call(d, "GET", "/api/status", token=None, headers={"Authorization": f"Basic {READ_TOKEN}"})[0] == 401
    text = d.log_text()
    assert READ_TOKEN not in text and WRITE_TOKEN not in text and TOKEN not in text


def test_tokens_follow_a_reload(daemons, token_hash, scoped_hashes):  # noqa: F811
    from scriptsftp.server.core.passwords import hash_password

    d = daemons.start(admin_toml(token_hash, bindings=tokens_toml(scoped_hashes)))
    assert call(d, "GET", "/api/status", token=READ_TOKEN)[0] == 200  # verified once, then cached
    # helpdesk gets a new token and becomes a writer: the old token stops at once, cached or not
    text = d.config.read_text().replace(toml_str(scoped_hashes["reader"]), toml_str(hash_password("renewed-5a")))
    d.config.write_text(text.replace('name = "helpdesk"\nscope = "read"', 'name = "helpdesk"\nscope = "write"'))
    assert call(d, "POST", "/api/reload", token=WRITE_TOKEN)[0] == 200
    assert call(d, "GET", "/api/status", token=READ_TOKEN)[0] == 401
    assert call(d, "POST", "/api/reload", token="renewed-5a")[0] == 200
    d.wait_log(r"\[admin\] tokens changed: applied")


def test_token_configuration_errors_name_the_key(daemons, token_hash, scoped_hashes):  # noqa: F811
    def check(extra: str) -> str:
        cfg = daemons.write_config(extra)
        proc = subprocess.run([str(BIN), "check", "-c", str(cfg)], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2, (extra, proc.stdout, proc.stderr)
        assert "Traceback" not in proc.stderr
        return proc.stderr

    reader = toml_str(scoped_hashes["reader"])
    err = check(admin_toml(token_hash) + f'[[admin.tokens]]\nname = "admin"\ntoken_hash = {reader}\n')
    assert "the name 'admin' is used twice (token_hash is the token named \"admin\")" in err
    err = check(admin_toml("") + f'[[admin.tokens]]\nname = "a"\ntoken_hash = {reader}\n'
                                 f'[[admin.tokens]]\nname = "a"\ntoken_hash = {reader}\n')
    assert "the name 'a' is used twice" in err
    err = check(admin_toml("") + '[[admin.tokens]]\nname = "a"\ntoken_hash = "secret"\n')
    assert "admin.tokens[0].token_hash" in err and "not an argon2id hash" in err
    err = check(admin_toml("") + f'[[admin.tokens]]\nname = "a"\nscope = "admin"\ntoken_hash = {reader}\n')
    assert "admin.tokens[0].scope" in err and "'read' or 'write'" in err
    err = check(admin_toml("") + f'[[admin.tokens]]\nname = "a b"\ntoken_hash = {reader}\n')
    assert "is not a valid token name" in err
    err = check(admin_toml("") + '[[admin.tokens]]\nname = "a"\n')
    assert "admin.tokens[0].token_hash" in err
    # named tokens alone are enough to listen beyond loopback
    cfg = daemons.write_config(admin_toml("").replace('"127.0.0.1:0"', '"0.0.0.0:0"')
                               + f'[[admin.tokens]]\nname = "a"\ntoken_hash = {reader}\n')
    proc = subprocess.run([str(BIN), "check", "-c", str(cfg)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr

"""The admin API's scoped tokens, and its account routes (users, groups, folders, keys).

Every answer received here goes through adminkit.call, which validates it against the
daemon's /api/openapi.json (openapi_check.py).
"""

from __future__ import annotations

import subprocess
import urllib.parse

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


# --- accounts over the API -----------------------------------------------------------------------


def _api_daemon(daemons, token_hash, scoped_hashes):  # noqa: F811
    return daemons.start(admin_toml(token_hash, bindings=tokens_toml(scoped_hashes)))


def _changes(d) -> list[tuple[str, str, str, str]]:
    """(actor, kind, name, action) of the account database's change feed, read as another process would."""
    from scriptsftp.server.stores.accounts_db import AccountDb
    from scriptsftp.server.stores.sql import SqliteDatabase

    db = AccountDb(SqliteDatabase(d.root / "state" / "accounts.sqlite3"))
    try:
        return [(c.actor, c.kind, c.name, c.action) for c in db.changes_since(0)]
    finally:
        db.close()


def _write(d, method: str, path: str, body=None, **kw):
    return call(d, method, path, token=WRITE_TOKEN, body=body, **kw)


def test_a_user_created_over_the_api_logs_in_with_openssh_at_once_and_follows_every_change(
        daemons, token_hash, scoped_hashes, alice_key, bob_key, tmp_path):  # noqa: F811
    import time

    from conftest import paramiko_client, sftp_batch

    d = _api_daemon(daemons, token_hash, scoped_hashes)
    home = d.root / "homes" / "carol"
    password = "carol-Pass-42 with spaces"
    status, body, headers = _write(d, "POST", "/api/users", {
        "name": "carol", "home": str(home), "public_keys": [alice_key.public_line],
        "permissions": {"/": ["*"]}, "quota_size": "1GiB", "password": password, "home_folders": ["/in", "/out"]})
    created = time.monotonic()
    assert status == 201, body
    assert (home / "in").is_dir() and (home / "out").is_dir()  # made at creation, before any login
    assert headers["Location"] == "/api/users/carol"
    proc = sftp_batch(d, "put /etc/hostname h.txt\nls\n", alice_key, user="carol")
    started_within = time.monotonic() - created
    assert proc.returncode == 0, (proc.stdout, proc.stderr, d.log_text()[-3000:])
    # the first attempt, no retry, no reload: the whole sftp run (login, put, ls) ends within 1 s of
    # the 201 (0.15 s here; the login is one read of the database by primary key)
    assert started_within < 1.0, started_within
    assert (home / "h.txt").read_bytes() == open("/etc/hostname", "rb").read()
    assert body["has_password"] is True and body["quota_size"] == 2**30
    assert body["created_by"] == body["updated_by"] == "api:provisioning"
    assert "password_hash" not in body and "password" not in body
    assert password not in d.log_text()

    # the read token sees it, and may change nothing
    assert get(d, "/api/users/carol", token=READ_TOKEN)["home"] == str(home)
    assert [u["name"] for u in get(d, "/api/users", token=READ_TOKEN)] == ["carol"]  # alice and bob are the file's
    for method, path in (("PATCH", "/api/users/carol"), ("DELETE", "/api/users/carol"),
                         ("POST", "/api/users/carol/disable"), ("PUT", "/api/users/carol/password")):
        assert call(d, method, path, token=READ_TOKEN, body={})[0] == 403, (method, path)

    # the password, set over the API, works for a password login; a new one replaces it at once
    client = paramiko_client(d, "carol", password=password)
    client.get_channel().get_transport().close()
    assert _write(d, "PUT", "/api/users/carol/password", {"password": "renewed-Pass-7"})[0] == 204
    with pytest.raises(Exception):
        paramiko_client(d, "carol", password=password)
    client = paramiko_client(d, "carol", password="renewed-Pass-7")
    client.get_channel().get_transport().close()
    assert get(d, "/api/users/carol")["password_changed"] >= body["created_at"]

    # PATCH changes only what it names; null resets an inherited value
    status, patched, _ = _write(d, "PATCH", "/api/users/carol", {"quota_files": 10, "quota_size": None})
    assert status == 200 and patched["quota_files"] == 10 and patched["quota_size"] is None
    assert patched["public_keys"] == [alice_key.public_line] and patched["has_password"] is True

    # disable (with the reason the client is told where it can be), enable
    status, disabled, _ = _write(d, "POST", "/api/users/carol/disable", {"reason": "contract ended"})
    assert status == 200 and disabled["disabled"] is True and disabled["disabled_reason"] == "contract ended"
    assert sftp_batch(d, "ls\n", alice_key, user="carol").returncode != 0
    status, enabled, _ = _write(d, "POST", "/api/users/carol/enable")
    assert status == 200 and enabled["disabled"] is False and enabled["disabled_reason"] == ""
    assert sftp_batch(d, "ls\n", alice_key, user="carol").returncode == 0

    # keys: added (Location names the fingerprint, '/' and '+' encoded), used, removed
    keys = get(d, "/api/users/carol/keys")
    assert [k["key"] for k in keys] == [alice_key.public_line] and keys[0]["fingerprint"].startswith("SHA256:")
    assert sftp_batch(d, "ls\n", bob_key, user="carol").returncode != 0
    status, added, headers = _write(d, "POST", "/api/users/carol/keys", {"key": bob_key.public_line})
    assert status == 201 and added["fingerprint"].startswith("SHA256:"), added
    fp = added["fingerprint"]
    assert headers["Location"] == "/api/users/carol/keys/" + urllib.parse.quote(fp, safe="")
    assert sftp_batch(d, "ls\n", bob_key, user="carol").returncode == 0
    status, again, _ = _write(d, "POST", "/api/users/carol/keys", {"key": bob_key.public_line})
    assert status == 409 and fp in again["error"]
    assert _write(d, "DELETE", headers["Location"])[0] == 204
    assert sftp_batch(d, "ls\n", bob_key, user="carol").returncode != 0
    status, gone, _ = _write(d, "DELETE", headers["Location"])
    assert status == 404 and "no key" in gone["error"]
    # the fingerprint without its SHA256: prefix, as some tools print it
    status, added, _ = _write(d, "POST", "/api/users/carol/keys", {"key": bob_key.public_line})
    bare = urllib.parse.quote(added["fingerprint"].removeprefix("SHA256:"), safe="")
    assert _write(d, "DELETE", f"/api/users/carol/keys/{bare}")[0] == 204

    # PUT replaces the definition; the password stays (replies never carry it to send back)
    current = get(d, "/api/users/carol")
    definition = {k: v for k, v in current.items() if k not in (
        "created_at", "created_by", "updated_at", "updated_by", "password_changed", "last_login", "has_password")}
    status, replaced, _ = _write(d, "PUT", "/api/users/carol", {**definition, "max_sessions": 3})
    assert status == 200 and replaced["max_sessions"] == 3 and replaced["has_password"] is True
    assert replaced["last_login"] is not None  # logins above were recorded
    client = paramiko_client(d, "carol", password="renewed-Pass-7")
    client.get_channel().get_transport().close()

    # delete: gone for the API and for logins
    assert _write(d, "DELETE", "/api/users/carol")[0] == 204
    assert call(d, "GET", "/api/users/carol")[0] == 404
    assert sftp_batch(d, "ls\n", alice_key, user="carol").returncode != 0

    actions = [(actor, action) for actor, kind, name, action in _changes(d) if name == "carol"]
    assert ("api:provisioning", "add") in actions and ("api:provisioning", "delete") in actions
    assert {a for a, _ in actions} == {"api:provisioning"}
    assert {"password", "disable", "enable", "key-add", "key-remove", "update"} <= {x for _, x in actions}
    assert "renewed-Pass-7" not in d.log_text() and password not in d.log_text()


@pytest.fixture(scope="module")
def api(module_daemons, password_hashes, host_keys):
    """One daemon for the refusal tests below (each uses names of its own)."""
    from scriptsftp.server.core.passwords import hash_password

    hashes = {"reader": hash_password(READ_TOKEN), "provisioning": hash_password(WRITE_TOKEN)}
    folders = '[[folders]]\nname = "filed"\npath = "filed"\n\n[[groups]]\nname = "filegroup"\n\n'
    return module_daemons.start(admin_toml(hash_password(TOKEN), bindings=tokens_toml(hashes) + folders))


def test_bodies_are_validated_field_by_field(api):
    d = api
    home = str(d.root / "homes" / "v")

    def refused(body, path="/api/users", method="POST", status=400):
        code, answer, _ = _write(d, method, path, body)
        assert code == status, (body, code, answer)
        return answer

    answer = refused({"name": "v1", "home": home, "colour": "blue", "quota_size": -1,
                      "permissions": {"/": ["fly"]}})
    assert answer["fields"]["colour"] == "unknown key"
    assert "quota_size" in answer["fields"]
    assert "unknown permission 'fly'" in answer["fields"]["permissions"]
    assert answer["error"].startswith("invalid user: ")
    assert refused({"name": "v1"})["fields"]["home"] == "Field required"
    assert "not a valid user name" in refused({"name": "../etc", "home": home})["fields"]["name"]
    assert "not a valid user name" in refused({"name": "x" * 65, "home": home})["fields"]["name"]
    answer = refused({"name": "v1", "home": home, "password_hash_file": "/etc/shadow", "generate_password": True})
    assert set(answer["fields"]) == {"password_hash_file", "generate_password"}
    answer = refused({"name": "v1", "home": home, "password": "a", "password_hash": "$argon2id$x"})
    assert answer["fields"]["password"] == "give password or password_hash, not both"
    assert "1 to 1024" in refused({"name": "v1", "home": home, "password": "p" * 1025})["fields"]["password"]
    assert "1 to 1024" in refused({"name": "v1", "home": home, "password": 12345})["fields"]["password"]
    assert "argon2id" in refused({"name": "v1", "home": home, "password_hash": "plain"})["fields"]["password_hash"]
    assert "key 0" in refused({"name": "v1", "home": home, "public_keys": ["ssh-ed25519 AAAA"]})["fields"]["public_keys"]
    assert "expires" in refused({"name": "v1", "home": home, "expires": "next tuesday"})["fields"]
    # references are checked by the database: an unknown group or folder names itself
    assert "nosuchgroup" in refused({"name": "v1", "home": home, "groups": ["nosuchgroup"]})["error"]
    assert "nosuchfolder" in refused({"name": "v1", "home": home, "folders": {"/x": "nosuchfolder"}})["error"]
    # not a JSON object
    for raw in (b"", b"not json", b"[1, 2]", b'"text"', b"\xff\xfe"):
        status, answer, _ = call(d, "POST", "/api/users", token=WRITE_TOKEN, data=raw,
                                 headers={"Content-Type": "application/json"})
        assert status == 400 and answer["error"], (raw, answer)
    # larger than the listener takes
    status, answer, _ = _write(d, "POST", "/api/users", {"name": "v1", "home": home, "description": "x" * 70000})
    assert status == 413 and "larger than" in answer["error"]
    # the URL names the account: a body naming another is refused, not a rename
    assert _write(d, "POST", "/api/users", {"name": "v2", "home": home})[0] == 201
    answer = refused({"name": "other", "home": home}, "/api/users/v2", "PUT")
    assert "renaming is not supported" in answer["error"]
    answer = refused({"quota_files": -3}, "/api/users/v2", "PATCH")
    assert "quota_files" in answer["fields"]
    assert refused({"reason": 5}, "/api/users/v2/disable", "POST")["fields"]["reason"]
    assert refused({"key": "ssh-dss AAAA"}, "/api/users/v2/keys", "POST")["fields"]["key"]
    assert refused({}, "/api/users/v2/password", "PUT")["fields"]["password"]
    assert refused({"password_hash": "nope"}, "/api/users/v2/password", "PUT")["fields"]["password_hash"]
    assert [u["name"] for u in get(d, "/api/users") if u["name"].startswith("v")] == ["v2"]
    assert get(d, "/api/users/v2")["has_password"] is False


def test_names_taken_in_use_defined_in_the_file_or_unknown(api):
    d = api
    home = str(d.root / "homes" / "n")
    assert _write(d, "POST", "/api/users", {"name": "n1", "home": home})[0] == 201
    status, answer, _ = _write(d, "POST", "/api/users", {"name": "n1", "home": home})
    assert status == 409 and "'n1' already exists" in answer["error"]
    # alice is the configuration file's: the API says where, and changes nothing there
    config = str(d.config)
    status, answer, _ = _write(d, "POST", "/api/users", {"name": "alice", "home": home})
    assert status == 409 and f"{config}:" in answer["error"], answer
    for method, path, body in (("PUT", "/api/users/alice", {"home": home}), ("PATCH", "/api/users/alice", {}),
                               ("DELETE", "/api/users/alice", None), ("POST", "/api/users/alice/disable", None),
                               ("PUT", "/api/users/alice/password", {"password": "x"}),
                               ("POST", "/api/users/alice/keys", {"key": d.root.joinpath("x").as_posix()}),
                               ("DELETE", "/api/groups/filegroup", None), ("PATCH", "/api/folders/filed", {})):
        status, answer, _ = _write(d, method, path, body)
        if status == 400:
            continue  # the body was refused first (an invalid key line)
        assert status == 409 and f"{config}:" in answer["error"] and "configuration file" in answer["error"], \
            (method, path, status, answer)
    status, answer, _ = call(d, "GET", "/api/users/alice")
    assert status == 404 and "configuration file" in answer["error"]
    # unknown names, hostile or not, are 404 (never a path, never a traceback)
    for name in ("nobody", "..", "../../etc/passwd", "a/b", "x" * 3000, "é\u202e", "%00", "a b", "*"):
        quoted = urllib.parse.quote(name, safe="")
        for kind in ("users", "groups", "folders"):
            status, answer, _ = call(d, "GET", f"/api/{kind}/{quoted}")
            assert status == 404, (kind, name, status, answer)
            assert _write(d, "DELETE", f"/api/{kind}/{quoted}")[0] == 404
        assert _write(d, "PATCH", f"/api/users/{quoted}", {"quota_files": 1})[0] in (400, 404)
        assert call(d, "GET", f"/api/users/{quoted}/keys")[0] == 404
        assert _write(d, "DELETE", f"/api/users/n1/keys/{quoted}")[0] == 404
    assert "Traceback" not in d.log_text()


def test_groups_and_folders_and_what_refers_to_them(api):
    d = api
    status, group, headers = _write(d, "POST", "/api/groups", {"name": "partners", "quota_size": "500MB",
                                                               "permissions": {"/inbox": ["list", "upload"]}})
    assert status == 201 and headers["Location"] == "/api/groups/partners", group
    assert group["quota_size"] == 500_000_000 and group["created_by"] == "api:provisioning"
    status, folder, headers = _write(d, "POST", "/api/folders", {"name": "exchange", "path": str(d.root / "exchange"),
                                                                 "quota_files": 100, "description": "drop"})
    assert status == 201 and headers["Location"] == "/api/folders/exchange", folder
    assert _write(d, "POST", "/api/folders", {"name": "exchange", "path": "/x"})[0] == 409
    home = str(d.root / "homes" / "g1")
    status, user, _ = _write(d, "POST", "/api/users", {"name": "g1", "home": home, "groups": ["partners"],
                                                        "folders": {"/exchange": "exchange"}})
    assert status == 201, user
    # in use: neither goes while g1 names them
    status, answer, _ = _write(d, "DELETE", "/api/groups/partners")
    assert status == 409 and "g1" in answer["error"], answer
    status, answer, _ = _write(d, "DELETE", "/api/folders/exchange")
    assert status == 409 and "g1" in answer["error"], answer
    # PATCH and PUT
    status, group, _ = _write(d, "PATCH", "/api/groups/partners", {"bandwidth_down": "1MiB"})
    assert status == 200 and group["bandwidth_down"] == 2**20 and group["quota_size"] == 500_000_000
    status, group, _ = _write(d, "PUT", "/api/groups/partners", {"home_folders": ["/inbox", "/outbox"]})
    assert status == 200 and group["quota_size"] is None and group["home_folders"] == ["/inbox", "/outbox"]
    status, folder, _ = _write(d, "PATCH", "/api/folders/exchange", {"permissions": {"/": ["list"]}})
    assert status == 200 and folder["permissions"] == {"/": ["list"]} and folder["quota_files"] == 100
    assert [g["name"] for g in get(d, "/api/groups", token=READ_TOKEN)] == ["partners"]
    assert [f["name"] for f in get(d, "/api/folders", token=READ_TOKEN)] == ["exchange"]
    assert _write(d, "POST", "/api/groups", {"name": "bad", "quota_size": "lots"})[0] == 400
    assert "path" in _write(d, "POST", "/api/folders", {"name": "nopath"})[1]["fields"]
    # once g1 lets go, both can be deleted
    assert _write(d, "PATCH", "/api/users/g1", {"groups": [], "folders": {}})[0] == 200
    assert _write(d, "DELETE", "/api/groups/partners")[0] == 204
    assert _write(d, "DELETE", "/api/folders/exchange")[0] == 204
    assert call(d, "GET", "/api/groups/partners")[0] == 404
    assert call(d, "GET", "/api/folders/exchange")[0] == 404
    kinds = {(kind, name, action) for actor, kind, name, action in _changes(d) if actor == "api:provisioning"}
    assert {("group", "partners", "add"), ("group", "partners", "delete"), ("folder", "exchange", "add"),
            ("folder", "exchange", "delete")} <= kinds


def test_racing_creates_and_a_client_gone_mid_body(api):
    """Eight clients create the same user at once: one 201, seven 409, never a 500. A client
    that announces a body and leaves mid-way costs nothing: the next request is served."""
    import socket
    from concurrent.futures import ThreadPoolExecutor

    d = api
    body = {"name": "race", "home": str(d.root / "homes" / "race"), "password": "race-Pass-1"}
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: _write(d, "POST", "/api/users", body), range(8)))
    statuses = sorted(status for status, _, _ in answers)
    assert statuses == [201] + [409] * 7, [(s, b) for s, b, _ in answers]
    assert all("already exists" in b["error"] for s, b, _ in answers if s == 409)

    for announced, sent in ((50_000, b'{"name": "half'), (10**9, b"x" * 1000)):
        with socket.create_connection(("127.0.0.1", d.ports["admin"]), timeout=10) as s:
            s.sendall(b"POST /api/users HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + WRITE_TOKEN.encode()
                      + b"\r\nContent-Type: application/json\r\nContent-Length: " + str(announced).encode()
                      + b"\r\n\r\n" + sent)
    assert call(d, "GET", "/api/users/race")[0] == 200
    assert call(d, "GET", "/api/users/half")[0] == 404
    text = d.log_text()
    assert "Traceback" not in text, text[text.find("Traceback") - 300:][:3000]

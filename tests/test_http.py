"""HTTP file API over a real daemon: curl, http.client and an aiohttp client.

GET/HEAD/Range/conditional requests, streamed PUT into the staged upload with
the pre-publish verdict in the response (issue 4), JSON listing, Basic auth
through the LoginCore (failure path, protocol switch), permissions, size limit,
an interrupted upload, TLS, the same events as over SFTP, and 50 parallel
16 MiB downloads.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import subprocess
import textwrap

import pytest

from conftest import ALICE_PASSWORD, BOB_PASSWORD, paramiko_client, close_client, require_tool, user_toml
from httpkit import HTTP_EXTRA, basic, curl, request, staged

SCRIPTS = {
    "gate.py": """
        def on_pre_upload(event, api):
            if event.path.endswith(".exe"):
                api.veto("executables are not accepted: " + event.path)

        def on_pre_publish(event, api):
            if b"EICAR-MARKER" in api.file.read(1 << 20):
                api.veto("marker found in " + event.path)
    """,
    "record.py": """
        def on_any(event, api):
            api.log("EV", ev=event.name, proto=event.protocol, path=event.path, user=event.user)

        def on_login_failed(event, api):
            api.log("LOGIN-FAILED", proto=event.protocol, user=event.user, method=event.login_method)
    """,
}

RECORDED = ("pre-upload", "pre-publish", "post-upload", "upload-failed", "pre-download", "post-download",
            "pre-delete", "post-delete", "pre-rename", "post-rename", "pre-mkdir", "post-mkdir", "pre-rmdir",
            "post-rmdir")


def _bindings() -> str:
    out = ['[[bindings]]\nevent = "pre-upload"\nscript = "gate.py"\n',
           '[[bindings]]\nevent = "pre-publish"\nscript = "gate.py"\nallow = ["read"]\n']
    for e in RECORDED:
        out.append(f'[[bindings]]\nevent = "{e}"\nscript = "record.py"\nfunction = "on_any"\n'
                   f'users = ["ev"]\norder = 50\n')
    out.append('[[bindings]]\nevent = "login-failed"\nscript = "record.py"\nusers = ["ev"]\n')
    return "\n".join(out)


@pytest.fixture(scope="module")
def d(module_daemons, password_hashes, alice_key):
    for name, body in SCRIPTS.items():
        (module_daemons.root / "scripts").mkdir(parents=True, exist_ok=True)
        (module_daemons.root / "scripts" / name).write_text(textwrap.dedent(body))
    users = module_daemons.default_users() + user_toml(
        "sftponly", password_hash=password_hashes["alice"], protocols='["sftp"]'
    ) + user_toml("ev", password_hash=password_hashes["alice"], keys=[alice_key]) + user_toml(
        "small", password_hash=password_hashes["alice"])
    daemon = module_daemons.start(HTTP_EXTRA + "max_upload_size = 20000000\n" + _bindings(), users=users)
    for u in ("alice", "bob", "ev", "small"):
        daemon.home(u).mkdir(parents=True, exist_ok=True)
    (daemon.home("bob") / "inbox").mkdir(exist_ok=True)
    (daemon.home("bob") / "readme.txt").write_text("read me\n")
    return daemon


def test_put_get_head_range_delete_with_curl(d, tmp_path):
    content = os.urandom(3 * 1024 * 1024 + 7)
    src = tmp_path / "up.bin"
    src.write_bytes(content)
    r = curl(d, "/up.bin", "-T", str(src))  # curl sends Expect: 100-continue for this size
    assert r.status == 201, r.text
    assert (d.home("alice") / "up.bin").read_bytes() == content
    assert staged(d.home("alice")) == []

    r = curl(d, "/up.bin")
    assert r.status == 200 and r.body == content
    etag, modified = r.headers["etag"], r.headers["last-modified"]
    assert r.headers["accept-ranges"] == "bytes"

    head = curl(d, "/up.bin", "-I")
    assert head.status == 200
    assert head.headers["content-length"] == str(len(content))
    assert head.headers["etag"] == etag and head.headers["last-modified"] == modified

    part = curl(d, "/up.bin", "-r", "100-199")
    assert part.status == 206 and part.body == content[100:200]
    assert part.headers["content-range"] == f"bytes 100-199/{len(content)}"
    assert curl(d, "/up.bin", "-r", "-10").body == content[-10:]
    assert curl(d, "/up.bin", "-r", f"{len(content) - 5}-").body == content[-5:]
    bad = curl(d, "/up.bin", "-r", f"{len(content) + 10}-")
    assert bad.status == 416 and bad.headers["content-range"] == f"bytes */{len(content)}"
    # If-Range with a stale validator: the whole file
    stale = curl(d, "/up.bin", "-r", "0-9", "-H", 'If-Range: "nope"')
    assert stale.status == 200 and stale.body == content

    assert curl(d, "/up.bin", "-H", f"If-None-Match: {etag}").status == 304
    assert curl(d, "/up.bin", "-H", f"If-Modified-Since: {modified}").status == 304
    assert curl(d, "/up.bin", "-H", 'If-Match: "other"').status == 412

    r = curl(d, "/up.bin", "-T", str(tmp_path / "up.bin"))  # overwrite
    assert r.status == 204
    r = curl(d, "/up.bin", "-X", "DELETE")
    assert r.status == 204
    assert not (d.home("alice") / "up.bin").exists()
    assert curl(d, "/up.bin").status == 404


def test_basic_auth_failures_go_through_the_login_core(d):
    r = request(d, "GET", "/", user=None)
    assert r.status == 401 and r.headers["www-authenticate"].startswith("Basic ")
    secret = "Wrong-Pass-Never-Logged-91"
    r = request(d, "GET", "/", user="alice", password=secret)
    assert r.status == 401
    d.wait_log(r"login failed for 'alice' \(password\): wrong password")
    r = request(d, "GET", "/", user="nosuchuser", password=secret)
    assert r.status == 401
    d.wait_log(r"login failed for 'nosuchuser' \(password\)")
    r = request(d, "GET", "/", user="ev", password=secret)
    assert r.status == 401
    d.wait_log(r"record\.py: LOGIN-FAILED proto=http user=ev method=password")
    assert secret not in d.log_text()
    r = request(d, "GET", "/", headers={"Authorization": "Basic !!!"}, user=None)
    assert r.status == 400
    r = request(d, "GET", "/", user="sftponly", password=ALICE_PASSWORD)
    assert r.status == 403 and "protocol http not allowed" in r.text
    assert request(d, "GET", "/", user="bob", password=BOB_PASSWORD).status == 200


def test_permissions_map_to_403(d, tmp_path):
    r = request(d, "PUT", "/x.txt", b"nope", user="bob", password=BOB_PASSWORD)
    assert r.status == 403 and "permission denied" in r.text
    assert request(d, "DELETE", "/readme.txt", user="bob", password=BOB_PASSWORD).status == 403
    r = request(d, "PUT", "/inbox/x.txt", b"yes", user="bob", password=BOB_PASSWORD)
    assert r.status == 201
    assert request(d, "GET", "/readme.txt", user="bob", password=BOB_PASSWORD).body == b"read me\n"


def test_put_errors(d):
    (d.home("alice") / "adir").mkdir(exist_ok=True)
    assert request(d, "PUT", "/missing/parent.txt", b"x").status == 409
    assert request(d, "PUT", "/adir", b"x").status == 405
    assert request(d, "PUT", "/p.txt", b"x", {"Content-Range": "bytes 0-0/1"}).status == 400
    assert request(d, "POST", "/p.txt", b"x").status == 405
    assert request(d, "GET", "/nothing-here").status == 404


def test_upload_size_limit(d):
    home = d.home("small")
    r = request(d, "PUT", "/big.bin", b"x" * 20_000_001, user="small")
    assert r.status == 413
    # chunked: no Content-Length, the limit is found while streaming
    conn_body = b"".join(b"%x\r\n%s\r\n" % (1_000_000, b"y" * 1_000_000) for _ in range(21)) + b"0\r\n\r\n"
    with socket.create_connection(("127.0.0.1", d.ports["http"]), timeout=30) as s:
        s.sendall(b"PUT /chunked.bin HTTP/1.1\r\nHost: x\r\nAuthorization: " + basic("small").encode()
                  + b"\r\nTransfer-Encoding: chunked\r\n\r\n")
        try:
            s.sendall(conn_body)
        except OSError:
            pass  # the server may stop reading once over the limit
        reply = s.recv(4096)
    assert reply.startswith(b"HTTP/1.1 413"), reply
    d.wait_log(r"upload /chunked\.bin aborted")
    assert not (home / "big.bin").exists() and not (home / "chunked.bin").exists()
    assert staged(home) == []


def test_json_and_html_listing(d):
    home = d.home("alice") / "list"
    home.mkdir(exist_ok=True)
    (home / "a b.txt").write_text("12345")
    (home / "<b>.txt").write_text("x")
    (home / "sub").mkdir(exist_ok=True)
    r = request(d, "GET", "/list?format=json")
    assert r.status == 200 and r.headers["content-type"].startswith("application/json")
    doc = json.loads(r.body)
    assert doc["path"] == "/list"
    by_name = {e["name"]: e for e in doc["entries"]}
    assert by_name["a b.txt"]["type"] == "file" and by_name["a b.txt"]["size"] == 5
    assert by_name["a b.txt"]["href"] == "/list/a%20b.txt"
    assert by_name["sub"]["type"] == "dir" and by_name["sub"]["href"] == "/list/sub/"
    r2 = request(d, "GET", "/list/", headers={"Accept": "application/json"})
    assert json.loads(r2.body) == doc
    page = request(d, "GET", "/list/")
    assert page.headers["content-type"].startswith("text/html")
    assert "&lt;b&gt;.txt" in page.text and "<b>.txt" not in page.text


def test_vetoed_put_gives_403_with_reason_and_never_appears(d, tmp_path):
    home = d.home("alice")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"clean start " * 1000 + b"EICAR-MARKER" + b" tail" * 1000)
    r = curl(d, "/bad.txt", "-T", str(bad))
    assert r.status == 403
    assert "marker found in /bad.txt" in r.text
    assert not (home / "bad.txt").exists() and staged(home) == []
    good = tmp_path / "good.txt"
    good.write_bytes(b"all clean\n" * 1000)
    assert curl(d, "/good.txt", "-T", str(good)).status == 201
    assert (home / "good.txt").read_bytes() == good.read_bytes()
    # a vetoed overwrite keeps the previous version
    r = curl(d, "/good.txt", "-T", str(bad))
    assert r.status == 403 and "marker found" in r.text
    assert (home / "good.txt").read_bytes() == good.read_bytes()
    assert staged(home) == []


def test_pre_upload_veto_is_answered_before_the_body(d, tmp_path):
    exe = tmp_path / "tool.exe"
    exe.write_bytes(b"MZ" + os.urandom(4 * 1024 * 1024))
    r = curl(d, "/tool.exe", "-T", str(exe))
    assert r.status == 403 and "executables are not accepted: /tool.exe" in r.text
    assert not (d.home("alice") / "tool.exe").exists()


def test_interrupted_upload_leaves_old_version(d):
    home = d.home("alice")
    (home / "keep.txt").write_bytes(b"version 1\n")
    with socket.create_connection(("127.0.0.1", d.ports["http"]), timeout=30) as s:
        s.sendall(b"PUT /keep.txt HTTP/1.1\r\nHost: x\r\nAuthorization: " + basic().encode()
                  + b"\r\nContent-Length: 1000000\r\n\r\n" + b"z" * 300_000)
    d.wait_log(r"upload /keep\.txt aborted")
    assert (home / "keep.txt").read_bytes() == b"version 1\n"
    assert staged(home) == []


def _events(d, start: int) -> list[tuple[str, str]]:
    import re

    lines = d.log_text().splitlines()[start:]
    out = []
    for line in lines:
        m = re.search(r"record\.py: EV ev=(\S+) proto=(\S+) path=(\S+)", line)
        if m:
            out.append((m.group(1), m.group(3), m.group(2)))
    return out


def test_same_events_as_sftp(d, alice_key):
    """The same operations over SFTP and HTTP raise the same events, protocol aside."""
    home = d.home("ev")

    def sftp_ops():
        c = paramiko_client(d, "ev", key=alice_key)
        try:
            with c.open("/f.txt", "w") as f:
                f.write(b"hello")
            c.open("/f.txt").read()
            c.mkdir("/dir")
            c.rename("/f.txt", "/dir/g.txt")
            c.remove("/dir/g.txt")
            c.rmdir("/dir")
        finally:
            close_client(c)

    def http_ops():
        assert request(d, "PUT", "/f.txt", b"hello", user="ev").status == 201
        assert request(d, "GET", "/f.txt", user="ev").body == b"hello"
        assert request(d, "MKCOL", "/dir", user="ev").status == 201
        assert request(d, "MOVE", "/f.txt", headers={"Destination": "/dir/g.txt"}, user="ev").status == 201
        assert request(d, "DELETE", "/dir/g.txt", user="ev").status == 204
        assert request(d, "DELETE", "/dir", user="ev").status == 204

    seen = {}
    for proto, ops in (("sftp", sftp_ops), ("http", http_ops)):
        start = len(d.log_text().splitlines())
        ops()
        d.wait_log(r"record\.py: EV ev=post-rmdir proto=" + proto, start=start)
        evs = _events(d, start)
        assert {p for _, _, p in evs} == {proto}
        seen[proto] = sorted((e, path) for e, path, _ in evs)
    assert seen["sftp"] == seen["http"]
    assert ("pre-publish", "/f.txt") in seen["http"] and ("post-download", "/f.txt") in seen["http"]
    assert list(home.iterdir()) == []


def test_aiohttp_client_stream_upload_and_50_parallel_downloads(d):
    import aiohttp

    size = 16 * 1024 * 1024
    content = os.urandom(size)
    digest = hashlib.sha256(content).hexdigest()
    base = f"http://127.0.0.1:{d.ports['http']}"
    auth = {"Authorization": basic()}

    async def body():
        for i in range(0, size, 1 << 20):
            yield content[i:i + (1 << 20)]

    async def main() -> list[str]:
        timeout = aiohttp.ClientTimeout(total=300)
        async with aiohttp.ClientSession(headers=auth, timeout=timeout) as s:
            async with s.put(f"{base}/par.bin", data=body()) as r:  # chunked, streamed
                assert r.status == 201, await r.text()

            async def one() -> str:
                h = hashlib.sha256()
                async with s.get(f"{base}/par.bin") as r:
                    assert r.status == 200
                    async for chunk in r.content.iter_chunked(1 << 20):
                        h.update(chunk)
                return h.hexdigest()

            return await asyncio.gather(*(one() for _ in range(50)))

    results = asyncio.run(main())
    assert results == [digest] * 50
    assert (d.home("alice") / "par.bin").stat().st_size == size


def test_tls(daemons, tmp_path):
    require_tool("openssl")
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    d = daemons.start(HTTP_EXTRA + f'certificate = "{cert}"\nprivate_key = "{key}"\n')
    d.home("alice").mkdir(parents=True, exist_ok=True)
    (d.home("alice") / "t.txt").write_text("over tls\n")
    r = curl(d, "/t.txt", "--cacert", str(cert), scheme="https")
    assert r.status == 200 and r.body == b"over tls\n"
    old = subprocess.run(["curl", "-sS", "--cacert", str(cert), "--tls-max", "1.1", "-u", f"alice:{ALICE_PASSWORD}",
                          f"https://127.0.0.1:{d.ports['http']}/t.txt"], capture_output=True, timeout=30)
    assert old.returncode != 0
    plain = subprocess.run(["curl", "-sS", f"http://127.0.0.1:{d.ports['http']}/t.txt"], capture_output=True,
                           timeout=30)
    assert b"over tls" not in plain.stdout


def test_uploaded_html_is_served_sandboxed(d):
    """A user's uploaded HTML must not run script in the server's origin: the browser
    sends Basic credentials with every same-origin request, so a script in one file could
    read, overwrite or delete whatever the user viewing it may reach (stored XSS)."""
    page = b"<html><script>fetch('/').then(r => r.text()).then(t => fetch('/stolen', {method: 'PUT', body: t}))</script>"
    assert request(d, "PUT", "/xss.html", page).status in (201, 204)
    for method in ("GET", "HEAD"):
        r = request(d, method, "/xss.html")
        assert r.status == 200
        assert r.headers.get("x-content-type-options") == "nosniff"
        assert "sandbox" in r.headers.get("content-security-policy", ""), r.headers
    ranged = request(d, "GET", "/xss.html", headers={"Range": "bytes=0-5"})
    assert ranged.status == 206 and "sandbox" in ranged.headers.get("content-security-policy", "")


def test_non_ascii_digits_in_headers_are_not_a_500(d):
    """str.isdigit() accepts digits like '²' that int() refuses: a Range or LOCK Timeout
    holding one raised ValueError out of the handler (500 and a traceback in the log)."""
    (d.home("alice") / "digits.txt").write_text("hello")
    weird = "\u00b2".encode().decode("latin-1")  # the UTF-8 bytes of '²', as http.client sends str
    r = request(d, "GET", "/digits.txt", headers={"Range": f"bytes={weird}-"})
    assert r.status == 200 and r.body == b"hello"
    r = request(d, "GET", "/digits.txt", headers={"Range": f"bytes=0-{weird}"})
    assert r.status == 200 and r.body == b"hello"
    r = request(d, "LOCK", "/digits.txt", headers={"Timeout": f"Second-{weird}", "If": "(<opaquelocktoken:x>)"})
    assert r.status == 412

"""Path traversal corpus over HTTP/WebDAV: every attempt to leave the home must fail.

The request line is sent exactly as written (http.client, no normalisation):
encoded dots and slashes, backslashes, double encoding, overlong UTF-8, NUL,
absolute-form targets, host paths, links planted on the host, staging names,
overlong names and paths, and COPY/MOVE destinations. Afterwards nothing outside
the home was changed or created, and the secret never appeared in a response.
"""

from __future__ import annotations

import os
import stat

import pytest

from conftest import BOB_PASSWORD, plant_hostile_home, user_toml
from httpkit import HTTP_EXTRA, request

SECRET = b"TOP-SECRET-outside-the-home-http-51c\n"
MARKER = b"marker: must stay exactly like this\n"


@pytest.fixture(scope="module")
def world(module_daemons, password_hashes):
    users = (
        user_toml("alice", password_hash=password_hashes["alice"])
        + user_toml("bob", password_hash=password_hashes["bob"],
                    permissions='{ "/" = ["list", "download"], "/inbox" = ["*"] }',
                    filters='[{ path = "/", denied = ["*.hidden"], policy = "hide" },'
                            ' { path = "/vault", denied = ["*"], policy = "hide" }]')
    )
    d = module_daemons.start(HTTP_EXTRA, users=users)
    outside = module_daemons.root / "outside"
    plant_hostile_home(d.home("alice"), outside, SECRET, MARKER)
    bhome = d.home("bob")
    (bhome / "inbox").mkdir(parents=True)
    (bhome / "notes.hidden").write_text("hidden from bob\n")
    (bhome / "vault").mkdir()
    (bhome / "vault" / "plans.txt").write_text("hidden from bob too\n")
    return d, outside


def _snapshot(directory):
    out = {}
    for name in sorted(os.listdir(directory)):
        st = os.lstat(directory / name)
        data = (directory / name).read_bytes() if stat.S_ISREG(st.st_mode) else None
        out[name] = (st.st_mode, st.st_size, st.st_mtime_ns, data)
    return out


@pytest.fixture
def untouched(world):
    d, outside = world
    home = d.home("alice")
    before, home_before, etc_before = _snapshot(outside), sorted(os.listdir(home)), set(os.listdir("/etc"))
    yield d
    assert _snapshot(outside) == before, "something outside the home changed"
    assert sorted(os.listdir(home)) == home_before
    assert (home / "sub" / "inside.txt").read_text() == "inside\n"
    assert (home / ".scriptsftp-part-planted").read_bytes() == b"staged bytes\n"
    assert set(os.listdir("/etc")) == etc_before


def _outside_path(world) -> str:
    return str(world[1] / "secret.txt")


READ_CORPUS = [
    "/../outside/secret.txt",
    "/../../outside/secret.txt",
    "/sub/../../../outside/secret.txt",
    "/..%2f..%2foutside%2fsecret.txt",
    "/%2e%2e/%2e%2e/outside/secret.txt",
    "/%2E%2E%2F%2E%2E%2Foutside%2Fsecret.txt",
    "/..\\..\\outside\\secret.txt",
    "/..%5c..%5coutside%5csecret.txt",
    "/%252e%252e/%252e%252e/outside/secret.txt",
    "/%c0%ae%c0%ae/%c0%ae%c0%ae/outside/secret.txt",
    "/%e0%80%ae%e0%80%ae/outside/secret.txt",
    "/etc/passwd",
    "//etc/passwd",
    "http://127.0.0.1/../../outside/secret.txt",
    "../outside/secret.txt",
    "*",
    "/etc_link/passwd",
    "/etc_link/../etc/passwd",
    "/abs_out/secret.txt",
    "/abs_out/marker.txt",
    "/secret_link",
    "/rel_out/secret.txt",
    "/sub/rel_secret",
    "/loop_a",
    "/loop_a/x",
    "/.scriptsftp-part-planted",
    "/sub/../.scriptsftp-part-planted",
    "/%2escriptsftp-part-planted",
    "/ok%00/../../outside/secret.txt",
    "/sub/inside.txt%00.png",
    "/" + "a" * 256,
    "/" + "sub/" * 1100 + "x",
]


@pytest.mark.parametrize("path", READ_CORPUS, ids=[repr(p)[:40] for p in READ_CORPUS])
def test_read_corpus(untouched, path):
    for method, headers in (("GET", {}), ("HEAD", {}), ("PROPFIND", {"Depth": "0"}), ("PROPFIND", {"Depth": "1"}),
                            ("GET", {"Accept": "application/json"})):
        r = request(untouched, method, path, headers=headers)
        assert r.status >= 400, (method, path, r.status, r.body[:200])
        assert SECRET.strip() not in r.body


def test_host_paths_are_not_guessable(world, untouched):
    d, outside = world
    for path in (str(outside / "secret.txt"), str(outside), str(d.home("alice"))):
        r = request(d, "GET", path)
        assert r.status == 404 and SECRET.strip() not in r.body


def test_outward_links_are_not_offered_in_propfind(untouched):
    r = request(untouched, "PROPFIND", "/", headers={"Depth": "1"})
    assert r.status == 207
    for name in (b"etc_link", b"abs_out", b"secret_link", b"rel_out", b"loop_a", b"scriptsftp-part"):
        assert name not in r.body
    assert b"/sub/" in r.body


WRITE_CORPUS = [
    "/../outside/evil.txt",
    "/../../outside/evil.txt",
    "/%2e%2e/%2e%2e/outside/evil.txt",
    "/..%2f..%2foutside%2fevil.txt",
    "/..\\..\\outside\\evil.txt",
    "/abs_out/evil.txt",
    "/rel_out/evil.txt",
    "/etc_link/evil.txt",
    "/secret_link",
    "/sub/rel_secret",
    "/.scriptsftp-part-planted",
    "/.scriptsftp-part-new",
    "/loop_a",
    "/evil%00.txt",
    "/" + "x" * 256,
    "/bad%0aname",
    "/bad%0d%0aSet-Cookie:%20x",
]


@pytest.mark.parametrize("path", WRITE_CORPUS, ids=[repr(p)[:40] for p in WRITE_CORPUS])
def test_write_corpus(world, untouched, path):
    d, outside = world
    port = d.ports["http"]
    links = ("/secret_link", "/sub/rel_secret", "/loop_a")  # links inside the home: replacing them is fine
    attempts = [
        ("PUT", path, b"evil\n", {}),
        ("MKCOL", path, None, {}),
        ("PROPPATCH", path, b'<D:propertyupdate xmlns:D="DAV:"><D:set><D:prop><D:getlastmodified>'
                            b"Tue, 15 Nov 1994 12:45:26 GMT</D:getlastmodified></D:prop></D:set></D:propertyupdate>",
         {}),
        ("LOCK", path, b'<D:lockinfo xmlns:D="DAV:"><D:lockscope><D:exclusive/></D:lockscope>'
                       b"<D:locktype><D:write/></D:locktype></D:lockinfo>", {}),
        ("COPY", "/sub/inside.txt", None, {"Destination": path}),
        ("MOVE", "/sub/inside.txt", None, {"Destination": path, "Overwrite": "F" if path in links else "T"}),
        ("COPY", "/sub/inside.txt", None, {"Destination": f"http://127.0.0.1:{port}{path}"}),
        ("COPY", path, None, {"Destination": "/sub/copied.txt"}),
    ]
    if path not in links:
        attempts.append(("DELETE", path, None, {}))
    for method, target, body, headers in attempts:
        r = request(d, method, target, body, headers)
        assert r.status >= 400, (method, target, headers, r.status, r.body[:200])
        assert SECRET.strip() not in r.body
    assert not (outside / "evil.txt").exists()
    assert not (d.home("alice") / "sub" / "copied.txt").exists()


def test_filters_apply_over_http(world):
    d, _ = world
    bob = {"user": "bob", "password": BOB_PASSWORD}
    assert request(d, "GET", "/notes.hidden", **bob).status == 404
    assert request(d, "GET", "/vault/plans.txt", **bob).status == 404
    vault = request(d, "PROPFIND", "/vault", headers={"Depth": "1"}, **bob)  # the filter hides what is inside
    assert vault.status == 207 and b"plans" not in vault.body
    listing = request(d, "GET", "/?format=json", **bob)
    assert listing.status == 200 and b"hidden" not in listing.body
    props = request(d, "PROPFIND", "/", headers={"Depth": "1"}, **bob)
    assert props.status == 207 and b"hidden" not in props.body
    assert request(d, "PUT", "/x.txt", b"x", **bob).status == 403
    assert request(d, "PUT", "/inbox/y.hidden", b"x", **bob).status == 404

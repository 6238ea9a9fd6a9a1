"""WebDAV over a real daemon: the verbs with curl/http.client, multistatus XML, locks, rclone.

rclone's webdav backend is configured through environment variables only
(RCLONE_CONFIG_DAV_*), with the password passed through ``rclone obscure``.
"""

from __future__ import annotations

import os
import subprocess
import xml.etree.ElementTree as ET

import pytest

from conftest import ALICE_PASSWORD, require_tool
from httpkit import HTTP_EXTRA, curl, request, staged

D = "{DAV:}"


@pytest.fixture(scope="module")
def d(module_daemons):
    daemon = module_daemons.start(HTTP_EXTRA)
    for u in ("alice", "bob"):
        daemon.home(u).mkdir(parents=True, exist_ok=True)
    (daemon.home("bob") / "inbox").mkdir(exist_ok=True)
    return daemon


@pytest.fixture
def home(d, request):
    """A fresh directory of alice's home for one test, as its virtual path and host path."""
    name = request.node.name.replace("[", "_").replace("]", "")
    path = d.home("alice") / name
    path.mkdir()
    return "/" + name, path


def ms(resp) -> dict[str, dict[str, tuple[str, ET.Element]]]:
    """Parse a multistatus into {href: {prop tag: (status, element)}}."""
    assert resp.status == 207, (resp.status, resp.text)
    root = ET.fromstring(resp.body)
    assert root.tag == D + "multistatus"
    out: dict[str, dict[str, tuple[str, ET.Element]]] = {}
    for r in root.findall(D + "response"):
        href = r.findtext(D + "href")
        props: dict[str, tuple[str, ET.Element]] = {}
        for ps in r.findall(D + "propstat"):
            status = ps.findtext(D + "status")
            for p in ps.find(D + "prop"):
                props[p.tag] = (status, p)
        out[href] = props
    return out


def test_options_advertises_dav(d):
    r = request(d, "OPTIONS", "/", user=None)
    assert r.status == 200
    assert r.headers["dav"] == "1, 2"
    for m in ("PROPFIND", "PROPPATCH", "MKCOL", "COPY", "MOVE", "LOCK", "UNLOCK", "PUT", "DELETE"):
        assert m in r.headers["allow"]


def test_propfind_depth_0_and_1(d, home):
    vp, path = home
    (path / "a b&c.txt").write_bytes(b"12345")
    (path / "ünï.txt").write_bytes(b"x")
    (path / "sub").mkdir()
    one = ms(request(d, "PROPFIND", vp + "/", headers={"Depth": "1"}))
    assert set(one) == {vp + "/", vp + "/a%20b&c.txt", vp + "/%C3%BCn%C3%AF.txt", vp + "/sub/"}
    me = one[vp + "/"]
    assert me[D + "resourcetype"][1].find(D + "collection") is not None
    f = one[vp + "/a%20b&c.txt"]
    assert f[D + "getcontentlength"][1].text == "5"
    assert f[D + "resourcetype"][1].find(D + "collection") is None
    assert f[D + "getetag"][1].text.startswith('"')
    assert f[D + "getlastmodified"][1].text.endswith("GMT")
    zero = ms(request(d, "PROPFIND", vp + "/sub", headers={"Depth": "0"}))
    assert list(zero) == [vp + "/sub/"]


def test_propfind_named_props_and_404_propstat(d, home):
    vp, path = home
    (path / "f.txt").write_bytes(b"abc")
    body = (b'<?xml version="1.0"?><D:propfind xmlns:D="DAV:" xmlns:X="urn:x"><D:prop>'
            b'<D:getcontentlength/><X:color/><D:quota-available-bytes/></D:prop></D:propfind>')
    res = ms(request(d, "PROPFIND", vp + "/f.txt", body, {"Depth": "0", "Content-Type": "application/xml"}))
    props = res[vp + "/f.txt"]
    assert props[D + "getcontentlength"][0] == "HTTP/1.1 200 OK"
    assert props["{urn:x}color"][0] == "HTTP/1.1 404 Not Found"
    assert int(props[D + "quota-available-bytes"][1].text) > 0
    names = ms(request(d, "PROPFIND", vp + "/f.txt", b'<propfind xmlns="DAV:"><propname/></propfind>',
                       {"Depth": "0"}))
    assert all(el.text is None and len(el) == 0 for _, el in names[vp + "/f.txt"].values())


def test_propfind_infinity_is_refused(d):
    for headers in ({"Depth": "infinity"}, {}):
        r = request(d, "PROPFIND", "/", headers=headers)
        assert r.status == 403
        assert ET.fromstring(r.body).find(D + "propfind-finite-depth") is not None
    assert request(d, "PROPFIND", "/", headers={"Depth": "2"}).status == 400


def test_xml_bombs_and_oversized_bodies_are_refused(d):
    bomb = (b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;">]>'
            b'<D:propfind xmlns:D="DAV:"><D:prop><D:displayname>&lol2;</D:displayname></D:prop></D:propfind>')
    r = request(d, "PROPFIND", "/", bomb, {"Depth": "0"})
    assert r.status == 400 and "DOCTYPE" in r.text
    external = (b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]>'
                b'<D:propfind xmlns:D="DAV:"><D:allprop/></D:propfind>')
    assert request(d, "PROPFIND", "/", external, {"Depth": "0"}).status == 400
    utf16 = '<?xml version="1.0" encoding="UTF-16"?><!DOCTYPE x [<!ENTITY a "b">]><x/>'.encode("utf-16")
    assert request(d, "PROPPATCH", "/", utf16).status == 400
    assert request(d, "PROPFIND", "/", b"<not xml", {"Depth": "0"}).status == 400
    huge = b'<D:propfind xmlns:D="DAV:"><D:prop>' + b"<D:displayname/>" * 40000 + b"</D:prop></D:propfind>"
    assert request(d, "PROPFIND", "/", huge, {"Depth": "0"}).status == 413


def _proppatch(prop_xml: str) -> bytes:
    return (f'<?xml version="1.0"?><D:propertyupdate xmlns:D="DAV:" xmlns:Z="urn:schemas-microsoft-com:">'
            f"<D:set><D:prop>{prop_xml}</D:prop></D:set></D:propertyupdate>").encode()


def test_proppatch_sets_times(d, home):
    vp, path = home
    f = path / "t.txt"
    f.write_text("t")
    res = ms(request(d, "PROPPATCH", vp + "/t.txt",
                     _proppatch("<D:getlastmodified>Tue, 15 Nov 1994 12:45:26 GMT</D:getlastmodified>")))
    assert res[vp + "/t.txt"][D + "getlastmodified"][0].endswith("200 OK")
    assert int(f.stat().st_mtime) == 784903526
    # what Windows Explorer sends after a copy
    res = ms(request(d, "PROPPATCH", vp + "/t.txt", _proppatch(
        "<Z:Win32CreationTime>Wed, 01 Jan 2020 00:00:00 GMT</Z:Win32CreationTime>"
        "<Z:Win32LastModifiedTime>Thu, 02 Jan 2020 00:00:00 GMT</Z:Win32LastModifiedTime>"
        "<Z:Win32FileAttributes>00000020</Z:Win32FileAttributes>")))
    assert all(s.endswith("200 OK") for s, _ in res[vp + "/t.txt"].values())
    assert int(f.stat().st_mtime) == 1577923200
    # a property we cannot store fails, and makes the whole request fail (atomic)
    res = ms(request(d, "PROPPATCH", vp + "/t.txt", _proppatch(
        '<D:getlastmodified>Tue, 15 Nov 1994 12:45:26 GMT</D:getlastmodified><X:c xmlns:X="urn:x">red</X:c>')))
    assert res[vp + "/t.txt"]["{urn:x}c"][0].endswith("403 Forbidden")
    assert res[vp + "/t.txt"][D + "getlastmodified"][0].endswith("424 Failed Dependency")
    assert int(f.stat().st_mtime) == 1577923200


def test_mkcol(d, home):
    vp, path = home
    assert request(d, "MKCOL", vp + "/new").status == 201
    assert (path / "new").is_dir()
    assert request(d, "MKCOL", vp + "/new").status == 405
    assert request(d, "MKCOL", vp + "/missing/new").status == 409
    assert request(d, "MKCOL", vp + "/withbody", b"<x/>").status == 415
    assert request(d, "MKCOL", "/inbox2", user="bob", password="bob-Secret-2").status == 403


def test_copy_move_overwrite_and_destination_parsing(d, home):
    vp, path = home
    (path / "a.txt").write_text("A")
    (path / "b.txt").write_text("B")
    port = d.ports["http"]
    r = request(d, "COPY", vp + "/a.txt", headers={"Destination": f"http://127.0.0.1:{port}{vp}/c%20c.txt"})
    assert r.status == 201 and (path / "c c.txt").read_text() == "A"
    r = request(d, "COPY", vp + "/a.txt", headers={"Destination": f"{vp}/b.txt", "Overwrite": "F"})
    assert r.status == 412 and (path / "b.txt").read_text() == "B"
    r = request(d, "COPY", vp + "/a.txt", headers={"Destination": f"{vp}/b.txt"})
    assert r.status == 204 and (path / "b.txt").read_text() == "A"
    r = request(d, "MOVE", vp + "/b.txt", headers={"Destination": f"{vp}/a.txt", "Overwrite": "F"})
    assert r.status == 412
    (path / "b.txt").write_text("B2")
    r = request(d, "MOVE", vp + "/b.txt", headers={"Destination": f"{vp}/a.txt"})
    assert r.status == 204 and (path / "a.txt").read_text() == "B2" and not (path / "b.txt").exists()
    # another server, a missing parent, the same resource, a directory into itself
    assert request(d, "COPY", vp + "/a.txt", headers={"Destination": "http://elsewhere.example/x"}).status == 502
    assert request(d, "MOVE", vp + "/a.txt", headers={"Destination": f"{vp}/no/such/x"}).status == 409
    assert request(d, "MOVE", vp + "/a.txt", headers={"Destination": f"{vp}/a.txt"}).status == 403
    assert request(d, "COPY", vp + "/a.txt").status == 400
    # a tree
    (path / "t" / "s").mkdir(parents=True)
    (path / "t" / "s" / "deep.txt").write_text("deep")
    assert request(d, "COPY", vp + "/t", headers={"Destination": f"{vp}/t2"}).status == 201
    assert (path / "t2" / "s" / "deep.txt").read_text() == "deep"
    assert request(d, "COPY", vp + "/t", headers={"Destination": f"{vp}/t/inner"}).status == 409
    assert request(d, "MOVE", vp + "/t2", headers={"Destination": f"{vp}/t3/"}).status == 201
    assert (path / "t3" / "s" / "deep.txt").read_text() == "deep" and not (path / "t2").exists()
    assert request(d, "COPY", vp + "/t", headers={"Destination": f"{vp}/t3", "Depth": "0"}).status == 204
    assert (path / "t3").is_dir() and list((path / "t3").iterdir()) == []
    assert staged(path) == []


def test_delete_tree(d, home):
    vp, path = home
    (path / "x" / "y").mkdir(parents=True)
    (path / "x" / "y" / "f").write_text("f")
    (path / "x" / "g").write_text("g")
    assert request(d, "DELETE", vp + "/x", headers={"Depth": "0"}).status == 400
    assert request(d, "DELETE", vp + "/x").status == 204
    assert not (path / "x").exists()
    assert request(d, "DELETE", vp + "/x").status == 404


LOCKINFO = (b'<?xml version="1.0" encoding="utf-8"?><D:lockinfo xmlns:D="DAV:"><D:lockscope><D:exclusive/>'
            b"</D:lockscope><D:locktype><D:write/></D:locktype><D:owner><D:href>me</D:href></D:owner></D:lockinfo>")


def test_lock_unlock(d, home):
    vp, path = home
    (path / "doc.txt").write_text("doc")
    r = request(d, "LOCK", vp + "/doc.txt", LOCKINFO, {"Timeout": "Second-600"})
    assert r.status == 200
    token = r.headers["lock-token"].strip("<>")
    assert token.startswith("opaquelocktoken:")
    root = ET.fromstring(r.body)
    assert root.find(f"{D}lockdiscovery/{D}activelock/{D}locktoken/{D}href").text == token
    assert root.find(f"{D}lockdiscovery/{D}activelock/{D}timeout").text == "Second-600"
    # a second exclusive lock is refused; the lock shows in PROPFIND
    assert request(d, "LOCK", vp + "/doc.txt", LOCKINFO).status == 423
    props = ms(request(d, "PROPFIND", vp + "/doc.txt", headers={"Depth": "0"}))[vp + "/doc.txt"]
    assert props[D + "lockdiscovery"][1].find(f"{D}activelock/{D}locktoken/{D}href").text == token
    # refresh (no body, token in If)
    assert request(d, "LOCK", vp + "/doc.txt", headers={"If": f"(<{token}>)"}).status == 200
    assert request(d, "LOCK", vp + "/doc.txt", headers={"If": "(<opaquelocktoken:nope>)"}).status == 412
    # writes are not blocked by the (advisory) lock
    assert request(d, "PUT", vp + "/doc.txt", b"new", {"If": f"(<{token}>)"}).status == 204
    assert request(d, "UNLOCK", vp + "/doc.txt", headers={"Lock-Token": "<opaquelocktoken:nope>"}).status == 409
    assert request(d, "UNLOCK", vp + "/doc.txt", headers={"Lock-Token": f"<{token}>"}).status == 204
    assert request(d, "LOCK", vp + "/doc.txt", LOCKINFO).status == 200
    # LOCK on an unmapped URL creates an empty file (as an ordinary upload)
    r = request(d, "LOCK", vp + "/fresh.txt", LOCKINFO)
    assert r.status == 201 and (path / "fresh.txt").read_bytes() == b""
    assert request(d, "LOCK", vp + "/no/parent.txt", LOCKINFO).status == 409


def test_webdav_verbs_with_curl(d, home, tmp_path):
    vp, path = home
    src = tmp_path / "c.txt"
    src.write_text("curl\n")
    assert curl(d, vp + "/dir", "-X", "MKCOL").status == 201
    assert curl(d, vp + "/dir/c.txt", "-T", str(src)).status == 201
    r = curl(d, vp + "/dir/", "-X", "PROPFIND", "-H", "Depth: 1")
    assert r.status == 207 and b"c.txt" in r.body
    assert curl(d, vp + "/dir/c.txt", "-X", "MOVE", "-H", f"Destination: {vp}/dir/d.txt").status == 201
    assert curl(d, vp + "/dir/d.txt", "-X", "COPY", "-H", f"Destination: {vp}/e.txt").status == 201
    assert curl(d, vp + "/dir", "-X", "DELETE").status == 204
    assert sorted(p.name for p in path.iterdir()) == ["e.txt"]


def _rclone(d, *args: str, check: bool = True, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    rclone = require_tool("rclone")
    obscured = subprocess.run([rclone, "obscure", ALICE_PASSWORD], capture_output=True, text=True,
                              check=True).stdout.strip()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RCLONE_")}
    env.update(RCLONE_CONFIG_DAV_TYPE="webdav", RCLONE_CONFIG_DAV_URL=f"http://127.0.0.1:{d.ports['http']}/",
               RCLONE_CONFIG_DAV_VENDOR="other", RCLONE_CONFIG_DAV_USER="alice", RCLONE_CONFIG_DAV_PASS=obscured,
               RCLONE_CONFIG="/dev/null")
    proc = subprocess.run([rclone, *args], capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"rclone {args} failed:\n{proc.stdout}\n{proc.stderr}\n--- log:\n" + d.log_text()[-3000:])
    return proc


def test_rclone_copy_ls_check_delete(d, home, tmp_path):
    vp, path = home
    local = tmp_path / "tree"
    files = {}
    for i in range(30):
        sub = local / f"d{i % 4}" / ("deep" if i % 3 == 0 else "")
        sub.mkdir(parents=True, exist_ok=True)
        data = os.urandom(1000 * i + 1)
        (sub / f"f {i}.bin").write_bytes(data)
        files[(sub / f"f {i}.bin").relative_to(local).as_posix()] = data
    (local / "big.bin").write_bytes(os.urandom(5 * 1024 * 1024))
    files["big.bin"] = (local / "big.bin").read_bytes()
    _rclone(d, "copy", str(local), f"dav:{vp}")
    for rel, data in files.items():
        assert (path / rel).read_bytes() == data
    listing = _rclone(d, "ls", f"dav:{vp}").stdout
    assert len(listing.strip().splitlines()) == len(files)
    _rclone(d, "check", str(local), f"dav:{vp}")
    (path / "d1" / "f 1.bin").write_bytes(b"changed")
    assert _rclone(d, "check", str(local), f"dav:{vp}", check=False).returncode != 0
    back = tmp_path / "back"
    _rclone(d, "copy", f"dav:{vp}/d2", str(back))
    assert (back / "f 2.bin").read_bytes() == files["d2/f 2.bin"]
    _rclone(d, "delete", f"dav:{vp}/d0")
    assert not any(p.is_file() for p in (path / "d0").rglob("*"))
    _rclone(d, "purge", f"dav:{vp}/d3")
    assert not (path / "d3").exists()
    assert staged(path) == []


def test_cadaver(d, home, tmp_path):
    cadaver = require_tool("cadaver")
    vp, path = home
    (tmp_path / "up.txt").write_text("via cadaver\n")
    netrc = tmp_path / ".netrc"
    netrc.write_text(f"machine 127.0.0.1 login alice password {ALICE_PASSWORD}\n")
    netrc.chmod(0o600)
    script = f"cd {vp}\nput {tmp_path / 'up.txt'} up.txt\nmkcol sub\nls\nquit\n"
    proc = subprocess.run([cadaver, f"http://127.0.0.1:{d.ports['http']}/"], input=script, text=True,
                          capture_output=True, timeout=60, env={**os.environ, "HOME": str(tmp_path)})
    assert (path / "up.txt").read_text() == "via cadaver\n", proc.stdout + proc.stderr
    assert (path / "sub").is_dir()
    assert "up.txt" in proc.stdout


def test_the_home_itself_cannot_be_deleted_or_overwritten(d, home):
    vp, path = home
    (path / "keep.txt").write_text("keep")
    assert request(d, "DELETE", "/").status == 403
    assert request(d, "DELETE", "/%2e%2e/").status == 403
    assert request(d, "COPY", vp + "/keep.txt", headers={"Destination": "/"}).status == 403
    assert request(d, "MOVE", vp, headers={"Destination": "/../"}).status == 403
    assert (path / "keep.txt").read_text() == "keep"
    r = request(d, "OPTIONS", "*", user=None)
    assert r.status == 200 and r.headers["dav"] == "1, 2"


def test_locks_are_bounded_per_user(d):
    """LOCK keeps state in the daemon's memory for up to a day: shared locks on one path
    (or locks on many paths), each with an owner element of up to the XML body limit, must
    not let one user grow the daemon without bound."""
    import http.client

    from httpkit import basic
    from conftest import BOB_PASSWORD

    shared = (b'<?xml version="1.0" encoding="utf-8"?><D:lockinfo xmlns:D="DAV:"><D:lockscope><D:shared/>'
              b"</D:lockscope><D:locktype><D:write/></D:locktype><D:owner>%s</D:owner></D:lockinfo>")
    (d.home("bob") / "many.txt").write_text("x")
    conn = http.client.HTTPConnection("127.0.0.1", d.ports["http"], timeout=30)
    auth = {"Authorization": basic("bob", BOB_PASSWORD), "Timeout": "Second-600"}
    try:
        def lock(owner: bytes) -> int:
            conn.request("LOCK", "/many.txt", shared % owner, auth)
            r = conn.getresponse()
            r.read()
            return r.status

        # a huge owner element is not kept
        assert lock(b"<D:href>" + b"o" * 200_000 + b"</D:href>") == 400
        statuses = [lock(b"<D:href>bob</D:href>") for _ in range(3000)]
    finally:
        conn.close()
    assert statuses[0] == 200
    refused = [s for s in statuses if s != 200]
    assert refused and set(refused) == {503}, sorted(set(statuses))
    assert statuses.index(503) <= 1024


def test_copy_does_not_follow_directory_links(d, home):
    """COPY of a tree holding links to directories (here to the tree's own parent, twice)
    followed them: an endless, exponential copy that held a pool thread and filled the disk."""
    vp, path = home
    (path / "c").mkdir()
    (path / "c" / "f.txt").write_text("x")
    (path / "c" / "sub").mkdir()
    (path / "c" / "sub" / "g.txt").write_text("y")
    os.symlink("..", path / "c" / "up1")
    os.symlink("..", path / "c" / "up2")
    os.symlink("f.txt", path / "c" / "flink")
    r = request(d, "COPY", vp + "/c", headers={"Destination": vp + "/c2"}, timeout=20)
    assert r.status == 207, (r.status, r.text)
    assert b"up1" in r.body and b"up2" in r.body
    assert sorted(p.name for p in (path / "c2").iterdir()) == ["f.txt", "flink", "sub"]
    assert (path / "c2" / "sub" / "g.txt").read_text() == "y"
    assert (path / "c2" / "flink").read_text() == "x" and not (path / "c2" / "flink").is_symlink()

"""One operation list, three protocols, identical events (issue 5).

The same session (log in with a password, mkdir, upload, download, rename, an
upload vetoed in pre-publish, delete, rmdir, log out) is walked over SFTP, FTP
and HTTP/WebDAV against one daemon. A script bound to every connection and file
event logs each event with all its fields; the three recordings must be equal
except for what naturally differs: when, which connection, the protocol and
the local port. Events are raised by the Session and the login core, never by
a front end (docs/architecture.md rules 1-3): this test is what holds them to it.
"""

from __future__ import annotations

import ast
import ftplib
import http.client
import io
import json
import re

import pytest

from conftest import ALICE_PASSWORD, close_client, sftp_event_walk
from httpkit import HTTP_EXTRA, basic

EVENTS = ("connect", "pre-login", "post-login", "disconnect",
          "pre-upload", "pre-publish", "post-upload", "upload-failed", "pre-download", "post-download",
          "pre-delete", "post-delete", "pre-rename", "post-rename", "pre-mkdir", "post-mkdir",
          "pre-rmdir", "post-rmdir")

SCRIPT = """
def record(event, api):
    api.log("EV " + repr(event))

def veto_marker(event, api):
    api.log("EV " + repr(event))
    if b"VETO-ME" in api.file.read(65536):
        api.veto("no VETO-ME here")
"""

# what may differ between two walks of the same session
VOLATILE = {"time", "session_id", "protocol", "remote_ip", "local_port", "duration"}


@pytest.fixture
def d(daemons):
    (daemons.root / "scripts").mkdir(parents=True, exist_ok=True)
    (daemons.root / "scripts" / "rec.py").write_text(SCRIPT)
    binds = "".join(f'\n[[bindings]]\nevent = "{e}"\nscript = "rec.py"\nfunction = "record"\n'
                    for e in EVENTS)
    binds += '\n[[bindings]]\nevent = "pre-publish"\nscript = "rec.py"\nfunction = "veto_marker"\nallow = ["read"]\n'
    ftp = '\n[ftp]\nenabled = true\nlisten = "127.0.0.1:0"\npassive_ports = "62500-62599"\n'
    daemon = daemons.start(binds + ftp + "\n" + HTTP_EXTRA)
    daemon.home("alice").mkdir(parents=True, exist_ok=True)
    return daemon


def sftp_walk(d) -> None:
    import paramiko

    t = paramiko.Transport(("127.0.0.1", d.ports["sftp"]))
    t.connect(username="alice", password=ALICE_PASSWORD)
    c = paramiko.SFTPClient.from_transport(t)
    try:
        sftp_event_walk(c)
    finally:
        close_client(c)


def ftp_walk(d) -> None:
    c = ftplib.FTP()
    c.connect("127.0.0.1", d.ports["ftp"], timeout=30)
    c.login("alice", ALICE_PASSWORD)
    try:
        c.mkd("/w")
        c.storbinary("STOR /w/a.txt", io.BytesIO(b"0123456789"))
        got = bytearray()
        c.retrbinary("RETR /w/a.txt", got.extend)
        assert bytes(got) == b"0123456789"
        c.rename("/w/a.txt", "/w/b.txt")
        with pytest.raises(ftplib.error_perm, match="no VETO-ME here"):
            c.storbinary("STOR /w/b.txt", io.BytesIO(b"VETO-ME"))
        c.delete("/w/b.txt")
        c.rmd("/w")
    finally:
        c.quit()


def http_walk(d) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", d.ports["http"], timeout=30)  # one keep-alive connection

    def req(method: str, path: str, body: bytes | None = None, **headers: str) -> tuple[int, bytes]:
        conn.request(method, path, body=body, headers={"Authorization": basic(), **headers})
        r = conn.getresponse()
        return r.status, r.read()

    try:
        assert req("MKCOL", "/w")[0] == 201
        assert req("PUT", "/w/a.txt", b"0123456789")[0] == 201
        assert req("GET", "/w/a.txt") == (200, b"0123456789")
        assert req("MOVE", "/w/a.txt", Destination="/w/b.txt")[0] == 201
        status, body = req("PUT", "/w/b.txt", b"VETO-ME")
        assert status == 403 and b"no VETO-ME here" in body
        assert req("DELETE", "/w/b.txt")[0] == 204
        assert req("DELETE", "/w")[0] == 204
    finally:
        conn.close()


def recorded(d, start: int, protocol: str) -> list[dict]:
    out = []
    with d._cond:
        lines = d.lines[start:]
    for line in lines:
        m = re.search(r"rec\.py: EV (event\(.*\))", line)  # the log line may go on with event_id=...
        if m:
            ev = _parse(m.group(1))
            assert ev["protocol"] == protocol, ev
            out.append({k: v for k, v in ev.items() if k not in VOLATILE})
    return out


def test_one_session_raises_identical_events_over_sftp_ftp_and_http(d):
    walks = {"sftp": sftp_walk, "ftp": ftp_walk, "http": http_walk}
    seen: dict[str, list[dict]] = {}
    for protocol, walk in walks.items():
        mark = len(d.lines)
        walk(d)
        d.wait_log(r"rec\.py: EV event\(.*name='disconnect'", start=mark, timeout=30)
        seen[protocol] = sorted(recorded(d, mark, protocol), key=lambda e: json.dumps(e, sort_keys=True))
    names = {e["name"] for e in seen["sftp"]}
    assert set(EVENTS) <= names, f"missing over SFTP: {set(EVENTS) - names}"
    assert seen["ftp"] == seen["sftp"], _diff(seen["sftp"], seen["ftp"])
    assert seen["http"] == seen["sftp"], _diff(seen["sftp"], seen["http"])


def _parse(text: str) -> dict:
    """``event(name='x', size=3, ...)`` (the script's repr of its event) back into a dict."""
    call = ast.parse(text, mode="eval").body
    assert isinstance(call, ast.Call)
    return {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}


def _diff(a: list[dict], b: list[dict]) -> str:
    ja = {json.dumps(e, sort_keys=True) for e in a}
    jb = {json.dumps(e, sort_keys=True) for e in b}
    return "only over SFTP:\n  " + "\n  ".join(sorted(ja - jb)) + "\nonly over the other:\n  " + \
        "\n  ".join(sorted(jb - ja))

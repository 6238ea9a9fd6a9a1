"""HTTP listener under slow scripts and at shutdown.

- a PUT waiting seconds for its pre-publish verdict does not stall other
  clients (the loop hands blocking Session calls to thread pools);
- async pre-publish over HTTP: the PUT is answered at once, HEAD shows the size
  while the check runs, GET answers 404 until the verdict;
- SIGTERM with an upload in progress: the connection is closed after the grace
  period, nothing is published, no staging file is left, the daemon exits 0.
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import threading
import time

from httpkit import HTTP_EXTRA, basic, request, staged

HOLD = 4.0
SCRIPT = """
import time

def on_pre_publish(event, api):
    end = time.time() + {hold}
    while time.time() < end:
        pass
    if b"VIRUS" in api.file.read(65536):
        api.veto("infected: " + event.path)
"""


def _start(daemons, mode: str):
    (daemons.root / "scripts").mkdir(parents=True, exist_ok=True)
    (daemons.root / "scripts" / "slow.py").write_text(SCRIPT.format(hold=HOLD))
    binding = (f'[[bindings]]\nevent = "pre-publish"\nscript = "slow.py"\nmode = "{mode}"\nallow = ["read"]\n'
               f'paths = ["/slow/**"]\ntimeout = {HOLD + 30}\ncpu_time = {HOLD + 20}\n')
    d = daemons.start(HTTP_EXTRA + binding)
    (d.home("alice") / "slow").mkdir(parents=True)
    (d.home("alice") / "fast.txt").write_bytes(b"fast\n" * 1000)
    return d


def _wait_for(condition, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_slow_verdict_does_not_stall_other_clients(daemons):
    d = _start(daemons, "sync")
    result: dict[str, object] = {}

    def slow_put() -> None:
        t0 = time.monotonic()
        r = request(d, "PUT", "/slow/x.txt", b"VIRUS inside\n" * 100)
        result["status"], result["text"], result["secs"] = r.status, r.text, time.monotonic() - t0

    t = threading.Thread(target=slow_put)
    t.start()
    home = d.home("alice") / "slow"
    _wait_for(lambda: staged(home), what="the staged upload")  # the body is in, the check runs
    t0 = time.monotonic()
    for _ in range(20):
        r = request(d, "GET", "/fast.txt")
        assert r.status == 200 and len(r.body) == 5000
    assert request(d, "PROPFIND", "/", headers={"Depth": "1"}).status == 207
    fast = time.monotonic() - t0
    assert t.is_alive(), "the slow verdict came back before the fast requests were done"
    t.join(60)
    assert result["status"] == 403 and "infected: /slow/x.txt" in str(result["text"])
    assert float(result["secs"]) >= HOLD * 0.9
    assert fast < HOLD, f"other clients waited {fast:.1f}s behind a slow script"
    assert not (home / "x.txt").exists() and staged(home) == []


def test_async_pre_publish_over_http(daemons):
    d = _start(daemons, "async")
    t0 = time.monotonic()
    r = request(d, "PUT", "/slow/a.txt", b"clean content\n")
    assert r.status == 201 and time.monotonic() - t0 < HOLD  # answered before the verdict
    head = request(d, "HEAD", "/slow/a.txt")
    assert head.status == 200 and head.headers["content-length"] == str(len(b"clean content\n"))
    assert request(d, "GET", "/slow/a.txt").status == 404  # not downloadable until checked
    d.wait_log(r"publish /slow/a\.txt ok", timeout=HOLD + 30)
    _wait_for(lambda: request(d, "GET", "/slow/a.txt").status == 200, what="publication")
    assert request(d, "GET", "/slow/a.txt").body == b"clean content\n"


def test_sigterm_during_upload_publishes_nothing(daemons):
    d = daemons.start(HTTP_EXTRA)
    home = d.home("alice")
    home.mkdir(parents=True, exist_ok=True)
    (home / "doc.bin").write_bytes(b"old version\n")
    s = socket.create_connection(("127.0.0.1", d.ports["http"]), timeout=60)
    try:
        s.sendall(b"PUT /doc.bin HTTP/1.1\r\nHost: x\r\nAuthorization: " + basic().encode()
                  + b"\r\nContent-Length: 10000000\r\n\r\n" + os.urandom(200_000))
        _wait_for(lambda: staged(home), what="the staged upload")
        d.signal(signal.SIGTERM)
        d.wait_log(r"closing 1 HTTP connection\(s\): server shutting down", timeout=30)
        assert s.recv(100) == b""  # closed by the server
    finally:
        s.close()
    assert d.proc.wait(30) == 0
    d.wait_log(r"upload /doc\.bin aborted")
    assert (home / "doc.bin").read_bytes() == b"old version\n"
    assert staged(home) == []


def test_keep_alive_connection_reuses_its_login(daemons):
    d = daemons.start(HTTP_EXTRA)
    d.home("alice").mkdir(parents=True, exist_ok=True)
    conn = http.client.HTTPConnection("127.0.0.1", d.ports["http"], timeout=30)
    try:
        for i in range(5):
            conn.request("PUT", f"/k{i}.txt", body=b"k", headers={"Authorization": basic()})
            r = conn.getresponse()
            r.read()
            assert r.status == 201
    finally:
        conn.close()
    d.wait_log(r"disconnect after .* \(in 5 bytes")
    assert d.log_text().count("login ok (password)") == 1


def test_another_user_on_the_same_connection_gets_their_own_session(daemons):
    from conftest import BOB_PASSWORD

    d = daemons.start(HTTP_EXTRA)
    for u in ("alice", "bob"):
        d.home(u).mkdir(parents=True, exist_ok=True)
    (d.home("alice") / "a.txt").write_text("alice's\n")
    conn = http.client.HTTPConnection("127.0.0.1", d.ports["http"], timeout=30)
    try:
        conn.request("GET", "/a.txt", headers={"Authorization": basic()})
        r = conn.getresponse()
        assert r.status == 200 and r.read() == b"alice's\n"
        conn.request("GET", "/a.txt", headers={"Authorization": basic("bob", BOB_PASSWORD)})
        r = conn.getresponse()
        r.read()
        assert r.status == 404  # bob's home, not alice's
        conn.request("PUT", "/a.txt", body=b"x", headers={"Authorization": basic("bob", BOB_PASSWORD)})
        r = conn.getresponse()
        r.read()
        assert r.status == 403  # bob's permissions
    finally:
        conn.close()
    d.wait_log(r"user=bob .*disconnect after")
    assert (d.home("alice") / "a.txt").read_text() == "alice's\n"


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def test_big_put_streams_in_bounded_memory(daemons, tmp_path):
    """A 512 MiB PUT (curl, from a sparse file) never makes the daemon hold the body."""
    import subprocess

    from conftest import ALICE_PASSWORD, require_tool

    require_tool("curl")
    d = daemons.start(HTTP_EXTRA)
    d.home("alice").mkdir(parents=True, exist_ok=True)
    src = tmp_path / "sparse.bin"
    with open(src, "wb") as f:
        f.truncate(512 * 1024 * 1024)
    # log in once first: the argon2 check itself takes 64 MiB for a moment (then the
    # credential is remembered, [server] password_cache), which is not what is measured here
    assert request(d, "GET", "/").status == 200
    base = _rss_mb(d.proc.pid)
    proc = subprocess.Popen(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-u", f"alice:{ALICE_PASSWORD}",
                             "-T", str(src), f"http://127.0.0.1:{d.ports['http']}/big.bin"], stdout=subprocess.PIPE)
    peak = base
    while proc.poll() is None:
        peak = max(peak, _rss_mb(d.proc.pid))
        time.sleep(0.02)
    assert proc.stdout is not None and proc.stdout.read() == b"201"
    assert (d.home("alice") / "big.bin").stat().st_size == 512 * 1024 * 1024
    assert peak - base < 32, f"RSS grew by {peak - base:.0f} MB during a 512 MiB upload"


def test_defender_refusal_is_a_403_with_the_reason(daemons):
    d = daemons.start(HTTP_EXTRA + "\n[defender]\nallow_list = []\nmax_connections_per_ip = 1\n")
    d.home("alice").mkdir(parents=True, exist_ok=True)
    first = http.client.HTTPConnection("127.0.0.1", d.ports["http"], timeout=30)
    try:
        first.request("GET", "/", headers={"Authorization": basic()})
        r = first.getresponse()
        r.read()
        assert r.status == 200
        second = request(d, "GET", "/")  # a second connection while the first stays open
        assert second.status == 403 and second.text.strip(), second
    finally:
        first.close()


def test_malformed_requests_get_400_and_one_short_log_line_not_tracebacks(daemons):
    """aiohttp logged each malformed request (a header line over 8 KiB, too many headers,
    garbage) as an ERROR with a traceback: any client could fill the log."""
    d = daemons.start(HTTP_EXTRA)
    bad = [b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 20000 + b"\r\n\r\n",
           b"GET / HTTP/1.1\r\n" + b"".join(b"X%d: y\r\n" % i for i in range(200)) + b"\r\n",
           b"GARBAGE\x00\x01\r\n\r\n"] * 10
    for data in bad:
        with socket.create_connection(("127.0.0.1", d.ports["http"]), timeout=10) as s:
            s.sendall(data)
            assert s.recv(64).startswith(b"HTTP/1.0 400 ")
    d.wait_log(r"malformed HTTP request refused \(400\): ")
    assert "Traceback" not in d.log_text()
    assert "ERROR" not in d.log_text()
    assert d.log_text().count("malformed HTTP request refused") == 1  # then one line per 10 s, with a count
    assert request(d, "GET", "/").status in (200, 207)


def test_unexpected_handler_errors_are_one_bounded_line_not_a_traceback_each(caplog):
    """Issue 15 item 8, the class: any exception aiohttp logs for a request (a handler's bug,
    answered 500 as "Error handling request"), not only a malformed request, is bounded: the
    first with its traceback, then one line per 10 s with a count, whatever a client sends."""
    import logging
    import sys

    from scriptsftp.server.support.logs import MalformedHttpFilter

    f = MalformedHttpFilter()
    aiohttp_log = logging.getLogger("aiohttp.server")
    caplog.set_level(logging.INFO, logger="scriptsftp.http")
    for i in range(50):
        try:
            raise RuntimeError(f"bug hit by request {i}")
        except RuntimeError:
            record = aiohttp_log.makeRecord("aiohttp.server", logging.ERROR, __file__, 1,
                                            "Error handling request", (), sys.exc_info())
        assert f.filter(record) is False  # never printed as aiohttp's own traceback
    plain = aiohttp_log.makeRecord("aiohttp.server", logging.WARNING, __file__, 1, "no exception", (), None)
    assert f.filter(plain) is True  # records without an exception are aiohttp's to print
    lines = [r for r in caplog.records if r.name == "scriptsftp.http"]
    assert len(lines) == 1, [r.getMessage() for r in lines]
    assert lines[0].levelno == logging.ERROR and lines[0].exc_info is not None
    assert lines[0].getMessage() == "HTTP request failed: Error handling request"

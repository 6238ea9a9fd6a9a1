"""Small HTTP client helpers shared by the HTTP/WebDAV suites (curl and http.client).

http.client is used where the exact request line matters (it sends the path as
given, percent-escapes and dots included); curl where a real command-line
client is the point.
"""

from __future__ import annotations

import base64
import http.client
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from conftest import ALICE_PASSWORD, require_tool

HTTP_EXTRA = '[http]\nenabled = true\nlisten = "127.0.0.1:0"\n'


@dataclass
class Resp:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


def basic(user: str = "alice", password: str = ALICE_PASSWORD) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def request(d, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None, *,
            user: str | None = "alice", password: str = ALICE_PASSWORD, timeout: float = 60) -> Resp:
    """One request on a fresh connection; ``path`` goes on the request line exactly as given."""
    conn = http.client.HTTPConnection("127.0.0.1", d.ports["http"], timeout=timeout)
    try:
        h = dict(headers or {})
        if user is not None:
            h.setdefault("Authorization", basic(user, password))
        conn.putrequest(method, path, skip_accept_encoding=True)
        for k, v in h.items():
            conn.putheader(k, v)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        r = conn.getresponse()
        data = r.read()
        return Resp(r.status, {k.lower(): v for k, v in r.getheaders()}, data)
    finally:
        conn.close()


def curl(d, path: str, *args: str, user: str = "alice", password: str = ALICE_PASSWORD, scheme: str = "http",
         timeout: float = 120) -> Resp:
    """Run curl against the daemon's HTTP port; returns status, headers and body."""
    require_tool("curl")
    with tempfile.TemporaryDirectory() as tmp:
        hdr, out = Path(tmp) / "h", Path(tmp) / "b"
        auth = ["-u", f"{user}:{password}"] if user else []
        proc = subprocess.run(
            ["curl", "-sS", "--path-as-is", *auth, "-D", str(hdr), "-o", str(out), "-w", "%{http_code}", *args,
             f"{scheme}://127.0.0.1:{d.ports['http']}{path}"],
            capture_output=True, timeout=timeout,
        )
        assert proc.returncode == 0, proc.stderr.decode()
        headers: dict[str, str] = {}
        if hdr.exists():
            # the last response's headers (after a 100 Continue or a 401 round)
            block = hdr.read_text("latin-1").strip().split("\r\n\r\n")[-1]
            for line in block.splitlines()[1:]:
                k, _, v = line.partition(":")
                headers[k.strip().lower()] = v.strip()
        body = out.read_bytes() if out.exists() else b""
        return Resp(int(proc.stdout.decode()[-3:]), headers, body)


def staged(directory: Path) -> list[str]:
    return [n for n in directory.iterdir() if n.name.startswith(".scriptsftp-part-")] if directory.exists() else []

"""A throwaway HAProxy for the tests: never the system's instance.

Its config, pid file and log live in one temp dir; it runs in the foreground (``-db``) as a
child of the test process, on the loopback addresses and ports the test names, and ``stop()``
ends it and removes the dir. A test builds it from :class:`Route` entries: each is one
``listen`` section forwarding one address (or a port range, for FTP's passive ports) to a
daemon, in TCP mode with a PROXY header (``send-proxy-v2`` or ``send-proxy``), or in HTTP
mode with ``X-Forwarded-For``.

Modeled on tests/pgkit.py; imports only the standard library.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "scriptsftp-haproxy-"


class HAProxyMissing(RuntimeError):
    """No haproxy binary (Debian: the ``haproxy`` package, in /usr/sbin)."""


def find_haproxy() -> str:
    path = shutil.which("haproxy") or ("/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None)
    if path is None:
        raise HAProxyMissing("haproxy is not installed (make test installs Debian's haproxy package when run as root)")
    return path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def free_port_range(count: int, hosts: tuple[str, ...] = ("127.0.0.1",), tries: int = 200) -> int:
    """The first of ``count`` consecutive ports free on every one of ``hosts`` (FTP's passive
    range, bound by the daemon on one address and by HAProxy on another)."""
    for _ in range(tries):
        first = free_port()
        if first + count > 65535:
            continue
        held: list[socket.socket] = []
        try:
            for port in range(first, first + count):
                for host in hosts:
                    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                    held.append(s)
                    s.bind((host, port))
            return first
        except OSError:
            continue
        finally:
            for s in held:
                s.close()
    raise RuntimeError(f"no {count} consecutive free ports")


@dataclass
class Route:
    """One ``listen`` section: ``bind`` (host, port, or port range "a-b") to ``server``
    (host, port; port 0: the port the client connected to, for a range)."""

    name: str
    bind_host: str
    bind_port: int | str
    server: tuple[str, int]
    proxy: str = "v2"   # "v2" (send-proxy-v2), "v1" (send-proxy), "http" (mode http, forwardfor), "" (none)

    def section(self) -> str:
        host, port = self.server
        target = f"{host}:{port}" if port else host
        lines = [f"listen {self.name}", f"    bind {self.bind_host}:{self.bind_port}"]
        if self.proxy == "http":
            lines += ["    mode http", "    option forwardfor", f"    server s1 {target}"]
        else:
            send = {"v2": " send-proxy-v2", "v1": " send-proxy", "": ""}[self.proxy]
            lines += ["    mode tcp", f"    server s1 {target}{send}"]
        return "\n".join(lines) + "\n"


@dataclass
class HAProxy:
    root: Path
    routes: list[Route]
    proc: subprocess.Popen | None = None
    output: list[str] = field(default_factory=list)

    @property
    def config(self) -> Path:
        return self.root / "haproxy.cfg"

    @classmethod
    def start(cls, routes: list[Route], timeout: float = 15.0) -> "HAProxy":
        binary = find_haproxy()
        h = cls(Path(tempfile.mkdtemp(prefix=PREFIX)), routes)
        h.config.write_text(
            "global\n"
            "    maxconn 512\n"
            f"    pidfile {h.root / 'haproxy.pid'}\n"
            "defaults\n"
            "    timeout connect 5s\n"
            "    timeout client 60s\n"
            "    timeout server 60s\n"
            + "".join(r.section() for r in routes)
        )
        check = subprocess.run([binary, "-c", "-f", str(h.config)], capture_output=True, text=True, timeout=30)
        if check.returncode != 0:
            h.stop()
            raise RuntimeError(f"haproxy refused its config:\n{check.stdout}{check.stderr}")
        log = open(h.root / "haproxy.log", "wb")
        h.proc = subprocess.Popen([binary, "-db", "-f", str(h.config)], stdin=subprocess.DEVNULL,
                                  stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout
        for r in routes:
            port = int(str(r.bind_port).split("-")[0])
            while True:
                if h.proc.poll() is not None:
                    text = (h.root / "haproxy.log").read_text(errors="replace")
                    h.stop()
                    raise RuntimeError(f"haproxy exited at start:\n{text}")
                try:
                    socket.create_connection((r.bind_host, port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        h.stop()
                        raise RuntimeError(f"haproxy does not listen on {r.bind_host}:{port}")
                    time.sleep(0.05)
        return h

    def log_text(self) -> str:
        try:
            return (self.root / "haproxy.log").read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.root, ignore_errors=True)

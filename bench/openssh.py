"""OpenSSH helpers for the benchmark: install check, a throw-away sshd, SSH KEXINIT sniffing.

Nothing here touches the system sshd: the bench sshd runs in the foreground
(`sshd -D -e -f CFG`) on a free loopback port, with its own host key, config and
authorized_keys under a temporary directory, and is killed (with every process it
forked) when the context exits.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

SSHD = "/usr/sbin/sshd"
SFTP_SERVER = "/usr/lib/openssh/sftp-server"
CLIENT_TOOLS = ("ssh-keygen", "sftp", "ssh", "curl")


# --------------------------------------------------------------------------- install


def ensure_tools() -> None:
    """Make sure sshd, sftp-server, the sftp/ssh clients, ssh-keygen and curl exist.

    Installs the Debian packages with apt-get when something is missing and we
    are root; otherwise raises with the list of what to install.
    """
    missing_pkgs: set[str] = set()
    if not (os.path.exists(SSHD) and os.path.exists(SFTP_SERVER)):
        missing_pkgs.add("openssh-server")
    for tool in CLIENT_TOOLS:
        if shutil.which(tool) is None:
            missing_pkgs.add("curl" if tool == "curl" else "openssh-client")
    if not missing_pkgs:
        return
    pkgs = sorted(missing_pkgs)
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise RuntimeError(f"missing tools; please install: {' '.join(pkgs)}")
    print(f"[bench] installing {' '.join(pkgs)} with apt-get ...", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *pkgs],
                   check=True, env=env)
    if not (os.path.exists(SSHD) and os.path.exists(SFTP_SERVER)):
        raise RuntimeError("openssh-server installed but sshd/sftp-server still missing")


def openssh_version() -> str:
    r = subprocess.run(["ssh", "-V"], capture_output=True, text=True)
    return (r.stderr or r.stdout).strip()


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ppid_map() -> dict[int, int]:
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        # field 2 (comm) may contain spaces/parens: split after the last ')'
        rest = data[data.rfind(b")") + 2:].split()
        out[int(d)] = int(rest[1])
    return out


def process_tree(pid: int) -> list[int]:
    """pid and all its live descendants (pid first)."""
    ppids = _ppid_map()
    children: dict[int, list[int]] = {}
    for p, pp in ppids.items():
        children.setdefault(pp, []).append(p)
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        if p in ppids or p == pid:
            out.append(p)
        todo.extend(children.get(p, []))
    return out


def kill_tree(proc: subprocess.Popen, timeout: float = 5.0) -> None:
    """Stop a process we started and everything it forked (by pid, never by name)."""
    if proc.poll() is not None:
        # already gone; its orphans (if any) were reparented and are not ours to find
        return
    pids = process_tree(proc.pid)
    for p in pids:
        try:
            os.kill(p, signal.SIGTERM)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.monotonic() + timeout
    for p in pids:
        while True:
            try:
                os.kill(p, 0)
            except ProcessLookupError:
                break
            if time.monotonic() > deadline:
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                break
            time.sleep(0.05)
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def wait_for_line(proc: subprocess.Popen, logfile: Path, pattern: str, timeout: float) -> re.Match:
    """Poll a log file (the process' stderr) until `pattern` matches; raise with the tail."""
    rx = re.compile(pattern)
    deadline = time.monotonic() + timeout
    while True:
        text = logfile.read_text(errors="replace") if logfile.exists() else ""
        m = rx.search(text)
        if m:
            return m
        if proc.poll() is not None:
            raise RuntimeError(f"exited with status {proc.returncode}: {tail(text)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"no line matching {pattern!r} after {timeout:.0f}s: {tail(text)}")
        time.sleep(0.05)


def tail(text: str, n: int = 3) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return " | ".join(lines[-n:]) if lines else "(no output)"


# --------------------------------------------------------------------------- CPU accounting


class CpuGroup:
    """CPU time of a server and everything it forks, via a temporary cgroup.

    /proc utime+cutime is not enough for OpenSSH: the per-connection monitor does
    not wait for its post-auth child, so that child's CPU (crypto, sftp-server's
    parent) never reaches the listener's cutime. A cgroup counts every process
    started inside it. Tries cgroup v2 (cpu.stat usage_usec), then v1 cpuacct;
    if neither is writable (not root, read-only /sys/fs/cgroup), `path` stays
    None and callers fall back to /proc (and say so).
    """

    CANDIDATES = (("/sys/fs/cgroup/unified", "v2"), ("/sys/fs/cgroup", "v2"),
                  ("/sys/fs/cgroup/cpuacct", "v1"), ("/sys/fs/cgroup/cpu,cpuacct", "v1"))

    def __init__(self, name: str):
        self.path: Path | None = None
        self.kind = ""
        for root, kind in self.CANDIDATES:
            r = Path(root)
            probe = r / ("cgroup.controllers" if kind == "v2" else "cpuacct.usage")
            if not probe.exists():
                continue
            p = r / f"scriptsftp-bench-{os.getpid()}-{name}"
            try:
                p.mkdir()
            except OSError:
                continue
            if (p / ("cpu.stat" if kind == "v2" else "cpuacct.usage")).exists():
                self.path, self.kind = p, kind
                break
            p.rmdir()

    def wrap(self, argv: list[str]) -> list[str]:
        """argv that joins the cgroup, then execs argv (so nothing escapes it)."""
        if self.path is None:
            return argv
        procs = self.path / "cgroup.procs"
        return ["/bin/sh", "-c", f'echo $$ > "{procs}" && exec "$@"', "sh", *argv]

    def seconds(self) -> float:
        if self.kind == "v2":
            for line in (self.path / "cpu.stat").read_text().splitlines():
                if line.startswith("usage_usec"):
                    return int(line.split()[1]) / 1e6
        return int((self.path / "cpuacct.usage").read_text()) / 1e9

    def remove(self) -> None:
        if self.path is None:
            return
        deadline = time.monotonic() + 5
        while True:
            try:
                self.path.rmdir()
                break
            except OSError:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.1)
        self.path = None


# --------------------------------------------------------------------------- keys


def keygen_ed25519(path: Path, comment: str = "bench") -> str:
    """Generate an unencrypted ed25519 key pair; return the public key line."""
    for p in (path, path.with_name(path.name + ".pub")):
        if p.exists():
            p.unlink()
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
                   check=True, stdin=subprocess.DEVNULL)
    return path.with_name(path.name + ".pub").read_text().strip()


# --------------------------------------------------------------------------- bench user

BENCH_USER = "scriptsftp-bench"
BENCH_GECOS = "scriptsftp bench (temporary)"


class BenchUser:
    """A throw-away system user for the OpenSSH side (root only).

    Why not log in as root: sshd starts sftp-server through the user's login
    shell (`$SHELL -c /usr/lib/openssh/sftp-server`) and bash sources ~/.bashrc
    when it sees SSH_CLIENT, so whatever root's dotfiles do (pyenv init: ~200 ms
    here) would be billed to OpenSSH. This user has /bin/sh (dash: no rc files),
    the data dir as home, and a "*" password field (not "!"-locked, which sshd
    with UsePAM no would refuse even for keys). Removed again by remove().
    """

    def __init__(self, home: Path):
        import pwd

        self.name = BENCH_USER
        self.created = False
        try:
            pw = pwd.getpwnam(self.name)
            if pw.pw_gecos != BENCH_GECOS:
                raise RuntimeError(f"user {self.name} exists and is not ours; not touching it")
            # left over from an interrupted run: adopt it (and remove it at the end)
            subprocess.run(["usermod", "-d", str(home), self.name], check=True)
        except KeyError:
            subprocess.run(["useradd", "--system", "--no-create-home", "--home-dir", str(home),
                            "--shell", "/bin/sh", "--comment", BENCH_GECOS, "--user-group",
                            self.name], check=True)
        self.created = True
        subprocess.run(["usermod", "-p", "*", self.name], check=True)
        pw = pwd.getpwnam(self.name)
        self.uid, self.gid = pw.pw_uid, pw.pw_gid

    def remove(self) -> None:
        if self.created:
            subprocess.run(["userdel", self.name], check=False,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.created = False


# --------------------------------------------------------------------------- sshd


@dataclass
class Sshd:
    """A foreground OpenSSH sshd on 127.0.0.1 with sftp-server as SFTP subsystem."""

    workdir: Path                # private temp dir (config, host key, authorized_keys, log)
    client_pubkey: str           # the one key allowed to log in
    sftp_server: str = SFTP_SERVER
    wrap: object = None          # argv -> argv (e.g. CpuGroup.wrap)
    port: int = 0
    proc: subprocess.Popen | None = None
    log: Path = field(init=False)

    def start(self, timeout: float = 15.0) -> "Sshd":
        w = self.workdir
        w.mkdir(parents=True, exist_ok=True)
        hostkey = w / "ssh_host_ed25519_key"
        keygen_ed25519(hostkey, "bench-sshd-host")
        auth = w / "authorized_keys"
        auth.write_text(self.client_pubkey + "\n")
        # sshd reads authorized_keys with the user's uid: let it traverse and read
        auth.chmod(0o644)
        w.chmod(0o755)
        if os.geteuid() == 0:
            # compiled-in privilege separation dir; the Debian package normally creates it at boot
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        self.port = self.port or free_port()
        cfg = w / "sshd_config"
        cfg.write_text(
            "\n".join(
                [
                    f"ListenAddress 127.0.0.1:{self.port}",
                    f"HostKey {hostkey}",
                    f"AuthorizedKeysFile {auth}",
                    "PidFile none",
                    "PubkeyAuthentication yes",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "UsePAM no",
                    "StrictModes no",
                    "PermitRootLogin prohibit-password",
                    "PermitUserRC no",
                    "PermitUserEnvironment no",
                    "PrintMotd no",
                    "PrintLastLog no",
                    "UseDNS no",
                    "X11Forwarding no",
                    "AllowTcpForwarding no",
                    # 20 parallel clients connect at once: the default 10:30:100 drops some
                    "MaxStartups 200",
                    "LogLevel INFO",
                    f"Subsystem sftp {self.sftp_server}",
                    "",
                ]
            )
        )
        self.log = w / "sshd.log"
        # config check first: a clear error beats a silent exit
        chk = subprocess.run([SSHD, "-t", "-f", str(cfg)], capture_output=True, text=True)
        if chk.returncode != 0:
            raise RuntimeError(f"sshd -t failed: {chk.stderr.strip()}")
        logf = open(self.log, "wb")
        try:
            argv = [SSHD, "-D", "-e", "-f", str(cfg)]
            self.proc = subprocess.Popen(
                self.wrap(argv) if self.wrap else argv,
                stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            logf.close()
        wait_for_line(self.proc, self.log, r"Server listening on 127\.0\.0\.1 port (\d+)", timeout)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            kill_tree(self.proc)
            self.proc = None

    def __enter__(self) -> "Sshd":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# --------------------------------------------------------------------------- KEXINIT sniffing
#
# The negotiated cipher/MAC is the first entry of the *client's* list that the
# server also offers (RFC 4253 §7.1). Both lists travel in clear text in the
# SSH_MSG_KEXINIT packets, so we read the server's by connecting to it and the
# client's by letting the client connect to a fake server. No server logging needed.
# A server may tailor its KEXINIT to the client (scriptsftp offers OpenSSH clients
# only AES-GCM when they list it), so the probe can replay a client's own banner and
# KEXINIT and read the answer that client would get.

_NAMELISTS = ("kex", "hostkey", "enc_c2s", "enc_s2c", "mac_c2s", "mac_s2c", "comp_c2s", "comp_s2c")


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("peer closed during KEXINIT")
        buf += chunk
    return buf


def _read_banner_and_kexinit(sock: socket.socket, raw: list[bytes] | None = None,
                             ) -> tuple[str, dict[str, list[str]]]:
    """The peer's banner and KEXINIT lists; ``raw`` gets the banner line and packet as sent."""
    banner = b""
    while True:  # lines before the "SSH-" line are allowed (RFC 4253 §4.2)
        line = b""
        while not line.endswith(b"\n"):
            line += _recv_exact(sock, 1)
            if len(line) > 1024:
                raise ConnectionError("banner too long")
        if line.startswith(b"SSH-"):
            banner = line.strip()
            break
    head = _recv_exact(sock, 5)
    plen, padlen = struct.unpack(">IB", head)
    if plen > 65536:
        raise ConnectionError("implausible KEXINIT length")
    body = _recv_exact(sock, plen - 1)
    if raw is not None:
        raw.append(line + head + body)
    payload = body[: plen - 1 - padlen]
    if payload[0] != 20:
        raise ConnectionError(f"expected KEXINIT, got message {payload[0]}")
    off = 17
    lists = {}
    for name in _NAMELISTS:
        (n,) = struct.unpack(">I", payload[off:off + 4])
        off += 4
        lists[name] = payload[off:off + n].decode().split(",") if n else []
        off += n
    return banner.decode(errors="replace"), lists


def server_kexinit(host: str, port: int, timeout: float = 5.0, opening: bytes = b"SSH-2.0-bench_probe\r\n",
                   ) -> tuple[str, dict[str, list[str]]]:
    """The server's banner and KEXINIT lists, as answered to ``opening`` (a client's first bytes)."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(opening)
        return _read_banner_and_kexinit(s)


def client_kexinit(argv_for_port, timeout: float = 10.0) -> tuple[str, dict[str, list[str]], bytes]:
    """Run a client (argv_for_port(port) -> argv) against a fake server; return its offer
    and its opening bytes (banner line and KEXINIT packet) for ``server_kexinit``."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    lsock.settimeout(timeout)
    port = lsock.getsockname()[1]
    result: dict = {}

    def serve():
        try:
            conn, _ = lsock.accept()
            with conn:
                conn.settimeout(timeout)
                conn.sendall(b"SSH-2.0-OpenSSH_9.2 bench_probe\r\n")
                raw: list[bytes] = []
                result["v"] = (*_read_banner_and_kexinit(conn, raw), raw[0])
        except Exception as e:  # reported below
            result["e"] = e

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    proc = subprocess.Popen(argv_for_port(port), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    t.join(timeout + 1)
    lsock.close()
    kill_tree(proc, timeout=2)
    if "v" not in result:
        raise RuntimeError(f"could not read client KEXINIT: {result.get('e', 'timeout')}")
    return result["v"]


AEAD = {"chacha20-poly1305@openssh.com", "aes128-gcm@openssh.com", "aes256-gcm@openssh.com"}


def negotiate(client: dict[str, list[str]], server: dict[str, list[str]]) -> dict[str, str]:
    def pick(key):
        for alg in client[key]:
            if alg in server[key]:
                return alg
        return "none-in-common"

    out = {}
    for d in ("c2s", "s2c"):
        enc = pick("enc_" + d)
        out["cipher_" + d] = enc
        out["mac_" + d] = "<implicit>" if enc in AEAD else pick("mac_" + d)
    kex = [k for k in client["kex"] if not k.startswith(("ext-info", "kex-strict"))]
    out["kex"] = next((k for k in kex if k in server["kex"]), "none-in-common")
    return out


def describe(neg: dict[str, str]) -> str:
    c, m = neg["cipher_c2s"], neg["mac_c2s"]
    s = c if m == "<implicit>" else f"{c}+{m}"
    if (neg["cipher_s2c"], neg["mac_s2c"]) != (c, m):
        s += f" / s2c {neg['cipher_s2c']}+{neg['mac_s2c']}"
    if neg.get("kex"):
        s += f" (kex {neg['kex']})"
    return s

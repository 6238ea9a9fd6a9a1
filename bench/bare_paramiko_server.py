"""A minimal paramiko SFTP server: the "bare paramiko" anchor of the benchmark.

What any paramiko-based server gets for free, plus TCP_NODELAY: the stock
paramiko.SFTPServer with a StubSFTPServer-like SFTPServerInterface over the local
filesystem (file objects, default SFTPHandle read/write), default window and
packet sizes, one Transport thread per connection. No permissions, events,
staging or logging. Public-key auth only.

It reads the same TOML config the bench writes for scriptsftp and prints the
same readiness line, so the bench starts both the same way:

    python bench/bare_paramiko_server.py run -c CONFIG.toml
    -> stderr: "listening sftp on 127.0.0.1:PORT"

Used keys: [server].state_dir (host key), [sftp].listen, the first [[users]]
entry's name, public_keys and home.
"""

from __future__ import annotations

import argparse
import base64
import os
import signal
import socket
import sys
import threading

try:
    import tomllib
except ImportError:  # Python < 3.11
    import tomli as tomllib

import paramiko
from paramiko import SFTPAttributes, SFTPHandle, SFTPServer, SFTPServerInterface
from paramiko.sftp import SFTP_OK


# --------------------------------------------------------------------------- SFTP over a root dir
# Modelled on paramiko's tests/_stub_sftp.py (StubSFTPServer / StubSFTPHandle).


class StubHandle(SFTPHandle):
    def stat(self):
        try:
            return SFTPAttributes.from_stat(os.fstat(self.readfile.fileno()))
        except OSError as e:
            return SFTPServer.convert_errno(e.errno)

    def chattr(self, attr):
        return SFTP_OK  # ignored, like a permissive stub


class StubSFTP(SFTPServerInterface):
    ROOT = "/nonexistent"

    def _realpath(self, path):
        return self.ROOT + self.canonicalize(path)

    def canonicalize(self, path):
        # confine to ROOT: normalise as an absolute virtual path
        return os.path.normpath("/" + path).replace("//", "/")

    def list_folder(self, path):
        path = self._realpath(path)
        try:
            out = []
            for fname in os.listdir(path):
                attr = SFTPAttributes.from_stat(os.lstat(os.path.join(path, fname)))
                attr.filename = fname
                out.append(attr)
            return out
        except OSError as e:
            return SFTPServer.convert_errno(e.errno)

    def stat(self, path):
        try:
            return SFTPAttributes.from_stat(os.stat(self._realpath(path)))
        except OSError as e:
            return SFTPServer.convert_errno(e.errno)

    def lstat(self, path):
        try:
            return SFTPAttributes.from_stat(os.lstat(self._realpath(path)))
        except OSError as e:
            return SFTPServer.convert_errno(e.errno)

    def open(self, path, flags, attr):
        path = self._realpath(path)
        try:
            binary_flag = getattr(os, "O_BINARY", 0)
            flags |= binary_flag
            mode = getattr(attr, "st_mode", None)
            fd = os.open(path, flags, mode if mode is not None else 0o666)
        except OSError as e:
            return SFTPServer.convert_errno(e.errno)
        if flags & os.O_CREAT and attr is not None:
            attr._flags &= ~attr.FLAG_PERMISSIONS
        if flags & os.O_WRONLY:
            fstr = "ab" if flags & os.O_APPEND else "wb"
        elif flags & os.O_RDWR:
            fstr = "a+b" if flags & os.O_APPEND else "r+b"
        else:
            fstr = "rb"
        try:
            f = os.fdopen(fd, fstr)
        except OSError as e:
            return SFTPServer.convert_errno(e.errno)
        h = StubHandle(flags)
        h.filename = path
        h.readfile = f
        h.writefile = f
        return h

    def remove(self, path):
        try:
            os.remove(self._realpath(path))
        except OSError as e:
            return SFTPServer.convert_errno(e.errno)
        return SFTP_OK

    def rename(self, oldpath, newpath):
        try:
            os.rename(self._realpath(oldpath), self._realpath(newpath))
        except OSError as e:
            return SFTPServer.convert_errno(e.errno)
        return SFTP_OK

    def posix_rename(self, oldpath, newpath):
        return self.rename(oldpath, newpath)

    def mkdir(self, path, attr):
        try:
            os.mkdir(self._realpath(path))
        except OSError as e:
            return SFTPServer.convert_errno(e.errno)
        return SFTP_OK

    def rmdir(self, path):
        try:
            os.rmdir(self._realpath(path))
        except OSError as e:
            return SFTPServer.convert_errno(e.errno)
        return SFTP_OK

    def chattr(self, path, attr):
        return SFTP_OK


# --------------------------------------------------------------------------- SSH side


class Server(paramiko.ServerInterface):
    def __init__(self, user: str, keys: set[tuple[str, bytes]]):
        self.user = user
        self.keys = keys

    def get_allowed_auths(self, username):
        return "publickey"

    def check_auth_publickey(self, username, key):
        if username == self.user and (key.get_name(), key.asbytes()) in self.keys:
            return paramiko.AUTH_SUCCESSFUL
        return paramiko.AUTH_FAILED

    def check_channel_request(self, kind, chanid):
        if kind == "session":
            return paramiko.OPEN_SUCCEEDED
        return paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED


def load_host_key(state_dir: str) -> paramiko.PKey:
    path = os.path.join(state_dir, "bare_host_ed25519_key")
    if not os.path.exists(path):
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        pem = Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption())
        os.makedirs(state_dir, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
    return paramiko.Ed25519Key(filename=path)


def parse_pubkey(line: str) -> tuple[str, bytes]:
    parts = line.split()
    return parts[0], base64.b64decode(parts[1])


def handle(conn: socket.socket, host_key, user, keys):
    try:
        t = paramiko.Transport(conn)
        t.add_server_key(host_key)
        t.set_subsystem_handler("sftp", SFTPServer, StubSFTP)
        t.start_server(server=Server(user, keys))
    except Exception as e:  # a broken client must not stop the server
        print(f"connection error: {e!r}", file=sys.stderr, flush=True)
        conn.close()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run")
    run.add_argument("-c", "--config", required=True)
    args = ap.parse_args(argv)

    with open(args.config, "rb") as f:
        cfg = tomllib.load(f)
    u = cfg["users"][0]
    StubSFTP.ROOT = os.path.realpath(u["home"])
    keys = {parse_pubkey(k) for k in u.get("public_keys", [])}
    host_key = load_host_key(cfg["server"]["state_dir"])
    listen = cfg["sftp"]["listen"]
    listen = listen[0] if isinstance(listen, list) else listen
    host, _, port = listen.rpartition(":")

    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind((host, int(port)))
    lsock.listen(128)
    h, p = lsock.getsockname()[:2]
    print(f"bare-paramiko {paramiko.__version__}: listening sftp on {h}:{p}",
          file=sys.stderr, flush=True)
    try:
        while True:
            conn, _ = lsock.accept()
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=handle, args=(conn, host_key, u["name"], keys),
                             daemon=True).start()
    except KeyboardInterrupt:
        pass
    finally:
        lsock.close()


if __name__ == "__main__":
    main()

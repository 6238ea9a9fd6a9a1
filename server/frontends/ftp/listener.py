"""The FTP listener: listening sockets, a thread per connection, passive ports, TLS.

pyftpdlib does what it is good at: command framing, passive/active data
channels, TLS on both channels, one thread with its own I/O loop per connection
(``ThreadedFTPServer``), so a slow script or a slow client stalls only its own
connection. :func:`make_listener` installs pyftpdlib_ext (which checks the
pyftpdlib version) and builds the handler class for one ``[ftp]`` section:
commands.py's SessionCommands in front of pyftpdlib's plain or TLS handler,
with data.py's data connections and the passive port listener below.
"""

from __future__ import annotations

import errno
import logging
import random
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

from OpenSSL import SSL

from scriptsftp.server.frontends.ftp import pyftpdlib_ext
from scriptsftp.server.frontends.ftp.commands import FS_COMMANDS_NOT_OFFERED, SessionCommands
from scriptsftp.server.frontends.ftp.data import DataConnection, TLSDataConnection
from scriptsftp.server.frontends.ftp.pyftpdlib_ext import (
    FTPHandler, PassiveDTP, ThreadedServer, TLS_FTPHandler,
)
from scriptsftp.server.support.config import ConfigError, FtpSection, ServerSection
from scriptsftp.server.support.listen import ConfigFiles, listen_addresses
from scriptsftp.server.support.proxy_protocol import ProxyError, TrustedProxies, read_header

if TYPE_CHECKING:
    from scriptsftp.server.contract.ports import LocalCorePort

log = logging.getLogger("scriptsftp.ftp")

DATA_PROXY_TIMEOUT = 10.0  # seconds a data connection from a trusted proxy has for its PROXY header


class PassiveDataListener(PassiveDTP):
    """pyftpdlib's passive data listener, made safe for a thread per connection.

    pyftpdlib binds a random port of ``passive_ports`` with SO_REUSEADDR, then listens.
    Linux lets two such sockets bind one port while neither listens yet, so two
    connection threads (or another program) can take the same port at once; the
    second listen() then fails with EADDRINUSE, which pyftpdlib does not expect: the
    control connection was dropped without a reply (rclone reported "EOF"). Here the
    loser binds another port of the range and listens again; the range exhausted,
    the kernel picks the port, as pyftpdlib does when every port of the range is busy."""

    socket: Any  # None between two binds
    cmd_channel: SessionCommands

    def handle_accepted(self, sock: socket.socket, addr: tuple) -> None:
        """A data connection from a trusted proxy (a balancer fronting the passive ports with
        ``send-proxy``) is the client's named in its PROXY header: pyftpdlib's check that a
        data connection comes from the control connection's client then compares real
        addresses. One without a valid header is refused with a 425, the port kept open."""
        cmd = self.cmd_channel
        if cmd.proxies.trusts(addr[0]):
            try:
                header = read_header(sock, time.monotonic() + DATA_PROXY_TIMEOUT)
            except ProxyError as exc:
                log.info("data connection from trusted proxy %s refused: %s", addr[0], exc,
                         extra={"sid": cmd.conn.id if cmd.conn else "", "ip": cmd.remote_ip})
                sock.close()
                cmd.respond("425 Data connection through a proxy without a valid PROXY header.")
                return
            sock.setblocking(False)
            addr = header.client or addr
        super().handle_accepted(sock, addr)

    def listen(self, num: int) -> None:
        taken = self.socket.getsockname()[1]
        untried = [p for p in (self.cmd_channel.passive_ports or ()) if p != taken]
        random.shuffle(untried)
        while True:
            try:
                super().listen(num)
                return
            except OSError as err:
                if err.errno != errno.EADDRINUSE or taken == 0:  # 0: the kernel chose it
                    self.close()  # half-built: nothing of it may stay in the I/O loop
                    raise
            taken = self._bind_another(untried)

    def _bind_another(self, untried: list[int]) -> int:
        """A new socket bound to the next free port of ``untried``; 0 once it is empty (the
        kernel's choice)."""
        host, family = self.socket.getsockname()[0], self.socket.family
        while True:
            port = untried.pop() if untried else 0
            self.socket.close()
            self.del_channel()
            self.socket = None
            self.create_socket(family, socket.SOCK_STREAM)
            self.set_reuse_addr()
            try:
                self.bind((host, port))
                return port
            except OSError as err:
                if err.errno != errno.EADDRINUSE or port == 0:
                    self.close()
                    raise


class _PlainHandler(SessionCommands, FTPHandler):
    dtp_handler = DataConnection
    passive_dtp = PassiveDataListener


class _TLSHandler(SessionCommands, TLS_FTPHandler):
    dtp_handler = TLSDataConnection
    passive_dtp = PassiveDataListener
    proto_cmds = {k: v for k, v in TLS_FTPHandler.proto_cmds.items() if k not in FS_COMMANDS_NOT_OFFERED}


# --- the listener ---------------------------------------------------------------------------


class _Server(ThreadedServer):
    """One listening socket; a thread with its own I/O loop per connection."""

    def __init__(self, sock: socket.socket, handler: type[SessionCommands], listener: FTPListener) -> None:
        self.listener = listener
        super().__init__(sock, handler, backlog=128)

    def handle_accept(self) -> None:
        if self.listener.stopping.is_set():
            self.del_channel()  # the socket is shut down: stop watching it
            return
        super().handle_accept()


class FTPListener:
    """FTP or FTPS on one or more addresses (the daemon's Listener protocol)."""

    name = "ftp"

    def __init__(self, addresses: list[tuple[str, int]], handler: type[SessionCommands]) -> None:
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._handlers: set[SessionCommands] = set()
        handler.listener = self
        self.servers: list[_Server] = []
        for host, port in addresses:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            s = socket.socket(family, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
            self.servers.append(_Server(s, handler, self))

    @property
    def bound(self) -> list[str]:
        return [f"{host}:{port}" for host, port in (s.socket.getsockname()[:2] for s in self.servers)]

    def start(self) -> None:
        for s in self.servers:
            threading.Thread(target=self._serve, args=(s,), name="ftp-accept", daemon=True).start()

    def _serve(self, server: _Server) -> None:
        try:
            server.serve_forever(timeout=1.0, blocking=True, handle_exit=False)
        except Exception:
            if not self.stopping.is_set():
                log.exception("FTP acceptor stopped")

    def track(self, handler: SessionCommands) -> None:
        with self._lock:
            self._handlers.add(handler)

    def untrack(self, handler: SessionCommands) -> None:
        with self._lock:
            self._handlers.discard(handler)

    def stop_accepting(self) -> None:
        self.stopping.set()
        for s in self.servers:
            try:
                s.socket.shutdown(socket.SHUT_RDWR)  # Linux: new connections are refused at once
            except OSError:
                pass

    def active(self) -> int:
        with self._lock:
            return len(self._handlers)

    def close_all(self, reason: str) -> None:
        with self._lock:
            handlers = list(self._handlers)
        for h in handlers:
            h.kick(reason)
        deadline = time.monotonic() + 3
        while self.active() and time.monotonic() < deadline:
            time.sleep(0.05)
        for s in self.servers:
            s.stop_connection_threads()


# --- wiring -------------------------------------------------------------------------------------


def passive_range(value: str) -> list[int] | None:
    """``"60000-60099"`` → the ports; ``""`` → None (any free port)."""
    if not value:
        return None
    low, _, high = value.partition("-")
    return list(range(int(low), int(high or low) + 1))


def tls_context(certificate: str, private_key: str) -> SSL.Context:
    """TLS 1.2 or later, no compression, no renegotiation."""
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_options(SSL.OP_NO_COMPRESSION | getattr(SSL, "OP_NO_RENEGOTIATION", 0))
    ctx.use_certificate_chain_file(certificate)
    ctx.use_privatekey_file(private_key)
    ctx.check_privatekey()
    # data connections may resume the control connection's TLS session
    ctx.set_session_id(b"scriptsftp-ftp")
    return ctx


def make_listener(core: LocalCorePort[Any, Any], m: FtpSection, server: ServerSection,
                  files: ConfigFiles, *, proxies: TrustedProxies | None = None) -> FTPListener:
    """The listener of ``[ftp]`` (``m``: its idle timeout too) on ``core``, ``[server]`` giving the stall timeout;
    UnsupportedPyftpdlib (a ValueError) if pyftpdlib is not 2.2.*. ``proxies``: ``[cluster]
    trusted_proxies``, whose PROXY headers name the client (control and passive data
    connections)."""
    pyftpdlib_ext.install()
    attrs: dict[str, Any] = {
        "core": core,
        "passive_ports": passive_range(m.passive_ports),
        "masquerade_address": m.masquerade_address or None,
        "active_mode": m.active_mode,
        "stall_timeout": server.stall_timeout,
        "timeout": m.idle_timeout,  # pyftpdlib's silence timer: 421 and closed
        "proxies": proxies or TrustedProxies(),
    }
    base: type[SessionCommands] = _PlainHandler
    if m.tls != "off":
        try:
            ctx = tls_context(str(files.resolve(m.certificate)), str(files.resolve(m.private_key)))
        except (SSL.Error, OSError) as exc:
            raise ConfigError([f"{files.where(('ftp', 'certificate'))}: cannot load certificate/key: {exc}"]) from None
        base = _TLSHandler
        attrs.update(ssl_context=ctx, implicit_tls=m.tls == "implicit")
    handler = type("FTPHandler", (base,), attrs)
    return FTPListener(listen_addresses(m.listen), handler)

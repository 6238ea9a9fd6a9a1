"""SSH listener for SFTP and SCP: sockets, transports, authentication, channels.

What paramiko leaves to us, and why it matters:

* ``TCP_NODELAY`` on every accepted socket: without it uploads crawl (measured
  51 vs 299 MB/s) because Nagle meets delayed ACKs.
* Modern algorithms only: no CBC, 3DES, SHA-1 or MD5 (paramiko 5.1 still
  offers some); AES-GCM first; strict key exchange (Terrapin) stays on.
* A large channel window and packet size, so a client can keep many 255 KiB
  requests in flight (``limits@openssh.com``).
* No login grace timer exists in paramiko's server mode: we close connections
  that have not authenticated in time (``[sftp] login_grace``, by default
  ``[server] preauth_timeout``), counted from the connect, banner and key
  exchange included.
* ``pre-login`` must run only after the client proved its credentials. paramiko
  asks ``check_auth_publickey`` before verifying the signature, so the login
  decision hooks the moment paramiko is about to answer USERAUTH_SUCCESS.
* A refusal at connect or login time is sent as SSH_MSG_DISCONNECT text,
  which OpenSSH clients print (unlike SFTP status messages).

The parts of this that need paramiko's private internals (the transport, the
auth hook, the packet reader and writer) live in paramiko_ext/, installed by the
daemon; this module uses paramiko's public server API and ``ServerTransport``.
Each connection's channel handlers (sftp.py, scp.py) get its ``ChannelHost``
(channels.py) and import nothing from here.
"""

from __future__ import annotations

import logging
import shlex
import socket
import threading
import time
from typing import Any, Callable

import paramiko
from paramiko.common import AUTH_FAILED, AUTH_SUCCESSFUL, OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED, OPEN_SUCCEEDED

from scriptsftp.server.support import memory
from scriptsftp.server.support.logs import BoundedLog
from scriptsftp.server.support.proxy_protocol import ProxyError, TrustedProxies, read_header
from scriptsftp.server.contract.dispatch import Decision
from scriptsftp.server.contract.errors import FsError
from scriptsftp.server.contract.ports import ConnectionView, CorePort, KeyProof, SessionPort
from scriptsftp.server.frontends.ssh.paramiko_ext.transport import ServerTransport, send_disconnect
from scriptsftp.server.frontends.ssh.channels import ChannelHost, ReplyPacing, SSHLimits
from scriptsftp.server.frontends.ssh.refuse import refuse
from scriptsftp.server.frontends.ssh.sftp import SFTPHandler

#: serves one ``scp -t``/``scp -f`` command on a channel (scp.run_scp), passed in by the
#: composition root so that this module does not import the SCP front end
ScpRunner = Callable[[paramiko.Channel, SessionPort[Any], list[str], ChannelHost], None]

__all__ = ["SSHConnections", "SSHLimits", "SSHListener", "SSHServer", "ServerTransport", "send_disconnect"]

log = logging.getLogger("scriptsftp.ssh")


WORKER_GRACE = 30.0  # seconds a channel thread may take to clean up after its connection ended


class SSHServer(paramiko.ServerInterface):
    """paramiko's view of one connection; the decisions are the LoginCore's."""

    def __init__(self, core: CorePort[Any, Any], conn: ConnectionView, limits: SSHLimits, pacing: ReplyPacing,
                 scp_runner: ScpRunner | None) -> None:
        self.core = core
        self.conn = conn
        self.limits = limits
        self.scp_runner = scp_runner
        self.transport: ServerTransport | None = None
        # what the SFTP handler and the SCP runner get of this connection
        self.channels = ChannelHost(conn.id, limits, pacing, self.open_session, self._end_connection)
        self._key_failures = 0
        self.key_proof: KeyProof | None = None  # set by the auth handler around a key request
        self._asked_none = self._tried_login = False
        self._refused_execs = 0
        self.settled = threading.Event()  # logged in, or the connection ended

    # --- authentication -----------------------------------------------------

    def get_allowed_auths(self, username: str) -> str:
        return ",".join(self.core.auth_methods(username))

    def check_auth_none(self, username: str) -> int:
        """Always fails, and the methods offered are the same for every name."""
        self._asked_none = True
        return AUTH_FAILED

    @property
    def probed_only(self) -> bool:
        """Asked which methods a name has and left without trying one: an enumeration probe
        (paramiko refuses a second name on one connection, so a prober opens one per name)."""
        return self._asked_none and not self._tried_login

    def check_auth_password(self, username: str, password: str) -> int:
        self._tried_login = True
        if not isinstance(password, str):
            return AUTH_FAILED
        return AUTH_SUCCESSFUL if self.core.check_password(self.conn, username, password) else AUTH_FAILED

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        self._tried_login = True
        # Called before paramiko verifies the signature; with a signed request the proof goes
        # to the core too, which verifies it itself when this runs in an SSH worker.
        return AUTH_SUCCESSFUL if self.core.key_allowed(username, key, self.key_proof) else AUTH_FAILED

    def key_rejected(self, username: str) -> None:
        self._key_failures += 1
        if self._key_failures == 1:
            log.info("public key not accepted for %r", username, extra={"sid": self.conn.id, "ip": self.conn.remote_ip})

    def finish_login(self, username: str, method: str) -> Decision:
        """The login decision; on success the caller answers, then calls :meth:`announce_login`."""
        return self.core.finish_login(self.conn, username, method, announce=False)

    def announce_login(self, method: str) -> None:
        self.channels.touch()  # the idle time of the connection counts from here
        self.settled.set()
        self.core.announce_login(self.conn, method)

    # --- channels -------------------------------------------------------------

    def check_channel_request(self, kind: str, chanid: int) -> int:
        """Session channels only, after login, and at most ``max_channels`` open at once: each
        costs a thread, a window's worth of buffer and the handles it opens, so one connection
        must not open hundreds (OpenSSH's client multiplexes ~10 by default)."""
        if kind != "session" or self.conn.account is None:
            return OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED
        if self._open_channels() >= self.limits.max_channels:
            log.info("channel refused: %d channels open (max_channels_per_connection)",
                     self.limits.max_channels, extra={"sid": self.conn.id})
            return OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED
        self.channels.touch()
        return OPEN_SUCCEEDED

    def _open_channels(self) -> int:
        """Channels of this connection not yet closed (paramiko forgets a channel once closed;
        the one being asked about is not there yet)."""
        transport = self.transport
        return transport.open_channel_count() if transport is not None else 0

    def check_channel_subsystem_request(self, channel: paramiko.Channel, name: str) -> bool:
        if name != "sftp":
            return False
        return super().check_channel_subsystem_request(channel, name)

    def check_channel_exec_request(self, channel: paramiko.Channel, command: bytes) -> bool:
        """Only ``scp -t``/``scp -f`` (legacy SCP); never a shell, never another program."""
        try:
            argv = shlex.split(command.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return False
        if not argv or argv[0] != "scp" or self.scp_runner is None:
            # clients probe for tools they could use (rclone: md5sum, sha1sum, echo, df; seven per
            # connection): the first refusal of a connection is worth a line, the rest only at debug
            self._refused_execs += 1
            level = logging.INFO if self._refused_execs == 1 else logging.DEBUG
            log.log(level, "exec refused: %r (only scp is offered)", command[:200], extra={"sid": self.conn.id})
            return False
        try:
            session = self.open_session("scp")
        except FsError as exc:
            log.info("scp refused: %s", exc.message, extra={"sid": self.conn.id})
            return False
        worker = threading.Thread(target=self.scp_runner, args=(channel, session, argv[1:], self.channels),
                                  name=f"scp-{self.conn.id}", daemon=True)
        self.channels.add_worker(worker)
        assert self.transport is not None  # set before the transport starts
        self.transport.start_after_reply(channel, worker.start)
        return True

    def _end_connection(self, reason: str) -> None:
        """The server closed this connection's last channel (idle, stalled): close the connection."""
        if self.transport is not None and self.transport.is_active():
            log.info("ssh connection closed: %s", reason, extra={"sid": self.conn.id})
            send_disconnect(self.transport, reason)

    def check_channel_pty_request(self, *args: object) -> bool:
        return False

    def check_channel_shell_request(self, channel: paramiko.Channel) -> bool:
        return False

    def open_session(self, protocol: str) -> SessionPort[Any]:
        return self.core.open_session(self.conn, protocol)

    def get_banner(self) -> tuple[str | None, str | None]:
        return (None, None)


def proxied_address(client: socket.socket, addr: tuple, proxies: TrustedProxies,
                    deadline: float) -> tuple | None:
    """The client's address: ``addr``, or for a connection from a trusted proxy the one its
    PROXY header names (read by ``deadline``, the login grace's end); None when that header
    is missing or bad (logged; the caller closes the connection). A header's LOCAL command (a
    health check) leaves ``addr``."""
    if not proxies.trusts(addr[0]):
        return addr
    try:
        header = read_header(client, deadline)
    except ProxyError as exc:
        log.info("connection from trusted proxy %s closed: %s", addr[0], exc, extra={"ip": addr[0]})
        return None
    return header.client or addr


def bind_sockets(addresses: list[tuple[str, int]]) -> list[socket.socket]:
    sockets = []
    for host, port in addresses:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        s = socket.socket(family, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host.strip("[]"), port))
        s.listen(128)
        sockets.append(s)
    return sockets


def bound_names(sockets: list[socket.socket]) -> list[str]:
    """``host:port`` of each socket still open (none once the listener stopped accepting)."""
    out = []
    for s in sockets:
        if s.fileno() == -1:
            continue
        host, port = s.getsockname()[:2]
        out.append(f"{host}:{port}")
    return out


def accept_forever(sock: socket.socket, stopping: threading.Event,
                   accepted: Callable[[socket.socket, tuple], None]) -> None:
    """Hand each connection to ``accepted`` until ``stopping`` is set (and the socket shut down)."""
    while not stopping.is_set():
        try:
            client, addr = sock.accept()
        except OSError:
            if stopping.is_set():
                return
            time.sleep(0.05)  # e.g. EMFILE: do not spin
            continue
        try:
            accepted(client, addr)
        except Exception:  # one connection's failure must never end accepting for everyone
            _ACCEPT_FAILED.log(log, "could not hand over a connection from %s", addr[0], exc_info=True)
            client.close()


_ACCEPT_FAILED = BoundedLog(logging.ERROR)


def close_listening(sockets: list[socket.socket]) -> None:
    for s in sockets:
        try:
            # close() alone neither wakes a thread blocked in accept() nor stops the
            # kernel from completing handshakes; shutdown() does both (Linux).
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            s.close()
        except OSError:
            pass


class SSHConnections:
    """Serves accepted SSH connections, one thread each, with what paramiko needs.

    ``core`` is the LoginCore in a single-process server, or a connection's
    RemoteCore in an SSH worker process (remote_core.py)."""

    def __init__(
        self,
        host_keys: list[paramiko.PKey],
        limits: SSHLimits,
        scp_runner: ScpRunner | None = None,
        proxies: TrustedProxies | None = None,
    ) -> None:
        self.host_keys = host_keys
        self.limits = limits
        self.scp_runner = scp_runner
        self.proxies = proxies or TrustedProxies()  # (an SSH worker's: the core read the header)
        self.pacing = ReplyPacing()  # shared by this process's SFTP channels
        self.stopping = threading.Event()
        self._transports: set[paramiko.Transport] = set()
        self._lock = threading.Lock()

    def serve(self, client: socket.socket, addr: tuple, core: CorePort[Any, Any]) -> None:
        # the login grace counts from here: the banner and the key exchange (paramiko
        # allows 15 s each) are part of it, or an idle socket would outlive it
        deadline = time.monotonic() + self.limits.login_grace
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        proxied = proxied_address(client, addr, self.proxies, deadline)
        if proxied is None:
            client.close()
            return
        addr = proxied
        conn, decision = core.connect("sftp", addr[0], client.getsockname()[1])
        transport = None
        server: SSHServer | None = None
        if not decision.allowed:
            # Refused (defender or connect script): no key exchange, no transport thread.
            try:
                refuse(client, decision.reason or "connection refused by a server script")
            finally:
                client.close()
                core.disconnect(conn)
            return
        try:
            transport = ServerTransport(
                client, default_window_size=self.limits.window_size,
                default_max_packet_size=self.limits.max_packet,
            )
            transport.local_version = "SSH-2.0-scriptsftp"
            # what the login grace leaves (a PROXY header took its share)
            transport.banner_timeout = transport.handshake_timeout = max(0.5, deadline - time.monotonic())
            for key in self.host_keys:
                transport.add_server_key(key)
            server = SSHServer(core, conn, self.limits, self.pacing, self.scp_runner)
            server.transport = transport
            transport.set_subsystem_handler("sftp", SFTPHandler, server.channels)
            with self._lock:
                if self.stopping.is_set():
                    return
                self._transports.add(transport)
            conn.on_kick = lambda reason, t=transport: send_disconnect(t, reason)
            try:
                transport.start_server(server=server)
            except (paramiko.SSHException, EOFError, OSError) as exc:
                log.info("ssh handshake failed: %s", exc, extra={"sid": conn.id, "ip": addr[0]})
                core.protocol_error(conn, f"ssh handshake failed: {exc}")
                return
            server.settled.wait(max(0.0, deadline - time.monotonic()))
            if transport.is_active() and not transport.is_authenticated():
                log.info("login grace time (%ss) exceeded", self.limits.login_grace, extra={"sid": conn.id})
                send_disconnect(transport, "login grace time exceeded")
                return
            self._serve_until_idle(transport, server)
        finally:
            if transport is not None:
                transport.close()  # does nothing for a transport never started...
                if server is not None:
                    server.channels.join_workers(WORKER_GRACE)
                transport.release_socket()  # ...and nothing else writes to it now
                with self._lock:
                    self._transports.discard(transport)
                    idle = not self._transports
            client.close()  # (already handed to the transport, if there was one)
            if server is not None and server.probed_only:
                core.protocol_error(conn, "auth 'none' only, no login attempt (a user-name probe)")
            core.disconnect(conn)
            if transport is not None and idle:
                memory.release_free_memory()  # the last connection's buffers go back to the system

    def _serve_until_idle(self, transport: paramiko.Transport, server: SSHServer) -> None:
        """Wait for the connection to end; end it once it has had no running channel for
        ``idle_timeout`` (paramiko times out nothing on a logged-in connection). Wakes once
        per idle_timeout, not per second: an idle connection costs no extra wakeups."""
        idle = self.limits.idle_timeout
        while idle and transport.is_active():
            left = idle - server.channels.idle_for()
            if left <= 0:
                log.info("ssh connection closed: no channel open for %gs", idle, extra={"sid": server.conn.id})
                send_disconnect(transport, "idle timeout")
                break
            transport.join(left)
        transport.join()

    def active(self) -> int:
        with self._lock:
            return len(self._transports)

    def close_all(self, reason: str) -> None:
        with self._lock:
            transports = list(self._transports)
        for t in transports:
            send_disconnect(t, reason)


class SSHListener:
    """Accepts SSH connections on one or more addresses and serves them in this process."""

    name = "sftp"

    def __init__(
        self,
        addresses: list[tuple[str, int]],
        host_keys: list[paramiko.PKey],
        core: CorePort[Any, Any],
        limits: SSHLimits,
        scp_runner: ScpRunner | None = None,
        proxies: TrustedProxies | None = None,
    ) -> None:
        self.core = core
        self.connections = SSHConnections(host_keys, limits, scp_runner, proxies)
        self.sockets = bind_sockets(addresses)

    @property
    def bound(self) -> list[str]:
        return bound_names(self.sockets)

    def start(self) -> None:
        for s in self.sockets:
            threading.Thread(target=accept_forever, args=(s, self.connections.stopping, self._accepted),
                             name="ssh-accept", daemon=True).start()

    def _accepted(self, client: socket.socket, addr: tuple) -> None:
        threading.Thread(target=self.connections.serve, args=(client, addr, self.core),
                         name=f"ssh-{addr[0]}", daemon=True).start()

    def stop_accepting(self) -> None:
        self.connections.stopping.set()
        close_listening(self.sockets)

    def active(self) -> int:
        return self.connections.active()

    def close_all(self, reason: str) -> None:
        self.connections.close_all(reason)

"""paramiko's server ``Transport`` bent where its public surface stops (paramiko pinned to 5.1.*).

Every override here replaces a private method or attribute of paramiko 5.1, so it
lives beside the other patches and is checked against the installed version by
``paramiko_ext.install()``:

* ``_channel_handler_table``: a channel request's worker starts only once paramiko
  answered the request (:meth:`ServerTransport.start_after_reply`); channel data is
  handed to the channel's pump right after it is buffered (:meth:`ServerTransport.set_pump`).
  Both are typed per-channel registrations on the transport, not attributes on the channel.
* ``packetizer.__class__``: the buffered reader (recv.py) and a handshake deadline
  without a timer thread.
* ``_send_kex_init``/``_negotiate_keys``: AES-GCM for the OpenSSH clients that accept it.
* ``_parse_newkeys`` installs an ``AuthHandler`` whose ``_send_auth_result`` runs the
  login decision after the credentials are proven (:class:`LoginHooks`).
* ``_log``: protocol errors of clients that never logged in are one info line.
* ``_check_banner`` (reading ``packetizer.readline``): a PROXY protocol header where the
  client's version line belongs is refused (:meth:`ServerTransport._check_banner`).
* ``_active_check_timeout``, ``_preferred_ciphers``/``_preferred_macs``, ``_channels``
  and ``_send_message`` (:func:`send_disconnect`).

The SSH front end (server.py) uses :class:`ServerTransport` and the functions here and
touches no paramiko private name itself.
"""

from __future__ import annotations

import logging
import socket
import sys
import time
from typing import Callable, Protocol, cast

import paramiko
from paramiko.auth_handler import AuthHandler
from paramiko.common import (
    AUTH_SUCCESSFUL, DISCONNECT_NO_MORE_AUTH_METHODS_AVAILABLE, MSG_CHANNEL_DATA, MSG_CHANNEL_REQUEST,
    cMSG_DISCONNECT,
)
from paramiko.message import Message

from scriptsftp.server.contract.dispatch import Decision
from scriptsftp.server.contract.errors import CoreGone
from scriptsftp.server.contract.ports import KeyProof
from scriptsftp.server.frontends.ssh.paramiko_ext.recv import BufferedPacketizer
from scriptsftp.server.support import logs

log = logging.getLogger("scriptsftp.ssh")

DISCONNECT_BY_APPLICATION = 11

_core_gone_log = logs.BoundedLog(logging.WARNING)


class LoginHooks(Protocol):
    """What the auth handler asks of the transport's ``server_object`` (server.SSHServer)."""

    key_proof: KeyProof | None  # the signed public-key request being handled, for the core

    def finish_login(self, username: str, method: str) -> Decision: ...

    def announce_login(self, method: str) -> None: ...

    def key_rejected(self, username: str) -> None: ...


class HandshakeDeadline(BufferedPacketizer):
    """paramiko's Packetizer starts a ``threading.Timer`` thread on every connection only
    to raise a flag once ``handshake_timeout`` has passed; the flag is read where packets
    are read, and the timer cancelled (an ``Event.set()``) after every packet. Starting
    that thread sits between the client's banner and our KEXINIT, so every client waits
    for it. A deadline read at the same places gives the same timeout without a thread.
    (The three methods replaced are the only users of the timer; paramiko 5.1.)"""

    _hs_deadline: float | None = None
    _hs_done = False

    def start_handshake(self, timeout: float) -> None:
        if self._hs_deadline is None:
            self._hs_deadline = time.monotonic() + float(timeout)

    def handshake_timed_out(self) -> bool:
        if self._hs_deadline is None or self._hs_done:
            return False
        return time.monotonic() >= self._hs_deadline

    def complete_handshake(self) -> None:
        if self._hs_deadline is not None:
            self._hs_done = True


class ConnectionSocket(socket.socket):
    """A client connection as paramiko holds it: ``close()`` only shuts it down.

    paramiko closes the socket from whichever thread ends the connection (the transport
    thread on EOF, another on a kick or a shutdown) while other threads may be between
    ``sock.fileno()`` and ``readv()``/``writev()`` on it (recv.py, send.py). A
    descriptor freed there and reused by the next ``accept()`` would carry that thread's
    bytes into, or out of, another client's connection. ``shutdown()`` wakes those threads
    (their calls fail or read EOF) and sends the FIN; the listener frees the descriptor with
    ``release()`` once no thread can use it."""

    @classmethod
    def adopt(cls, sock: socket.socket) -> "ConnectionSocket":
        if isinstance(sock, cls):
            return sock
        return cls(sock.family, sock.type, sock.proto, fileno=sock.detach())

    def close(self) -> None:
        try:
            self.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def release(self) -> None:
        super().close()


class ServerTransport(paramiko.Transport):
    """The server side of one SSH connection, as paramiko's Transport with the overrides
    listed in the module docstring; server.SSHConnections makes one per accepted client."""

    _preferred_ciphers: tuple[str, ...] = (
        "aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "aes128-ctr", "aes256-ctr", "aes192-ctr",
    )
    _preferred_macs: tuple[str, ...] = (
        "hmac-sha2-256-etm@openssh.com", "hmac-sha2-512-etm@openssh.com", "hmac-sha2-256", "hmac-sha2-512",
    )

    _quiet_traceback = False

    # paramiko's transport thread waits for the socket in slices of this many seconds, then
    # looks whether it was closed, a keepalive or a rekey is due, the handshake overran:
    # paramiko's 0.1 s woke every idle session ten times a second (100 idle sessions: 6% of
    # a core). Closing shuts the socket down (ConnectionSocket), which wakes it at once.
    _active_check_timeout = 1.0

    def __init__(self, sock: socket.socket, **kwargs: object) -> None:
        super().__init__(ConnectionSocket.adopt(sock), **kwargs)  # type: ignore[arg-type]
        self.packetizer.__class__ = HandshakeDeadline  # same object, no timer thread
        self._pumps: dict[paramiko.Channel, Callable[[], None]] = {}
        self._after_reply: dict[paramiko.Channel, Callable[[], None]] = {}
        # paramiko's run loop calls self._channel_handler_table[ptype](chan, m): an instance
        # table of bound methods reaches this transport's registrations in one lookup
        self._channel_handler_table = {**paramiko.Transport._channel_handler_table,  # type: ignore[attr-defined]
                                       MSG_CHANNEL_REQUEST: self._handle_request_then_start,
                                       MSG_CHANNEL_DATA: self._feed_then_pump}

    # --- per-channel registrations ----------------------------------------------------

    def start_after_reply(self, chan: paramiko.Channel, start: Callable[[], None]) -> None:
        """Call ``start`` once paramiko has answered the channel request being handled now.

        paramiko answers a channel request after the check_* callback returns; a worker
        started inside the callback could finish (and send CHANNEL_CLOSE) before that answer."""
        self._after_reply[chan] = start

    def set_pump(self, chan: paramiko.Channel, pump: Callable[[], None] | None) -> None:
        """Have the transport thread call ``pump`` after each CHANNEL_DATA it buffered in
        ``chan`` (the SFTP stream answers READs and WRITEs there, without waking the
        channel's thread); None removes it."""
        if pump is None:
            self._pumps.pop(chan, None)
        else:
            self._pumps[chan] = pump

    def _handle_request_then_start(self, chan: paramiko.Channel, m: Message) -> None:
        chan._handle_request(m)  # type: ignore[attr-defined]
        start = self._after_reply.pop(chan, None)
        if start is not None:
            start()

    def _feed_then_pump(self, chan: paramiko.Channel, m: Message) -> None:
        chan._feed(m)  # type: ignore[attr-defined]
        pump = self._pumps.get(chan)
        if pump is not None:
            pump()

    def _check_banner(self) -> None:
        """paramiko skips any lines a client sends before its version line; a PROXY protocol
        header there (version 1's ``PROXY …`` line, or the first lines of version 2's
        signature: two empty ones, then a NUL) came from a balancer this server does not trust
        (a trusted one's header is read before paramiko sees the socket): refused, so the
        connection fails as a protocol error instead of being served as the balancer's."""
        packetizer = self.packetizer
        readline = packetizer.readline
        seen: list[str] = []

        def checked(timeout: float) -> str:
            line: str = readline(timeout)
            if len(seen) < 3:
                seen.append(line)
                if seen[0].startswith("PROXY ") or seen == ["", "", "\x00"]:
                    raise paramiko.SSHException(": PROXY protocol header from an address not in "
                                                "[cluster] trusted_proxies")
            return line

        packetizer.readline = checked  # type: ignore[method-assign]
        try:
            super()._check_banner()  # type: ignore[misc]
        finally:
            del packetizer.readline

    def open_channel_count(self) -> int:
        """Channels of this connection not yet closed (paramiko forgets a channel once closed)."""
        return len(self._channels)  # type: ignore[attr-defined]


    def run(self) -> None:
        """paramiko's transport thread; at its end, wake whoever waits for the login."""
        try:
            super().run()
        finally:
            settled = getattr(self.server_object, "settled", None)
            if settled is not None:
                settled.set()

    def release_socket(self, wait: float = 5.0) -> None:
        """Free the descriptor, once the transport thread is gone (see ConnectionSocket);
        the caller has joined every other thread that writes to it."""
        if self.ident is not None:  # started
            self.join(wait)
        if not self.is_alive():
            cast(ConnectionSocket, self.sock).release()

    def _log(self, level: int, msg, *args) -> None:
        """Protocol errors of clients that never logged in (port scanners, TCP health checks,
        broken clients) are the client's problem, not the server's: one info line, no
        traceback. paramiko logs them as ERROR with a 20-line traceback each. Unexpected
        exceptions ("Unknown exception") keep their ERROR and traceback, but for a closed
        link to the core (:meth:`_core_gone`).

        paramiko calls this ~30 times per connection, nearly all at DEBUG: those that
        nobody listens to stop here."""
        if level < logging.ERROR:
            if self.logger.isEnabledFor(level):
                super()._log(level, msg, *args)  # type: ignore[misc]
            return
        if self._core_gone(msg):
            return
        if isinstance(msg, str) and msg.startswith("Socket exception"):
            # a logged-in client that vanished (reset, broken pipe: a killed client, a
            # dropped link) ends its session, not the server's health: sshd logs it at INFO
            super()._log(logging.INFO, msg, *args)  # type: ignore[misc]
            return
        if not self.is_authenticated():
            if isinstance(msg, list):
                if self._quiet_traceback:
                    self._quiet_traceback = False
                    level = logging.DEBUG
            elif isinstance(msg, str) and msg.startswith(("Exception (server)", "Socket exception",
                                                          "Error reading SSH protocol banner")):
                self._quiet_traceback = True
                level = logging.INFO
        super()._log(level, msg, *args)  # type: ignore[misc]

    _core_gone_seen = False

    def _core_gone(self, msg: object) -> bool:
        """paramiko's "Unknown exception" (and the traceback after it) for a CoreGone: the
        worker's link to the core closed under this connection (shutdown, or its login grace
        ran out during a password check). Expected, not a bug: one bounded warning line."""
        if isinstance(msg, list) and self._core_gone_seen:
            self._core_gone_seen = False
            return True
        if isinstance(msg, str) and msg.startswith("Unknown exception") \
                and isinstance(sys.exc_info()[1], CoreGone):
            self._core_gone_seen = True
            _core_gone_log.log(log, "ssh connection ended: its link to the core closed (%s)",
                            msg[len("Unknown exception: "):200])
            return True
        return False

    # --- AES-GCM for the clients that accept it ------------------------------------------
    #
    # The client's cipher preference decides (RFC 4253 7.1). OpenSSH ranks chacha20-poly1305
    # (which paramiko lacks), then aes-ctr, then aes-gcm; so it settles on aes-ctr with a
    # separate HMAC-SHA256, the slowest thing we offer (a 256 MiB download costs the server
    # 0.8 s of CPU against 0.63 s with GCM). Offering only GCM to a client that lists GCM
    # keeps it within its own configured set while getting the fast AEAD. To know the list,
    # our KEXINIT waits for the client's; only OpenSSH clients, which are known to send theirs
    # without waiting for ours, are asked to (anything else gets the usual immediate KEXINIT).
    # Cost: half a round trip on connect. Rekeys are unaffected (the ciphers stay).

    _GCM = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")
    _kexinit_waits = False

    def _send_kex_init(self) -> None:
        if self.server_mode and not self.initial_kex_done and not self._kexinit_waits \
                and self.local_kex_init is None and str(self.remote_version).startswith("SSH-2.0-OpenSSH_"):
            self._kexinit_waits = True  # sent by _negotiate_keys when the client's arrives
            return
        super()._send_kex_init()  # type: ignore[misc]

    def _negotiate_keys(self, m: Message) -> None:
        if self._kexinit_waits and self.local_kex_init is None:
            self._preferred_ciphers = self._ciphers_for(m)
        super()._negotiate_keys(m)  # type: ignore[misc]

    def _ciphers_for(self, m: Message) -> tuple[str, ...]:
        """Only the GCM ciphers when the client accepts one of them both ways, else the usual list."""
        try:
            m.get_bytes(16)  # cookie
            m.get_list()  # kex
            m.get_list()  # host key
            to_server, to_client = m.get_list(), m.get_list()
        except Exception:
            return type(self)._preferred_ciphers  # malformed: paramiko's own parse will say so
        finally:
            m.rewind()
        gcm = tuple(c for c in self._GCM if c in to_server and c in to_client)
        return gcm or type(self)._preferred_ciphers

    def _parse_newkeys(self, m: Message) -> None:
        if self.server_mode and self.auth_handler is None:
            self.auth_handler = LoginAuthHandler(self)
        super()._parse_newkeys(m)  # type: ignore[misc]


class LoginAuthHandler(AuthHandler):
    """Runs the login decision (policy, pre-login scripts) after credentials are proven.

    The decision comes before USERAUTH_SUCCESS; what cannot change it (the ``login ok``
    line, the metric, ``post-login``) comes right after, while the client reads the
    answer. This thread handles the client's next message only once that is done."""

    def _parse_userauth_request(self, m: Message) -> None:
        """Keep a signed public-key request's proof for the login hooks (:class:`KeyProof`),
        then let paramiko handle the request as usual."""
        server = cast(LoginHooks, self.transport.server_object)
        server.key_proof = _key_proof(m, self.transport.session_id)
        try:
            super()._parse_userauth_request(m)  # type: ignore[misc]
        finally:
            server.key_proof = None

    def _send_auth_result(self, username: str, method: str, result: int) -> None:
        server = cast(LoginHooks, self.transport.server_object)
        if result == AUTH_SUCCESSFUL:
            decision = server.finish_login(username, method)
            if not decision.allowed:
                send_disconnect(self.transport, decision.reason, DISCONNECT_NO_MORE_AUTH_METHODS_AVAILABLE)
                return
            try:
                super()._send_auth_result(username, method, result)  # type: ignore[misc]
            finally:  # allowed and counted: logged even if the answer could not be sent
                server.announce_login(method)
            return
        if method == "publickey":
            server.key_rejected(username)
        super()._send_auth_result(username, method, result)  # type: ignore[misc]


def _key_proof(m: Message, session_id: bytes | None) -> KeyProof | None:
    """The proof in a USERAUTH_REQUEST if it is a signed public-key one, read without
    moving the message's position (paramiko reads it next)."""
    if not session_id:
        return None
    at = m.packet.tell()
    try:
        m.get_text()  # user name: the core takes it from the request it is asked about
        service, method = m.get_text(), m.get_text()
        if method != "publickey" or not m.get_boolean():
            return None
        algorithm = m.get_text()
        m.get_binary()  # the key: the core takes it from the request it is asked about
        return KeyProof(bytes(session_id), service, algorithm, m.get_binary())
    except Exception:  # malformed: paramiko's own parsing answers it
        return None
    finally:
        m.packet.seek(at)


def send_disconnect(transport: paramiko.Transport, reason: str, code: int = DISCONNECT_BY_APPLICATION) -> None:
    """Close with a reason the client prints (OpenSSH: 'Received disconnect ...: reason')."""
    try:
        m = Message()
        m.add_byte(cMSG_DISCONNECT)
        m.add_int(code)
        m.add_string(reason[:1000])
        m.add_string("en")
        transport._send_message(m)  # type: ignore[attr-defined]
    except Exception:
        pass
    transport.close()

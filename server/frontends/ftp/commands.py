"""The FTP command handler: each command that touches a file is one Session call.

pyftpdlib's filesystem and authorizer are stubs that hold no host path and
grant nothing themselves: the Session decides (docs/architecture.md). Session
errors become one reply line (replies.py): ``550 <message>`` (a script's veto
reason included), ``553`` for a refused name, ``452`` for a full disk, ``451``
for a local failure.

* Login goes through the core's port (``LocalCorePort``: the same users, events
  and limits as SFTP); the connection, session and handles are the contract's
  ports too (server/contract/ports.py), never the core's classes;
  ``connect`` scripts run in the connection's own thread, not the acceptor's.
* ``AUTH TLS`` drops whatever the client pipelined in plaintext after it
  (pyftpdlib #315, the STARTTLS command-injection class, CVE-2011-1575).
* Active mode (PORT/EPRT) is off unless ``[ftp] active_mode = true``, and then
  only to the client's own address on an unprivileged port (no FTP bounce).

Resume and atomic uploads: ``REST n`` + ``STOR`` starts the hidden staging file
as a copy of the *published* file cut at ``n`` and appends what the client
sends; ``APPE`` likewise appends to a copy. Nothing partial is ever kept, so
after an interrupted upload the published size (0 for a new file) is where a
client resumes from.

:class:`SessionCommands` is a pyftpdlib control channel (pyftpdlib_ext's
ControlChannel); listener.py puts it in front of pyftpdlib's plain or TLS
handler and names the data connection classes (data.py).
"""

from __future__ import annotations

import calendar
import functools
import logging
import posixpath
import secrets
import stat as statmod
import time
from typing import Any, Callable, Protocol

from OpenSSL import SSL

from scriptsftp.server.contract.credentials import Credentials
from scriptsftp.server.contract.errors import (
    AlreadyExists, BadCredentials, FsError, LoginRefused, NotADirectory, TlsRequired,
)
from scriptsftp.server.contract.ports import (
    Entry, LocalConnectionView, LocalCorePort, LocalSessionPort, WriteHandlePort,
)
from scriptsftp.server.frontends.ftp.data import Download, Upload
from scriptsftp.server.frontends.ftp.pyftpdlib_ext import ControlChannel, FileProducer, FTPHandler
from scriptsftp.server.frontends.ftp.replies import reply_of, reply_text
from scriptsftp.server.support.proxy_protocol import ProxyError, TrustedProxies, read_header

log = logging.getLogger("scriptsftp.ftp")

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_STOU_TRIES = 10

def _replies(method: Callable[..., None]) -> Callable[..., None]:
    """A command method whose Session errors become its reply line."""

    @functools.wraps(method)
    def command(self: ControlChannel, *args: Any, **kwargs: Any) -> None:
        try:
            method(self, *args, **kwargs)
        except FsError as exc:
            self.respond(reply_of(exc))

    return command


# --- listings ---------------------------------------------------------------------------


def _list_line(entry: Entry, owner: str, now: float) -> str:
    """One ``ls -l`` line, as FTP clients parse LIST output (English month names, UTC)."""
    st = entry.st
    t = time.gmtime(st.st_mtime)
    if now - st.st_mtime < 180 * 86400:
        when = f"{_MONTHS[t.tm_mon - 1]} {t.tm_mday:2d} {t.tm_hour:02d}:{t.tm_min:02d}"
    else:
        when = f"{_MONTHS[t.tm_mon - 1]} {t.tm_mday:2d}  {t.tm_year}"
    return f"{statmod.filemode(st.st_mode)} {st.st_nlink or 1:3d} {owner:<8} {owner:<8} {st.st_size:>12} {when} {entry.name}\r\n"


def _mlsx_facts(entry: Entry, perms: frozenset[str], kind: str | None = None) -> str:
    """RFC 3659 facts; ``perm`` reflects what the Session would allow in that directory."""
    st = entry.st
    is_dir = statmod.S_ISDIR(st.st_mode)
    p = ""
    if is_dir:
        p += "e" + ("l" if "list" in perms else "")
        p += "c" if "upload" in perms else ""
        p += "m" if "mkdir" in perms else ""
        p += "p" if "rmdir" in perms else ""
    else:
        p += "r" if "download" in perms else ""
        p += "aw" if {"upload", "overwrite"} <= perms else ""
    p += "d" if ("rmdir" if is_dir else "delete") in perms else ""
    p += "f" if "rename" in perms else ""
    modify = time.strftime("%Y%m%d%H%M%S", time.gmtime(st.st_mtime))
    facts = f"type={kind or ('dir' if is_dir else 'file')};"
    if not is_dir:
        facts += f"size={st.st_size};"
    return facts + f"modify={modify};perm={p};unique={st.st_dev:x}g{st.st_ino:x};"


# --- stubs standing in for pyftpdlib's filesystem and authorizer ---------------------


class _VirtualFS:
    """Only what pyftpdlib's command parsing needs: a cwd and lexical path joining.

    Paths stay virtual; the Session confines and checks them. No method here
    touches the disk, and any pyftpdlib code path we did not override that tries
    fails with AttributeError (the connection is closed) rather than reaching a
    host path."""

    def __init__(self, cmd_channel: Any) -> None:
        self.cmd_channel = cmd_channel
        self.root = "/"
        self.cwd = "/"

    def ftpnorm(self, ftppath: str) -> str:
        return posixpath.normpath("/" + posixpath.join(self.cwd, ftppath).lstrip("/"))

    ftp2fs = ftpnorm

    def fs2ftp(self, fspath: str) -> str:
        return fspath

    def validpath(self, path: str) -> bool:
        return True


class _NoAuthorizer:
    """pyftpdlib asks its authorizer before each command; the Session decides instead."""

    def has_perm(self, username: str, perm: str, path: str | None = None) -> bool:
        return True

    def get_perms(self, username: str) -> str:
        return "elradfmwMT"

    def get_msg_quit(self, username: str) -> str:
        return "Goodbye."

    def impersonate_user(self, username: str, password: str) -> None:
        pass

    def terminate_impersonation(self, username: str) -> None:
        pass


# --- the control connection -----------------------------------------------------------------

FS_COMMANDS_NOT_OFFERED = ("REIN", "SMNT")  # no account switch, no mounts: one Session per login
_TRANSFER_COMMANDS = frozenset({"RETR", "STOR", "APPE", "STOU", "LIST", "NLST", "MLSD"})


class ConnectionTracker(Protocol):
    """The listener's side of a connection: it counts them and kicks them at shutdown."""

    def track(self, handler: SessionCommands) -> None: ...

    def untrack(self, handler: SessionCommands) -> None: ...


class SessionCommands(ControlChannel):
    """FTP commands as Session calls; listener.py puts it before FTPHandler or TLS_FTPHandler."""

    # set per listener by make_listener. The port is invariant in its connection and session
    # types (LoginCore's are Connection and Session): the core is LocalCorePort[Any, Any] and
    # what we keep of it (conn, session) is typed on the contract's views below.
    core: LocalCorePort[Any, Any]
    listener: ConnectionTracker
    active_mode = False
    implicit_tls = False
    stall_timeout = 120.0  # [server] stall_timeout, read by the data channel (data.py)
    proxies = TrustedProxies()  # [cluster] trusted_proxies: whose PROXY headers are believed

    # pyftpdlib settings
    authorizer = _NoAuthorizer()
    banner = "scriptsftp FTP server ready."
    permit_foreign_addresses = False  # no FTP bounce (RFC 2577)
    permit_privileged_ports = False
    unicode_errors = "strict"  # an undecodable name gets 501, never a U+FFFD look-alike
    max_login_attempts = 3
    proto_cmds = {k: v for k, v in FTPHandler.proto_cmds.items() if k not in FS_COMMANDS_NOT_OFFERED}

    authenticated: bool  # pyftpdlib's; set here by ftp_PASS
    conn: LocalConnectionView | None = None
    rename_from: str | None = None  # RNFR's path, for the RNTO that must follow
    session: LocalSessionPort[WriteHandlePort] | None = None
    _greet_in_thread = False
    _ended = False
    _preauth_timer: Any = None

    # --- lifetime -----------------------------------------------------------------

    def handle(self) -> None:
        """Called in the acceptor thread: the greeting waits for the connection's own thread."""
        self._greet_in_thread = True

    def add_channel(self, map: Any = None, events: Any = None) -> None:
        super().add_channel(map, events)
        if self._greet_in_thread:  # registered with the connection thread's own I/O loop
            self._greet_in_thread = False
            try:
                self.move_idle_timer_here()
                self._preauth_timer = self.ioloop.call_later(
                    self.core.preauth_timeout, self._preauth_expired, _errback=self.handle_error)
                self._greet()
            except Exception:
                self.handle_error()

    def _greet(self) -> None:
        self.listener.track(self)
        sock = self.socket
        if self.proxies.trusts(self.remote_ip) and not self._read_proxy_header(sock):
            self.close()
            return
        self.conn, decision = self.core.connect("ftp", self.remote_ip, sock.getsockname()[1])
        self.conn.on_kick = self.kick
        if not decision.allowed:
            self.respond("421 " + reply_text(decision.reason or "connection refused by a server script"))
            self.close_when_done()
            return
        if self.implicit_tls:
            self.protect_everything()
            self.secure_connection(self.ssl_context)
            return  # the 220 follows the handshake
        self.respond(f"220 {self.banner}")

    def _read_proxy_header(self, sock: Any) -> bool:
        """A connection from a trusted proxy starts with a PROXY header naming the client (FTP
        clients wait for the greeting: nothing else can come first). Read here, in this
        connection's own thread, within the pre-authentication time; the client's address
        replaces the proxy's. False (logged) when it is missing or bad."""
        proxy = self.remote_ip
        try:
            header = read_header(sock, time.monotonic() + self.core.preauth_timeout)
        except ProxyError as exc:
            log.info("connection from trusted proxy %s closed: %s", proxy, exc, extra={"ip": proxy})
            return False
        finally:
            sock.setblocking(False)  # pyftpdlib's I/O loop
        if header.client is not None:
            self.remote_ip, self.remote_port = header.client
        return True

    def _untrusted_proxy_header(self) -> None:
        """A PROXY header (a version 1 line, or the NUL line of version 2's signature) as a
        command: a balancer this server does not trust. Refused and scored by the defender."""
        reason = "PROXY protocol header from an address not in [cluster] trusted_proxies"
        log.info("FTP connection closed: %s", reason,
                 extra={"sid": self.conn.id if self.conn else "", "ip": self.remote_ip})
        if self.conn is not None:
            self.core.protocol_error(self.conn, reason)
        self.respond("421 " + reply_text(reason))
        self.close_when_done()

    def pre_process_command(self, line: str, cmd: str, arg: str) -> None:
        if not self.authenticated and (cmd == "PROXY" or line == "\x00"):
            self._untrusted_proxy_header()
            return
        super().pre_process_command(line, cmd, arg)

    def _preauth_expired(self) -> None:
        """``[server] preauth_timeout``: a control connection that has not logged in by now is
        closed with a 421, so idle sockets cannot hold connection slots (pyftpdlib's own
        ``timeout`` only counts silence, and a client may trickle commands forever)."""
        if self.is_closed or self.authenticated:
            return
        timeout = self.core.preauth_timeout
        log.info("closing FTP connection not logged in after %gs", timeout,
                 extra={"sid": self.conn.id if self.conn else "", "ip": self.remote_ip})
        self.respond(f"421 Login timeout ({timeout:g}s): closing control connection.")
        self.close_when_done()

    def handle_failed_ssl_handshake(self) -> None:
        if self.conn is not None:  # scanners and probes: the defender counts them
            self.core.protocol_error(self.conn, "TLS handshake failed")
        super().handle_failed_ssl_handshake()

    def handle_ssl_established(self) -> None:
        if self.implicit_tls and not self.authenticated and not self.username:
            self.respond(f"220 {self.banner}")

    def close(self) -> None:
        super().close()  # (closes the data channel first: an open upload is discarded)
        if self._ended:
            return
        self._ended = True
        if self._preauth_timer is not None and not self._preauth_timer.cancelled:
            self._preauth_timer.cancel()
        self.listener.untrack(self)
        if self.conn is not None:
            try:
                self.core.disconnect(self.conn)
            except Exception:
                log.exception("disconnect failed")

    def kick(self, reason: str) -> None:
        """Close from another thread (reload removed the user, shutdown): runs on our own loop."""
        def go() -> None:
            if not self.is_closed:
                self.respond("421 " + reply_text(reason))
                self.close_when_done()
        try:
            self.ioloop.call_later(0, go, _errback=self.handle_error)
        except Exception:
            pass

    # --- command gate ----------------------------------------------------------------

    def _tls_on(self) -> bool:
        return isinstance(getattr(self, "socket", None), SSL.Connection)

    def process_command(self, cmd: str, *args: Any, **kwargs: Any) -> None:
        if cmd in _TRANSFER_COMMANDS and self.data_channel is not None \
                and self.data_channel.file_obj is not None:
            # pyftpdlib would swap the running transfer's file for the new one
            self.respond("425 Another transfer is in progress on this connection.")
            return
        acct = self.session.account if self.session is not None else None
        if acct is not None and acct.require_tls and cmd in ("PASV", "EPSV", "PORT", "EPRT") \
                and not self.data_protected:
            self.respond("521 Data connections must be protected for this user: send PBSZ 0 and PROT P first.")
            return
        super().process_command(cmd, *args, **kwargs)

    def ftp_AUTH(self, line: str) -> None:
        secured_before = self._tls_on()
        super().ftp_AUTH(line)
        if not secured_before and self.tls_requested:
            # Bytes the client sent after AUTH in the same plaintext packet must not
            # run as if they had come over TLS (pyftpdlib #315).
            pending = self.drop_pending_input()
            if pending:
                log.warning("discarded %d bytes pipelined in plaintext after AUTH TLS", pending,
                            extra={"sid": self.conn.id if self.conn else "", "ip": self.remote_ip})

    def ftp_PORT(self, line: str) -> None:
        if self._active_refused():
            return
        super().ftp_PORT(line)

    def ftp_EPRT(self, line: str) -> None:
        if self._active_refused():
            return
        super().ftp_EPRT(line)

    def _active_refused(self) -> bool:
        if self.active_mode:
            return False
        self.respond("502 Active mode (PORT/EPRT) is disabled on this server: use passive mode (PASV/EPSV).")
        return True

    # --- login -------------------------------------------------------------------------

    def _tls_required_reply(self) -> str:
        if getattr(self, "ssl_context", None) is None:
            return "530 TLS is required for this user, and this server offers no FTPS."
        return "530 TLS is required for this user: use FTPS (AUTH TLS before USER, or implicit FTPS)."

    def ftp_USER(self, line: str) -> None:
        if self.authenticated:
            self.respond("503 Already logged in: reconnect to log in as another user.")
            return
        assert self.conn is not None
        self.conn.tls = self._tls_on()
        try:
            self.core.check_tls(self.conn, line)  # before the password travels in clear text
        except TlsRequired:
            self.respond(self._tls_required_reply())
            return
        self.username = line
        self.respond("331 Username ok, send password.")

    def ftp_PASS(self, line: str) -> None:
        if self.authenticated:
            self.respond("503 User already authenticated.")
            return
        name = self.username
        if not name:
            self.respond("503 Login with USER first.")
            return
        self.username = ""
        assert self.conn is not None
        self.conn.tls = self._tls_on()
        try:
            self.session = self.core.login(self.conn, Credentials(name, line))
        except LoginRefused as exc:
            self._login_refused(exc)
            return
        self.username = name
        self.authenticated = True
        if self._preauth_timer is not None and not self._preauth_timer.cancelled:
            self._preauth_timer.cancel()
        self.fs = _VirtualFS(self)
        self.respond("230 Login successful.")

    def _login_refused(self, exc: LoginRefused) -> None:
        """The one place a refused login becomes FTP replies (the core has logged it)."""
        if isinstance(exc, TlsRequired):  # not a failed attempt: no password was checked
            self.respond(self._tls_required_reply())
            return
        if exc.wait:  # the failure delay; this thread serves only this connection
            time.sleep(exc.wait)
        if isinstance(exc, BadCredentials):
            self._login_failed("530 Authentication failed.")
        else:
            self._login_failed("530 " + reply_text(exc.reason))

    def _login_failed(self, reply: str) -> None:
        self.attempted_logins += 1
        self.respond(reply)
        if self.attempted_logins >= self.max_login_attempts:
            self.respond("421 Too many failed logins: goodbye.")
            self.close_when_done()

    # --- directories and names --------------------------------------------------------

    def _s(self) -> LocalSessionPort[WriteHandlePort]:
        assert self.session is not None
        return self.session

    @_replies
    def ftp_CWD(self, path: str) -> None:
        entry = self._s().stat(path)
        if not entry.is_dir:
            raise NotADirectory(f"{path}: not a directory")
        self.fs.cwd = self._s().realpath(path)
        self.respond(f'250 "{self.fs.cwd}" is the current directory.')

    @_replies
    def ftp_MKD(self, path: str) -> None:
        self._s().mkdir(path)
        self.respond('257 "%s" directory created.' % path.replace('"', '""'))

    @_replies
    def ftp_RMD(self, path: str) -> None:
        self._s().rmdir(path)
        self.respond("250 Directory removed.")

    @_replies
    def ftp_DELE(self, path: str) -> None:
        self._s().remove(path)
        self.respond("250 File removed.")

    @_replies
    def ftp_RNFR(self, path: str) -> None:
        if path == "/":
            self.respond("550 Cannot rename the home directory.")
            return
        self._s().stat(path, follow=False)
        self.rename_from = path
        self.respond("350 Ready for destination name.")

    @_replies
    def ftp_RNTO(self, path: str) -> None:
        src, self.rename_from = self.rename_from, None
        if not src:
            self.respond("503 Bad sequence of commands: use RNFR first.")
            return
        # FTP servers rename over an existing file (rename(2)); the Session
        # then also requires the overwrite permission there.
        self._s().rename(src, path, overwrite=True)
        self.respond("250 Renaming ok.")

    @_replies
    def ftp_SIZE(self, path: str) -> None:
        entry = self._s().stat(path)
        if entry.is_dir:
            self.respond(f"550 {reply_text(path)} is not retrievable.")
        else:
            self.respond(f"213 {entry.size}")

    @_replies
    def ftp_MDTM(self, path: str) -> None:
        entry = self._s().stat(path)
        if entry.is_dir:
            self.respond(f"550 {reply_text(path)} is not retrievable.")
        else:
            self.respond("213 " + time.strftime("%Y%m%d%H%M%S", time.gmtime(entry.st.st_mtime)))

    @_replies
    def ftp_MFMT(self, path: str, timeval: str) -> None:
        try:
            when = calendar.timegm(time.strptime(timeval[:14], "%Y%m%d%H%M%S"))
        except ValueError:
            self.respond("501 Invalid time format: expected YYYYMMDDHHMMSS.")
            return
        entry = self._s().stat(path)
        self._s().setstat(path, times=(entry.st.st_atime, float(when)))
        self.respond(f"213 Modify={timeval[:14]}; {path}.")

    @_replies
    def ftp_SITE_CHMOD(self, path: str, mode: str) -> None:
        try:
            bits = int(mode, 8)
            if not 0 <= bits <= 0o7777:
                raise ValueError
        except ValueError:
            self.respond("501 Invalid SITE CHMOD format.")
            return
        self._s().setstat(path, mode=bits)
        self.respond("200 SITE CHMOD successful.")

    # --- listings -------------------------------------------------------------------

    def _entries(self, path: str) -> tuple[str, list[Entry], bool]:
        """(directory, entries, is_dir) for LIST/NLST/STAT; symlinks shown as what they reach."""
        s = self._s()
        try:
            entries = s.listdir(path)
        except NotADirectory:
            return posixpath.dirname(path), [s.stat(path)], False
        shown = []
        for e in entries:
            if e.is_link:
                try:
                    e = Entry(e.name, s.stat(posixpath.join(path, e.name)).st)
                except FsError:
                    pass  # dangling, or pointing outside the home: listed as the link it is
            shown.append(e)
        return path, shown, True

    def _list_lines(self, path: str) -> str:
        _, entries, _ = self._entries(path)
        now = time.time()
        owner = self._s().user
        return "".join(_list_line(e, owner, now) for e in entries)

    @_replies
    def ftp_LIST(self, path: str) -> None:
        data = self._list_lines(path)
        self.push_dtp_data(data.encode("utf-8", "surrogateescape"), isproducer=False, cmd="LIST")

    @_replies
    def ftp_NLST(self, path: str) -> None:
        _, entries, is_dir = self._entries(path)
        names = "".join((e.name if is_dir else posixpath.join(posixpath.dirname(path), e.name)) + "\r\n"
                        for e in entries)
        self.push_dtp_data(names.encode("utf-8", "surrogateescape"), isproducer=False, cmd="NLST")

    @_replies
    def ftp_MLSD(self, path: str) -> None:
        s = self._s()
        directory, entries, is_dir = self._entries(path)
        if not is_dir:
            self.respond(f"501 {reply_text(path)} is not a directory.")
            return
        perms = s.account.access.permissions_at(tuple(p for p in directory.split("/") if p))
        data = "".join(f"{_mlsx_facts(e, perms)} {e.name}\r\n" for e in entries)
        self.push_dtp_data(data.encode("utf-8", "surrogateescape"), isproducer=False, cmd="MLSD")

    @_replies
    def ftp_MLST(self, path: str) -> None:
        s = self._s()
        entry = s.stat(path)
        parent = tuple(p for p in path.split("/") if p)
        perms = s.account.access.permissions_at(parent if entry.is_dir else parent[:-1])
        self.push(f'250-Listing "{path}":\r\n')
        self.push(f" {_mlsx_facts(entry, perms, 'cdir' if path == '/' else None)} {path}\r\n")
        self.respond("250 End MLST.")

    @_replies
    def ftp_STAT(self, path: str) -> None:
        if not path:
            super().ftp_STAT(path)
            return
        data = self._list_lines(path)
        self.push(f'213-Status of "{path}":\r\n')
        self.push(data)
        self.respond("213 End of status.")

    # --- transfers ------------------------------------------------------------------

    _announced: int | None = None

    def ftp_ALLO(self, line: str) -> None:
        """``ALLO size``: the size of the next upload. One that ends cleanly with another
        size is discarded: the only check plain FTP offers against a client that dies
        between two writes while its control connection looks alive (docs/ftp.md)."""
        words = line.split()
        if not words or not words[0].isdigit() or len(words[0]) > 19:
            self.respond("501 Syntax: ALLO <SP> size-in-bytes.")
            return
        self._announced = int(words[0])
        self.respond(f"200 The next upload must be {self._announced} bytes; another size is discarded.")

    def _take_announced(self) -> int | None:
        """ALLO covers the next upload command only, whether it succeeds or not."""
        announced, self._announced = self._announced, None
        return announced

    @_replies
    def ftp_RETR(self, path: str) -> None:
        rest = self.take_restart_position()
        handle = self._s().open_read(path)
        size = handle.size()
        if rest > size:
            handle.abort("REST position beyond the end of the file")
            self.respond(f"554 REST position ({rest}) > file size ({size}).")
            return
        f = Download(handle, rest, self._s().bandwidth.down)
        self.push_dtp_data(FileProducer(f, self.transfer_type), isproducer=True, file=f, cmd="RETR")

    @_replies
    def ftp_STOR(self, path: str, mode: str = "w") -> None:
        rest = self.take_restart_position()
        announced = self._take_announced()
        append = "a" in mode
        handle = self._s().open_write(path, truncate=not (rest or append), append=append)
        offset = 0
        if append or rest:
            size = handle.size()
            if rest > size:
                handle.abort("REST position beyond the end of the file")
                self.respond(f"554 REST position ({rest}) > file size ({size}).")
                return
            offset = size if append else rest
            if not append:
                try:
                    handle.truncate(rest)
                except FsError:
                    handle.abort("could not cut the copy at the REST position")
                    raise
        self._receive(Upload(handle, offset, announced, self._s().bandwidth.up), "APPE" if append else "STOR")

    @_replies
    def ftp_STOU(self, line: str) -> None:
        announced = self._take_announced()
        if self.restart_position:
            self.respond("450 Can't STOU while REST request is pending.")
            return
        if line:
            directory, prefix = posixpath.split(self.fs.ftp2fs(line))
        else:
            directory, prefix = self.fs.cwd, "upload"
        for _ in range(_STOU_TRIES):
            name = f"{prefix}.{secrets.token_hex(4)}"
            try:
                handle = self._s().open_write(posixpath.join(directory, name), exclusive=True)
                break
            except AlreadyExists:
                continue
        else:
            self.respond("450 No usable unique file name found.")
            return
        self._receive(Upload(handle, 0, announced, self._s().bandwidth.up), "STOU", f"FILE: {name}")

    def _receive(self, f: Upload, cmd: str, text: str = "") -> None:
        if self.data_channel is not None:
            self.respond("125 " + (text or "Data connection already open. Transfer starting."))
            self.data_channel.file_obj = f
            self.data_channel.enable_receiving(self.transfer_type, cmd)
        else:
            self.respond("150 " + (text or "File status okay. About to open data connection."))
            self.queue_upload(f, cmd)


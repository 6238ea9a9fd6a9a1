"""The login decision, shared by every protocol: who is this, and may they come in.

Like Twisted cred's ``Portal.login``, one call serves every front end:
:meth:`LoginCore.login` takes the connection and the credentials the client
presented and either returns the Session the client then works through or
raises one typed refusal (:class:`~scriptsftp.server.contract.errors.LoginRefused`
and its kinds), which each front end maps to its own reply in one place. The
steps, in this order, for every protocol:

1. ``require_tls``: an account that takes logins only over TLS, on a connection
   in clear (FTP without AUTH TLS), is refused before any password is checked
   (:class:`TlsRequired`; nothing is counted, no password has travelled yet);
2. prove: an address banned meanwhile, a user whose password logins are locked,
   an unknown user, a wrong password: :class:`BadCredentials` (logged, scored by
   the defender, ``login-failed`` raised, the failure delay as ``wait``);
3. decide: banned address, the account's state (disabled with its reason, expired,
   a password past its max age for a password login: :mod:`.account_policy`), protocol
   and allowed networks, the ``pre-login`` scripts, the home (made or checked:
   :mod:`.homes`), ``max_sessions`` (the account's, else ``[server]
   max_sessions_per_user``): :class:`LoginRefused` with the reason;
4. the Session is opened;
5. announce: the ``login ok`` line, the metric and ``post-login``, none of which
   can refuse the login any more.

SSH keeps these as separate calls, because paramiko asks for the proof
(:meth:`LoginCore.check_password`, :meth:`LoginCore.key_allowed`) apart from the
decision (:meth:`LoginCore.finish_login`) and the answer comes between the
decision and :meth:`LoginCore.announce_login`; they are the same functions
:meth:`LoginCore.login` runs, so the checks come in the same order.

The login core also raises the connection events (``connect``, ``disconnect``)
and keeps the registry of connections: the defender decides on each new one,
connections not logged in yet are bounded (``[defender] max_preauth_connections``)
and timed (``[server] preauth_timeout``, enforced by the front ends). Accounts come
from an :class:`~.accounts.AccountSource`; passwords are verified by
:class:`~.passwords.PasswordVerifier` and never logged.
"""

from __future__ import annotations

import ipaddress
import logging
import secrets
import threading
import time
from pathlib import Path
from typing import Callable, Protocol

from scriptsftp.server.contract import events as ev
from scriptsftp.server.contract.credentials import Credentials
from scriptsftp.server.contract.dispatch import ALLOW, Decision, Dispatcher
from scriptsftp.server.contract.ports import KeyProof, PublicKey
from scriptsftp.server.contract.errors import (
    BadCredentials, FsError, LimitExceeded, LoginRefused, PermissionDenied, TlsRequired,
)
from scriptsftp.server.support import metrics
from scriptsftp.server.support.config import DefenderSection
from scriptsftp.server.support.logs import BoundedLog
from scriptsftp.server.core import account_policy
from scriptsftp.server.core.accounts import AccountSource, UserRecord
from scriptsftp.server.core.bandwidth import BandwidthLimits
from scriptsftp.server.core.connections import Connection, ConnectionRegistry, kick_soon
from scriptsftp.server.core.homes import HomeFenced, HomeMissing, HomePolicy, ensure_home
from scriptsftp.server.core.limits import Mount
from scriptsftp.server.core.passwords import PasswordCache, PasswordVerifier
from scriptsftp.server.core.publish import Publisher, UploadPolicy
from scriptsftp.server.core.session import Account, HandleBudget, RefusalSink, Session
from scriptsftp.server.core.staging import StagingRecords
from scriptsftp.server.core.storage import LocalStorage, StorageOpener
from scriptsftp.server.core.mounts import open_account_storage

log = logging.getLogger("scriptsftp.login")


def _opened_on(home: Path, mounts: tuple[Mount, ...]) -> tuple[Path, set[tuple[tuple[str, ...], str, Path]]]:
    """What a session's storage is opened on: the home, and where each folder is mounted and
    what it is (their quotas aside, which apply live)."""
    return home, {(m.vpath, m.folder, m.root) for m in mounts}

# a flood of idle sockets: one line every few seconds, with a count, not one per socket
_evictions = BoundedLog(logging.INFO)
_preauth_refusals = BoundedLog(logging.INFO)

#: protocols on which one listener serves clients in clear and over TLS (FTP's AUTH TLS),
#: so ``require_tls`` has something to refuse; SSH is always encrypted, and an HTTP
#: listener is TLS or not for everyone (``require_tls`` is documented for FTP only)
TLS_OPTIONAL = frozenset({"ftp"})


class _Refusal(Protocol):
    @property
    def reason(self) -> str: ...


class _HostInfo(Protocol):
    @property
    def score(self) -> int: ...

    @property
    def banned_before(self) -> bool: ...


class DefenderPort(Protocol):
    """What the login core asks of the defender: admission and connection caps, bans and
    scores, password locks. ``server/ops/defender.py``'s Defender is the implementation the
    daemon hands in; declared here so that the core does not import ops (imports run
    downward, see docs/architecture.md)."""

    @property
    def settings(self) -> DefenderSection: ...

    def admit(self, ip: str) -> _Refusal | None: ...

    def release(self, ip: str) -> None: ...

    def host_info(self, ip: str) -> _HostInfo: ...

    def is_banned(self, ip: str) -> bool: ...

    def record(self, ip: str, kind: str, detail: str = "") -> bool: ...

    def user_locked_until(self, user: str, ip: str) -> float: ...

    def record_user_failure(self, user: str, ip: str) -> float: ...


class SharedSessionsPort(Protocol):
    """Where the sessions of every node of a cluster are counted (``[cluster] database``:
    ``server/stores/cluster_sessions.py``). ``claim`` and ``grow`` answer True (counted),
    False (over the limit on the cluster) or None (the shared count cannot be reached: the
    local registry applies the limit instead)."""

    def claim(self, conn: Connection, user: str, limit: int) -> bool | None: ...

    def grow(self, conn: Connection, weight: int, limit: int) -> bool | None: ...

    def shrink(self, conn: Connection) -> None: ...

    def release(self, conn: Connection) -> None: ...


class LoginCore:
    """The one login core of the process (the ``CorePort`` the front ends are handed)."""

    def __init__(
        self,
        accounts: AccountSource,
        dispatcher: Dispatcher,
        *,
        staging: StagingRecords | None,
        uploads: UploadPolicy,
        max_handles: int = 256,
        max_handles_per_user: int = 1024,
        max_sessions_per_user: int = 0,
        failure_delay: float = 1.0,
        password_cache: float = 0.0,
        max_parallel_hashes: int | None = None,
        preauth_timeout: float = 30.0,
        defender: DefenderPort | None = None,
        publisher: Publisher | None = None,
        open_storage: StorageOpener = LocalStorage,
    ) -> None:
        """``open_storage``: what a home is made of (docs/architecture.md, "The ports"); the
        daemon hands the same opener to the Publisher and to the restart's cleanup."""
        self.open_storage = open_storage
        self.defender = defender
        #: where refused connects, logins and operations are recorded (the daemon's audit trail)
        self.refusals: RefusalSink | None = None
        #: told the name of each user who logs in (the daemon dates last logins off this path)
        self.on_login: Callable[[str], None] | None = None
        self.publisher = publisher
        #: where accounts come from; replaced whole on reload (:meth:`replace_accounts`)
        self.accounts = accounts
        self.dispatcher = dispatcher
        self.staging = staging
        self.uploads = uploads
        self.max_handles = max_handles
        self.max_handles_per_user = max_handles_per_user  # [server] max_handles_per_user (reload applies it)
        #: [server] max_sessions_per_user: the sessions of a user whose account sets no
        #: ``max_sessions`` (0: unlimited); read at each login and channel, so a reload applies it
        self.max_sessions_per_user = max_sessions_per_user
        self._budgets: dict[str, HandleBudget] = {}
        #: each user's bandwidth buckets, shared by all their sessions (``bandwidth_up``/``_down``)
        self.bandwidth = BandwidthLimits()
        self.failure_delay = failure_delay
        self.passwords = PasswordVerifier(password_cache, max_parallel_hashes)
        self._budgets_lock = threading.Lock()
        self.registry = ConnectionRegistry()
        #: with [cluster] database: the sessions of every node, which max_sessions counts
        self.shared_sessions: SharedSessionsPort | None = None
        #: seconds a connection may take to log in; front ends close it after that
        self.preauth_timeout = preauth_timeout
        #: [accounts] kick_on_disable: an account removed, disabled or expired ends its sessions
        self.kick_on_disable = True
        #: [accounts] create_homes, home_mode, home_owner (the daemon sets them, reload too)
        self.homes = HomePolicy()
        #: what "now" is for expiry dates and password ages (tests move it)
        self.clock: Callable[[], float] = time.time

    # --- connections -------------------------------------------------------

    def connect(self, protocol: str, remote_ip: str, local_port: int = 0) -> tuple[Connection, Decision]:
        """Register a new connection and decide whether it may go on.

        The defender decides first (bans, rate limit, caps) so that a refused address
        costs no event script, no handshake and no password hash. A connection the
        defender refused is not registered; the front end ends it (it may still call
        :meth:`disconnect`, which then does nothing)."""
        conn = Connection(secrets.token_hex(6), protocol, remote_ip, local_port)
        if self.defender is not None:
            refusal = self.defender.admit(remote_ip)
            if refusal is not None:
                self._record_refusal(conn, "connect", "", refusal.reason, "defender")
                return conn, Decision(False, refusal.reason)
            conn.admitted = True
        room, victim = self.registry.add(conn, self._preauth_cap())
        if victim is not None:
            self._evict(victim)
        if not room:
            return self._preauth_refused(conn)
        log.info("connect %s", remote_ip, extra={"sid": conn.id, "proto": protocol, "ip": remote_ip})
        decision = ALLOW
        if self.dispatcher.wants("connect"):
            info = self.defender.host_info(remote_ip) if self.defender is not None else None
            decision = self.dispatcher.pre(ev.Connect(
                session_id=conn.id, protocol=protocol, remote_ip=remote_ip, local_port=local_port,
                defender_score=info.score if info else 0, banned_before=info.banned_before if info else False,
            ))
            if not decision.allowed:
                log.info("connect refused: %s", decision.reason, extra={"sid": conn.id, "ip": remote_ip})
                if self.defender is not None:
                    self._score(conn, "connect_vetoed", decision.reason)
        return conn, decision

    # --- connections not logged in yet -------------------------------------------

    def _preauth_cap(self) -> int:
        return self.defender.settings.max_preauth_connections if self.defender is not None else 0

    def _evict(self, victim: Connection) -> None:
        """Close a pre-auth connection to make room (from another thread: see _score)."""
        cap = self._preauth_cap()
        _evictions.log(log, "closing a connection not logged in after %.1fs: too many connections not logged in "
                       "(limit %d)", time.monotonic() - victim.started, cap,
                       extra={"sid": victim.id, "proto": victim.protocol, "ip": victim.remote_ip})
        kick_soon(victim, f"too many connections not logged in (limit {cap})", f"evict-{victim.id}")

    def _preauth_refused(self, conn: Connection) -> tuple[Connection, Decision]:
        """No room among the connections not logged in: give back the defender's slot."""
        if self.registry.give_back_admission(conn) and self.defender is not None:
            self.defender.release(conn.remote_ip)
        reason = f"server busy: too many connections not logged in (limit {self._preauth_cap()})"
        _preauth_refusals.log(log, "connect refused: %s", reason, extra={"sid": conn.id, "ip": conn.remote_ip})
        return conn, Decision(False, reason)

    def preauth_count(self) -> int:
        """Connections not logged in yet (what ``max_preauth_connections`` bounds)."""
        return self.registry.preauth_count()

    @property
    def preauth_evicted(self) -> int:
        """Connections not logged in closed to make room for newer ones, since start."""
        return self.registry.preauth_evicted

    def _record_refusal(self, conn: Connection, op: str, user: str, reason: str, kind: str) -> None:
        """A connect or login the server refused: counted, and an audit record when one is kept."""
        metrics.refusal(conn.protocol, op, kind)
        if self.refusals is not None:
            self.refusals({"name": op, "session_id": conn.id, "protocol": conn.protocol,
                           "remote_ip": conn.remote_ip, "user": user}, reason, kind)

    def protocol_error(self, conn: Connection, detail: str) -> None:
        """A front end saw a client break its protocol (e.g. an SSH handshake that never
        completed: scanners, probes): the defender counts it."""
        if self.defender is not None:
            self._score(conn, "protocol_error", detail)

    def _score(self, conn: Connection, kind: str, detail: str) -> None:
        """Add to the address's score; when that bans it, end this connection too."""
        assert self.defender is not None
        if self.defender.record(conn.remote_ip, kind, detail):
            kick_soon(conn, "address banned after repeated failures", f"kick-{conn.id}")

    def _refused_as_banned(self, conn: Connection) -> bool:
        """True if the address was banned since this connection was admitted (it is then
        ended): a held-open connection must not keep trying passwords."""
        if self.defender is None or not self.defender.is_banned(conn.remote_ip):
            return False
        kick_soon(conn, "address banned after repeated failures", f"kick-{conn.id}")
        return True

    def disconnect(self, conn: Connection) -> None:
        for s in list(conn.sessions):
            s.close()
        if self.registry.give_back_admission(conn) and self.defender is not None:
            self.defender.release(conn.remote_ip)
        if self.shared_sessions is not None:
            self.shared_sessions.release(conn)
        if not self.registry.remove(conn):
            return
        bytes_in = sum(s.bytes_in for s in conn.sessions)
        bytes_out = sum(s.bytes_out for s in conn.sessions)
        duration = time.monotonic() - conn.started
        log.info(
            "disconnect after %.1fs (in %d bytes, out %d bytes)", duration, bytes_in, bytes_out,
            extra={"sid": conn.id, "user": conn.user, "proto": conn.protocol, "ip": conn.remote_ip},
        )
        if self.dispatcher.wants("disconnect"):
            self.dispatcher.post(ev.Disconnect(
                session_id=conn.id, protocol=conn.protocol, remote_ip=conn.remote_ip, user=conn.user,
                duration=duration, bytes_in=bytes_in, bytes_out=bytes_out,
            ))

    def connections(self) -> list[Connection]:
        return self.registry.all()

    # --- one login ----------------------------------------------------------------

    def login(self, conn: Connection, credentials: Credentials) -> Session:
        """Log ``conn`` in with a user name and password and open its Session, or raise.

        The steps and their order are the module's (TLS, prove, decide, session,
        announce); every refusal is already logged, audited, scored and raised as
        ``login-failed`` when it reaches the caller, which only answers the client, after
        the refusal's ``wait``. :class:`TlsRequired` and :class:`BadCredentials` are
        refusals a client must not learn more from than "TLS first" and "failed";
        any other :class:`LoginRefused` carries a reason for the client."""
        name, method = credentials.user, "password"
        self.check_tls(conn, name)
        ok, wait = self.check_password_nowait(conn, name, credentials.password)
        if not ok:
            raise BadCredentials("authentication failed", wait)
        refusal = self._decide(conn, name, method)
        if refusal is not None:
            raise LoginRefused(refusal, self.failure_delay)
        try:
            session = self.open_session(conn)
        except FsError as exc:
            raise LoginRefused(exc.message) from None
        self.announce_login(conn, method)
        return session

    def check_tls(self, conn: Connection, name: str) -> None:
        """Raise :class:`TlsRequired` if ``name``'s account takes logins only over TLS and
        ``conn`` (on a protocol where TLS is optional) is in clear. Nothing is logged or
        counted: FTP asks at ``USER``, before a password has been sent, and again in
        :meth:`login`."""
        if conn.tls or conn.protocol not in TLS_OPTIONAL:
            return
        rec = self.accounts.get(name)
        if rec is not None and rec.account.require_tls:
            raise TlsRequired("TLS is required for this user")

    # --- credentials ----------------------------------------------------------

    def auth_methods(self, name: str) -> list[str]:
        """The same for every name, as OpenSSH answers: which methods a user has would tell
        an unauthenticated client which users exist (and which have passwords to guess)."""
        return ["publickey", "password"]

    def check_password(self, conn: Connection, name: str, password: str) -> bool:
        """True if the password is right. A failure is logged, raised as an event and delayed.

        An address banned meanwhile gets False at once: no hash is computed for it."""
        ok, wait = self.check_password_nowait(conn, name, password)
        if wait:
            time.sleep(wait)
        return ok

    def check_password_nowait(self, conn: Connection, name: str, password: str) -> tuple[bool, float]:
        """:meth:`check_password` without its waits: (right?, seconds the answer must wait).

        For a front end that can wait without holding a thread (HTTP's event loop): slept in
        one of a few auth threads, the failure delay let seven bad logins a second stall
        everyone's good ones."""
        if self._refused_as_banned(conn):
            return False, 0.0
        if self._password_locked(conn, name):
            return False, self.failure_delay
        rec = self.accounts.get(name)
        ok, wait = False, 0.0
        if rec is not None and rec.password_hash:
            ok = self.passwords.verify(name, password, rec.password_hash)
        else:
            wait = 0.15  # what a verify would have cost, so timing does not reveal users
        if not ok:
            reason = "unknown user" if rec is None else "wrong password"
            self._login_failed(conn, name, "password", reason)
            if rec is not None:
                self._count_user_failure(conn, name)
            wait += self.failure_delay
        return ok, wait

    def _password_locked(self, conn: Connection, name: str) -> bool:
        """Refused without a check: password logins for this user are locked (many failures
        from many addresses). Answered like a wrong password, so the lock tells nothing."""
        if self.defender is None or self.accounts.get(name) is None:
            return False
        until = self.defender.user_locked_until(name, conn.remote_ip)
        if not until:
            return False
        self._login_failed(conn, name, "password", "password logins for this user are locked until "
                           + time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(until)))
        return True

    def _count_user_failure(self, conn: Connection, name: str) -> None:
        if self.defender is None:
            return
        until = self.defender.record_user_failure(name, conn.remote_ip)
        if until and self.dispatcher.wants("user-locked"):
            s = self.defender.settings
            self.dispatcher.post(ev.UserLocked(
                session_id=conn.id, protocol=conn.protocol, remote_ip=conn.remote_ip, user=name,
                failures=s.user_max_failures, locked_until=until,
            ))

    @property
    def password_cache(self) -> PasswordCache:
        """``[server] password_cache`` (reload sets its ``seconds``)."""
        return self.passwords.cache

    @property
    def verifications(self) -> int:
        """argon2 verifications run since start (what the cache and single flight save)."""
        return self.passwords.verifications

    def key_allowed(self, name: str, key: PublicKey, proof: KeyProof | None = None) -> bool:
        """Whether the key (its type name and canonical blob, as the SSH library re-encodes
        a parsed key) is one of the user's. Only the key: in this process the SSH library
        verifies the signature; an SSH worker's ``proof`` is checked by its link
        (frontends/ssh/core_link.py) before it asks this."""
        rec = self.accounts.get(name)
        if rec is None:
            return False
        wanted = (key.get_name(), key.asbytes())
        return any((k.key_type, k.blob) == wanted for k in rec.keys)

    def _login_failed(self, conn: Connection, name: str, method: str, reason: str, *, scored: bool = True,
                      audited: bool = True) -> None:
        """Log it, count it, raise ``login-failed``; the caller waits ``failure_delay``.
        ``scored``: the defender adds to the address's score (not for policy refusals after
        proven credentials)."""
        log.warning("login failed for %r (%s): %s", name, method, reason, extra=conn.log_context(user=name))
        if not scored and audited:  # proven credentials refused by policy (disabled, address, sessions...)
            self._record_refusal(conn, "login", name, reason, "policy")
        metrics.auth(conn.protocol, method, False)
        if scored and self.defender is not None:
            self._score(conn, "unknown_user" if self.accounts.get(name) is None else "login_failed", reason)
        if self.dispatcher.wants("login-failed"):
            self.dispatcher.post(ev.LoginFailed(
                session_id=conn.id, protocol=conn.protocol, remote_ip=conn.remote_ip, user=name,
                login_method=method, reason=reason,
            ))

    # --- the login decision ---------------------------------------------------

    def policy_refusal(self, conn: Connection, name: str, method: str) -> str | None:
        """Why this user may not log in here and now with ``method``, or None."""
        rec = self.accounts.get(name)
        if rec is None:
            return "unknown user"
        refusal = account_policy.login_refusal(rec, method, self.clock())
        if refusal is not None:
            return refusal
        acct = rec.account
        # One SSH listener serves SFTP and SCP: a login there needs either one; which
        # channel the user may then open is checked in open_session.
        served = {"sftp", "scp"} if conn.protocol in ("sftp", "scp") else {conn.protocol}
        if not served & acct.protocols:
            return f"protocol {conn.protocol} not allowed for this user"
        if acct.allowed_ips:
            try:
                ip = ipaddress.ip_address(conn.remote_ip)
            except ValueError:
                return "unparsable client address"
            if not any(ip in net for net in acct.allowed_ips):
                return f"address {conn.remote_ip} not allowed for this user"
        return None

    def finish_login(self, conn: Connection, name: str, method: str, *, announce: bool = True) -> Decision:
        """Credentials are proven: the login decision (:meth:`_decide`); a refusal waits
        ``failure_delay`` before it is returned.

        ``announce=False``: the caller answers the client first and then calls
        :meth:`announce_login` itself, so the log line, the metric and ``post-login``
        (none of which can refuse the login) are not in the way of the answer."""
        refusal = self._decide(conn, name, method)
        if refusal is not None:
            if self.failure_delay:
                time.sleep(self.failure_delay)
            return Decision(False, refusal)
        if announce:
            self.announce_login(conn, method)
        return ALLOW

    def _decide(self, conn: Connection, name: str, method: str) -> str | None:
        """Credentials are proven: apply policy, run pre-login, count the session. Why the
        login is refused (logged, audited, raised as ``login-failed``), or None: ``conn``
        is then logged in as ``name``."""
        vetoed = False
        if self.defender is not None and self.defender.is_banned(conn.remote_ip):
            refusal: str | None = "address banned after repeated failures"
        else:
            refusal = self.policy_refusal(conn, name, method)
        if refusal is None and self.dispatcher.wants("pre-login"):
            decision = self.dispatcher.pre(ev.PreLogin(
                session_id=conn.id, protocol=conn.protocol, remote_ip=conn.remote_ip, user=name,
                login_method=method,
            ))
            if not decision.allowed:
                refusal = decision.reason or "login refused by a server script"
                vetoed = True  # the engine records a script's veto itself
        rec = self.accounts.get(name)  # read again: a reload may have come while pre-login ran
        if refusal is None:
            if rec is None:  # gone by a reload while pre-login ran
                refusal = "unknown user"
            else:
                # disabled or expired meanwhile: the watcher's kick missed this connection,
                # which has no user until the decision ends
                refusal = account_policy.login_refusal(rec, method, self.clock()) or self._home_refusal(conn, rec)
        if refusal is None:
            assert rec is not None
            limit = self.session_limit(rec.account)
            # on a cluster the shared count decides (it holds this node's sessions too)
            counted = self.shared_sessions.claim(conn, name, limit) if self.shared_sessions is not None else None
            if counted is False or not self.registry.count_login(conn, name, 0 if counted else limit):
                refusal = f"too many sessions for this user (limit {limit})"
                if counted is None and self.shared_sessions is not None:
                    self.shared_sessions.release(conn)  # refused on this node's count: no row to write
        if refusal is not None:
            self._login_failed(conn, name, method, refusal, scored=False, audited=not vetoed)
            return refusal
        assert rec is not None
        conn.user = name
        conn.account = rec.account
        conn.expires = rec.expires
        return None

    def _home_refusal(self, conn: Connection, rec: UserRecord) -> str | None:
        """Make the home and its ``home_folders`` (``[accounts] create_homes``), or check
        that it is there: after the scripts allowed the login, so a refused login makes
        nothing. The client learns only that the home is unusable; the log says why."""
        try:
            ensure_home(rec.account, self.homes)
        except HomeFenced as exc:
            log.error("login refused: %s", exc, extra=conn.log_context(user=rec.account.name))
            return "home directory unavailable: ask your administrator"
        except HomeMissing as exc:
            log.error("%s (create_homes is off)", exc, extra=conn.log_context(user=rec.account.name))
            return "home directory missing: ask your administrator"
        except (OSError, LookupError) as exc:
            log.error("cannot make the home %s: %s", rec.account.home, exc,
                      extra=conn.log_context(user=rec.account.name))
            return "home directory unavailable: ask your administrator"
        return None

    def announce_login(self, conn: Connection, method: str) -> None:
        """A login the decision allowed: log it, count it, raise ``post-login``."""
        log.info("login ok (%s)", method, extra=conn.log_context(user=conn.user))
        metrics.auth(conn.protocol, method, True)
        if self.on_login is not None:
            self.on_login(conn.user)
        if self.dispatcher.wants("post-login"):
            self.dispatcher.post(ev.PostLogin(
                session_id=conn.id, protocol=conn.protocol, remote_ip=conn.remote_ip, user=conn.user,
                login_method=method,
            ))

    def open_session(self, conn: Connection, protocol: str | None = None) -> Session:
        """A Session for a logged-in connection (SFTP and SCP channels each get one).

        ``max_sessions`` counts sessions, as SFTPGo counts each SFTP channel as a connection:
        a logged-in connection is one, and every SSH channel beyond its first running one is
        one more. So a user limited to 2 runs two connections, or two channels on one, but
        not 50 SFTP channels on one connection. The limit is the account's own, else the
        server's (:meth:`session_limit`), so a user with many connections from several
        addresses cannot hold ``max_connections`` × ``max_channels_per_connection`` sessions.
        Refused: ``LimitExceeded``, logged, counted and audited as ``session`` / ``limit``."""
        assert conn.account is not None, "open_session before login"
        protocol = protocol or conn.protocol
        if protocol not in conn.account.protocols:
            raise PermissionDenied(f"protocol {protocol} not allowed for this user")
        try:
            limit = self.session_limit(conn.account)
            if self.shared_sessions is not None and conn.open_sessions >= 1:  # a channel beyond the first
                grown = self.shared_sessions.grow(conn, conn.open_sessions + 1, limit)
                if grown is False:
                    raise LimitExceeded(f"too many sessions for this user (limit {limit})")
                limit = 0 if grown else limit
            self.registry.count_session(conn, +1, limit)
        except LimitExceeded as exc:
            log.info("session refused: %s", exc.message, extra=conn.log_context(
                user=conn.user, op="session", result="denied", kind="limit", reason=exc.message))
            self._record_refusal(conn, "session", conn.user, exc.message, "limit")
            raise
        session = Session(
            session_id=conn.id, account=conn.account, protocol=protocol, remote_ip=conn.remote_ip,
            dispatcher=self.dispatcher, staging=self.staging, uploads=self.uploads, max_handles=self.max_handles,
            publisher=self.publisher, tls=conn.tls, budget=self._budget(conn.user),
            on_close=lambda _session: self._session_closed(conn),
            storage=open_account_storage(self.open_storage, conn.account), bandwidth=self.bandwidth.of(conn.user),
        )
        session.refusals = self.refusals
        conn.sessions.append(session)
        return session

    def _session_closed(self, conn: Connection) -> None:
        shrinks = conn.open_sessions > 1
        self.registry.count_session(conn, -1)
        if shrinks and self.shared_sessions is not None:
            self.shared_sessions.shrink(conn)

    def session_limit(self, account: Account) -> int:
        """How many sessions ``account``'s user may hold at once (0: no limit): its own
        ``max_sessions``, else the server's ``max_sessions_per_user``."""
        return account.max_sessions or self.max_sessions_per_user

    def _budget(self, user: str) -> HandleBudget:
        """The user's handle budget, shared by all their sessions (created on first use)."""
        with self._budgets_lock:
            budget = self._budgets.get(user)
            if budget is None:
                budget = self._budgets[user] = HandleBudget(user, lambda: self.max_handles_per_user)
            return budget

    # --- reload -------------------------------------------------------------------

    def replace_accounts(self, accounts: AccountSource) -> list[Connection]:
        """A new account source (SIGHUP). Live sessions get the new permissions at once;
        connections of users removed or disabled are returned for closing."""
        self.accounts = accounts
        gone = []
        records: dict[str, UserRecord | None] = {}  # one read per user, not per connection
        for conn in self.connections():
            if not conn.user:
                continue
            if conn.user not in records:
                records[conn.user] = self.accounts.get(conn.user)
            rec = records[conn.user]
            if rec is None or rec.disabled:
                gone.append(conn)
                continue
            self._refresh(conn, rec)
        return gone

    def _refresh(self, conn: Connection, rec: UserRecord) -> None:
        """A logged-in connection gets its account's new settings at once (permissions,
        quotas, limits, expiry). Its home and virtual folders are not: a session keeps the
        storage it was opened on until the next login, which one line says when they change
        (docs/accounts.md "Virtual folders")."""
        old = conn.account
        conn.account = rec.account
        conn.expires = rec.expires
        for s in conn.sessions:
            s.account = rec.account
        now = _opened_on(rec.account.home, rec.account.folders)
        if old is not None and _opened_on(old.home, old.folders) != now \
                and any(_opened_on(s.home_opened, s.mounts) != now for s in conn.sessions):
            log.info("home or virtual folders of %s changed: this session keeps those it logged in with "
                     "until the next login", conn.user, extra=conn.log_context())

    # --- accounts changed while their users are connected ----------------------------

    def account_changed(self, name: str) -> list[Connection]:
        """``name``'s account changed (the database's change feed, the CLI, the API, another
        node): read it again. Its open connections get the new settings; if it is gone,
        disabled or expired and ``kick_on_disable`` is on, they are ended instead (one log
        line each, with the reason, which the client gets where its protocol carries one)
        and returned. A password that aged meanwhile ends nothing: it was good when proven."""
        mine = [c for c in self.connections() if c.user == name and c.account is not None]
        if not mine:
            return []
        rec = self.accounts.get(name)
        reason = account_policy.unusable(rec, self.clock())
        if reason is None or not self.kick_on_disable:
            if rec is not None:
                for conn in mine:
                    self._refresh(conn, rec)
                    if reason is not None:  # left open (kick_on_disable off): not looked at again
                        conn.expires = None
            return []
        for conn in mine:
            log.info("closing session of %s: %s", name, reason, extra=conn.log_context(user=name))
            metrics.refusal(conn.protocol, "session", "account")
            conn.expires = None  # ended once, not again at every tick while it closes
            kick_soon(conn, f"session ended: {reason}", f"kick-{conn.id}")
        return mine

    def accounts_changed(self) -> list[Connection]:
        """Something many accounts share changed (a group, a folder): every connected user
        is read again, as by :meth:`account_changed`."""
        names = sorted({c.user for c in self.connections() if c.user})
        return [conn for name in names for conn in self.account_changed(name)]

    def end_expired(self) -> list[Connection]:
        """End the connections whose account expired since they logged in (the daemon calls
        this every half second): only those whose expiry passed are looked up again, so
        the tick costs nothing while no one expires."""
        now = self.clock()
        due = {c.user for c in self.connections() if c.expires is not None and c.expires <= now}
        return [conn for name in sorted(due) for conn in self.account_changed(name)]

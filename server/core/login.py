"""Users, credentials and the login sequence, shared by every protocol.

Like Twisted's cred, one core answers "who is this and may they come in" for
every front end, and raises the connection events (``connect``, ``pre-login``,
``post-login``, ``login-failed``, ``disconnect``). A front end only says which
protocol it speaks and hands over what the client sent.

Password checks cost ~150 ms of CPU and 64 MiB each (argon2id), so at most a
few run at once; an attacker's failed attempt then waits on a timer, which
costs the server nothing. A verified password is remembered for a while
(:class:`PasswordCache`), and concurrent checks of the same one share a single
verification (:class:`VerifyFlights`), so a client opening many connections at
once costs one check. Connections that have not logged in yet are bounded
(``[defender] max_preauth_connections``) and timed (``[server] preauth_timeout``,
enforced by the front ends). Passwords are never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import paramiko
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from scriptsftp.server.contract import events as ev
from scriptsftp.server.support import metrics
from scriptsftp.server.support.config import LoadedConfig, User
from scriptsftp.server.ops.defender import Defender
from scriptsftp.server.contract.dispatch import ALLOW, Decision, Dispatcher
from scriptsftp.server.contract.errors import LimitExceeded, PermissionDenied
from scriptsftp.server.contract.ports import PublicKey
from scriptsftp.server.support.keys import parse_public_key
from scriptsftp.server.support.logs import BoundedLog
from scriptsftp.server.core.session import Account, HandleBudget, Session, UploadPolicy
from scriptsftp.server.core.publish import Publisher
from scriptsftp.server.core.staging import StagingRecords
from scriptsftp.server.core.vfs import Access, FilterRule, split

log = logging.getLogger("scriptsftp.login")

_hasher = PasswordHasher()  # argon2id, RFC 9106 low-memory profile
# a flood of idle sockets: one line every few seconds, with a count, not one per socket
_evictions = BoundedLog(logging.INFO)
_preauth_refusals = BoundedLog(logging.INFO)


def hash_password(password: str) -> str:
    return _hasher.hash(password)


@dataclass
class UserRecord:
    account: Account
    password_hash: str | None
    keys: list[paramiko.PKey]
    disabled: bool


def _read_hash_file(path: Path) -> str | None:
    try:
        value = path.read_text().strip()
    except FileNotFoundError:
        return None
    return value or None


def ensure_generated_passwords(cfg: LoadedConfig, announce: Callable[[str, str, Path], None]) -> None:
    """For users with ``generate_password``: create the password on first start.

    Only the hash is stored (0600); the password itself is handed to
    ``announce`` once and never written anywhere."""
    for user in cfg.model.users:
        if not user.generate_password:
            continue
        path = cfg.resolve(user.password_hash_file)
        if path.exists():
            continue
        password = secrets.token_urlsafe(15)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(hash_password(password) + "\n")
        announce(user.name, password, path)


def build_users(cfg: LoadedConfig) -> dict[str, UserRecord]:
    groups = {g.name: g for g in cfg.model.groups}
    out: dict[str, UserRecord] = {}
    for user in cfg.model.users:
        mine = [groups[g] for g in user.groups]
        filters = [
            FilterRule(split(f.path), tuple(f.denied), tuple(f.allowed), f.policy == "hide")
            for f in [*(f for g in mine for f in g.filters), *user.filters]
        ]
        access = Access.build(user.permissions, [g.permissions for g in mine], filters)
        protocols = _first_set(user.protocols, [g.protocols for g in mine], ["sftp", "scp", "ftp", "http"])
        nets = _first_set(user.allowed_ips, [g.allowed_ips for g in mine], [])
        account = Account(
            name=user.name,
            home=cfg.resolve(user.home),
            access=access,
            groups=tuple(user.groups),
            protocols=frozenset(protocols),
            allowed_ips=tuple(ipaddress.ip_network(n, strict=False) for n in nets),
            max_sessions=user.max_sessions,
            require_tls=user.require_tls,
            setstat_mode=next((m for m in (user.setstat_mode, *(g.setstat_mode for g in mine)) if m), "times"),
        )
        out[user.name] = UserRecord(
            account=account,
            password_hash=_password_hash(cfg, user),
            keys=[parse_public_key(k) for k in user.public_keys],
            disabled=user.disabled,
        )
    return out


def _first_set(own: list[str] | None, from_groups: list[list[str] | None], default: list[str]) -> list[str]:
    """The user's own list if set, else the union of their groups' lists, else the default."""
    if own is not None:
        return own
    merged = [x for g in from_groups if g is not None for x in g]
    return merged if any(g is not None for g in from_groups) else default


def _password_hash(cfg: LoadedConfig, user: User) -> str | None:
    if user.password_hash:
        return user.password_hash
    if user.password_hash_file:
        return _read_hash_file(cfg.resolve(user.password_hash_file))
    return None


@dataclass
class Connection:
    """One client connection, before and after login."""

    id: str
    protocol: str
    remote_ip: str
    local_port: int = 0
    started: float = field(default_factory=time.monotonic)
    user: str = ""
    account: Account | None = None
    sessions: list[Session] = field(default_factory=list)
    on_kick: Callable[[str], None] | None = None
    login_counted: bool = False
    #: holds a slot of the defender's connection caps, given back at disconnect
    admitted: bool = False
    #: counted among the connections not logged in yet ([defender] max_preauth_connections)
    preauth: bool = False
    #: the front end secured it (FTPS): logged as tls=true, so FTPS and plain FTP can be told apart
    tls: bool = False

    def log_context(self, **more: object) -> dict[str, object]:
        ctx: dict[str, object] = {"sid": self.id, "proto": self.protocol, "ip": self.remote_ip, **more}
        if self.tls:
            ctx["tls"] = "true"
        return ctx
    #: sessions (SSH channels; one for FTP and HTTP) open now: see LoginCore.open_session
    open_sessions: int = 0


class PasswordCache:
    """Passwords verified in the last ``seconds``, so a client that logs in again and
    again (an FTP script per file, curl or rclone opening connections) costs one
    argon2 verification per period instead of one per login (~0.2 s of CPU and
    64 MiB each; SFTPGo caches the same way).

    Only a keyed SHA-256 of user and password is kept, under a secret made at start
    and never written anywhere; an entry holds for the password hash it was
    verified against, so a changed password invalidates it. A wrong password never
    matches an entry: failures always cost the full check and the failure delay."""

    MAX_ENTRIES = 10000

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._secret = secrets.token_bytes(32)
        self._entries: dict[bytes, tuple[str, float]] = {}
        self._lock = threading.Lock()

    def key(self, name: str, password: str) -> bytes:
        """The keyed hash that stands for (user, password) here and in :class:`VerifyFlights`."""
        msg = name.encode("utf-8", "surrogatepass") + b"\0" + password.encode("utf-8", "surrogatepass")
        return hmac.new(self._secret, msg, hashlib.sha256).digest()

    def hit(self, name: str, password: str, password_hash: str) -> bool:
        if self.seconds <= 0:
            return False
        key = self.key(name, password)
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return False
            if entry[0] != password_hash or entry[1] < time.monotonic():
                del self._entries[key]
                return False
        return True

    def remember(self, name: str, password: str, password_hash: str) -> None:
        if self.seconds <= 0:
            return
        key, now = self.key(name, password), time.monotonic()
        with self._lock:
            if len(self._entries) >= self.MAX_ENTRIES:
                for k in [k for k, (_, exp) in self._entries.items() if exp < now]:
                    del self._entries[k]
                if len(self._entries) >= self.MAX_ENTRIES:
                    self._entries.clear()
            self._entries[key] = (password_hash, now + self.seconds)


class _Flight:
    """One argon2 verification in progress; ``ok`` is None until it is done (and stays
    None if it failed with an exception: the waiters then verify for themselves)."""

    __slots__ = ("done", "ok", "waiting")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.ok: bool | None = None
        self.waiting = 0  # checks sharing this verification besides its leader


class VerifyFlights:
    """Single flight for password verifications: concurrent checks of the same user,
    candidate password and stored hash wait for one argon2 run and share its verdict.

    Why: the password cache answers only once a verification has finished, so a burst
    of N concurrent logins of one user (a client opening many connections at once)
    otherwise runs argon2 N times, queued on the few hash slots, and the last ones miss
    their login grace. The key is the password cache's keyed hash of (user, password)
    plus the stored hash, so a wrong password never shares a right one's verdict: it
    has its own flight, and is verified. Identical attempts share either verdict (the
    same input gives the same answer); only a success is remembered afterwards."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._flights: dict[tuple[bytes, str], _Flight] = {}

    def join(self, key: tuple[bytes, str]) -> tuple[_Flight, bool]:
        """The flight for ``key`` and whether the caller leads it (runs the verification)."""
        with self._lock:
            flight = self._flights.get(key)
            if flight is not None:
                flight.waiting += 1
                return flight, False
            flight = self._flights[key] = _Flight()
            return flight, True

    def land(self, key: tuple[bytes, str], flight: _Flight, ok: bool | None) -> None:
        """The leader's verdict (None: it failed): waiters wake, later checks start afresh."""
        with self._lock:
            if self._flights.get(key) is flight:
                del self._flights[key]
        flight.ok = ok
        flight.done.set()

    def __len__(self) -> int:
        with self._lock:
            return len(self._flights)


class LoginCore:
    def __init__(
        self,
        users: dict[str, UserRecord],
        dispatcher: Dispatcher,
        *,
        staging: StagingRecords | None,
        uploads: UploadPolicy,
        max_handles: int = 256,
        max_handles_per_user: int = 1024,
        failure_delay: float = 1.0,
        password_cache: float = 0.0,
        max_parallel_hashes: int | None = None,
        preauth_timeout: float = 30.0,
        defender: Defender | None = None,
        publisher: Publisher | None = None,
    ) -> None:
        self.defender = defender
        #: where refused connects, logins and operations are recorded (the daemon's audit trail)
        self.refusals: Callable[[dict, str, str], None] | None = None
        self.publisher = publisher
        self.users = users
        self.dispatcher = dispatcher
        self.staging = staging
        self.uploads = uploads
        self.max_handles = max_handles
        self.max_handles_per_user = max_handles_per_user  # [server] max_handles_per_user (reload applies it)
        self._budgets: dict[str, HandleBudget] = {}
        self.failure_delay = failure_delay
        self.password_cache = PasswordCache(password_cache)
        self._hash_slots = threading.BoundedSemaphore(max_parallel_hashes or max(2, os.cpu_count() or 2))
        self._flights = VerifyFlights()
        #: argon2 verifications run since start (what the cache and single flight save)
        self.verifications = 0
        self._lock = threading.Lock()
        self._connections: dict[str, Connection] = {}
        self._per_user: dict[str, int] = {}
        #: seconds a connection may take to log in; front ends close it after that
        self.preauth_timeout = preauth_timeout
        #: connections not logged in yet, oldest first (dicts keep insertion order)
        self._preauth: dict[str, Connection] = {}
        #: pre-auth connections closed to make room for newer ones, since start
        self.preauth_evicted = 0

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
        with self._lock:
            room, victim = self._preauth_room()
            if room:
                self._connections[conn.id] = conn
                self._preauth[conn.id] = conn
                conn.preauth = True
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

    def _preauth_room(self) -> tuple[bool, Connection | None]:
        """(lock held) Whether a new connection may wait for its login, and which waiting one
        makes room for it. At the cap the one that has waited longest goes (a flood of idle
        sockets then only shortens each other's lives, and a real client, which logs in
        within a second, still gets in); refused only if none can be closed (none has a
        front end to close it yet)."""
        cap = self._preauth_cap()
        if not cap or len(self._preauth) < cap:
            return True, None
        victim = next((c for c in self._preauth.values() if c.on_kick is not None), None)
        if victim is None:
            return False, None
        del self._preauth[victim.id]
        victim.preauth = False
        self.preauth_evicted += 1
        return True, victim

    def _evict(self, victim: Connection) -> None:
        """Close a pre-auth connection to make room (from another thread: see _score)."""
        cap = self._preauth_cap()
        _evictions.log(log, "closing a connection not logged in after %.1fs: too many connections not logged in "
                       "(limit %d)", time.monotonic() - victim.started, cap,
                       extra={"sid": victim.id, "proto": victim.protocol, "ip": victim.remote_ip})
        if victim.on_kick is not None:
            threading.Thread(target=victim.on_kick, args=(f"too many connections not logged in (limit {cap})",),
                             name=f"evict-{victim.id}", daemon=True).start()

    def _preauth_refused(self, conn: Connection) -> tuple[Connection, Decision]:
        """No room among the connections not logged in: give back the defender's slot."""
        with self._lock:
            release, conn.admitted = conn.admitted, False
        if release and self.defender is not None:
            self.defender.release(conn.remote_ip)
        reason = f"server busy: too many connections not logged in (limit {self._preauth_cap()})"
        _preauth_refusals.log(log, "connect refused: %s", reason, extra={"sid": conn.id, "ip": conn.remote_ip})
        return conn, Decision(False, reason)

    def preauth_count(self) -> int:
        """Connections not logged in yet (what ``max_preauth_connections`` bounds)."""
        with self._lock:
            return len(self._preauth)

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
        if self.defender.record(conn.remote_ip, kind, detail) and conn.on_kick is not None:
            # From another thread: on_kick may be called from inside the front end's own
            # I/O thread here (paramiko's auth handler), which must first send its reply.
            threading.Thread(target=conn.on_kick, args=("address banned after repeated failures",),
                             name=f"kick-{conn.id}", daemon=True).start()

    def _refused_as_banned(self, conn: Connection) -> bool:
        """True if the address was banned since this connection was admitted (it is then
        ended): a held-open connection must not keep trying passwords."""
        if self.defender is None or not self.defender.is_banned(conn.remote_ip):
            return False
        if conn.on_kick is not None:
            threading.Thread(target=conn.on_kick, args=("address banned after repeated failures",),
                             name=f"kick-{conn.id}", daemon=True).start()
        return True

    def disconnect(self, conn: Connection) -> None:
        for s in list(conn.sessions):
            s.close()
        with self._lock:
            release, conn.admitted = conn.admitted, False
        if release and self.defender is not None:
            self.defender.release(conn.remote_ip)
        with self._lock:
            if self._preauth.pop(conn.id, None) is not None:
                conn.preauth = False
            if self._connections.pop(conn.id, None) is None:
                return
            if conn.login_counted:
                self._per_user[conn.user] = self._per_user.get(conn.user, 1) - 1
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
        with self._lock:
            return list(self._connections.values())

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
        rec = self.users.get(name)
        ok, wait = False, 0.0
        if rec is not None and rec.password_hash:
            ok = self._verify(name, password, rec.password_hash)
        else:
            wait = 0.15  # what a verify would have cost, so timing does not reveal users
        if not ok:
            reason = "unknown user" if rec is None else "wrong password"
            self.login_failed(conn, name, "password", reason, wait=False)
            if rec is not None:
                self._count_user_failure(conn, name)
            wait += self.failure_delay
        return ok, wait

    def _password_locked(self, conn: Connection, name: str) -> bool:
        """Refused without a check: password logins for this user are locked (many failures
        from many addresses). Answered like a wrong password, so the lock tells nothing."""
        if self.defender is None or name not in self.users:
            return False
        until = self.defender.user_locked_until(name, conn.remote_ip)
        if not until:
            return False
        self.login_failed(conn, name, "password", "password logins for this user are locked until "
                          + time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(until)), wait=False)
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

    def _verify(self, name: str, password: str, password_hash: str) -> bool:
        """The cache, else one shared verification for all concurrent identical checks."""
        if self.password_cache.hit(name, password, password_hash):
            return True
        key = (self.password_cache.key(name, password), password_hash)
        while True:
            flight, leader = self._flights.join(key)
            if leader:
                return self._lead(name, password, password_hash, key, flight)
            flight.done.wait()
            if flight.ok is not None:
                return flight.ok

    def _lead(self, name: str, password: str, password_hash: str, key: tuple[bytes, str], flight: _Flight) -> bool:
        """Verify once for the flight. The cache is asked again once a hash slot is ours:
        a flight that landed while we queued for the slot may have just proven it."""
        ok: bool | None = None
        try:
            with self._hash_slots:
                if self.password_cache.hit(name, password, password_hash):
                    ok = True
                else:
                    ok = self._argon2(name, password, password_hash)
            if ok:
                self.password_cache.remember(name, password, password_hash)
            return ok
        finally:
            self._flights.land(key, flight, ok)

    def _argon2(self, name: str, password: str, password_hash: str) -> bool:
        """One argon2 verification (the hash slot held). Counted and logged at debug level,
        without the password, so a test or an operator can see what logins cost."""
        started = time.monotonic()
        try:
            return _hasher.verify(password_hash, password)
        except VerifyMismatchError:
            return False
        except (VerificationError, InvalidHashError):
            log.error("user %s: stored password hash is invalid", name)
            return False
        finally:
            with self._lock:
                self.verifications += 1
            log.debug("argon2 verification for %r took %.0f ms", name, (time.monotonic() - started) * 1000)

    def key_allowed(self, name: str, key: PublicKey) -> bool:
        rec = self.users.get(name)
        if rec is None:
            return False
        # paramiko >= 2.8.1 compares keys field by field (not by hash()).
        return any(k == key for k in rec.keys)

    def login_failed(self, conn: Connection, name: str, method: str, reason: str, *, scored: bool = True,
                     wait: bool = True, audited: bool = True) -> None:
        """Log, raise ``login-failed`` and wait ``failure_delay`` (unless ``wait`` is false: the
        caller waits). ``scored``: the defender adds to the address's score (not for policy
        refusals after proven credentials)."""
        log.warning("login failed for %r (%s): %s", name, method, reason, extra=conn.log_context(user=name))
        if not scored and audited:  # proven credentials refused by policy (disabled, address, sessions...)
            self._record_refusal(conn, "login", name, reason, "policy")
        metrics.auth(conn.protocol, method, False)
        if scored and self.defender is not None:
            self._score(conn, "unknown_user" if name not in self.users else "login_failed", reason)
        if self.dispatcher.wants("login-failed"):
            self.dispatcher.post(ev.LoginFailed(
                session_id=conn.id, protocol=conn.protocol, remote_ip=conn.remote_ip, user=name,
                login_method=method, reason=reason,
            ))
        if wait and self.failure_delay:
            time.sleep(self.failure_delay)

    # --- the login decision ---------------------------------------------------

    def policy_refusal(self, conn: Connection, name: str) -> str | None:
        """Why this user may not log in here and now, or None."""
        rec = self.users.get(name)
        if rec is None:
            return "unknown user"
        if rec.disabled:
            return "account disabled"
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
        """Credentials are proven: apply policy, run pre-login, count the session.

        ``announce=False``: the caller answers the client first and then calls
        :meth:`announce_login` itself, so the log line, the metric and ``post-login``
        (none of which can refuse the login) are not in the way of the answer."""
        vetoed = False
        if self.defender is not None and self.defender.is_banned(conn.remote_ip):
            refusal: str | None = "address banned after repeated failures"
        else:
            refusal = self.policy_refusal(conn, name)
        if refusal is None and self.dispatcher.wants("pre-login"):
            decision = self.dispatcher.pre(ev.PreLogin(
                session_id=conn.id, protocol=conn.protocol, remote_ip=conn.remote_ip, user=name,
                login_method=method,
            ))
            if not decision.allowed:
                refusal = decision.reason or "login refused by a server script"
                vetoed = True  # the engine records a script's veto itself
        if refusal is None:
            account = self.users[name].account
            with self._lock:
                current = self._per_user.get(name, 0)
                if account.max_sessions and current >= account.max_sessions:
                    refusal = f"too many sessions for this user (limit {account.max_sessions})"
                else:
                    self._per_user[name] = current + 1
                    conn.login_counted = True
                    self._preauth.pop(conn.id, None)  # logged in: no longer bound by the pre-auth cap
                    conn.preauth = False
        if refusal is not None:
            self.login_failed(conn, name, method, refusal, scored=False, audited=not vetoed)
            return Decision(False, refusal)
        conn.user = name
        conn.account = self.users[name].account
        if announce:
            self.announce_login(conn, method)
        return ALLOW

    def announce_login(self, conn: Connection, method: str) -> None:
        """A login :meth:`finish_login` allowed: log it, count it, raise ``post-login``."""
        log.info("login ok (%s)", method, extra=conn.log_context(user=conn.user))
        metrics.auth(conn.protocol, method, True)
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
        not 50 SFTP channels on one connection. Refused: :class:`LimitExceeded`."""
        assert conn.account is not None, "open_session before login"
        protocol = protocol or conn.protocol
        if protocol not in conn.account.protocols:
            raise PermissionDenied(f"protocol {protocol} not allowed for this user")
        self._count_session(conn, +1)
        session = Session(
            session_id=conn.id, account=conn.account, protocol=protocol, remote_ip=conn.remote_ip,
            dispatcher=self.dispatcher, staging=self.staging, uploads=self.uploads, max_handles=self.max_handles,
            publisher=self.publisher, tls=conn.tls, budget=self._budget(conn.user),
            on_close=lambda s, c=conn: self._count_session(c, -1),
        )
        session.refusals = self.refusals
        conn.sessions.append(session)
        return session

    def _count_session(self, conn: Connection, delta: int) -> None:
        """A session of ``conn`` opens (+1) or ends (-1). The user's count holds each of their
        connections as max(1, its open sessions); the login already counted the 1."""
        limit = conn.account.max_sessions if conn.account is not None else 0
        with self._lock:
            before = max(1, conn.open_sessions)
            after = max(1, conn.open_sessions + delta)
            current = self._per_user.get(conn.user, 0)
            if delta > 0 and limit and after > before and current + after - before > limit:
                raise LimitExceeded(f"too many sessions for this user (limit {limit})")
            conn.open_sessions += delta
            if conn.login_counted:
                self._per_user[conn.user] = current + after - before

    def _budget(self, user: str) -> HandleBudget:
        """The user's handle budget, shared by all their sessions (created on first use)."""
        with self._lock:
            budget = self._budgets.get(user)
            if budget is None:
                budget = self._budgets[user] = HandleBudget(user, lambda: self.max_handles_per_user)
            return budget

    # --- reload -------------------------------------------------------------------

    def replace_users(self, users: dict[str, UserRecord]) -> list[Connection]:
        """New users and permissions (SIGHUP). Live sessions get the new permissions
        at once; connections of users removed or disabled are returned for closing."""
        self.users = users
        gone = []
        for conn in self.connections():
            if not conn.user:
                continue
            rec = users.get(conn.user)
            if rec is None or rec.disabled:
                gone.append(conn)
                continue
            conn.account = rec.account
            for s in conn.sessions:
                s.account = rec.account
        return gone

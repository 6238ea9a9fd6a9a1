"""Score-based automatic banning per source IP, plus connection rate limits and caps.

In the spirit of SFTPGo's defender and fail2ban: every failed login, unknown
user, protocol error (an SSH handshake that never completes) and vetoed
``connect`` event adds points to the source address's score; when the points
collected within ``observation_window`` reach ``threshold`` the address is
banned for ``ban_time``, and each repeat ban lasts ``ban_time_multiplier``
times longer, up to ``max_ban_time``.

Why it sits in front of everything: the login core asks :meth:`Defender.admit`
before it logs, raises the ``connect`` event or lets a front end start a
handshake, so a banned address costs one indexed SQLite lookup per connection
(no argon2 verification, no script run, no SSH key exchange). That is what lets
a burst of thousands of failed logins leave other users' transfers alone.

Bans and scores live in the ``bans`` state database (docs/architecture.md rule 10):
SQLite under ``state_dir`` on one node (they survive a restart, and several server
processes sharing one state_dir see the same bans), or the PostgreSQL database
every node of a cluster shares (``[cluster] database``, docs/cluster.md):

- scores are rows of the shared ``scores`` table, summed over every node within
  ``observation_window``: an address that spreads its failures over the nodes is
  banned at the same threshold as one that hits a single node. A score and the ban
  it causes are one transaction under a per-address advisory lock, so two nodes
  crossing the threshold at once make one ban.
- a connection check never waits for the network: each node keeps the active bans
  in memory, read whole from the shared table every :data:`BAN_REFRESH` (0.25) seconds by a
  background thread (and its own bans at once), so a ban (or an unban) made on one
  node takes effect on every other within ``BAN_REFRESH`` plus one query, under a
  second.
- while the database cannot be reached, the bans already known keep refusing until
  they end (nothing is lifted by an outage), and this node goes on scoring in memory:
  an address that reaches the threshold is banned on this node only (``ban_time``,
  logged as such) until the database is back. Password locks per user
  (``user_max_failures``) are not counted and not enforced meanwhile (logged): a
  lock must not become every user's lockout. Logins themselves still need their
  account; only the defender degrades.

Counts of open connections and the per-IP token buckets are, by nature, per
process and stay in memory.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

from scriptsftp.server.contract.state import Cursor, StateStoreFactory
from scriptsftp.server.support.config import DefenderSection

log = logging.getLogger("scriptsftp.defender")

#: What can add to a score; each maps to a ``score_*`` key of ``[defender]``.
KINDS = ("login_failed", "unknown_user", "protocol_error", "connect_vetoed", "limit_exceeded")

_PRUNE_EVERY = 60.0  # seconds between clean-ups of expired scores and forgotten hosts
_REFUSAL_LOG_EVERY = 10.0  # at most one "refused" log line per address and reason in this time

#: seconds between two reads of the active bans from a shared database (cluster)
BAN_REFRESH = 0.25
#: PostgreSQL advisory lock class (with the address): one score of an address at a time
SCORE_LOCK = 7318852

#: the ``bans`` database's schema (stores/state.py applies it); append only. Version 1 is
#: what the SQLite files held before they were versioned (hence IF NOT EXISTS).
MIGRATIONS: list[tuple[int, list[str]]] = [
    (1, [
        "CREATE TABLE IF NOT EXISTS hosts (ip TEXT PRIMARY KEY, banned_until DOUBLE PRECISION NOT NULL,"
        " ban_count INTEGER NOT NULL, score INTEGER NOT NULL, reason TEXT NOT NULL,"
        " banned_at DOUBLE PRECISION NOT NULL)",
        "CREATE TABLE IF NOT EXISTS scores (ip TEXT NOT NULL, at DOUBLE PRECISION NOT NULL,"
        " points INTEGER NOT NULL, kind TEXT NOT NULL)",
        "CREATE INDEX IF NOT EXISTS scores_ip_at ON scores (ip, at)",
        'CREATE TABLE IF NOT EXISTS user_failures ("user" TEXT NOT NULL, at DOUBLE PRECISION NOT NULL)',
        'CREATE INDEX IF NOT EXISTS user_failures_user_at ON user_failures ("user", at)',
        'CREATE TABLE IF NOT EXISTS user_locks ("user" TEXT PRIMARY KEY, locked_until DOUBLE PRECISION NOT NULL,'
        " failures INTEGER NOT NULL, reason TEXT NOT NULL, locked_at DOUBLE PRECISION NOT NULL)",
    ]),
    # the active bans are read whole by every node of a cluster four times a second
    (2, ["CREATE INDEX IF NOT EXISTS hosts_banned_until ON hosts (banned_until)"]),
]


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why :meth:`Defender.admit` turned a connection away; ``reason`` goes to the client."""

    kind: str  # "banned" | "rate" | "per_ip" | "global"
    reason: str


@dataclass(frozen=True, slots=True)
class HostInfo:
    """What the ``connect`` event is told about an address."""

    score: int
    banned_before: bool


class _Networks:
    """The allow list. Asked two or three times per connection about the same few
    addresses, so answers are remembered (parsing an address costs more than the
    lookup it serves)."""

    _MEMO_MAX = 4096

    def __init__(self, nets: list[str]) -> None:
        self.nets = [ipaddress.ip_network(n, strict=False) for n in nets]
        self._memo: dict[str, bool] = {}

    def __contains__(self, ip: str) -> bool:
        hit = self._memo.get(ip)
        if hit is None:
            hit = self._match(ip)
            if len(self._memo) >= self._MEMO_MAX:
                self._memo.clear()  # a flood of addresses: start over rather than grow
            self._memo[ip] = hit
        return hit

    def _match(self, ip: str) -> bool:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped  # "::ffff:10.0.0.1" on a dual-stack socket is 10.0.0.1
        return any(addr in n for n in self.nets)


@functools.lru_cache(maxsize=4096)  # pure, and called several times per connection
def normalize_ip(ip: str) -> str:
    """One spelling per address: "::ffff:192.0.2.1" (an IPv4 client on a dual-stack
    socket) is "192.0.2.1", IPv6 is compressed; anything unparsable is kept as is."""
    try:
        addr = ipaddress.ip_address(ip.strip())
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


@functools.lru_cache(maxsize=4096)
def group_ip(ip: str, ipv6_prefix: int) -> str:
    """The key an address is scored and banned under: itself for IPv4, its ``/ipv6_prefix``
    network for IPv6 (a host gets a whole /64: rotating addresses in it must not reset
    its score or dodge its ban)."""
    addr = normalize_ip(ip)
    if ":" not in addr or ipv6_prefix >= 128:
        return addr
    try:
        return str(ipaddress.ip_network(f"{addr}/{ipv6_prefix}", strict=False))
    except ValueError:
        return addr


USER_PREFIX = "user:"  # bans() and unban() name a user's password lock so


class Defender:
    """One per daemon (``daemon.defender``); thread-safe."""

    def __init__(self, stores: StateStoreFactory, settings: DefenderSection,
                 clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()  # the in-memory state; never held across a shared database's call
        self._db = stores.database("bans", MIGRATIONS)
        self._errors = self._db.errors
        #: a database other nodes write too: bans are read from memory, refreshed by a thread
        self._shared = self._db.dialect.name == "postgresql"
        self._closed = False
        # per process: open connections and token buckets
        self._open_total = 0
        self._open_per_ip: dict[str, int] = {}
        self._buckets: dict[str, tuple[float, float]] = {}  # ip -> (tokens, last refill, monotonic)
        self._last_prune = 0.0
        self._refusal_logged: dict[tuple[str, str], tuple[float, int]] = {}
        self._counters = {"bans_total": 0, "rejected_connections": 0, "rejected_banned": 0,
                          "rejected_rate": 0, "rejected_per_ip": 0, "rejected_global": 0, "scored_events": 0,
                          "unbans_total": 0}
        # shared database only: the active bans as last read (ip -> until), and while the database
        # cannot be reached, the scores and bans this node keeps on its own
        self._known_bans: dict[str, float] = {}
        self._local_scores: dict[str, list[tuple[float, int]]] = {}
        self._local_bans: dict[str, float] = {}
        #: bans this node wrote (ip -> (until, monotonic time)): kept over a refresh that began before
        self._fresh_bans: dict[str, tuple[float, float]] = {}
        self._db_error_logged: dict[str, float] = {}
        self.configure(settings)
        self._stop = threading.Event()
        self._refresher: threading.Thread | None = None
        if self._shared:
            self._refresh_bans()
            self._refresher = threading.Thread(target=self._refresh_loop, name="defender-bans", daemon=True)
            self._refresher.start()

    # --- settings -----------------------------------------------------------

    def configure(self, settings: DefenderSection) -> None:
        """Apply new settings (start and SIGHUP). Existing bans keep their end time."""
        with self._lock:
            self.settings = settings
            self._allow = _Networks(settings.allow_list)
            self._points = {
                "login_failed": settings.score_login_failed,
                "unknown_user": settings.score_unknown_user,
                "protocol_error": settings.score_protocol_error,
                "connect_vetoed": settings.score_connect_vetoed,
                "limit_exceeded": settings.score_limit_exceeded,
            }
            self._buckets.clear()

    def allowed_listed(self, ip: str) -> bool:
        return ip in self._allow

    def _key(self, ip: str) -> tuple[str, bool]:
        """(the key ``ip`` is counted under, whether the address itself is allow-listed)."""
        return group_ip(ip, self.settings.ipv6_prefix), normalize_ip(ip) in self._allow

    # --- the connect gate ---------------------------------------------------

    def admit(self, ip: str) -> Refusal | None:
        """Decide at connect time, before any expensive work. On None the caller holds a
        connection slot and must give it back with :meth:`release` when the connection ends."""
        s = self.settings
        ip, trusted = self._key(ip)
        refusal: Refusal | None = None
        with self._lock:
            now = self._clock()
            self._maybe_prune(now)
            if s.enabled and not trusted:
                until = self._banned_until(ip, now)
                if until:
                    refusal = Refusal("banned", f"address {ip} is banned until "
                                      f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(until))}")
            if refusal is None and s.max_connections and self._open_total >= s.max_connections:
                refusal = Refusal("global", f"server busy: too many connections (limit {s.max_connections})")
            if refusal is None and not trusted and s.max_connections_per_ip \
                    and self._open_per_ip.get(ip, 0) >= s.max_connections_per_ip:
                refusal = Refusal("per_ip", f"too many connections from {ip} (limit {s.max_connections_per_ip})")
            if refusal is None and not trusted and s.rate_per_ip and not self._take_token(ip):
                refusal = Refusal("rate", f"too many new connections from {ip} "
                                  f"(limit {s.rate_per_ip:g}/s, burst {s.burst_per_ip})")
            if refusal is None:
                self._open_total += 1
                self._open_per_ip[ip] = self._open_per_ip.get(ip, 0) + 1
                return None
            self._counters["rejected_connections"] += 1
            self._counters["rejected_" + refusal.kind] += 1
            self._log_refusal(ip, refusal, now)
        if refusal.kind in ("rate", "per_ip"):
            self._record_key(ip, "limit_exceeded", refusal.reason)
        return refusal

    def release(self, ip: str) -> None:
        """A connection admitted by :meth:`admit` ended."""
        ip = self._key(ip)[0]
        with self._lock:
            self._open_total = max(0, self._open_total - 1)
            n = self._open_per_ip.get(ip, 0) - 1
            if n > 0:
                self._open_per_ip[ip] = n
            else:
                self._open_per_ip.pop(ip, None)

    def _take_token(self, ip: str) -> bool:
        s = self.settings
        now = time.monotonic()
        tokens, last = self._buckets.get(ip, (float(s.burst_per_ip), now))
        tokens = min(float(s.burst_per_ip), tokens + (now - last) * s.rate_per_ip)
        ok = tokens >= 1.0
        self._buckets[ip] = (tokens - 1.0 if ok else tokens, now)
        if len(self._buckets) > 10000:  # forget full buckets: they behave like new ones
            full = [k for k, (t, l) in self._buckets.items()
                    if t + (now - l) * s.rate_per_ip >= s.burst_per_ip]
            for k in full:
                del self._buckets[k]
        return ok

    def _log_refusal(self, ip: str, refusal: Refusal, now: float) -> None:
        """One line per address and reason every few seconds, with a count: a flood of
        refused connections must not become a flood of log lines."""
        key = (ip, refusal.kind)
        last, suppressed = self._refusal_logged.get(key, (0.0, 0))
        if now - last < _REFUSAL_LOG_EVERY:
            self._refusal_logged[key] = (last, suppressed + 1)
            return
        more = f" ({suppressed} more refused since the last report)" if suppressed else ""
        log.info("connect refused: %s%s", refusal.reason, more, extra={"ip": ip})
        self._refusal_logged[key] = (now, 0)
        if len(self._refusal_logged) > 10000:
            self._refusal_logged = {k: v for k, v in self._refusal_logged.items() if now - v[0] < _REFUSAL_LOG_EVERY}

    def _db_failed(self, what: str, exc: BaseException) -> None:
        """One warning a minute of each kind while the bans database fails."""
        now = time.monotonic()
        if now - self._db_error_logged.get(what, -1e9) > 60:
            self._db_error_logged[what] = now
            log.warning("defender: %s (%s: %s)", what, self._db.where, exc)

    # --- scores and bans ----------------------------------------------------

    def record(self, ip: str, kind: str, detail: str = "") -> bool:
        """Add the points of ``kind`` to ``ip``'s score; True if this banned it."""
        key, trusted = self._key(ip)
        return False if trusted else self._record_key(key, kind, detail)

    def _record_key(self, ip: str, kind: str, detail: str) -> bool:
        s = self.settings
        points = self._points.get(kind, 0)
        if not s.enabled or points <= 0 or self._closed:
            return False
        try:
            banned = self._record(ip, kind, detail, points)
        except self._errors as exc:
            if not self._shared:
                # state_dir full or broken: the login that scored still gets its answer
                self._db_failed("score not recorded; bans are not updated until it can be", exc)
                return False
            self._db_failed("the shared database cannot be reached: scores are kept, and bans "
                            "made, on this node only until it can", exc)
            return self._record_local(ip, kind, detail, points)
        with self._lock:
            self._counters["scored_events"] += 1
            if banned is not None:
                self._counters["bans_total"] += 1
                if self._shared:
                    self._known_bans[ip] = banned[0]
                    self._fresh_bans[ip] = (banned[0], time.monotonic())
        if banned is None:
            return False
        _, duration, count, reason = banned
        log.warning("banned %s for %.0fs (ban #%d): %s", ip, duration, count, reason, extra={"ip": ip})
        return True

    def _record(self, ip: str, kind: str, detail: str, points: int) -> tuple[float, float, int, str] | None:
        """One transaction: the score, and the ban if it reached the threshold ((until,
        duration, ban count, reason) then)."""
        s = self.settings
        with self._db.transaction() as cur:
            if self._shared:
                cur.execute("SELECT pg_advisory_xact_lock(?, hashtext(?))", (SCORE_LOCK, ip))
            now = self._clock()
            if self._db_banned_until(cur, ip, now):
                return None  # already banned (a connection admitted just before the ban)
            cur.execute("INSERT INTO scores (ip, at, points, kind) VALUES (?, ?, ?, ?)", (ip, now, points, kind))
            score = self._score(cur, ip, now)
            if score < s.threshold:
                return None
            row = cur.execute("SELECT ban_count, banned_until FROM hosts WHERE ip = ?", (ip,)).fetchone()
            count = 0
            if row is not None:
                count, last_until = row
                if now - last_until > s.max_ban_time:
                    count = 0  # clean for a whole max_ban_time since the last ban ended: start over
            count += 1
            duration = min(s.ban_time * s.ban_time_multiplier ** (count - 1), s.max_ban_time)
            reason = f"score {score} >= {s.threshold} within {s.observation_window:g}s, last: {kind}"
            if detail:
                reason += f" ({detail})"
            cur.execute(
                "INSERT INTO hosts (ip, banned_until, ban_count, score, reason, banned_at) VALUES (?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (ip) DO UPDATE SET banned_until = excluded.banned_until, ban_count = excluded.ban_count,"
                " score = excluded.score, reason = excluded.reason, banned_at = excluded.banned_at",
                (ip, now + duration, count, score, reason[:500], now),
            )
            cur.execute("DELETE FROM scores WHERE ip = ?", (ip,))
        return now + duration, duration, count, reason

    def _record_local(self, ip: str, kind: str, detail: str, points: int) -> bool:
        """The shared database is away: score in memory, ban on this node only."""
        s = self.settings
        with self._lock:
            now = self._clock()
            self._counters["scored_events"] += 1
            if self._banned_until(ip, now):
                return False
            kept = [(at, p) for at, p in self._local_scores.get(ip, []) if at > now - s.observation_window]
            kept.append((now, points))
            score = sum(p for _, p in kept)
            if score < s.threshold:
                self._local_scores[ip] = kept
                return False
            self._local_scores.pop(ip, None)
            self._local_bans[ip] = now + s.ban_time
            self._counters["bans_total"] += 1
        log.warning("banned %s for %.0fs on this node only (the shared database cannot be reached): "
                    "score %d >= %d, last: %s%s", ip, s.ban_time, score, s.threshold, kind,
                    f" ({detail})" if detail else "", extra={"ip": ip})
        return True

    def is_banned(self, ip: str) -> bool:
        ip, trusted = self._key(ip)
        if not self.settings.enabled or trusted:
            return False
        with self._lock:
            return bool(self._banned_until(ip, self._clock()))

    def host_info(self, ip: str) -> HostInfo:
        """Current score and whether the address was ever banned (for the ``connect`` event)."""
        ip = self._key(ip)[0]
        if self._closed:
            return HostInfo(0, False)
        try:
            with self._db.read() as cur:
                now = self._clock()
                row = cur.execute("SELECT ban_count FROM hosts WHERE ip = ?", (ip,)).fetchone()
                return HostInfo(self._score(cur, ip, now), bool(row and row[0]))
        except self._errors as exc:
            self._db_failed("score not read", exc)
            return HostInfo(0, False)

    def bans(self) -> list[dict]:
        """Active bans, longest-running first: ip, score (at ban time), banned_until (epoch
        seconds), ban_count (this one included), reason."""
        if self._closed:
            return []
        with self._db.read() as cur:
            rows = cur.execute(
                "SELECT ip, score, banned_until, ban_count, reason FROM hosts WHERE banned_until > ?"
                " ORDER BY banned_until DESC", (self._clock(),)
            ).fetchall()
            locks = cur.execute(
                'SELECT "user", failures, locked_until, reason FROM user_locks WHERE locked_until > ?'
                " ORDER BY locked_until DESC", (self._clock(),)
            ).fetchall()
        return [{"ip": ip, "score": score, "banned_until": until, "ban_count": count, "reason": reason}
                for ip, score, until, count, reason in rows] + \
               [{"ip": USER_PREFIX + user, "score": failures, "banned_until": until, "ban_count": 1, "reason": reason}
                for user, failures, until, reason in locks]

    def unban(self, ip: str) -> bool:
        """Lift a ban and forget the address's score and ban history; True if it was banned.
        ``user:NAME`` lifts that user's password lock instead; an IPv6 address lifts the
        ban of its network. In a cluster, every node lifts it within ``BAN_REFRESH``."""
        if ip.startswith(USER_PREFIX):
            return self._unlock_user(ip[len(USER_PREFIX):])
        ip = ip if "/" in ip else self._key(ip)[0]
        if self._closed:
            return False
        with self._db.transaction() as cur:
            was = bool(self._db_banned_until(cur, ip, self._clock()))
            cur.execute("DELETE FROM hosts WHERE ip = ?", (ip,))
            cur.execute("DELETE FROM scores WHERE ip = ?", (ip,))
        with self._lock:
            self._buckets.pop(ip, None)
            self._fresh_bans.pop(ip, None)
            was = bool(self._known_bans.pop(ip, None) or self._local_bans.pop(ip, None)) or was
            self._local_scores.pop(ip, None)
            if was:
                self._counters["unbans_total"] += 1
        if was:
            log.warning("unbanned %s", ip, extra={"ip": ip})
        return was

    # --- one account guessed from many addresses ----------------------------------

    def user_locked_until(self, user: str, ip: str) -> float:
        """When the password lock of ``user`` ends (0: not locked). Allow-listed addresses
        are never locked out (nor do their failures count)."""
        s = self.settings
        if not s.enabled or not s.user_max_failures or self._key(ip)[1] or self._closed:
            return 0.0
        try:
            with self._db.read() as cur:
                row = cur.execute('SELECT locked_until FROM user_locks WHERE "user" = ?', (user,)).fetchone()
        except self._errors as exc:
            self._db_failed("password locks not read: not enforced until the database is back", exc)
            return 0.0
        return float(row[0]) if row and row[0] > self._clock() else 0.0

    def record_user_failure(self, user: str, ip: str) -> float:
        """Count a failed password login for ``user``; the lock's end time if this locked it."""
        s = self.settings
        if not s.enabled or not s.user_max_failures or self._key(ip)[1] or self._closed:
            return 0.0
        try:
            with self._db.transaction() as cur:
                if self._shared:
                    cur.execute("SELECT pg_advisory_xact_lock(?, hashtext(?))", (SCORE_LOCK, USER_PREFIX + user))
                now = self._clock()
                cur.execute('INSERT INTO user_failures ("user", at) VALUES (?, ?)', (user, now))
                failures = (cur.execute('SELECT COUNT(*) FROM user_failures WHERE "user" = ? AND at > ?',
                                        (user, now - s.observation_window)).fetchone() or (0,))[0]
                if failures < s.user_max_failures:
                    return 0.0
                until = now + s.user_lock_time
                reason = (f"{failures} failed password logins within {s.observation_window:g}s "
                          f"(limit {s.user_max_failures}), the last from {normalize_ip(ip)}")
                cur.execute(
                    'INSERT INTO user_locks ("user", locked_until, failures, reason, locked_at) VALUES (?, ?, ?, ?, ?)'
                    ' ON CONFLICT ("user") DO UPDATE SET locked_until = excluded.locked_until,'
                    " failures = excluded.failures, reason = excluded.reason, locked_at = excluded.locked_at",
                    (user, until, failures, reason, now),
                )
                cur.execute('DELETE FROM user_failures WHERE "user" = ?', (user,))
        except self._errors as exc:
            log.warning("defender: failed login for %r not recorded (%s)", user, exc)
            return 0.0
        log.warning("password logins for %r locked for %.0fs: %s", user, s.user_lock_time, reason,
                    extra={"user": user, "ip": normalize_ip(ip)})
        return until

    def _unlock_user(self, user: str) -> bool:
        if self._closed:
            return False
        with self._db.transaction() as cur:
            was = bool(cur.execute('SELECT 1 FROM user_locks WHERE "user" = ? AND locked_until > ?',
                                   (user, self._clock())).fetchone())
            cur.execute('DELETE FROM user_locks WHERE "user" = ?', (user,))
            cur.execute('DELETE FROM user_failures WHERE "user" = ?', (user,))
        if was:
            log.warning("password logins for %r unlocked", user, extra={"user": user})
        return was

    def stats(self) -> dict:
        """Counters since start (bans_total, rejected_connections and its split by kind,
        scored_events, unbans_total) and gauges (active_bans, open_connections)."""
        with self._lock:
            out: dict = dict(self._counters)
            out["open_connections"] = self._open_total
            now = self._clock()
            if self._shared:
                out["active_bans"] = sum(1 for u in {**self._known_bans, **self._local_bans}.values() if u > now)
                return out
        active = 0
        if not self._closed:
            try:
                with self._db.read() as cur:
                    active = (cur.execute("SELECT COUNT(*) FROM hosts WHERE banned_until > ?",
                                          (now,)).fetchone() or (0,))[0]
            except self._errors as exc:
                self._db_failed("bans not counted", exc)
        out["active_bans"] = active
        return out

    def close(self) -> None:
        self._stop.set()
        if self._refresher is not None:
            self._refresher.join(timeout=5)
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._db.close()

    # --- the shared database's bans, read by a thread -----------------------------

    def _refresh_loop(self) -> None:
        while not self._stop.wait(BAN_REFRESH):
            self._refresh_bans()

    def _refresh_bans(self) -> None:
        """Read the active bans whole (replacing the known ones, so an unban made on another
        node is seen too); prune once a minute. On failure the known bans stay in force."""
        started = time.monotonic()
        try:
            with self._db.read() as cur:
                now = self._clock()
                rows = cur.execute("SELECT ip, banned_until FROM hosts WHERE banned_until > ?", (now,)).fetchall()
            if now - self._last_prune >= _PRUNE_EVERY:
                self._last_prune = now
                with self._db.transaction() as cur:
                    self._prune(cur, now)
        except self._errors as exc:
            self._db_failed("the shared database cannot be reached: the bans known keep refusing; "
                            "new ones from other nodes are not seen until it can", exc)
            return
        except Exception:  # the thread must live on, whatever one refresh met
            log.exception("defender: refreshing the bans failed")
            return
        with self._lock:
            known = {ip: float(until) for ip, until in rows}
            self._fresh_bans = {ip: f for ip, f in self._fresh_bans.items() if f[1] >= started}
            for ip, (until, _) in self._fresh_bans.items():  # written while this read ran
                known[ip] = max(known.get(ip, 0.0), until)
            self._known_bans = known
            if self._local_bans or self._local_scores:  # back: this node's own bans end as they would
                self._local_bans = {ip: u for ip, u in self._local_bans.items() if u > now}
                self._local_scores.clear()

    # --- internals ------------------------------------------------------------------

    def _banned_until(self, ip: str, now: float) -> float:
        """(self._lock held.) Shared database: the bans known; else the SQLite file's row."""
        if self._closed:
            return 0.0
        if self._shared:
            until = max(self._known_bans.get(ip, 0.0), self._local_bans.get(ip, 0.0))
            return until if until > now else 0.0
        try:
            with self._db.read() as cur:
                return self._db_banned_until(cur, ip, now)
        except self._errors as exc:
            self._db_failed("ban not read", exc)
            return 0.0

    @staticmethod
    def _db_banned_until(cur: Cursor, ip: str, now: float) -> float:
        row = cur.execute("SELECT banned_until FROM hosts WHERE ip = ?", (ip,)).fetchone()
        return float(row[0]) if row is not None and row[0] > now else 0.0

    def _score(self, cur: Cursor, ip: str, now: float) -> int:
        row = cur.execute("SELECT COALESCE(SUM(points), 0) FROM scores WHERE ip = ? AND at > ?",
                          (ip, now - self.settings.observation_window)).fetchone()
        return int(row[0]) if row else 0

    def _maybe_prune(self, now: float) -> None:
        """(self._lock held.) SQLite: at most once a minute, from the connect gate. A shared
        database is pruned by the thread that reads its bans."""
        if self._shared or self._closed or now - self._last_prune < _PRUNE_EVERY:
            return
        self._last_prune = now
        try:
            with self._db.transaction() as cur:
                self._prune(cur, now)
        except self._errors as exc:
            self._db_failed("old scores not pruned", exc)

    def _prune(self, cur: Cursor, now: float) -> None:
        s = self.settings
        cur.execute("DELETE FROM scores WHERE at <= ?", (now - s.observation_window,))
        # a host clean for max_ban_time after its ban ended would start over anyway
        cur.execute("DELETE FROM hosts WHERE banned_until < ?", (now - s.max_ban_time,))
        cur.execute("DELETE FROM user_failures WHERE at <= ?", (now - s.observation_window,))
        cur.execute("DELETE FROM user_locks WHERE locked_until < ?", (now,))


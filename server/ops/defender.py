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

Bans and scores live in SQLite under ``state_dir`` (docs/architecture.md rule 10): they
survive a restart, and several server processes sharing one state_dir see the
same bans. Counts of open connections and the per-IP token buckets are, by
nature, per process and stay in memory.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import sqlite3
import threading
import time
from dataclasses import dataclass
from typing import Callable

from scriptsftp.server.contract.state import StateStoreFactory
from scriptsftp.server.support.config import DefenderSection

log = logging.getLogger("scriptsftp.defender")

#: What can add to a score; each maps to a ``score_*`` key of ``[defender]``.
KINDS = ("login_failed", "unknown_user", "protocol_error", "connect_vetoed", "limit_exceeded")

_PRUNE_EVERY = 60.0  # seconds between clean-ups of expired scores and forgotten hosts
_REFUSAL_LOG_EVERY = 10.0  # at most one "refused" log line per address and reason in this time


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
        self._lock = threading.Lock()
        self._db = stores.connect("bans")
        self._closed = False
        with self._lock:
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS hosts (ip TEXT PRIMARY KEY, banned_until REAL NOT NULL,"
                " ban_count INTEGER NOT NULL, score INTEGER NOT NULL, reason TEXT NOT NULL, banned_at REAL NOT NULL)"
            )
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS scores (ip TEXT NOT NULL, at REAL NOT NULL, points INTEGER NOT NULL,"
                " kind TEXT NOT NULL)"
            )
            self._db.execute("CREATE INDEX IF NOT EXISTS scores_ip_at ON scores (ip, at)")
            self._db.execute("CREATE TABLE IF NOT EXISTS user_failures (user TEXT NOT NULL, at REAL NOT NULL)")
            self._db.execute("CREATE INDEX IF NOT EXISTS user_failures_user_at ON user_failures (user, at)")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS user_locks (user TEXT PRIMARY KEY, locked_until REAL NOT NULL,"
                " failures INTEGER NOT NULL, reason TEXT NOT NULL, locked_at REAL NOT NULL)"
            )
        # per process: open connections and token buckets
        self._open_total = 0
        self._open_per_ip: dict[str, int] = {}
        self._buckets: dict[str, tuple[float, float]] = {}  # ip -> (tokens, last refill, monotonic)
        self._last_prune = 0.0
        self._refusal_logged: dict[tuple[str, str], tuple[float, int]] = {}
        self._counters = {"bans_total": 0, "rejected_connections": 0, "rejected_banned": 0,
                          "rejected_rate": 0, "rejected_per_ip": 0, "rejected_global": 0, "scored_events": 0,
                          "unbans_total": 0}
        self.configure(settings)

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

    # --- scores and bans ----------------------------------------------------

    def record(self, ip: str, kind: str, detail: str = "") -> bool:
        """Add the points of ``kind`` to ``ip``'s score; True if this banned it."""
        key, trusted = self._key(ip)
        return False if trusted else self._record_key(key, kind, detail)

    def _record_key(self, ip: str, kind: str, detail: str) -> bool:
        s = self.settings
        points = self._points.get(kind, 0)
        if not s.enabled or points <= 0:
            return False
        try:
            return self._record(ip, kind, detail, points)
        except sqlite3.Error as exc:
            # state_dir full or broken: the login that scored still gets its answer
            now = time.monotonic()
            if now - self._db_error_logged > 60:
                self._db_error_logged = now
                log.warning("defender: score not recorded (%s); bans are not updated until it can be", exc)
            return False

    _db_error_logged = -1e9

    def _record(self, ip: str, kind: str, detail: str, points: int) -> bool:
        s = self.settings
        with self._lock:
            if self._closed:
                return False
            now = self._clock()
            self._counters["scored_events"] += 1
            if self._banned_until(ip, now):
                return False  # already banned (a connection admitted just before the ban)
            self._db.execute("INSERT INTO scores (ip, at, points, kind) VALUES (?, ?, ?, ?)", (ip, now, points, kind))
            score = self._score(ip, now)
            if score < s.threshold:
                return False
            row = self._db.execute("SELECT ban_count, banned_until FROM hosts WHERE ip = ?", (ip,)).fetchone()
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
            self._db.execute(
                "INSERT INTO hosts (ip, banned_until, ban_count, score, reason, banned_at) VALUES (?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (ip) DO UPDATE SET banned_until = excluded.banned_until, ban_count = excluded.ban_count,"
                " score = excluded.score, reason = excluded.reason, banned_at = excluded.banned_at",
                (ip, now + duration, count, score, reason[:500], now),
            )
            self._db.execute("DELETE FROM scores WHERE ip = ?", (ip,))
            self._counters["bans_total"] += 1
        log.warning("banned %s for %.0fs (ban #%d): %s", ip, duration, count, reason, extra={"ip": ip})
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
        with self._lock:
            if self._closed:
                return HostInfo(0, False)
            now = self._clock()
            row = self._db.execute("SELECT ban_count FROM hosts WHERE ip = ?", (ip,)).fetchone()
            return HostInfo(self._score(ip, now), bool(row and row[0]))

    def bans(self) -> list[dict]:
        """Active bans, longest-running first: ip, score (at ban time), banned_until (epoch
        seconds), ban_count (this one included), reason."""
        with self._lock:
            if self._closed:
                return []
            rows = self._db.execute(
                "SELECT ip, score, banned_until, ban_count, reason FROM hosts WHERE banned_until > ?"
                " ORDER BY banned_until DESC", (self._clock(),)
            ).fetchall()
            locks = self._db.execute(
                "SELECT user, failures, locked_until, reason FROM user_locks WHERE locked_until > ?"
                " ORDER BY locked_until DESC", (self._clock(),)
            ).fetchall()
        return [{"ip": ip, "score": score, "banned_until": until, "ban_count": count, "reason": reason}
                for ip, score, until, count, reason in rows] + \
               [{"ip": USER_PREFIX + user, "score": failures, "banned_until": until, "ban_count": 1, "reason": reason}
                for user, failures, until, reason in locks]

    def unban(self, ip: str) -> bool:
        """Lift a ban and forget the address's score and ban history; True if it was banned.
        ``user:NAME`` lifts that user's password lock instead; an IPv6 address lifts the
        ban of its network."""
        if ip.startswith(USER_PREFIX):
            return self._unlock_user(ip[len(USER_PREFIX):])
        ip = ip if "/" in ip else self._key(ip)[0]
        with self._lock:
            if self._closed:
                return False
            was = bool(self._banned_until(ip, self._clock()))
            self._db.execute("DELETE FROM hosts WHERE ip = ?", (ip,))
            self._db.execute("DELETE FROM scores WHERE ip = ?", (ip,))
            self._buckets.pop(ip, None)
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
        if not s.enabled or not s.user_max_failures or self._key(ip)[1]:
            return 0.0
        with self._lock:
            if self._closed:
                return 0.0
            row = self._db.execute("SELECT locked_until FROM user_locks WHERE user = ?", (user,)).fetchone()
        return row[0] if row and row[0] > self._clock() else 0.0

    def record_user_failure(self, user: str, ip: str) -> float:
        """Count a failed password login for ``user``; the lock's end time if this locked it."""
        s = self.settings
        if not s.enabled or not s.user_max_failures or self._key(ip)[1]:
            return 0.0
        try:
            with self._lock:
                if self._closed:
                    return 0.0
                now = self._clock()
                self._db.execute("INSERT INTO user_failures (user, at) VALUES (?, ?)", (user, now))
                failures = self._db.execute("SELECT COUNT(*) FROM user_failures WHERE user = ? AND at > ?",
                                            (user, now - s.observation_window)).fetchone()[0]
                if failures < s.user_max_failures:
                    return 0.0
                until = now + s.user_lock_time
                reason = (f"{failures} failed password logins within {s.observation_window:g}s "
                          f"(limit {s.user_max_failures}), the last from {normalize_ip(ip)}")
                self._db.execute(
                    "INSERT INTO user_locks (user, locked_until, failures, reason, locked_at) VALUES (?, ?, ?, ?, ?)"
                    " ON CONFLICT (user) DO UPDATE SET locked_until = excluded.locked_until,"
                    " failures = excluded.failures, reason = excluded.reason, locked_at = excluded.locked_at",
                    (user, until, failures, reason, now),
                )
                self._db.execute("DELETE FROM user_failures WHERE user = ?", (user,))
        except sqlite3.Error as exc:
            log.warning("defender: failed login for %r not recorded (%s)", user, exc)
            return 0.0
        log.warning("password logins for %r locked for %.0fs: %s", user, s.user_lock_time, reason,
                    extra={"user": user, "ip": normalize_ip(ip)})
        return until

    def _unlock_user(self, user: str) -> bool:
        with self._lock:
            if self._closed:
                return False
            was = bool(self._db.execute("SELECT 1 FROM user_locks WHERE user = ? AND locked_until > ?",
                                        (user, self._clock())).fetchone())
            self._db.execute("DELETE FROM user_locks WHERE user = ?", (user,))
            self._db.execute("DELETE FROM user_failures WHERE user = ?", (user,))
        if was:
            log.warning("password logins for %r unlocked", user, extra={"user": user})
        return was

    def stats(self) -> dict:
        """Counters since start (bans_total, rejected_connections and its split by kind,
        scored_events, unbans_total) and gauges (active_bans, open_connections)."""
        with self._lock:
            out: dict = dict(self._counters)
            out["open_connections"] = self._open_total
            out["active_bans"] = 0 if self._closed else self._db.execute(
                "SELECT COUNT(*) FROM hosts WHERE banned_until > ?", (self._clock(),)).fetchone()[0]
        return out

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._db.close()

    # --- internals (lock held) ---------------------------------------------------

    def _banned_until(self, ip: str, now: float) -> float:
        if self._closed:
            return 0.0
        row = self._db.execute("SELECT banned_until FROM hosts WHERE ip = ?", (ip,)).fetchone()
        return row[0] if row is not None and row[0] > now else 0.0

    def _score(self, ip: str, now: float) -> int:
        row = self._db.execute("SELECT COALESCE(SUM(points), 0) FROM scores WHERE ip = ? AND at > ?",
                               (ip, now - self.settings.observation_window)).fetchone()
        return int(row[0])

    def _maybe_prune(self, now: float) -> None:
        if self._closed or now - self._last_prune < _PRUNE_EVERY:
            return
        self._last_prune = now
        s = self.settings
        self._db.execute("DELETE FROM scores WHERE at <= ?", (now - s.observation_window,))
        # a host clean for max_ban_time after its ban ended would start over anyway
        self._db.execute("DELETE FROM hosts WHERE banned_until < ?", (now - s.max_ban_time,))
        self._db.execute("DELETE FROM user_failures WHERE at <= ?", (now - s.observation_window,))
        self._db.execute("DELETE FROM user_locks WHERE locked_until < ?", (now,))

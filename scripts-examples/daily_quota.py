# daily_quota.py: each user may upload at most a number of bytes per day
# (UTC); an upload that would go over is refused with how much is left.
#
# pre-upload refuses at once, before any byte is sent, when the day's quota
# is already used up. pre-publish, when the upload is complete and its size
# is known, counts it and refuses it if it goes over: nothing of it is
# published. (A resumed or appended upload counts with its whole size.)
# Counters live in the script's store ("USER:YYYY-MM-DD" -> bytes; the
# previous day's counter is deleted when a new day starts).
#
# Bind it (scriptsftp.toml):
#
#   [[bindings]]
#   event  = "pre-upload"
#   script = "daily_quota.py"
#   allow  = ["store"]
#
#   [[bindings]]
#   event  = "pre-publish"
#   script = "daily_quota.py"
#   allow  = ["store"]
#   order  = 1000           # after the other pre-publish checks: a file they
#                           # refuse then does not count
#
# A file refused by a pre-publish check that runs after this one still counts.

import datetime
import fnmatch

MB = 1000 * 1000
GB = 1000 * MB

# First matching user glob wins.
QUOTAS = [
    ("backup-*", 200 * GB),
    ("partner-*", 5 * GB),
    ("*", 1 * GB),
]


def quota_for(user):
    for pattern, limit in QUOTAS:
        if fnmatch.fnmatchcase(user, pattern):
            return limit
    return None


def day_key(event):
    day = datetime.datetime.fromtimestamp(event.time, datetime.timezone.utc).date()
    return f"{event.user}:{day.isoformat()}"


def human(n):
    for unit, size in (("GB", GB), ("MB", MB), ("kB", 1000)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} bytes"


def refuse(api, limit, used, size):
    left = max(0, limit - used)
    api.veto(f"daily upload quota exceeded: {human(used)} of {human(limit)} used today, "
             f"{human(left)} left" + (f", this file is {human(size)}" if size else "")
             + "; the quota resets at 00:00 UTC")


def on_pre_upload(event, api):
    limit = quota_for(event.user)
    if limit is None:
        return
    used = api.store.get(day_key(event), 0)
    if used >= limit:
        refuse(api, limit, used, 0)


def on_pre_publish(event, api):
    limit = quota_for(event.user)
    size = event.size or 0
    if limit is None or size == 0:
        return
    key = day_key(event)
    total = api.store.incr(key, size)        # atomic: parallel uploads add up exactly
    if total > limit:
        api.store.incr(key, -size)           # this file does not count: it is refused
        refuse(api, limit, total - size, size)
    if total == size:                        # first upload today: drop the previous day's counter
        last = api.store.get(event.user + ":last")
        if last and last != key:
            api.store.delete(last)
        api.store.set(event.user + ":last", key)
    api.log("quota", used=total, limit=limit)

# brute_force_alert.py: when someone guesses a user's password, tell the
# admin: on the 5th failed password login for one user within ten minutes,
# send an email and post to the "ops" webhook (once per burst).
#
# Only wrong passwords of existing users count (unknown user names are what
# scanners try all day: the built-in [defender] bans their addresses).
# The alert lists the addresses the attempts came from.
#
# Bind it (scriptsftp.toml):
#
#   [[bindings]]
#   event  = "login-failed"
#   script = "brute_force_alert.py"
#   allow  = ["store", "notify"]
#
#   [notify.smtp]
#   host   = "127.0.0.1"
#   port   = 25
#   sender = "scriptsftp@example.com"
#
#   [notify.webhooks.ops]
#   url = "https://chat.example.com/hooks/sftp-alerts"

ADMIN = "sftp-admin@example.com"
WEBHOOK = "ops"                  # a [notify.webhooks] name, or None for email only
THRESHOLD = 5                    # failed logins ...
WINDOW = 10 * 60                 # ... within this many seconds


def on_login_failed(event, api):
    if event.login_method != "password" or event.reason != "wrong password":
        return
    key = "failures:" + event.user
    # [[time, address], ...] of this user's failures within the window
    recent = [f for f in api.store.get(key, []) if f[0] > event.time - WINDOW]
    recent.append([event.time, event.remote_ip])
    api.store.set(key, recent[-100:])
    api.log("failed login counted", user=event.user, failures=len(recent))
    if len(recent) < THRESHOLD:
        return
    last_alert = api.store.get("alerted:" + event.user, 0)
    if last_alert > event.time - WINDOW:
        return                                   # already alerted for this burst
    api.store.set("alerted:" + event.user, event.time)

    addresses = sorted(set(ip for _, ip in recent))
    minutes = WINDOW // 60
    subject = f"[sftp] {len(recent)} failed logins for {event.user} in {minutes} minutes"
    body = (f"{len(recent)} wrong passwords were given for the user {event.user} within "
            f"{minutes} minutes, the last one over {event.protocol}.\n"
            f"From: {', '.join(addresses)}\n\n"
            "If this was not the user, consider blocking these addresses and "
            "changing the user's password.\n")
    api.notify.email(ADMIN, subject, body)
    if WEBHOOK:
        api.notify.webhook(WEBHOOK, {"alert": "brute-force", "user": event.user,
                                     "failures": len(recent), "window_minutes": minutes,
                                     "addresses": addresses})
    api.log("brute-force alert sent", user=event.user, failures=len(recent))

# access_rules.py: who may connect and log in from where, and when.
#
# connect (before any authentication; nothing is known but the address):
#   - refuse addresses in BLOCKED_NETWORKS;
#   - refuse an address that opened more than MAX_CONNECTIONS_PER_MINUTE
#     connections in the last minute (scanners, runaway scripts).
# pre-login (the password or key was right; a refusal still ends the login):
#   - per-user rules (first matching user glob wins): the networks the user
#     may log in from, and whether only during business hours.
# Times are the server's local time (set TZ in the daemon's environment to
# choose another zone). Networks are IPv4 CIDRs ("10.0.0.0/8"); an IPv6
# address matches only when written exactly.
#
# Bind it (scriptsftp.toml):
#
#   [[bindings]]
#   event  = "connect"
#   script = "access_rules.py"
#   allow  = ["store"]              # connection counts per address
#
#   [[bindings]]
#   event  = "pre-login"
#   script = "access_rules.py"
#
# Try it:  scriptsftp script test access_rules.py --event connect --remote-ip 203.0.113.9
#          scriptsftp script test access_rules.py --event pre-login --user ops-anna --remote-ip 10.1.2.3

import datetime
import fnmatch

BLOCKED_NETWORKS = ["203.0.113.0/24", "198.51.100.17/32"]
MAX_CONNECTIONS_PER_MINUTE = 30

# (user glob, networks the user may log in from or None for anywhere, business hours only)
USER_RULES = [
    ("ops-*", ["10.0.0.0/8", "192.168.0.0/16"], False),
    ("partner-*", None, True),
]
BUSINESS_DAYS = [0, 1, 2, 3, 4]          # Monday .. Friday
BUSINESS_HOURS = (8, 18)                 # from 08:00 to 18:00
DAY_NAMES = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def ipv4(text):
    """'10.1.2.3' -> int, or None when it is not a dotted IPv4 address."""
    if text.startswith("::ffff:"):                 # IPv4 seen through an IPv6 socket
        text = text[7:]
    parts = text.split(".")
    if len(parts) != 4 or not all(p.isdigit() and int(p) < 256 for p in parts):
        return None
    value = 0
    for p in parts:
        value = value * 256 + int(p)
    return value


def in_network(ip, network):
    address, _, bits = network.partition("/")
    ip_value, net_value = ipv4(ip), ipv4(address)
    if ip_value is None or net_value is None:
        return ip == network
    shift = 32 - int(bits or 32)
    return ip_value >> shift == net_value >> shift


def on_connect(event, api):
    ip = event.remote_ip
    if any(in_network(ip, net) for net in BLOCKED_NETWORKS):
        api.veto(f"connections from {ip} are not accepted")
    # recent connection times of this address (a sliding one-minute window)
    key = "connections:" + ip
    recent = [t for t in api.store.get(key, []) if t > event.time - 60]
    if len(recent) >= MAX_CONNECTIONS_PER_MINUTE:
        api.veto(f"too many connections from {ip}: at most {MAX_CONNECTIONS_PER_MINUTE} "
                 "a minute, try again later")
    api.store.set(key, recent + [event.time])


def on_pre_login(event, api):
    for pattern, networks, business_hours_only in USER_RULES:
        if not fnmatch.fnmatchcase(event.user, pattern):
            continue
        if networks is not None and not any(in_network(event.remote_ip, n) for n in networks):
            api.veto(f"{event.user} may log in only from {', '.join(networks)} "
                     f"(not from {event.remote_ip})")
        if business_hours_only:
            now = datetime.datetime.fromtimestamp(event.time)
            start, end = BUSINESS_HOURS
            if now.weekday() not in BUSINESS_DAYS or not start <= now.hour < end:
                days = DAY_NAMES[BUSINESS_DAYS[0]] + " to " + DAY_NAMES[BUSINESS_DAYS[-1]]
                api.veto(f"{event.user} may log in {days} from {start:02d}:00 to {end:02d}:00 "
                         f"(server time is now {DAY_NAMES[now.weekday()]} {now:%H:%M})")
        return

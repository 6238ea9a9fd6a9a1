# notify_upload.py: on every upload into /inbox, email the admin and post a
# JSON webhook with who uploaded what: user, path, size and SHA-256.
#
# Runs after the upload is published (post-upload), asynchronously: the
# client does not wait for the hash or the notifications. Notifications go
# through the server's outbox: they are retried when the mail server or the
# webhook is down, and survive a restart.
#
# The webhook receives (Content-Type: application/json):
#   {"event": "upload", "user": "alice", "path": "/inbox/a.csv", "size": 1234,
#    "sha256": "9f86d0...", "protocol": "sftp", "remote_ip": "192.0.2.7",
#    "time": "2024-05-01T09:30:00Z"}
#
# Bind it (scriptsftp.toml):
#
#   [[bindings]]
#   event    = "post-upload"
#   script   = "notify_upload.py"
#   paths    = ["/inbox/**"]
#   mode     = "async"
#   allow    = ["read", "notify"]   # api.file.hash, api.notify
#   cpu_time = 30.0                 # hashing takes ~2 s of CPU per GB
#   timeout  = 60.0
#
#   [notify.smtp]
#   host   = "127.0.0.1"
#   port   = 25
#   sender = "scriptsftp@example.com"
#
#   [notify.webhooks.uploads]
#   url     = "https://hooks.example.com/sftp-uploads"
#   headers = { Authorization = "Bearer CHANGE-ME" }

import datetime

ADMIN = "sftp-admin@example.com"
WEBHOOK = "uploads"              # the name in [notify.webhooks.NAME]


def on_post_upload(event, api):
    digest = api.file.hash("sha256")
    size = api.file.size
    when = datetime.datetime.fromtimestamp(event.time, datetime.timezone.utc)
    api.notify.webhook(WEBHOOK, {
        "event": "upload", "user": event.user, "path": event.path, "size": size,
        "sha256": digest, "protocol": event.protocol, "remote_ip": event.remote_ip,
        "time": when.strftime("%Y-%m-%dT%H:%M:%SZ"),
    })
    api.notify.email(
        ADMIN,
        f"[sftp] {event.user} uploaded {event.path}",
        f"User:     {event.user} (from {event.remote_ip} over {event.protocol})\n"
        f"File:     {event.path}\n"
        f"Size:     {size} bytes\n"
        f"SHA-256:  {digest}\n"
        f"Time:     {when:%Y-%m-%d %H:%M:%S} UTC\n")
    api.log("notified", path=event.path, sha256=digest)

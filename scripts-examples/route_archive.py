# route_archive.py: file each uploaded invoice into an archive by month and
# tell accounting.
#
# After a PDF is uploaded into /inbox/invoices/, it is moved to
#   admin:/archive/USER/YYYY/MM/NAME.pdf
# ("admin:" is the directory set as [scripts] fs_admin_root: outside every
# user's home, so partners cannot change the archive) and accounting gets an
# email. A name already in the archive gets "-1", "-2"... added. The month is
# the upload's (UTC).
#
# "own_file" lets the binding move the uploaded file as the server, whatever the
# partner's rights: an upload-only /inbox (no download, no delete) can be archived.
# To file invoices in the user's own home instead, write the folder without
# "admin:" (e.g. f"/archive/{when:%Y}/{when:%m}") and drop "fs_admin" below (the
# user needs mkdir there, for the folders; own_file covers the move).
#
# Bind it (scriptsftp.toml):
#
#   [scripts]                       # (add the key to your existing [scripts] table)
#   fs_admin_root = "/srv/sftp-archive"
#
#   [[bindings]]
#   event  = "post-upload"
#   script = "route_archive.py"
#   paths  = ["/inbox/invoices/*.pdf"]
#   mode   = "async"                # the client does not wait for the move
#   allow  = ["fs", "fs_admin", "own_file", "notify"]   # own_file: works for upload-only partners too
#
#   [notify.smtp]
#   host   = "127.0.0.1"
#   port   = 25
#   sender = "scriptsftp@example.com"

import datetime

ACCOUNTING = "accounting@example.com"


def make_dirs(api, folder):
    """mkdir -p for "admin:/a/b/c"."""
    prefix, _, rest = folder.rpartition(":")
    path = prefix + ":" if prefix else ""
    for part in rest.strip("/").split("/"):
        path += "/" + part
        if not api.fs.exists(path):
            try:
                api.fs.mkdir(path)
            except FileExistsError:
                pass                  # another upload created it just now


def on_post_upload(event, api):
    when = datetime.datetime.fromtimestamp(event.time, datetime.timezone.utc)
    folder = f"admin:/archive/{event.user}/{when:%Y}/{when:%m}"
    make_dirs(api, folder)
    name = event.path.rsplit("/", 1)[-1]
    stem, dot, ext = name.rpartition(".")
    target, n = f"{folder}/{name}", 0
    while api.fs.exists(target):
        n += 1
        target = f"{folder}/{stem}-{n}{dot}{ext}"
    api.fs.move(event.path, target)
    archived = target[len("admin:"):]
    api.log("archived", path=event.path, to=archived)
    api.notify.email(
        ACCOUNTING,
        f"[sftp] new invoice from {event.user}: {name}",
        f"{event.user} uploaded the invoice {name} ({event.size} bytes) at "
        f"{when:%Y-%m-%d %H:%M} UTC.\nIt is archived as {archived}.\n")

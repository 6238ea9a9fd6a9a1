# download_once.py: each user may download a file once; a second download of
# the same file is refused (e.g. one-time delivery of credentials or keys).
#
# post-download (the client closed the file after reading it) records the
# download in the script's store; pre-download refuses the file when a
# record exists. A transfer cut off by a dropped connection is not recorded,
# so the user can retry it. Uploading the file again (a new version) allows one more download.
#
# Bind it (scriptsftp.toml):
#
#   [[bindings]]
#   event  = "pre-download"
#   script = "download_once.py"
#   paths  = ["/outbox/**"]
#   allow  = ["store"]
#
#   [[bindings]]
#   event  = "post-download"
#   script = "download_once.py"
#   paths  = ["/outbox/**"]
#   allow  = ["store"]
#
#   [[bindings]]
#   event  = "post-upload"
#   script = "download_once.py"
#   paths  = ["/outbox/**"]
#   allow  = ["store"]
#
#   [[bindings]]
#   event  = "post-delete"
#   script = "download_once.py"
#   paths  = ["/outbox/**"]
#   allow  = ["store"]
#
# Two downloads started at the very same moment can both pass pre-download;
# for strict one-time links, also remove the file after its download.

import datetime


def key(user, path):
    return user + ":" + path


def on_pre_download(event, api):
    done = api.store.get(key(event.user, event.path))
    if done is not None:
        when = datetime.datetime.fromtimestamp(done["time"], datetime.timezone.utc)
        api.veto(f"{event.path} may be downloaded only once; you downloaded it on "
                 f"{when:%Y-%m-%d at %H:%M} UTC. Ask the sender to send it again.")


def on_post_download(event, api):
    api.store.set(key(event.user, event.path), {"time": event.time, "bytes": event.bytes})
    readers = api.store.get("readers:" + event.path, [])
    if event.user not in readers:
        api.store.set("readers:" + event.path, readers + [event.user])
    api.log("downloaded once", path=event.path, bytes=event.bytes)


def forget(path, api):
    for user in api.store.get("readers:" + path, []):
        api.store.delete(key(user, path))
    api.store.delete("readers:" + path)


def on_post_upload(event, api):
    forget(event.path, api)         # a new version: everyone may fetch it once more


def on_post_delete(event, api):
    forget(event.path, api)         # keeps the store small

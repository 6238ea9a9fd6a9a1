# manifest_order.py: a batch is complete when "batch.done" arrives, and
# "batch.done" is refused until every file listed in the folder's
# "manifest.json" is there (with the listed size, when one is given).
#
# The system that picks up batches waits for batch.done; with this script it
# can trust that the batch is whole. The partner uploads manifest.json first:
#
#   {"files": ["orders.csv", {"name": "lines.csv", "size": 5120}]}
#
# then the files, then an empty batch.done. pre-upload runs before any byte
# of batch.done is sent, so a too-early batch.done is refused at once with
# the list of what is missing.
#
# Bind it (scriptsftp.toml):
#
#   [[bindings]]
#   event  = "pre-upload"
#   script = "manifest_order.py"
#   paths  = ["/inbox/**/batch.done"]
#   allow  = ["fs"]                 # api.fs: read manifest.json, look for the files

import json

MANIFEST = "manifest.json"


def on_pre_upload(event, api):
    folder = event.path.rsplit("/", 1)[0] or ""
    manifest = folder + "/" + MANIFEST
    if not api.fs.exists(manifest):
        api.veto(f"upload {MANIFEST} before batch.done")
    try:
        listed = json.loads(api.fs.read_text(manifest, 1024 * 1024))["files"]
    except (ValueError, KeyError, TypeError):
        listed = None
    if not isinstance(listed, list):
        api.veto(f'{MANIFEST} is not valid: expected {{"files": ["name", ...]}}')
    missing = []
    for entry in listed:
        name, size = entry, None
        if isinstance(entry, dict):
            name, size = entry.get("name"), entry.get("size")
        if not isinstance(name, str) or not name or "/" in name or name in (".", ".."):
            api.veto(f"{MANIFEST} lists an invalid entry: {str(entry)[:80]}")
        path = folder + "/" + name
        if not api.fs.exists(path):
            missing.append(name)
        elif size is not None and api.fs.stat(path).size != size:
            missing.append(f"{name} (size {api.fs.stat(path).size}, expected {size})")
    if missing:
        api.veto(f"batch.done refused: {len(missing)} of {len(listed)} files in {MANIFEST} "
                 f"are not complete yet: {', '.join(missing[:20])}")
    api.log("batch complete", folder=folder or "/", files=len(listed))

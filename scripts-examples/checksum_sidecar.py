# checksum_sidecar.py: accept "data.csv" only if "data.csv.sha256", uploaded
# before it, holds the file's SHA-256; a file damaged or changed on the way
# is refused and never appears.
#
# The partner uploads the checksum file first (as written by
# `sha256sum data.csv > data.csv.sha256`, or just the 64 hex digits), then
# the data file. In pre-publish (all bytes arrived, file still hidden) the
# script hashes the upload and compares. Checksum files are checked for
# their format when they are uploaded.
#
# Bind it (scriptsftp.toml):
#
#   [[bindings]]
#   event    = "pre-publish"
#   script   = "checksum_sidecar.py"
#   paths    = ["/inbox/**"]
#   allow    = ["read", "fs"]       # api.file (the upload), api.fs (its .sha256)
#   cpu_time = 30.0                 # hashing takes ~2 s of CPU per GB
#   timeout  = 60.0

import re

SUFFIX = ".sha256"
DIGEST = re.compile(r"\s*([0-9a-fA-F]{64})(\s|$)")


def on_pre_publish(event, api):
    name = event.path.rsplit("/", 1)[-1]
    if event.path.endswith(SUFFIX):
        text = api.file.read(4096).decode("utf-8", "replace")
        if not DIGEST.match(text):
            api.veto(f"{name} must start with the file's SHA-256 (64 hex digits), "
                     f"as written by: sha256sum {name[:-len(SUFFIX)]}")
        return
    sidecar = event.path + SUFFIX
    if not api.fs.exists(sidecar):
        api.veto(f"upload {name}{SUFFIX} (its SHA-256) before {name}")
    expected = DIGEST.match(api.fs.read_text(sidecar, 4096)).group(1).lower()
    actual = api.file.hash("sha256")
    if actual != expected:
        api.veto(f"{name} is damaged or incomplete: its SHA-256 is {actual}, "
                 f"but {name}{SUFFIX} says {expected}; please upload it again")
    api.log("checksum verified", path=event.path, sha256=actual)

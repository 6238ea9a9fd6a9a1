# antivirus_clamav.py: scan every upload with ClamAV before it is published;
# an infected file is refused and never appears.
#
# pre-publish runs when all bytes arrived and the file is still hidden. The
# script runs the command named "clamscan" from [commands]: clamdscan asks
# the clamd daemon (Debian/Ubuntu: apt install clamav-daemon) to scan the
# staged file. The server opens the file and gives it to clamdscan as its
# standard input (stdin = "file"), which clamdscan streams to clamd ("-"):
# clamd, running as its own user, needs no access to the users' directories,
# and neither the script nor the command ever handles a path.
#
# clamdscan exits 0 (clean), 1 (virus found) or 2 (error: clamd down, file
# unreadable...). On an error the upload is refused too: "fail closed".
# clamd refuses streams over its StreamMaxLength (100 MB by default), which
# fails the scan, so the upload is refused: raise StreamMaxLength and
# MaxFileSize in clamd.conf if partners send bigger files.
#
# Bind it (scriptsftp.toml):
#
#   [[bindings]]
#   event   = "pre-publish"
#   script  = "antivirus_clamav.py"
#   allow   = ["run"]
#   timeout = 120.0                 # the scan runs within the handler's time
#
#   [commands.clamscan]
#   argv    = ["clamdscan", "--no-summary", "-"]
#   stdin   = "file"
#   timeout = 110.0

import re


def on_pre_publish(event, api):
    result = api.run("clamscan")
    if result.code == 0:
        api.log("clean", path=event.path)
        return
    if result.code == 1:
        # clamdscan prints "stream: Signature.Name FOUND" (or "fd[N]: ...")
        found = re.findall(r": (\S+) FOUND", result.stdout)
        name = found[0] if found else "malware"
        api.log("virus found", path=event.path, signature=name)
        api.veto(f"{event.path} was refused: the virus scanner found {name}")
    api.log("scan failed", path=event.path, code=result.code,
            error=(result.stderr or result.stdout).strip()[:500])
    api.veto(f"{event.path} could not be scanned for viruses; please try again later")

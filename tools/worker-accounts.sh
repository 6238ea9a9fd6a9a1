#!/usr/bin/env bash
# The unprivileged accounts the daemon's workers run as when it runs as root
# (docs/deploy.md, docs/architecture.md rule 11): script workers as scriptsftp-sandbox
# ([scripts] user), SSH workers as scriptsftp-worker ([sftp] worker_user).
# Creates those that are missing; needs root; does nothing for a normal user
# (a daemon that is not root runs its workers as itself).
set -euo pipefail
[ "$(id -u)" -eq 0 ] || exit 0
for name in scriptsftp-sandbox scriptsftp-worker; do
  if ! id -u "$name" >/dev/null 2>&1; then
    useradd --system --user-group --no-create-home --home-dir / --shell /usr/sbin/nologin "$name"
    echo "created system account $name (workers run as it)"
  fi
done

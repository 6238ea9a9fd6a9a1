#!/usr/bin/env bash
# Install the system tools the test suite drives as real clients (and the real
# peers it tests against: clamd, Chromium, a PostgreSQL server, HAProxy), if missing. Only `make test` needs
# them; the daemon itself (`make run`) needs nothing but Python.
# Uses apt-get when run as root (CI, fresh machines); otherwise says what is missing.
set -euo pipefail
need=()
command -v ssh >/dev/null && command -v sftp >/dev/null && command -v scp >/dev/null \
  && command -v ssh-keygen >/dev/null || need+=(openssh-client)
if ! command -v curl >/dev/null || ! curl -V 2>/dev/null | grep -q '\bsftp\b'; then need+=(curl); fi
command -v python3 >/dev/null || need+=(python3 python3-venv)
command -v lftp >/dev/null || need+=(lftp)
command -v rclone >/dev/null || need+=(rclone)
command -v openssl >/dev/null || need+=(openssl)
# clamd lives in /usr/sbin, which a normal user's PATH may not have
command -v clamd >/dev/null || [ -x /usr/sbin/clamd ] || need+=(clamav-daemon)
command -v clamdscan >/dev/null || [ -x /usr/bin/clamdscan ] || need+=(clamdscan)
command -v chromium >/dev/null || need+=(chromium)
command -v cadaver >/dev/null || need+=(cadaver)
command -v systemd-analyze >/dev/null || need+=(systemd)   # tests verify conf/scriptsftp.service
# PostgreSQL: the account database's tests start their own throwaway cluster (tests/pgkit.py) from
# the server binaries, which Debian keeps off PATH in /usr/lib/postgresql/VERSION/bin
pg_installed() { compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || command -v initdb >/dev/null; }
pg_installed || need+=(postgresql)
# HAProxy: the load-balancer tests start their own throwaway instance (tests/haproxykit.py); it
# lives in /usr/sbin, which a normal user's PATH may not have
command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || need+=(haproxy)
if [ ${#need[@]} -eq 0 ]; then exit 0; fi
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
  echo "installing system packages: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  # clamav-daemon's package starts a system clamd wanting a signature download
  # this machine cannot do; tests run their own clamd on a test database.
  if command -v systemctl >/dev/null; then systemctl disable --now clamav-daemon clamav-freshclam >/dev/null 2>&1 || true; fi
  # postgresql's package creates and starts a system cluster the tests never use (they run their
  # own on a free port): stop it only when we installed it just now, never one already in service
  if [[ " ${need[*]} " == *" postgresql "* ]]; then
    if command -v systemctl >/dev/null; then systemctl disable --now postgresql >/dev/null 2>&1 || true; fi
    if command -v pg_lsclusters >/dev/null; then
      pg_lsclusters -h 2>/dev/null | while read -r ver name _; do pg_ctlcluster "$ver" "$name" stop >/dev/null 2>&1 || true; done
    fi
  fi
  # haproxy's package starts a system instance the tests never use: the same, only if just installed
  if [[ " ${need[*]} " == *" haproxy "* ]]; then
    if command -v systemctl >/dev/null; then systemctl disable --now haproxy >/dev/null 2>&1 || true; fi
    if [ -x /etc/init.d/haproxy ]; then /etc/init.d/haproxy stop >/dev/null 2>&1 || true; fi
  fi
else
  echo "missing system packages: ${need[*]} (install them, e.g. sudo apt-get install ${need[*]})" >&2
  exit 1
fi

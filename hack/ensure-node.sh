#!/usr/bin/env bash
# Make sure node and npm exist (the dashboard's build: analytics/web): installed from Debian's
# packages when root, otherwise say exactly what is missing.
set -euo pipefail
if command -v node >/dev/null && command -v npm >/dev/null; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "==> installing nodejs and npm from Debian's packages (the dashboard's build)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get -o DPkg::Lock::Timeout=600 install -y -qq nodejs npm >/dev/null
  exit 0
fi
echo "error: node and npm are not installed; the dashboard's build needs them (Debian/Ubuntu: sudo apt-get install nodejs npm)" >&2
exit 1

#!/usr/bin/env bash
# Make sure Debian's chromium exists at /usr/bin/chromium for the dashboard's browser tests
# (Playwright drives it by its path; no browser is ever downloaded): installed from Debian's
# packages when root, otherwise say exactly what is missing.
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "==> installing chromium from Debian's packages (the dashboard's browser tests)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get -o DPkg::Lock::Timeout=600 install -y -qq chromium >/dev/null
  exit 0
fi
echo "error: /usr/bin/chromium is not installed; the dashboard's browser tests need it (Debian/Ubuntu: sudo apt-get install chromium)" >&2
exit 1

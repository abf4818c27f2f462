#!/usr/bin/env bash
# Make sure redis-server and redis-cli exist: install Debian's packages when root, otherwise
# say exactly what is missing. With --optional, a missing Redis is only a notice (the demo
# falls back to its in-memory store).
set -euo pipefail
optional=${1:-}
if command -v redis-server >/dev/null && command -v redis-cli >/dev/null; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "==> installing redis-server and redis-tools from Debian's packages"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq redis-server redis-tools >/dev/null
  # The package enables a system service; Sluice starts its own servers on free ports.
  exit 0
fi
msg="redis-server and redis-cli are not installed (Debian/Ubuntu: sudo apt-get install redis-server redis-tools)"
if [ "$optional" = "--optional" ]; then
  echo "note: $msg; the demo will use the in-memory store" >&2
  exit 0
fi
echo "error: $msg" >&2
exit 1

#!/usr/bin/env bash
# Make sure PostgreSQL's server binaries exist (the usage collector's tests and benchmark start
# throwaway clusters from /usr/lib/postgresql/<version>/bin): install Debian's package when
# root, otherwise say exactly what is missing. The package's own cluster service is not used.
set -euo pipefail
if compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "==> installing postgresql from Debian's packages"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq postgresql >/dev/null
  exit 0
fi
echo "error: PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/postgres; Debian/Ubuntu: sudo apt-get install postgresql)" >&2
exit 1

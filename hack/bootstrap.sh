#!/usr/bin/env bash
# Create the virtualenv and install Sluice with its development tools. Idempotent.
set -euo pipefail
VENV=${1:-.venv}
PYTHON=${PYTHON:-python3}
if ! command -v "$PYTHON" >/dev/null; then
  echo "error: $PYTHON not found; Sluice needs Python >= 3.11 (Debian: apt-get install python3 python3-venv)" >&2
  exit 1
fi
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "error: Sluice needs Python >= 3.11, $PYTHON is $("$PYTHON" -V 2>&1)" >&2
  exit 1
fi
# A venv needs ensurepip: Debian ships it in python3-venv (installed here when root).
if ! "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "==> installing python3-venv from Debian's packages"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq python3-venv >/dev/null
  else
    echo "error: the Python venv module is missing (Debian: sudo apt-get install python3-venv)" >&2
    exit 1
  fi
fi
# A venv without a working pip (an earlier creation that failed half-way) is made again.
if ! "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
  echo "==> creating virtualenv $VENV"
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
fi
echo "==> installing Sluice and its tools into $VENV"
# Playwright (the dashboard's browser tests) drives Debian's chromium: never a downloaded browser.
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -U pip
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -c hack/constraints.txt -e ".[dev,bench]"
touch "$VENV/.installed"

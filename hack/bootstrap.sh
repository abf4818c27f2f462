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
if [ ! -x "$VENV/bin/python" ]; then
  echo "==> creating virtualenv $VENV"
  "$PYTHON" -m venv "$VENV" || { echo "error: python venv module missing (Debian: apt-get install python3-venv)" >&2; exit 1; }
fi
echo "==> installing Sluice and its tools into $VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -U pip
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -c hack/constraints.txt -e ".[dev,bench]"
touch "$VENV/.installed"

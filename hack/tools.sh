#!/usr/bin/env bash
# The scanners the suite runs on the rendered chart (checkov), in a virtualenv of their own
# (.venv-tools): their dependencies must never move the pins Sluice is tested with
# (hack/constraints.txt, .venv). Pinned to hack/tools-constraints.txt. Idempotent: a no-op once
# the stamp is newer than the pins.
set -euo pipefail
VENV=${1:-.venv-tools}
PYTHON=${PYTHON:-python3}
CHECKOV=3.3.30
STAMP="$VENV/.installed"
if [ -f "$STAMP" ] && [ "$STAMP" -nt hack/tools-constraints.txt ] && [ "$STAMP" -nt "$0" ]; then
  exit 0
fi
if ! "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
  echo "==> creating tools virtualenv $VENV"
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
fi
echo "==> installing checkov $CHECKOV into $VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check \
  -c hack/tools-constraints.txt "checkov==$CHECKOV"
touch "$STAMP"

#!/usr/bin/env bash
# Creates .venv (if missing) and installs the project with its test dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[dev]"

# The stripe-stateful-mock emulator for the tests (Node): install it when node_modules is
# missing or older than the lock file.
MOCK_DIR=tests/emulator/stateful_mock
if [ ! -d "$MOCK_DIR/node_modules/stripe-stateful-mock" ] || [ "$MOCK_DIR/package-lock.json" -nt "$MOCK_DIR/node_modules/.package-lock.json" ]; then
  command -v npm >/dev/null || { echo "setup-dev.sh: npm is needed for $MOCK_DIR (install Node.js 20)" >&2; exit 1; }
  (cd "$MOCK_DIR" && npm ci --no-audit --no-fund --loglevel=error)
fi

# Debian's chromium for the review page's browser test (Playwright drives it at
# /usr/bin/chromium; `playwright install` is never run: no browser is downloaded).
if [ ! -x /usr/bin/chromium ]; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "setup-dev.sh: chromium is missing and sudo is not available; run as root" >&2; exit 1; }
    SUDO="sudo"
  fi
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -q
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium
fi

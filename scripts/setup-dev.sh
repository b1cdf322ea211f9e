#!/usr/bin/env bash
# Everything the tests need: what serving needs (scripts/setup-serve.sh), the test
# dependencies (the `dev` extra), the stripe-stateful-mock emulator (npm) and Debian's
# chromium for the browser test. scripts/test and CI (.ci/run) run this.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-serve.sh
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
touch .venv/.dev-installed

#!/usr/bin/env bash
# What serving needs, nothing more: .venv (created if missing) with the project and its
# runtime dependencies. No test tools, no browser, no Node packages (scripts/setup-dev.sh
# adds those). Re-run whenever pyproject.toml changes; scripts/serve and scripts/demo do.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e .
touch .venv/.serve-installed

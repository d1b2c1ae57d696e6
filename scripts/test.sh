#!/usr/bin/env bash
# Runs the whole test suite against real PostgreSQL, Redis, Celery workers and anvil.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
# The status page is tested in a real headless browser (Debian's Chromium).
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "[test] installing chromium and chromium-driver"
    apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null
  else
    echo "[test] chromium missing: the browser test will be skipped (apt-get install chromium chromium-driver)"
  fi
fi
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
node contracts/build.js --check
exec .venv/bin/python -m pytest "$@"

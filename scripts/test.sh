#!/usr/bin/env bash
# Runs the whole test suite against real PostgreSQL, Redis, Celery workers and anvil.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
# Tests drive the status page in Debian's headless Chromium, put nginx in front of two API
# replicas, validate docker-compose.yml with the compose client, and unit-test the alert rules
# with promtool (Debian's prometheus package).
missing=()
[ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ] || missing+=(chromium chromium-driver)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing+=(nginx)
command -v docker-compose >/dev/null || missing+=(docker-compose)
command -v promtool >/dev/null || missing+=(prometheus)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "[test] installing ${missing[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    # The Debian package may start a system nginx on :80 and prometheus on :9090; tests use
    # neither daemon.
    (command -v systemctl >/dev/null && systemctl stop nginx prometheus) >/dev/null 2>&1 || true
  else
    echo "[test] missing ${missing[*]}: those tests will be skipped (apt-get install ${missing[*]})"
  fi
fi
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
node contracts/build.js --check
exec .venv/bin/python -m pytest "$@"

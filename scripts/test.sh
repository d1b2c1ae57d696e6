#!/usr/bin/env bash
# Runs the whole test suite against real PostgreSQL, Redis, Celery workers and anvil.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
node contracts/build.js --check
exec .venv/bin/python -m pytest "$@"

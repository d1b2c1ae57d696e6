#!/usr/bin/env bash
# Brings the whole system up (see README) and keeps it running until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/python -m deploy.stack "$@"

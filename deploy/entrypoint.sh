#!/bin/sh
# Container entry point: pick up the contract addresses the setup service recorded, then run.
set -e
if [ -n "${CHAIN_ENV_FILE:-}" ] && [ -f "$CHAIN_ENV_FILE" ]; then
  set -a
  . "$CHAIN_ENV_FILE"
  set +a
fi
exec "$@"

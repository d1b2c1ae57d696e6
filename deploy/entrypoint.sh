#!/bin/sh
# Container entry point: pick up the contract addresses the setup service recorded, then run
# a mintq process by its role (api, events, worker, webhooks, beat, flower: deploy/processes.py
# writes their command lines) or any other command as given.
set -e
if [ -n "${CHAIN_ENV_FILE:-}" ] && [ -f "$CHAIN_ENV_FILE" ]; then
  set -a
  . "$CHAIN_ENV_FILE"
  set +a
fi
case "${1:-}" in
  api|events|worker|webhooks|beat|flower) exec python -m deploy.processes "$@" ;;
esac
exec "$@"

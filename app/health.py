"""Readiness: `GET /readyz` answers 200 only when PostgreSQL, Redis and the chain all answer.

`GET /healthz` (in routes) says the process is alive; this one says whether it can do its job,
for a load balancer to route by. Every check gives up after `PROBE_TIMEOUT_SECONDS`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from flask import Blueprint, Response, current_app, jsonify
from sqlalchemy import text

from app.errors import error_response
from app.metrics import PROBE_TIMEOUT_SECONDS, probe_web3, redis_client, short_reason
from mintq.services import Services

log = logging.getLogger(__name__)

bp = Blueprint("health", __name__)


def _database(svc: Services) -> None:
    with svc.sessions() as session:
        session.execute(text(f"SET LOCAL statement_timeout = {int(PROBE_TIMEOUT_SECONDS * 1000)}"))
        session.execute(text("SELECT 1"))


def _redis(svc: Services) -> None:
    redis_client(svc.settings.redis_url).ping()


def _chain(svc: Services) -> None:
    probe_web3(svc.settings.rpc_url).eth.block_number  # noqa: B018 (the call is the check)


CHECKS: dict[str, Callable[[Services], None]] = {
    "database": _database,
    "redis": _redis,
    "chain": _chain,
}


def check_dependencies(svc: Services) -> dict[str, str]:
    """`"ok"` or `"unavailable: <reason>"` per dependency, checked at once within the timeout."""
    pool = ThreadPoolExecutor(max_workers=len(CHECKS), thread_name_prefix="mintq-readyz")
    try:
        futures = {name: pool.submit(check, svc) for name, check in CHECKS.items()}
        deadline = time.monotonic() + PROBE_TIMEOUT_SECONDS
        results: dict[str, str] = {}
        for name, future in futures.items():
            try:
                future.result(timeout=max(0.0, deadline - time.monotonic()))
            except Exception as exc:
                reason = short_reason(exc)
                log.warning("readiness: %s unavailable: %s", name, reason)
                results[name] = f"unavailable: {reason}"
            else:
                results[name] = "ok"
        return results
    finally:
        # A check still hanging is abandoned; its client's own timeout ends it.
        pool.shutdown(wait=False, cancel_futures=True)


@bp.get("/readyz")
def readyz() -> Response | tuple[Response, int]:
    """Readiness: PostgreSQL, Redis and the chain all answer
    ---
    get:
      description: >-
        Checks PostgreSQL (`SELECT 1`), Redis (`PING`) and the node (`eth_blockNumber`), each
        within 2 seconds. `/healthz` only says the process is alive.
      responses:
        200:
          description: Every dependency answers.
          content:
            application/json:
              schema:
                type: object
                properties:
                  status: {type: string, enum: [ready]}
                  checks: {type: object, additionalProperties: {type: string, enum: [ok]}}
        503:
          description: >-
            `not_ready`; `details` has each dependency's check, `ok` or
            `unavailable: <reason>`.
          headers:
            Retry-After: {description: Seconds., schema: {type: integer}}
          content:
            application/json:
              schema: ErrorSchema
    """
    checks = check_dependencies(current_app.extensions["mintq"])
    down = [name for name, state in checks.items() if state != "ok"]
    if down:
        return error_response(
            503, "not_ready", f"Not ready: {', '.join(down)} not answering.", checks
        )
    return jsonify({"status": "ready", "checks": checks})

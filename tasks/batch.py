"""The batch tasks: a singleton queue tick driven by beat, and confirmation: started by the
nonce owner as soon as the chain mines a batch, then polled (a chained task) until final."""

from __future__ import annotations

import logging
import uuid
from functools import cache

from celery import Task
from eth_account import Account
from redis import Redis

from db.session import make_engine, make_session_factory
from mintq import batching
from mintq.chain import Chain
from mintq.settings import Settings
from tasks import celery_app

log = logging.getLogger(__name__)


def _watch_ttl(settings: Settings) -> int:
    """How long a confirmation chain counts as alive without polling. A chain lost with a
    dead worker is restarted by the next tick once this has passed, so keep it short: a few
    missed polls, not minutes."""
    return max(5, int(settings.confirm_poll_seconds * 10))


@cache
def minter() -> batching.Minter:
    """The worker process's collaborators, built on first use (after the pool forks)."""
    settings = Settings.from_env()
    engine = make_engine(settings.database_url)
    return batching.Minter(
        settings=settings,
        chain=Chain(settings),
        sessions=make_session_factory(engine),
        redis=Redis.from_url(settings.redis_url, socket_timeout=5),
        account=Account.from_key(settings.require_minter_key()),
    )


def _watch_key(batch_id: uuid.UUID | str) -> str:
    return f"mintq:confirming:{batch_id}"


def schedule_confirmation(batch_id: uuid.UUID | str, countdown: float) -> None:
    """Start (once) the confirmation chain of a batch; a live chain keeps its key fresh."""
    m = minter()
    if m.redis.set(_watch_key(batch_id), "1", nx=True, ex=_watch_ttl(m.settings)):
        confirm_batch.apply_async((str(batch_id),), countdown=countdown)


@celery_app.task(name="mintq.process_queue", ignore_result=True)
def process_queue() -> dict[str, object]:
    """Beat tick: as nonce owner, send due batches and make sure each is being confirmed."""
    m = minter()

    def confirm_now(batch_ids: list[uuid.UUID]) -> None:
        # Mined: the receipt is there, so the first check should find it.
        for batch_id in batch_ids:
            schedule_confirmation(batch_id, 0)

    try:
        result = batching.process_queue(m, on_mined=confirm_now)
    except batching.LostLock as exc:
        log.warning("stopped: %s", exc)
        return {"owner": False}
    # Batches the chain has yet to mine, and any whose confirmation chain was lost with a dead
    # worker: polled until final.
    for batch_id in result.in_flight:
        schedule_confirmation(batch_id, m.settings.confirm_poll_seconds)
    if result.more:
        # The owner's time was up while the chain still had its batches: carry on at once
        # (beat's next tick may be a whole tick away, and blocks would go out half full).
        process_queue.apply_async(expires=m.settings.lock_ttl_seconds)
    return {
        "owner": result.owner,
        "paused": result.paused,
        "sent": [str(b) for b in result.sent],
        "inFlight": len(result.in_flight),
    }


@celery_app.task(
    name="mintq.confirm_batch",
    bind=True,
    max_retries=None,
    ignore_result=True,
    acks_late=True,
)
def confirm_batch(self: Task, batch_id: str) -> str:
    """Poll one batch until it is final; retries itself with a countdown while waiting."""
    m = minter()
    m.redis.expire(_watch_key(batch_id), _watch_ttl(m.settings))
    try:
        outcome = batching.confirm_batch(m, uuid.UUID(batch_id))
    except Exception as exc:
        # The chain or the database hiccuped: try again, the check is idempotent.
        log.warning("confirmation check failed, retrying: %s", exc, extra={"batchId": batch_id})
        raise self.retry(countdown=m.settings.confirm_poll_seconds * 2, exc=exc) from exc
    if outcome.state == "waiting":
        raise self.retry(countdown=m.settings.confirm_poll_seconds)
    m.redis.delete(_watch_key(batch_id))
    return outcome.state

"""The webhook task: POST a queue item's final state to its callback URL, retried with backoff.

Importing this module (the worker does, through `tasks`) registers the enqueue with
`mintq.events`, which calls it after the commit that made an item with a callback final.
"""

from __future__ import annotations

import logging
import uuid
from functools import cache

from celery import Task
from sqlalchemy.orm import Session, sessionmaker

from db.session import make_engine, make_session_factory
from mintq import events, webhooks
from mintq.settings import Settings
from tasks import celery_app

log = logging.getLogger(__name__)


@cache
def collaborators() -> tuple[Settings, sessionmaker[Session]]:
    """The worker process's settings and sessions, built on first use (after the pool forks)."""
    settings = Settings.from_env()
    return settings, make_session_factory(make_engine(settings.database_url, pool_size=2))


@events.on_final
def _enqueue(change: events.ItemChange) -> None:
    deliver_webhook.delay(str(change.queue_id), change.status)


@celery_app.task(
    name="mintq.deliver_webhook",
    bind=True,
    max_retries=webhooks.MAX_ATTEMPTS - 1,
    ignore_result=True,
    acks_late=True,
    soft_time_limit=30,
    time_limit=60,
)
def deliver_webhook(self: Task, queue_id: str, event: str) -> str:
    """POST the item and `event` to its callback URL. Network errors, 429 and 5xx are retried
    after 2, 4, 8, ... s, up to `MAX_ATTEMPTS` attempts; a 2xx delivers; anything else gives up.
    A redelivered message after a delivery sends nothing (the delivery is recorded)."""
    settings, sessions = collaborators()
    attempt = webhooks.deliver(sessions, settings, uuid.UUID(queue_id), event)
    if attempt.outcome != "retry":
        return attempt.outcome
    attempts = self.request.retries + 1
    if attempts >= webhooks.MAX_ATTEMPTS:
        log.warning(
            "webhook given up after %d attempts: %s",
            attempts,
            attempt.detail,
            extra={"queueId": queue_id, "event": event},
        )
        return "given_up"
    raise self.retry(countdown=webhooks.backoff_seconds(attempts))

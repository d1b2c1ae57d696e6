"""Live updates of one queue item as Server-Sent Events, fed by Redis pub/sub.

The worker publishes on `mintq:item:<queueId>` after each committed change (mintq.events), so
a stream sees every change whichever replica it is served by. The stream subscribes before it
reads the item, so no change falls between the two; each message makes it re-read the item
from the database. Every `HEARTBEAT_SECONDS` of silence it re-reads the item too (a message
lost to a Redis hiccup costs one beat, not the update) and sends a `: keepalive` comment,
which also tells a dead client apart (the write fails and the stream ends).

Under gunicorn's gthread workers a stream holds a thread for its whole life, so a process
serves at most `EVENT_STREAMS_PER_PROCESS` at once and answers 503 beyond (the status page
then polls), keeping threads for `POST /mint`.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Response, current_app, stream_with_context
from redis import Redis, RedisError
from redis.client import PubSub
from sqlalchemy.exc import SQLAlchemyError

from app.routes import services
from mintq import events, queue
from mintq.errors import DependencyUnavailable, MintqError
from mintq.services import Services

log = logging.getLogger(__name__)

bp = Blueprint("events", __name__)

HEARTBEAT_SECONDS = 15.0
# EventSource reconnects after this many milliseconds when the connection drops.
RETRY_MILLISECONDS = 3000
SUBSCRIBE_TIMEOUT_SECONDS = 5.0


class EventStreams:
    """This app's Redis client for subscriptions and its count of open streams."""

    def __init__(self, svc: Services) -> None:
        self.redis = Redis.from_url(
            svc.settings.redis_url, socket_connect_timeout=2, socket_timeout=HEARTBEAT_SECONDS * 2
        )
        self.slots = threading.BoundedSemaphore(svc.settings.event_streams_per_process)

    @classmethod
    def for_app(cls) -> EventStreams:
        streams: EventStreams | None = current_app.extensions.get("mintq.events")
        if streams is None:
            streams = current_app.extensions.setdefault("mintq.events", cls(services()))
        return streams


def _subscribe(redis: Redis, queue_id: uuid.UUID) -> PubSub:
    """Subscribed for sure: the subscription is confirmed before this returns."""
    pubsub = redis.pubsub()
    try:
        pubsub.subscribe(events.channel(queue_id))
        deadline = time.monotonic() + SUBSCRIBE_TIMEOUT_SECONDS
        while True:
            message = pubsub.get_message(timeout=max(0.0, deadline - time.monotonic()))
            if message is not None and message["type"] == "subscribe":
                return pubsub
            if time.monotonic() >= deadline:
                raise RedisError("no subscription confirmation")
    except BaseException:
        pubsub.close()
        raise


def _read(svc: Services, queue_id: uuid.UUID) -> dict[str, Any] | None:
    """The item as `GET /queue/item` answers it, from a short session (a stream must not
    hold a pooled connection while it waits)."""
    with svc.sessions() as session:
        item = queue.get_item(session, queue_id)
        if item is None:
            return None
        return queue.item_view(session, item, svc.operating(session), svc.redis)


def _event(item: dict[str, Any]) -> str:
    return f"event: status\ndata: {json.dumps(item, separators=(',', ':'))}\n\n"


def _final(item: dict[str, Any]) -> bool:
    return item["status"] in events.FINAL_STATUSES


def _stream(
    svc: Services, queue_id: uuid.UUID, pubsub: PubSub, item: dict[str, Any]
) -> Iterator[str]:
    yield f"retry: {RETRY_MILLISECONDS}\n" + _event(item)
    last = item
    quiet_since = time.monotonic()
    while not _final(last):
        try:
            message = pubsub.get_message(
                timeout=max(0.0, quiet_since + HEARTBEAT_SECONDS - time.monotonic())
            )
        except RedisError as exc:
            # The client reconnects (or polls) and starts again from the current state.
            log.warning("live updates lost Redis: %s", exc, extra={"queueId": str(queue_id)})
            return
        beat = time.monotonic() >= quiet_since + HEARTBEAT_SECONDS
        if message is None and not beat:
            continue
        try:
            current = _read(svc, queue_id)
        except SQLAlchemyError as exc:
            log.warning("live updates lost the database: %s", exc, extra={"queueId": str(queue_id)})
            return
        if current is None:  # deleted under us: nothing more will happen to it
            return
        if current != last:
            last = current
            quiet_since = time.monotonic()
            yield _event(current)
        elif beat:
            quiet_since = time.monotonic()
            yield ": keepalive\n\n"


@bp.get("/queue/item/<queue_id>/events")
def get_queue_item_events(queue_id: str) -> Response:
    """Live updates of one queue item (Server-Sent Events)
    ---
    get:
      description: >-
        A `text/event-stream`: first the item's current state, then each change, as
        `event: status` with `data:` the item exactly as `GET /queue/item/{queueId}` answers
        it. The stream ends after the item is `completed` or `failed`. A `: keepalive`
        comment comes every 15 s of silence, and `retry:` asks EventSource to reconnect
        after 3 s. Each API process serves a limited number of streams at once: beyond it,
        a 503 (poll `GET /queue/item/{queueId}` instead).
      responses:
        200:
          description: The event stream.
          content:
            text/event-stream:
              schema: {type: string}
        400: {$ref: "#/components/responses/Error"}
        404: {$ref: "#/components/responses/Error"}
        503: {$ref: "#/components/responses/Unavailable"}
    """
    parsed = queue.parse_queue_id(queue_id)
    svc = services()
    streams = EventStreams.for_app()
    if not streams.slots.acquire(blocking=False):
        raise MintqError(
            "Too many live update streams on this server; poll the queue item instead.",
            code="streams_busy",
            status=503,
        )
    pubsub: PubSub | None = None
    closed = False

    def close() -> None:
        nonlocal closed
        if closed:
            return
        closed = True
        if pubsub is not None:
            pubsub.close()
        streams.slots.release()

    try:
        try:
            pubsub = _subscribe(streams.redis, parsed)
        except RedisError as exc:
            raise DependencyUnavailable("redis") from exc
        item = _read(svc, parsed)
        if item is None:
            raise MintqError("No such queue item.", code="queue_item_not_found", status=404)
        response = Response(
            stream_with_context(_stream(svc, parsed, pubsub, item)),
            mimetype="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    except BaseException:
        close()
        raise
    # Whether the stream ended, the client left, or the stream never started.
    response.call_on_close(close)
    return response

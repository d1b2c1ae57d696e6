"""Item changes, told after they are committed: live updates, and the webhooks of final states.

Whoever moves queue items between statuses calls `announce` once the transaction that moved
them has committed (never before: a listener that reads the item must see the change). Each
change is published on the Redis channel `mintq:item:<queueId>`, where the API's event streams
listen whichever replica a client is connected to; the message only says which item changed,
and a stream re-reads the item from the database. Final changes of items with a callback URL
also go to the listeners registered with `on_final` (the tasks layer enqueues the webhook).

A Redis hiccup costs a live update, never the transaction that already committed: streams
also re-read their item on every heartbeat, so a lost message delays an update by one beat.
The same pipeline keeps the queue positions (`mintq.positions`) in step with the change.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from redis import Redis, RedisError

from db.models import MintQueueItem
from mintq import positions

log = logging.getLogger(__name__)

FINAL_STATUSES = frozenset({"completed", "failed", "refunded"})
# Refund states after which nothing more happens to an item (None: nothing owed).
SETTLED_REFUNDS = frozenset({None, "confirmed", "dust", "failed"})


def finished(item: Mapping[str, Any]) -> bool:
    """Whether an item's view (as `GET /queue/item` shows it) will change no more: a final
    status, and no refund still on its way."""
    return item["status"] in FINAL_STATUSES and item.get("refundStatus") in SETTLED_REFUNDS


def channel(queue_id: uuid.UUID | str) -> str:
    return f"mintq:item:{queue_id}"


@dataclass(frozen=True)
class ItemChange:
    """An item's new status, taken inside the transaction that set it."""

    queue_id: uuid.UUID
    status: str
    created_at: datetime
    settle_deadline: datetime | None
    priority: int = 0
    has_callback: bool = False

    @property
    def final(self) -> bool:
        return self.status in FINAL_STATUSES


def changes(items: Iterable[MintQueueItem]) -> list[ItemChange]:
    return [
        ItemChange(
            i.queue_id,
            i.status,
            i.created_at,
            i.settle_deadline,
            i.priority,
            i.callback_url is not None,
        )
        for i in items
    ]


FinalListener = Callable[[ItemChange], None]
_final_listeners: list[FinalListener] = []


def on_final(listener: FinalListener) -> FinalListener:
    """Call `listener` (after the commit) for every item with a callback URL that became
    completed or failed. Registered at import by the process that delivers (the worker)."""
    _final_listeners.append(listener)
    return listener


def announce(redis: Redis, changed: Iterable[ItemChange]) -> None:
    """Publish committed changes, keep the queue positions in step, and hand final changes
    to the listeners. Never raises."""
    changed = list(changed)
    if not changed:
        return
    try:
        pipe = redis.pipeline(transaction=False)
        for change in changed:
            message = {"queueId": str(change.queue_id), "status": change.status}
            pipe.publish(channel(change.queue_id), json.dumps(message))
        positions.update(pipe, ((c, c.status == "pending") for c in changed))
        pipe.execute()
    except RedisError as exc:
        log.warning("could not publish %d item changes: %s", len(changed), exc)
    for change in changed:
        if not (change.final and change.has_callback):
            continue
        for listener in list(_final_listeners):
            try:
                listener(change)
            except Exception as exc:
                # The item is final either way; only its webhook is lost.
                log.warning(
                    "could not schedule the webhook: %s",
                    exc,
                    extra={"queueId": str(change.queue_id), "event": change.status},
                )

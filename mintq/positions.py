"""Queue positions from a Redis sorted set of the pending items, in claim order.

Counting the pending items ahead of one in Postgres reads all of them: with 100,000 queued
that is milliseconds per request, on every `POST /mint` and every poll. The sorted set answers
in O(log n). Postgres stays the truth and the set is only derived from it:

- intake adds each new item; `events.announce`, which every status change already goes
  through after its commit, adds items that are pending again and removes the others;
- an item missing from the set (Redis was down, a process died between commit and Redis) is
  counted in Postgres and added back;
- the batch worker's tick builds the set after Redis restarts, rebuilds it when it holds more
  members than there are pending rows (an item whose removal was lost would otherwise count
  as ahead of others), and every few minutes to bound any other drift. Until it is built,
  positions are counted in Postgres.

The score is the priority, then the settle deadline, in one number (see `score`), and the
member starts with the arrival time in microseconds, zero-padded, then the queue id: Redis
orders equal scores by member bytes, so the set's order is `MintQueueItem.claim_order()`.
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Protocol

from redis import Redis, RedisError
from redis.exceptions import NoScriptError
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.models import MAX_PRIORITY, MintQueueItem

log = logging.getLogger(__name__)

KEY = "mintq:queue:pending"
# When the set was last built from Postgres; absent after Redis restarts (it keeps nothing).
BUILT_KEY = f"{KEY}:built"
# A rebuild now and then bounds any drift the checks below cannot see.
REBUILD_EVERY_SECONDS = 300.0
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_REBUILD_CHUNK = 10_000


class Ordered(Protocol):
    """What places an item in the claim order (an ORM item, a row, an `ItemChange`)."""

    @property
    def queue_id(self) -> uuid.UUID: ...
    @property
    def created_at(self) -> datetime: ...
    @property
    def settle_deadline(self) -> datetime | None: ...
    @property
    def priority(self) -> int: ...


# Seconds since 1970 below this fit beside the priority in a float's 53 bits of integer;
# a deadline past it (the year 4147, or none) sorts last in its priority.
_NO_DEADLINE = 2**36 - 1


def score(item: Ordered) -> float:
    """-priority * 2^36 + the deadline in seconds: every priority's items come before those of
    a lower one, and within a priority the soonest deadline first. Deadlines are EIP-3009
    `validBefore`s, whole seconds; |score| stays below 2^53, where floats are exact."""
    assert abs(item.priority) <= MAX_PRIORITY
    deadline = item.settle_deadline
    seconds = _NO_DEADLINE if deadline is None else min(int(deadline.timestamp()), _NO_DEADLINE)
    return float(-item.priority * 2**36 + seconds)


def member(item: Ordered) -> str:
    micros = (item.created_at - _EPOCH) // timedelta(microseconds=1)
    return f"{micros:018d}:{item.queue_id}"


# Add the item (when asked), then its rank if the set is built: one command per request.
_POSITION = """
if ARGV[2] ~= '' then redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1]) end
if redis.call('EXISTS', KEYS[2]) == 0 then return -1 end
local rank = redis.call('ZRANK', KEYS[1], ARGV[1])
if not rank then return -1 end
return rank
"""
_POSITION_SHA = hashlib.sha1(_POSITION.encode()).hexdigest()


def position(redis: Redis, item: Ordered, *, add: bool = False) -> int | None:
    """1 for the next item to be batched, counted in the set; None when the set does not
    hold `item`, has not been built since Redis started, or Redis is away. With `add`, add
    `item` first (a new item at intake)."""
    args = (member(item), repr(score(item)) if add else "")
    try:
        try:
            rank = redis.evalsha(_POSITION_SHA, 2, KEY, BUILT_KEY, *args)
        except NoScriptError:  # Redis restarted (or flushed its scripts) since the last load
            rank = redis.eval(_POSITION, 2, KEY, BUILT_KEY, *args)
    except RedisError as exc:
        log.warning("queue positions from Postgres, Redis unavailable: %s", exc)
        return None
    return None if int(rank) < 0 else int(rank) + 1


def positions(redis: Redis, items: Sequence[Ordered]) -> list[int | None]:
    """`position` of each of `items`, asked in one round trip (reads of many items at once)."""
    if not items:
        return []
    try:
        for attempt in (1, 2):
            pipe = redis.pipeline(transaction=False)
            for item in items:
                pipe.evalsha(_POSITION_SHA, 2, KEY, BUILT_KEY, member(item), "")
            try:
                ranks = pipe.execute()
                break
            except NoScriptError:  # Redis restarted (or flushed its scripts): load it once
                if attempt == 2:
                    raise
                redis.script_load(_POSITION)
    except RedisError as exc:
        log.warning("queue positions from Postgres, Redis unavailable: %s", exc)
        return [None] * len(items)
    return [None if int(rank) < 0 else int(rank) + 1 for rank in ranks]


def add(redis: Redis, item: Ordered) -> None:
    try:
        redis.zadd(KEY, {member(item): score(item)})
    except RedisError as exc:
        log.warning("could not index queue item %s: %s", item.queue_id, exc)


def update(pipe: Redis, changed: Iterable[tuple[Ordered, bool]]) -> None:
    """Queue into `pipe` the set changes for items that are, or are no longer, pending."""
    adds = {}
    removes = []
    for item, pending in changed:
        if pending:
            adds[member(item)] = score(item)
        else:
            removes.append(member(item))
    if adds:
        pipe.zadd(KEY, adds)
    if removes:
        pipe.zrem(KEY, *removes)


def reconcile(redis: Redis, session: Session, max_age: float = REBUILD_EVERY_SECONDS) -> bool:
    """Rebuild the set from Postgres when it was never built since Redis started, holds more
    members than there are pending items, or was built more than `max_age` seconds ago.
    Returns whether it rebuilt. Never raises for Redis."""
    try:
        built, members = redis.get(BUILT_KEY), int(redis.zcard(KEY))
        if built is not None and time.time() - float(built) < max_age:
            pending = session.scalar(
                select(func.count())
                .select_from(MintQueueItem)
                .where(MintQueueItem.status == "pending")
            )
            if members <= int(pending or 0):
                return False
        rebuild(redis, session)
    except RedisError as exc:
        log.warning("could not reconcile queue positions: %s", exc)
        return False
    return True


def rebuild(redis: Redis, session: Session) -> int:
    """Replace the set with the pending items in Postgres; returns how many.

    Items queued while it runs may be missing from the result: each is added back the first
    time its position is asked for.
    """
    staging = f"{KEY}:rebuild:{uuid.uuid4()}"
    rows = session.execute(
        select(
            MintQueueItem.queue_id,
            MintQueueItem.created_at,
            MintQueueItem.settle_deadline,
            MintQueueItem.priority,
        )
        .where(MintQueueItem.status == "pending")
        .execution_options(yield_per=_REBUILD_CHUNK)
    )
    count = 0
    try:
        for chunk in rows.partitions():
            redis.zadd(staging, {member(r): score(r) for r in chunk})
            count += len(chunk)
        pipe = redis.pipeline(transaction=True)
        if count:
            pipe.rename(staging, KEY)
        else:
            pipe.delete(KEY)
        pipe.set(BUILT_KEY, str(time.time()))
        pipe.execute()
    finally:
        redis.delete(staging)
    log.info("rebuilt queue positions", extra={"pending": count})
    return count

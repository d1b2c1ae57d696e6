"""Queue positions from the Redis sorted set agree with Postgres's claim order, and stay so."""

from __future__ import annotations

import random
import time
import uuid
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pytest
from redis import Redis
from sqlalchemy import select, update

from conftest import paid
from db.models import MintQueueItem
from mintq import events, positions, queue
from mintq.services import Services


@pytest.fixture
def redis(services: Services) -> Redis:
    return Redis.from_url(services.settings.redis_url)


def queue_items(services: Services, deadlines: list[int | None]) -> None:
    """Queue one item per deadline (seconds from now), all in one transaction: they share
    `created_at`, so the queue id breaks their ties, as it does in the claim order."""
    now = int(time.time())
    with services.sessions() as session, session.begin():
        for offset in deadlines:
            deadline = None if offset is None else now + offset
            queue.enqueue(session, paid(settle_deadline=deadline))


def claim_order(services: Services) -> list[MintQueueItem]:
    """The pending items in the order the batch worker claims them."""
    with services.sessions() as session:
        return list(
            session.scalars(
                select(MintQueueItem)
                .where(MintQueueItem.status == "pending")
                .order_by(*MintQueueItem.claim_order())
            )
        )


def assert_positions_match_postgres(services: Services, redis: Redis) -> None:
    ordered = claim_order(services)
    with services.sessions() as session:
        counted = [queue.queue_position(session, item) for item in ordered]
    from_set = [positions.position(redis, item) for item in ordered]
    assert counted == from_set == list(range(1, len(ordered) + 1))


def test_the_set_orders_items_as_the_worker_claims_them(services: Services, redis: Redis) -> None:
    rng = random.Random(7)
    deadlines = [rng.choice([None, 900, 900, 1800, rng.randrange(600, 7200)]) for _ in range(40)]
    queue_items(services, deadlines[:20])
    queue_items(services, deadlines[20:])  # a later arrival time
    with services.sessions() as session:
        assert positions.rebuild(redis, session) == 40
    assert_positions_match_postgres(services, redis)


def test_status_changes_move_items_out_of_the_set_and_back(
    services: Services, redis: Redis
) -> None:
    queue_items(services, [None, 900, 1800, None, 600, 900])
    with services.sessions() as session:
        positions.rebuild(redis, session)
    first, second, *_ = claim_order(services)

    with services.sessions() as session, session.begin():
        claimed = [session.get(MintQueueItem, i.queue_id) for i in (first, second)]
        for item in claimed:
            assert item is not None
            item.status = "processing"
        changed = events.changes([i for i in claimed if i is not None])
    events.announce(redis, changed)
    assert positions.position(redis, first) is None
    assert_positions_match_postgres(services, redis)

    with services.sessions() as session, session.begin():
        back = session.get(MintQueueItem, first.queue_id)
        assert back is not None
        back.status = "pending"  # e.g. a dropped batch: requeued
        changed = events.changes([back])
    events.announce(redis, changed)
    assert positions.position(redis, first) == 1
    assert_positions_match_postgres(services, redis)


def test_positions_come_from_postgres_until_the_set_is_built(
    services: Services, redis: Redis
) -> None:
    queue_items(services, [None, 900, 1800])
    ordered = claim_order(services)
    # Redis restarted (it keeps nothing): no set, and intake adds only the newest item.
    assert positions.position(redis, ordered[-1], add=True) is None
    with services.sessions() as session:
        assert queue.queue_position(session, ordered[-1], redis) == 3

        assert positions.reconcile(redis, session)  # the worker's next tick
    assert_positions_match_postgres(services, redis)


def test_an_item_missing_from_the_set_is_counted_and_added(
    services: Services, redis: Redis
) -> None:
    queue_items(services, [900, None, 1800])
    with services.sessions() as session:
        positions.rebuild(redis, session)
    ordered = claim_order(services)
    redis.zrem(positions.KEY, positions.member(ordered[1]))  # its add was lost

    with services.sessions() as session:
        assert queue.queue_position(session, ordered[1], redis) == 2
    assert positions.position(redis, ordered[1]) == 2
    assert_positions_match_postgres(services, redis)


def test_positions_survive_redis_forgetting_its_scripts(services: Services, redis: Redis) -> None:
    queue_items(services, [None, 900])
    with services.sessions() as session:
        positions.rebuild(redis, session)
    ordered = claim_order(services)
    redis.script_flush()  # as after a Redis restart that kept its data
    assert [positions.position(redis, item) for item in ordered] == [1, 2]
    newest = SimpleNamespace(
        queue_id=ordered[0].queue_id, created_at=datetime.now(UTC), settle_deadline=None, priority=0
    )
    redis.script_flush()
    assert positions.position(redis, newest, add=True) == 3  # added behind both, no deadline


def test_many_positions_in_one_round_trip_agree_with_one_at_a_time(
    services: Services, redis: Redis
) -> None:
    queue_items(services, [None, 900, 1800, None, 600])
    with services.sessions() as session:
        positions.rebuild(redis, session)
    ordered = claim_order(services)
    shuffled = random.Random(3).sample(ordered, len(ordered))
    redis.script_flush()  # the round trip loads the script when Redis lost it
    assert positions.positions(redis, shuffled) == [
        positions.position(redis, item) for item in shuffled
    ]
    redis.zrem(positions.KEY, positions.member(shuffled[0]))  # its add was lost
    assert positions.positions(redis, shuffled)[0] is None
    away = Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2, socket_timeout=0.2)
    assert positions.positions(away, shuffled) == [None] * len(shuffled)
    assert positions.positions(redis, []) == []


def test_views_of_many_items_are_each_item_s_view(services: Services, redis: Redis) -> None:
    """What the event service sends is what `GET /queue/item` answers, pending or not, and
    whether or not the set holds the item."""
    queue_items(services, [None, 900, 1800, None])
    with services.sessions() as session:
        positions.rebuild(redis, session)
    ordered = claim_order(services)
    with services.sessions() as session, session.begin():
        moved = session.scalars(
            update(MintQueueItem)
            .where(MintQueueItem.queue_id == ordered[0].queue_id)
            .values(status="processing")
            .returning(MintQueueItem)
        ).all()
        changed = events.changes(moved)
    events.announce(redis, changed)
    # The last one's add was lost (the last: the others' ranks do not depend on it).
    redis.zrem(positions.KEY, positions.member(ordered[-1]))
    with services.sessions() as session:
        items = queue.get_items(session, [item.queue_id for item in ordered])
        ops = services.operating(session)
        views = queue.item_views(session, items, ops, redis)
        assert views == [queue.item_view(session, item, ops, redis) for item in items]
        orm_items = [queue.get_item(session, item.queue_id) for item in items]
        assert views == [queue.item_view(session, item, ops, redis) for item in orm_items if item]
        assert queue.item_views(session, items, ops) == views  # counted in Postgres alike
    assert sorted(view["queuePosition"] for view in views) == [0, 1, 2, 3]


def test_the_tick_rebuilds_a_set_holding_items_no_longer_pending(
    services: Services, redis: Redis
) -> None:
    queue_items(services, [600, 900, None])
    with services.sessions() as session:
        positions.rebuild(redis, session)
        assert not positions.reconcile(redis, session)  # in step: nothing to do
    first = claim_order(services)[0]
    # Completed, but the process died before Redis heard of it.
    with services.sessions() as session, session.begin():
        session.execute(
            update(MintQueueItem)
            .where(MintQueueItem.queue_id == first.queue_id)
            .values(status="completed")
        )
    with services.sessions() as session:
        assert positions.reconcile(redis, session)
    assert positions.position(redis, first) is None
    assert_positions_match_postgres(services, redis)


def test_the_tick_rebuilds_an_old_set(services: Services, redis: Redis) -> None:
    queue_items(services, [None])
    with services.sessions() as session:
        positions.rebuild(redis, session)
        assert not positions.reconcile(redis, session)
        redis.set(positions.BUILT_KEY, str(time.time() - positions.REBUILD_EVERY_SECONDS - 1))
        assert positions.reconcile(redis, session)


def test_without_redis_positions_are_counted_in_postgres(services: Services) -> None:
    queue_items(services, [None, None])
    ordered = claim_order(services)
    # As the API builds its client (from a URL): redis-py then does not retry a refused
    # connection, ten times with backoff, as a client built from a host does.
    away = Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2, socket_timeout=0.2)
    assert positions.position(away, ordered[1], add=True) is None
    with services.sessions() as session:
        assert queue.queue_position(session, ordered[1], away, new=True) == 2


def test_members_sort_by_arrival_then_queue_id() -> None:
    """Equal scores sort by member bytes in Redis: the zero-padded arrival time, then the id."""
    early = datetime(2026, 1, 1, tzinfo=UTC)
    items = [
        SimpleNamespace(queue_id=queue_id, created_at=created_at, settle_deadline=None, priority=0)
        for queue_id, created_at in [
            ("00000000-0000-0000-0000-00000000000a", early + timedelta(microseconds=1)),
            ("ffffffff-0000-0000-0000-000000000000", early),
            ("0fffffff-0000-0000-0000-000000000000", early),
        ]
    ]
    assert sorted(positions.member(i) for i in items) == [
        positions.member(items[2]),
        positions.member(items[1]),
        positions.member(items[0]),
    ]


def test_scores_order_priority_first_then_deadline() -> None:
    now = datetime(2026, 12, 6, tzinfo=UTC)

    def item(priority: int, deadline: datetime | None) -> SimpleNamespace:
        return SimpleNamespace(
            queue_id=uuid.uuid4(), created_at=now, settle_deadline=deadline, priority=priority
        )

    soon, later = now + timedelta(minutes=5), now + timedelta(minutes=6)
    far = datetime(9999, 12, 31, tzinfo=UTC)  # a validBefore far past any real deadline
    claim_order = [
        item(1000, None),
        item(3, soon),
        item(3, None),
        item(0, soon),
        item(0, later),
        item(0, far),
        item(0, None),
        item(-1, soon),
        item(-1000, None),
    ]
    scores = [positions.score(i) for i in claim_order]
    assert scores == sorted(scores)
    assert scores[5] == scores[6]  # past the year 4147 counts as no deadline; arrival decides
    assert all(abs(s) < 2**53 and s == int(s) for s in scores)

"""The mint queue as clients see it: intake, positions, the item view, per-payer and global
views."""

from __future__ import annotations

import math
import uuid
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, NamedTuple

from marshmallow import Schema, fields
from redis import Redis
from sqlalchemy import (
    ColumnElement,
    Connection,
    Table,
    and_,
    bindparam,
    func,
    or_,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from db.models import QUEUE_STATUSES, BatchMint, HotWallet, MintQueueItem, QueueStatus
from mintq import positions, sale
from mintq.errors import MintqError
from mintq.operating import OperatingSettings
from mintq.payments import VerifiedPayment

_ITEMS: Table = MintQueueItem.__table__  # type: ignore[assignment]


class ItemRow(NamedTuple):
    """A `mint_queue` row as intake reads it: what the item view and its position need."""

    queue_id: uuid.UUID
    status: str
    payment_id: str
    payment_type: str
    payer: str
    recipient: str
    payment_tx_hash: str | None
    batch_id: uuid.UUID | None
    mint_tx_hash: str | None
    retry_count: int
    error: str | None
    created_at: datetime
    updated_at: datetime
    completed_at: datetime | None
    settle_deadline: datetime | None
    priority: int
    quantity: int
    price: Decimal
    refund_amount: Decimal | None
    refund_status: str | None
    refund_tx_hash: str | None


# An ORM item or a row of `mint_queue` (intake reads rows): what views and positions read.
QueueItem = MintQueueItem | ItemRow

_ROW = select(*(_ITEMS.c[name] for name in ItemRow._fields))
_FIND = _ROW.where(_ITEMS.c.payment_id == bindparam("payment_id"))
# The unique payment id decides: concurrent submissions of one payment on several API
# replicas make one row, and the statement that made it is the one that returns it.
_INSERT = (
    insert(_ITEMS)
    .on_conflict_do_nothing(index_elements=[_ITEMS.c.payment_id])
    .returning(*(_ITEMS.c[name] for name in ItemRow._fields))
)


def _one(db: Session | Connection, statement: Any, params: dict[str, Any]) -> ItemRow | None:
    row = db.execute(statement, params).one_or_none()
    return None if row is None else ItemRow._make(row)


def find(db: Session | Connection, payment_id: str) -> ItemRow | None:
    """The item queued for a payment id, if there is one."""
    return _one(db, _FIND, {"payment_id": payment_id})


def enqueue(
    db: Session | Connection,
    payment: VerifiedPayment,
    callback_url: str | None = None,
    *,
    refund_reason: str | None = None,
) -> tuple[ItemRow, bool]:
    """Queue a verified payment once: the item, and whether this call created it.

    Intake runs it on an autocommit connection, where the insert is durable when it returns
    and a new payment costs one statement. A repeat keeps the first request's `callback_url`.
    The database reserves the item's quantity of the sale's supply in the same statement, or
    refuses it (`sale.SaleRefusal`) under the sale's rules. A payment that buys nothing
    (quantity 0) is recorded as `refunded`, with `refund_reason` as its error: the database
    then owes its payer the whole amount.
    """
    values = {
        "quantity": payment.quantity,
        "price": payment.price,
        "payment_id": payment.payment_id,
        "payment_type": str(payment.payment_type),
        "payer": payment.payer,
        "recipient": payment.recipient,
        "amount_paid": payment.amount,
        "payment_tx_hash": payment.payment_tx_hash,
        "payment_payload": payment.payload,
        "settle_deadline": (
            datetime.fromtimestamp(payment.settle_deadline, UTC)
            if payment.settle_deadline is not None
            else None
        ),
        "callback_url": callback_url,
        "status": QueueStatus.PENDING if payment.quantity else QueueStatus.REFUNDED,
        "error": None if payment.quantity else refund_reason,
    }
    row = _insert(db, values, payment.quantity)
    if row is not None:
        return row, True
    row = find(db, payment.payment_id)
    assert row is not None  # the conflicting writer committed it
    return row, False


def _insert(db: Session | Connection, values: dict[str, Any], quantity: int) -> ItemRow | None:
    """The insert, as the sale's trigger lets it through: a shard of the supply that runs short
    is rebalanced in a transaction of its own (`sale.rebalance`), and the insert tried again."""
    # Each retry follows a rebalance that lent the shard what it lacked: another insert on
    # the same shard can take it first, so a few may be needed under contention.
    for _ in range(16):
        try:
            if isinstance(db, Session):
                with db.begin_nested():  # a refused insert leaves the caller's transaction
                    return _one(db, _INSERT, values)
            return _one(db, _INSERT, values)
        except DBAPIError as exc:
            short = sale.short_shard(exc)
            if short is None:
                refused = sale.refusal(exc)
                if refused is None:
                    raise
                raise refused from None
            if not sale.rebalance(db, short, quantity):
                raise sale.sold_out(db) from None
    raise sale.sold_out(db)


_REQUEUE_PAID = (
    update(_ITEMS)
    .where(
        _ITEMS.c.queue_id == bindparam("failed_item"),
        _ITEMS.c.status == QueueStatus.FAILED,
        _ITEMS.c.payment_tx_hash.is_(None),
    )
    .values(
        status=QueueStatus.PENDING,
        payment_tx_hash=bindparam("paid_in"),
        settle_deadline=None,
        error=None,
        batch_id=None,
    )
    .returning(*(_ITEMS.c[name] for name in ItemRow._fields))
)


def requeue_paid(db: Session | Connection, queue_id: uuid.UUID, tx_hash: str) -> ItemRow | None:
    """Queue a failed, uncharged item again as paid, now that its money moved in `tx_hash`.

    An authorization whose item failed before it was settled (the payer's balance was short,
    an operator cancelled it, it neared expiry) stays valid on chain, and anyone may still
    submit it: the payer is then charged, and only a mint makes that right. None when the item
    is not failed and uncharged (someone else requeued it first).
    """
    return _one(db, _REQUEUE_PAID, {"failed_item": queue_id, "paid_in": tx_hash})


def parse_queue_id(raw: str) -> uuid.UUID:
    """A queueId from a URL; 400 `invalid_queue_id` when it is not a UUID."""
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise MintqError(
            "queueId must be a UUID.", code="invalid_queue_id", details={"queueId": raw}
        ) from None


def get_item(session: Session, queue_id: uuid.UUID) -> MintQueueItem | None:
    return session.get(MintQueueItem, queue_id)


def get_items(db: Session | Connection, queue_ids: Collection[uuid.UUID]) -> list[ItemRow]:
    """The items of `queue_ids` that exist, in one query, as rows (the event service reads
    hundreds at a time, and ORM objects cost more to build than the query)."""
    rows = db.execute(_ROW.where(_ITEMS.c.queue_id.in_(queue_ids)))
    return [ItemRow._make(row) for row in rows]


def items_for_payer(session: Session, payer: str, limit: int = 100) -> list[MintQueueItem]:
    return list(
        session.scalars(
            select(MintQueueItem)
            .where(MintQueueItem.payer == payer)
            .order_by(MintQueueItem.created_at.desc())
            .limit(limit)
        )
    )


def queue_position(
    db: Session | Connection, item: QueueItem, redis: Redis | None = None, *, new: bool = False
) -> int | None:
    """1 for the next item to be batched; 0 while its batch is on the way; None when done.

    With `redis`, from the sorted set of `mintq.positions` (O(log n); a `new` item is added
    to it); counted in Postgres when the set cannot answer, and added to it then.
    """
    if item.status == "processing":
        return 0
    if item.status != "pending":
        return None
    if redis is not None:
        known = positions.position(redis, item, add=new)
        if known is not None:
            return known
    ahead = db.scalar(
        select(func.count())
        .select_from(MintQueueItem)
        .where(MintQueueItem.status == "pending", _claimed_before(item))
    )
    if redis is not None and not new:
        positions.add(redis, item)
    return int(ahead or 0) + 1


def _claimed_before(item: QueueItem) -> ColumnElement[bool]:
    """Rows that `MintQueueItem.claim_order()` puts ahead of `item`."""
    arrived_before = tuple_(MintQueueItem.created_at, MintQueueItem.queue_id) < tuple_(
        item.created_at, item.queue_id
    )
    deadline = MintQueueItem.settle_deadline
    if item.settle_deadline is None:
        within = or_(deadline.is_not(None), arrived_before)
    else:
        within = and_(
            deadline.is_not(None),
            or_(
                deadline < item.settle_deadline,
                and_(deadline == item.settle_deadline, arrived_before),
            ),
        )
    priority = MintQueueItem.priority
    return or_(priority > item.priority, and_(priority == item.priority, within))


class QueueItemSchema(Schema):
    """A queue item as clients see it: `GET /queue/item`, its live updates and webhooks."""

    queue_id = fields.UUID(data_key="queueId")
    status = fields.String()
    queue_position = fields.Integer(data_key="queuePosition", allow_none=True)
    estimated_wait_seconds = fields.Integer(data_key="estimatedWaitSeconds", allow_none=True)
    payer = fields.String()
    recipient = fields.String()
    payment_type = fields.String(data_key="paymentType")
    payment_id = fields.String(data_key="paymentId")
    batch_id = fields.UUID(data_key="batchId", allow_none=True)
    mint_tx_hash = fields.String(data_key="mintTxHash", allow_none=True)
    retry_count = fields.Integer(data_key="retryCount")
    priority = fields.Integer()
    quantity = fields.Integer()
    price = fields.String()
    refund_amount = fields.String(data_key="refundAmount", allow_none=True)
    refund_status = fields.String(data_key="refundStatus", allow_none=True)
    refund_tx_hash = fields.String(data_key="refundTxHash", allow_none=True)
    error = fields.String(allow_none=True)
    created_at = fields.AwareDateTime(data_key="createdAt")
    updated_at = fields.AwareDateTime(data_key="updatedAt")
    completed_at = fields.AwareDateTime(data_key="completedAt", allow_none=True)


_item_schema = QueueItemSchema()


def item_view(
    db: Session | Connection,
    item: QueueItem,
    ops: OperatingSettings,
    redis: Redis | None = None,
    *,
    new: bool = False,
) -> dict[str, Any]:
    """The item as JSON-ready camelCase, with its queue position and wait estimate."""
    return _view(item, queue_position(db, item, redis, new=new), ops)


def item_views(
    db: Session | Connection,
    items: Sequence[QueueItem],
    ops: OperatingSettings,
    redis: Redis | None = None,
) -> list[dict[str, Any]]:
    """`item_view` of each of `items`, the pending ones' positions asked of Redis in one round
    trip (the event service reads hundreds at once)."""
    pending = [item for item in items if item.status == "pending"]
    ranked = dict(
        zip(
            (item.queue_id for item in pending),
            positions.positions(redis, pending) if redis is not None else [],
            strict=False,
        )
    )
    views = []
    for item in items:
        position = ranked.get(item.queue_id)
        if position is None:  # not pending, or the set cannot say: as `item_view` finds it
            position = queue_position(db, item, redis)
        views.append(_view(item, position, ops))
    return views


def _view(item: QueueItem, position: int | None, ops: OperatingSettings) -> dict[str, Any]:
    # The item's own fields straight from it; the two it has no attribute for, then.
    data: dict[str, Any] = _item_schema.dump(item)
    data["queuePosition"] = position
    data["estimatedWaitSeconds"] = estimated_wait_seconds(position, ops)
    return data


def estimated_wait_seconds(position: int | None, ops: OperatingSettings) -> int | None:
    """Seconds until the item's batch is sent: one interval per full batch ahead of it."""
    if position is None:
        return None
    if position == 0:
        return 0
    batches = math.ceil(position / ops.max_batch_size)
    return math.ceil(batches * ops.batch_interval_seconds)


@dataclass(frozen=True)
class QueueOverview:
    counts: dict[str, int]
    oldest_pending_age_seconds: float | None
    recent_batches: list[BatchMint]
    wallets: list[HotWallet]


def queue_status(session: Session, recent: int = 10) -> QueueOverview:
    row = session.execute(
        text(
            "SELECT pending, processing, completed, failed, refunded, oldest_pending_at "
            "FROM queue_stats"
        )
    ).one()
    oldest = row[5]
    age = (datetime.now(UTC) - oldest).total_seconds() if oldest else None
    batches = list(
        session.scalars(select(BatchMint).order_by(BatchMint.created_at.desc()).limit(recent))
    )
    wallets = list(session.scalars(select(HotWallet).order_by(HotWallet.address)))
    return QueueOverview(
        wallets=wallets,
        counts=dict(zip(QUEUE_STATUSES, row[:5], strict=True)),
        oldest_pending_age_seconds=age,
        recent_batches=batches,
    )

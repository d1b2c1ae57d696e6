"""The mint queue as clients see it: intake, positions, the item view, per-payer and global
views."""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple

import psycopg2
import psycopg2.errors
from marshmallow import Schema, fields
from psycopg2.extras import Json
from redis import Redis
from sqlalchemy import (
    ColumnElement,
    Connection,
    Table,
    and_,
    func,
    or_,
    select,
    text,
    tuple_,
)
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from db.models import BatchMint, HotWallet, MintQueueItem
from mintq import positions
from mintq.errors import DependencyUnavailable, MintqError
from mintq.operating import OperatingSettings
from mintq.payments import VerifiedPayment

_ITEMS: Table = MintQueueItem.__table__  # type: ignore[assignment]


def find_by_payment_id(session: Session, payment_id: str) -> MintQueueItem | None:
    return session.scalars(
        select(MintQueueItem).where(MintQueueItem.payment_id == payment_id)
    ).one_or_none()


class ItemRow(NamedTuple):
    """A `mint_queue` row as intake reads it: what the item view and its position need."""

    queue_id: uuid.UUID
    status: str
    payment_id: str
    payment_type: str
    payer: str
    recipient: str
    batch_id: uuid.UUID | None
    mint_tx_hash: str | None
    retry_count: int
    error: str | None
    created_at: datetime
    updated_at: datetime
    completed_at: datetime | None
    settle_deadline: datetime | None


# An ORM item or a row of `mint_queue` (intake reads rows): what views and positions read.
QueueItem = MintQueueItem | ItemRow

# Intake runs two statements per request, as plain SQL on the DBAPI cursor: building,
# caching and processing a SQLAlchemy statement costs more CPU than Postgres takes to run it.
# Each is a server-side prepared statement on its connection: Postgres parses and plans it
# once per connection instead of on every request (about a quarter of the CPU an insert costs
# it). Named prepared statements need a session of their own: a pooler in front of Postgres
# must run in session mode.
_ROW_COLUMNS = ", ".join(ItemRow._fields)
_INSERT_COLUMNS = (
    "payment_id",
    "payment_type",
    "payer",
    "recipient",
    "amount_paid",
    "payment_tx_hash",
    "payment_payload",
    "settle_deadline",
    "callback_url",
)
_PREPARED = {
    "mintq_find_row": f"SELECT {_ROW_COLUMNS} FROM mint_queue WHERE payment_id = $1",
    "mintq_enqueue_row": (
        f"INSERT INTO mint_queue ({', '.join(_INSERT_COLUMNS)})"
        f" VALUES ({', '.join(f'${i + 1}' for i in range(len(_INSERT_COLUMNS)))})"
        f" ON CONFLICT (payment_id) DO NOTHING RETURNING {_ROW_COLUMNS}"
    ),
}
# How each is run: one psycopg2 placeholder per `$n` parameter of the statement.
_EXECUTE = {
    name: f"EXECUTE {name} ({', '.join(['%s'] * sql.count('$'))})"
    for name, sql in _PREPARED.items()
}
# Where a connection records that its statements are prepared (SQLAlchemy keeps `info` with
# the DBAPI connection for as long as the pool does).
_PREPARED_KEY = "mintq.intake_prepared"


def _prepare(connection: Connection, cursor: Any, *, again: bool = False) -> None:
    if again:
        cursor.execute("DEALLOCATE ALL")  # only intake prepares statements on this pool
    for name, sql in _PREPARED.items():
        cursor.execute(f"PREPARE {name} AS {sql}")
    connection.info[_PREPARED_KEY] = True


def _fetch_row(connection: Connection, statement: str, params: tuple[Any, ...]) -> ItemRow | None:
    """Run one of intake's prepared statements (autocommit) and return its row, if any."""
    cursor = connection.connection.cursor()
    try:
        if _PREPARED_KEY not in connection.info:
            _prepare(connection, cursor)
        try:
            cursor.execute(_EXECUTE[statement], params)
        except (psycopg2.errors.InvalidSqlStatementName, psycopg2.errors.FeatureNotSupported):
            # Gone (a `DISCARD ALL`), or its plan no longer fits the table (a migration changed
            # a column it returns): prepare again, once.
            _prepare(connection, cursor, again=True)
            cursor.execute(_EXECUTE[statement], params)
        values = cursor.fetchone()
    except (psycopg2.OperationalError, psycopg2.InterfaceError) as exc:
        # What SQLAlchemy would do: the pool discards the connection, the client gets a 503.
        connection.invalidate()
        raise DependencyUnavailable("database") from exc
    finally:
        cursor.close()
    return None if values is None else ItemRow._make(values)


def find_row(connection: Connection, payment_id: str) -> ItemRow | None:
    """The item for a payment id as a plain row (intake: no ORM on the hot path)."""
    return _fetch_row(connection, "mintq_find_row", (payment_id,))


def _values(payment: VerifiedPayment, callback_url: str | None) -> dict[str, Any]:
    return {
        "payment_id": payment.payment_id,
        "payment_type": payment.payment_type,
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
    }


def enqueue(
    session: Session, payment: VerifiedPayment, callback_url: str | None = None
) -> tuple[MintQueueItem, bool]:
    """Queue a verified payment once. Returns the item and whether this call created it.

    The unique payment id decides, so concurrent submissions of one payment on several
    API replicas still make a single row. A repeat keeps the first request's `callback_url`.
    """
    item = session.scalars(
        insert(MintQueueItem)
        .values(_values(payment, callback_url))
        .on_conflict_do_nothing(index_elements=[MintQueueItem.payment_id])
        .returning(MintQueueItem)
    ).one_or_none()
    if item is not None:
        return item, True
    item = find_by_payment_id(session, payment.payment_id)
    assert item is not None  # the conflicting writer committed it
    return item, False


def enqueue_row(
    connection: Connection, payment: VerifiedPayment, callback_url: str | None = None
) -> tuple[ItemRow, bool]:
    """`enqueue` as one statement on an autocommit connection, returning a plain row: the
    intake hot path, where the ORM and a separate COMMIT cost more than the insert."""
    values = _values(payment, callback_url)
    if values["payment_payload"] is not None:
        values["payment_payload"] = Json(values["payment_payload"])
    row = _fetch_row(connection, "mintq_enqueue_row", tuple(values[c] for c in _INSERT_COLUMNS))
    if row is not None:
        return row, True
    row = find_row(connection, payment.payment_id)
    assert row is not None  # the conflicting writer committed it
    return row, False


def find_by_authorization(session: Session, sender: str, nonce: bytes) -> MintQueueItem | None:
    """The item queued for an EIP-3009 authorization, whatever its payment id."""
    return session.scalars(
        select(MintQueueItem).where(
            MintQueueItem.payment_payload.contains(
                {"authorization": {"from": sender, "nonce": "0x" + nonce.hex()}}
            )
        )
    ).first()


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
        return or_(deadline.is_not(None), arrived_before)
    return and_(
        deadline.is_not(None),
        or_(
            deadline < item.settle_deadline,
            and_(deadline == item.settle_deadline, arrived_before),
        ),
    )


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
    position = queue_position(db, item, redis, new=new)
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
class QueueStatus:
    counts: dict[str, int]
    oldest_pending_age_seconds: float | None
    recent_batches: list[BatchMint]
    wallets: list[HotWallet]


def queue_status(session: Session, recent: int = 10) -> QueueStatus:
    row = session.execute(
        text("SELECT pending, processing, completed, failed, oldest_pending_at FROM queue_stats")
    ).one()
    oldest = row[4]
    age = (datetime.now(UTC) - oldest).total_seconds() if oldest else None
    batches = list(
        session.scalars(select(BatchMint).order_by(BatchMint.created_at.desc()).limit(recent))
    )
    wallets = list(session.scalars(select(HotWallet).order_by(HotWallet.address)))
    return QueueStatus(
        wallets=wallets,
        counts=dict(zip(("pending", "processing", "completed", "failed"), row[:4], strict=True)),
        oldest_pending_age_seconds=age,
        recent_batches=batches,
    )

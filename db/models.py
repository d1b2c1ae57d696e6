"""SQLAlchemy 2 models. The schema itself comes from the Alembic migrations."""

from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    Numeric,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class QueueStatus(StrEnum):
    PENDING = "pending"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"
    # The payment bought nothing (outside the sale's rules, or cancelled): it is paid back.
    REFUNDED = "refunded"


# Statuses in which an item holds its quantity of the sale's supply (`sale_supply`).
HOLDING = (QueueStatus.PENDING, QueueStatus.PROCESSING, QueueStatus.COMPLETED)


class RefundStatus(StrEnum):
    """pending: owed, not yet in a transaction; sent: in a refund batch; confirmed: paid on
    chain; dust: below the minimum worth sending, recorded and not sent; failed: USDC refused
    it for good (a blacklisted payer), for an operator to look at."""

    PENDING = "pending"
    SENT = "sent"
    CONFIRMED = "confirmed"
    DUST = "dust"
    FAILED = "failed"


class BatchKind(StrEnum):
    MINT = "mint"
    REFUND = "refund"


class PaymentType(StrEnum):
    """How a payment was presented; its id does not depend on it (`mintq.payments`)."""

    CUSTOM = "custom"
    GASLESS = "gasless"
    X402 = "x402"


class BatchStatus(StrEnum):
    """signed: written ahead, not yet broadcast; sent: broadcast, waiting for confirmations;
    confirmed / reverted: final on chain; failed: never mined (its items went back)."""

    SIGNED = "signed"
    SENT = "sent"
    CONFIRMED = "confirmed"
    REVERTED = "reverted"
    FAILED = "failed"


# A batch whose transaction may still be mined: its nonce and its items are spoken for.
BATCH_IN_FLIGHT = (BatchStatus.SIGNED, BatchStatus.SENT)

QUEUE_STATUSES = tuple(s.value for s in QueueStatus)
REFUND_STATUSES = tuple(s.value for s in RefundStatus)
BATCH_KINDS = tuple(k.value for k in BatchKind)
PAYMENT_TYPES = tuple(t.value for t in PaymentType)
BATCH_STATUSES = tuple(s.value for s in BatchStatus)

Uint256 = Numeric(78, 0)
# An item's priority is within ±MAX_PRIORITY (queue positions encode it in a float score).
MAX_PRIORITY = 1000


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


def _uuid_pk() -> Mapped[uuid.UUID]:
    return mapped_column(
        UUID(as_uuid=True), primary_key=True, server_default=text("gen_random_uuid()")
    )


def _created_at() -> Mapped[datetime]:
    return mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())


def _updated_at() -> Mapped[datetime]:
    # Kept current by the set_updated_at trigger, whoever writes the row.
    return mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class BatchMint(Base):
    """One batchMint transaction: its nonce, hash, size, gas and fate."""

    __tablename__ = "batch_mints"
    __table_args__ = (
        CheckConstraint(_in("status", BATCH_STATUSES), name="status"),
        CheckConstraint(_in("kind", BATCH_KINDS), name="kind"),
        UniqueConstraint("nonce"),
    )

    batch_id: Mapped[uuid.UUID] = _uuid_pk()
    kind: Mapped[str] = mapped_column(String(16), nullable=False, server_default="mint")
    nonce: Mapped[int] = mapped_column(BigInteger, nullable=False)
    tx_hash: Mapped[str] = mapped_column(String(66), nullable=False, unique=True)
    raw_tx: Mapped[str] = mapped_column(Text, nullable=False)
    size: Mapped[int] = mapped_column(Integer, nullable=False)
    gas_limit: Mapped[int] = mapped_column(BigInteger, nullable=False)
    max_fee_per_gas: Mapped[Decimal] = mapped_column(Uint256, nullable=False)
    max_priority_fee_per_gas: Mapped[Decimal] = mapped_column(Uint256, nullable=False)
    status: Mapped[str] = mapped_column(String(16), nullable=False, server_default="signed")
    gas_used: Mapped[int | None] = mapped_column(BigInteger)
    block_number: Mapped[int | None] = mapped_column(BigInteger)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = _created_at()
    updated_at: Mapped[datetime] = _updated_at()
    sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    confirmed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class MintQueueItem(Base):
    """A paid mint request, from intake until it is completed or failed."""

    __tablename__ = "mint_queue"
    __table_args__ = (
        CheckConstraint(_in("status", QUEUE_STATUSES), name="status"),
        CheckConstraint(_in("payment_type", PAYMENT_TYPES), name="payment_type"),
        CheckConstraint("retry_count >= 0", name="retry_count"),
        CheckConstraint("quantity >= 0", name="quantity"),
        CheckConstraint(_in("refund_status", REFUND_STATUSES), name="refund_status"),
        CheckConstraint(
            "(refund_amount IS NULL) = (refund_status IS NULL) AND refund_amount > 0",
            name="refund_amount",
        ),
        # The database, not a check-then-insert, guarantees one queue item per payment.
        UniqueConstraint("payment_id"),
        CheckConstraint(f"priority BETWEEN {-MAX_PRIORITY} AND {MAX_PRIORITY}", name="priority"),
        Index(
            "ix_mint_queue_pending_claim_order",
            text("priority DESC"),
            text("settle_deadline ASC NULLS LAST"),
            "created_at",
            "queue_id",
            postgresql_where=text("status = 'pending'"),
        ),
        Index(
            "ix_mint_queue_unsettled_failures",
            "settle_deadline",
            postgresql_where=text("status = 'failed' AND payment_tx_hash IS NULL"),
        ),
        Index("ix_mint_queue_payer", "payer", "created_at"),
        Index("ix_mint_queue_batch_id", "batch_id"),
        Index("ix_mint_queue_refund_batch_id", "refund_batch_id"),
        Index(
            "ix_mint_queue_refunds_due",
            "updated_at",
            postgresql_where=text("refund_status = 'pending'"),
        ),
    )

    queue_id: Mapped[uuid.UUID] = _uuid_pk()
    payment_id: Mapped[str] = mapped_column(String(66), nullable=False)
    payment_type: Mapped[str] = mapped_column(String(16), nullable=False)
    payer: Mapped[str] = mapped_column(String(42), nullable=False)
    recipient: Mapped[str] = mapped_column(String(42), nullable=False)
    amount_paid: Mapped[Decimal] = mapped_column(Uint256, nullable=False)
    payment_tx_hash: Mapped[str | None] = mapped_column(String(66))
    payment_payload: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    status: Mapped[str] = mapped_column(String(16), nullable=False, server_default="pending")
    batch_id: Mapped[uuid.UUID | None] = mapped_column(
        UUID(as_uuid=True), ForeignKey("batch_mints.batch_id")
    )
    mint_tx_hash: Mapped[str | None] = mapped_column(String(66))
    retry_count: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = _created_at()
    updated_at: Mapped[datetime] = _updated_at()
    completed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # When an authorization must be settled by (EIP-3009 validBefore); NULL when already paid.
    settle_deadline: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Where to POST the webhook when the item is completed or failed (the request's callbackUrl).
    callback_url: Mapped[str | None] = mapped_column(Text)
    # Set by an operator: a higher priority is batched before any lower one.
    priority: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    # Mints this payment buys (0: it bought nothing and is refunded in full), at `price` each.
    quantity: Mapped[int] = mapped_column(Integer, nullable=False, server_default="1")
    price: Mapped[Decimal] = mapped_column(Uint256, nullable=False)
    # What the payer is owed back, in atomic USDC, once the item is final (NULL: nothing); set
    # by the database (migration 0010) whenever the status becomes final, whoever sets it.
    refund_amount: Mapped[Decimal | None] = mapped_column(Uint256)
    refund_status: Mapped[str | None] = mapped_column(String(16))
    refund_tx_hash: Mapped[str | None] = mapped_column(String(66))
    # The refund wallet that last signed this refund, and until when that signature is valid.
    refund_wallet: Mapped[str | None] = mapped_column(String(42))
    refund_valid_before: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    refund_batch_id: Mapped[uuid.UUID | None] = mapped_column(
        UUID(as_uuid=True), ForeignKey("batch_mints.batch_id")
    )

    @classmethod
    def claim_order(cls) -> tuple[Any, ...]:
        """The order pending items are batched in: highest priority, then soonest deadline,
        then arrival."""
        return (
            cls.priority.desc(),
            cls.settle_deadline.asc().nulls_last(),
            cls.created_at,
            cls.queue_id,
        )


WEBHOOK_EVENTS = ("completed", "failed", "refunded")


class WebhookDelivery(Base):
    """The webhook of one item's final state: attempts so far, the last error, when delivered.

    A table of its own, so that recording an attempt leaves the item's `updated_at` alone.
    """

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        CheckConstraint(_in("event", WEBHOOK_EVENTS), name="event"),
        CheckConstraint("attempts >= 0", name="attempts"),
    )

    queue_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    event: Mapped[str] = mapped_column(String(16), primary_key=True)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    last_error: Mapped[str | None] = mapped_column(Text)
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = _created_at()
    updated_at: Mapped[datetime] = _updated_at()


class MintHistory(Base):
    """Audit trail: one row per completed mint, never updated."""

    __tablename__ = "mint_history"
    __table_args__ = (UniqueConstraint("queue_id"), UniqueConstraint("payment_id"))

    history_id: Mapped[uuid.UUID] = _uuid_pk()
    queue_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), nullable=False)
    payment_id: Mapped[str] = mapped_column(String(66), nullable=False)
    payment_type: Mapped[str] = mapped_column(String(16), nullable=False)
    payer: Mapped[str] = mapped_column(String(42), nullable=False)
    recipient: Mapped[str] = mapped_column(String(42), nullable=False)
    amount_paid: Mapped[Decimal] = mapped_column(Uint256, nullable=False)
    mint_amount: Mapped[Decimal] = mapped_column(Uint256, nullable=False)
    batch_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("batch_mints.batch_id"), nullable=False
    )
    mint_tx_hash: Mapped[str] = mapped_column(String(66), nullable=False)
    block_number: Mapped[int] = mapped_column(BigInteger, nullable=False)
    queued_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    completed_at: Mapped[datetime] = _created_at()


class TxKind(StrEnum):
    BATCH = "batch"
    REPLACEMENT = "replacement"
    FILLER = "filler"


class TxStatus(StrEnum):
    SIGNED = "signed"
    SENT = "sent"
    MINED = "mined"
    FAILED = "failed"


TX_KINDS = tuple(k.value for k in TxKind)
TX_STATUSES = tuple(s.value for s in TxStatus)


class WalletTransaction(Base):
    """One signed transaction of the hot wallet. A batch may have several at its nonce (the
    original and fee-bumped replacements); a receipt for any of them settles the nonce."""

    __tablename__ = "wallet_transactions"
    __table_args__ = (
        CheckConstraint(_in("kind", TX_KINDS), name="kind"),
        CheckConstraint(_in("status", TX_STATUSES), name="status"),
        Index("ix_wallet_transactions_nonce", "nonce"),
        Index("ix_wallet_transactions_batch_id", "batch_id"),
    )

    tx_hash: Mapped[str] = mapped_column(String(66), primary_key=True)
    nonce: Mapped[int] = mapped_column(BigInteger, nullable=False)
    batch_id: Mapped[uuid.UUID | None] = mapped_column(
        UUID(as_uuid=True), ForeignKey("batch_mints.batch_id")
    )
    kind: Mapped[str] = mapped_column(String(16), nullable=False)
    raw_tx: Mapped[str] = mapped_column(Text, nullable=False)
    gas_limit: Mapped[int] = mapped_column(BigInteger, nullable=False)
    max_fee_per_gas: Mapped[Decimal] = mapped_column(Uint256, nullable=False)
    max_priority_fee_per_gas: Mapped[Decimal] = mapped_column(Uint256, nullable=False)
    status: Mapped[str] = mapped_column(String(16), nullable=False, server_default="signed")
    created_at: Mapped[datetime] = _created_at()
    sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class HotWallet(Base):
    """The minter wallet's next nonce, advanced in the same transaction that assigns a batch."""

    __tablename__ = "hot_wallets"

    address: Mapped[str] = mapped_column(String(42), primary_key=True)
    next_nonce: Mapped[int] = mapped_column(BigInteger, nullable=False)
    updated_at: Mapped[datetime] = _updated_at()
    # Set while the wallet cannot pay for the next transaction (the owner then sends nothing).
    low_funds_since: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    balance: Mapped[Decimal | None] = mapped_column(Uint256)
    balance_needed: Mapped[Decimal | None] = mapped_column(Uint256)


# Rows `sale_supply` counts on (an item on the one its payment id hashes to).
SALE_SHARDS = 16


class SaleSupply(Base):
    """Mints the held items hold, per shard, and under a cap what each shard may hold: kept
    by the `mint_queue_sale` trigger and `sale_rebalance` (migration 0010)."""

    __tablename__ = "sale_supply"
    __table_args__ = (CheckConstraint(f"shard >= 0 AND shard < {SALE_SHARDS}", name="shard"),)

    shard: Mapped[int] = mapped_column(Integer, primary_key=True)
    reserved: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default="0")
    quota: Mapped[int | None] = mapped_column(BigInteger)


class SaleSupplyRelease(Base):
    """Supply an item gave back, not yet folded into its shard (that takes every shard's lock,
    so `sale_rebalance` does it)."""

    __tablename__ = "sale_supply_releases"

    release_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    shard: Mapped[int] = mapped_column(Integer, nullable=False)
    quantity: Mapped[int] = mapped_column(BigInteger, nullable=False)


class SystemSetting(Base):
    """Hot-reloadable operating knobs, read by the batch task on every tick."""

    __tablename__ = "system_settings"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text, nullable=False)
    description: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime] = _updated_at()

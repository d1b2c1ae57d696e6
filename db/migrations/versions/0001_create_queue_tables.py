"""Create the queue, history, batch, hot wallet and settings tables and the queue_stats view

Revision ID: 0001
Revises:
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB, UUID

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

UINT256 = sa.Numeric(78, 0)
TIMESTAMPED = ("mint_queue", "batch_mints", "hot_wallets", "system_settings")

DEFAULT_SETTINGS = [
    ("max_batch_size", "50", "Most queue items in one batchMint transaction."),
    ("batch_interval_seconds", "10", "Seconds between batches while the queue is not full."),
    ("max_retries", "3", "Reverted batches an item survives before it is failed."),
    ("max_in_flight", "3", "Batches that may wait for confirmation at consecutive nonces."),
    ("paused", "false", "When true no new batch is sent; queued items stay pending."),
]


def _uuid_pk(name: str) -> sa.Column:
    return sa.Column(
        name, UUID(as_uuid=True), primary_key=True, server_default=sa.text("gen_random_uuid()")
    )


def _ts(name: str, nullable: bool = False) -> sa.Column:
    if nullable:
        return sa.Column(name, sa.DateTime(timezone=True), nullable=True)
    return sa.Column(name, sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now())


def upgrade() -> None:
    op.execute(
        """
        CREATE FUNCTION set_updated_at() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            NEW.updated_at = now();
            RETURN NEW;
        END $$
        """
    )

    op.create_table(
        "batch_mints",
        _uuid_pk("batch_id"),
        sa.Column("nonce", sa.BigInteger, nullable=False),
        sa.Column("tx_hash", sa.String(66), nullable=False),
        sa.Column("raw_tx", sa.Text, nullable=False),
        sa.Column("size", sa.Integer, nullable=False),
        sa.Column("gas_limit", sa.BigInteger, nullable=False),
        sa.Column("max_fee_per_gas", UINT256, nullable=False),
        sa.Column("max_priority_fee_per_gas", UINT256, nullable=False),
        sa.Column("status", sa.String(16), nullable=False, server_default="signed"),
        sa.Column("gas_used", sa.BigInteger),
        sa.Column("block_number", sa.BigInteger),
        sa.Column("error", sa.Text),
        _ts("created_at"),
        _ts("updated_at"),
        _ts("sent_at", nullable=True),
        _ts("confirmed_at", nullable=True),
        sa.CheckConstraint(
            "status IN ('signed', 'sent', 'confirmed', 'reverted', 'failed')",
            name=op.f("ck_batch_mints_status"),
        ),
        sa.UniqueConstraint("nonce", name="uq_batch_mints_nonce"),
        sa.UniqueConstraint("tx_hash", name="uq_batch_mints_tx_hash"),
        sa.PrimaryKeyConstraint("batch_id", name="pk_batch_mints"),
    )

    op.create_table(
        "mint_queue",
        _uuid_pk("queue_id"),
        sa.Column("payment_id", sa.String(66), nullable=False),
        sa.Column("payment_type", sa.String(16), nullable=False),
        sa.Column("payer", sa.String(42), nullable=False),
        sa.Column("recipient", sa.String(42), nullable=False),
        sa.Column("amount_paid", UINT256, nullable=False),
        sa.Column("payment_tx_hash", sa.String(66)),
        sa.Column("payment_payload", JSONB),
        sa.Column("status", sa.String(16), nullable=False, server_default="pending"),
        sa.Column("batch_id", UUID(as_uuid=True)),
        sa.Column("mint_tx_hash", sa.String(66)),
        sa.Column("retry_count", sa.Integer, nullable=False, server_default="0"),
        sa.Column("error", sa.Text),
        _ts("created_at"),
        _ts("updated_at"),
        _ts("completed_at", nullable=True),
        sa.CheckConstraint(
            "status IN ('pending', 'processing', 'completed', 'failed')",
            name=op.f("ck_mint_queue_status"),
        ),
        sa.CheckConstraint(
            "payment_type IN ('custom', 'gasless', 'x402')", name=op.f("ck_mint_queue_payment_type")
        ),
        sa.CheckConstraint("retry_count >= 0", name=op.f("ck_mint_queue_retry_count")),
        sa.UniqueConstraint("payment_id", name="uq_mint_queue_payment_id"),
        sa.ForeignKeyConstraint(
            ["batch_id"], ["batch_mints.batch_id"], name="fk_mint_queue_batch_id_batch_mints"
        ),
        sa.PrimaryKeyConstraint("queue_id", name="pk_mint_queue"),
    )
    op.create_index(
        "ix_mint_queue_pending_order",
        "mint_queue",
        ["created_at", "queue_id"],
        postgresql_where=sa.text("status = 'pending'"),
    )
    op.create_index("ix_mint_queue_payer", "mint_queue", ["payer", "created_at"])
    op.create_index("ix_mint_queue_batch_id", "mint_queue", ["batch_id"])

    op.create_table(
        "mint_history",
        _uuid_pk("history_id"),
        sa.Column("queue_id", UUID(as_uuid=True), nullable=False),
        sa.Column("payment_id", sa.String(66), nullable=False),
        sa.Column("payment_type", sa.String(16), nullable=False),
        sa.Column("payer", sa.String(42), nullable=False),
        sa.Column("recipient", sa.String(42), nullable=False),
        sa.Column("amount_paid", UINT256, nullable=False),
        sa.Column("mint_amount", UINT256, nullable=False),
        sa.Column("batch_id", UUID(as_uuid=True), nullable=False),
        sa.Column("mint_tx_hash", sa.String(66), nullable=False),
        sa.Column("block_number", sa.BigInteger, nullable=False),
        sa.Column("queued_at", sa.DateTime(timezone=True), nullable=False),
        _ts("completed_at"),
        sa.UniqueConstraint("queue_id", name="uq_mint_history_queue_id"),
        sa.UniqueConstraint("payment_id", name="uq_mint_history_payment_id"),
        sa.ForeignKeyConstraint(
            ["batch_id"], ["batch_mints.batch_id"], name="fk_mint_history_batch_id_batch_mints"
        ),
        sa.PrimaryKeyConstraint("history_id", name="pk_mint_history"),
    )

    op.create_table(
        "hot_wallets",
        sa.Column("address", sa.String(42), nullable=False),
        sa.Column("next_nonce", sa.BigInteger, nullable=False),
        _ts("updated_at"),
        sa.PrimaryKeyConstraint("address", name="pk_hot_wallets"),
    )

    settings = op.create_table(
        "system_settings",
        sa.Column("key", sa.String(64), nullable=False),
        sa.Column("value", sa.Text, nullable=False),
        sa.Column("description", sa.Text),
        _ts("updated_at"),
        sa.PrimaryKeyConstraint("key", name="pk_system_settings"),
    )
    op.bulk_insert(
        settings,
        [{"key": k, "value": v, "description": d} for k, v, d in DEFAULT_SETTINGS],
    )

    for table in TIMESTAMPED:
        op.execute(
            f"CREATE TRIGGER trg_{table}_updated_at BEFORE UPDATE ON {table} "
            "FOR EACH ROW EXECUTE FUNCTION set_updated_at()"
        )

    op.execute(
        """
        CREATE VIEW queue_stats AS
        SELECT
            count(*) FILTER (WHERE status = 'pending') AS pending,
            count(*) FILTER (WHERE status = 'processing') AS processing,
            count(*) FILTER (WHERE status = 'completed') AS completed,
            count(*) FILTER (WHERE status = 'failed') AS failed,
            min(created_at) FILTER (WHERE status = 'pending') AS oldest_pending_at,
            (SELECT count(*) FROM batch_mints WHERE status IN ('signed', 'sent'))
                AS batches_in_flight
        FROM mint_queue
        """
    )


def downgrade() -> None:
    op.execute("DROP VIEW queue_stats")
    for table in TIMESTAMPED:
        op.execute(f"DROP TRIGGER trg_{table}_updated_at ON {table}")
    op.drop_table("system_settings")
    op.drop_table("hot_wallets")
    op.drop_table("mint_history")
    op.drop_table("mint_queue")
    op.drop_table("batch_mints")
    op.execute("DROP FUNCTION set_updated_at()")

"""Record every signed transaction of the hot wallet, and when it runs low on funds

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import UUID

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "wallet_transactions",
        sa.Column("tx_hash", sa.String(66), nullable=False),
        sa.Column("nonce", sa.BigInteger, nullable=False),
        # NULL for a gap filler (a zero-value self-transfer that unblocks the nonces after it).
        sa.Column("batch_id", UUID(as_uuid=True)),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("raw_tx", sa.Text, nullable=False),
        sa.Column("gas_limit", sa.BigInteger, nullable=False),
        sa.Column("max_fee_per_gas", sa.Numeric(78, 0), nullable=False),
        sa.Column("max_priority_fee_per_gas", sa.Numeric(78, 0), nullable=False),
        sa.Column("status", sa.String(16), nullable=False, server_default="signed"),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False,
                  server_default=sa.func.now()),
        sa.Column("sent_at", sa.DateTime(timezone=True)),
        sa.CheckConstraint("kind IN ('batch', 'replacement', 'filler')",
                           name=op.f("ck_wallet_transactions_kind")),
        sa.CheckConstraint("status IN ('signed', 'sent', 'mined', 'failed')",
                           name=op.f("ck_wallet_transactions_status")),
        sa.ForeignKeyConstraint(["batch_id"], ["batch_mints.batch_id"],
                                name="fk_wallet_transactions_batch_id_batch_mints"),
        sa.PrimaryKeyConstraint("tx_hash", name="pk_wallet_transactions"),
    )  # fmt: skip
    # Why the owner is not sending, for operators: set while the wallet cannot pay for gas.
    op.add_column("hot_wallets", sa.Column("low_funds_since", sa.DateTime(timezone=True)))
    op.add_column("hot_wallets", sa.Column("balance", sa.Numeric(78, 0)))
    op.add_column("hot_wallets", sa.Column("balance_needed", sa.Numeric(78, 0)))
    op.create_index("ix_wallet_transactions_nonce", "wallet_transactions", ["nonce"])
    op.create_index("ix_wallet_transactions_batch_id", "wallet_transactions", ["batch_id"])
    # Every batch written so far was one transaction.
    op.execute(
        """
        INSERT INTO wallet_transactions (tx_hash, nonce, batch_id, kind, raw_tx, gas_limit,
            max_fee_per_gas, max_priority_fee_per_gas, status, created_at, sent_at)
        SELECT tx_hash, nonce, batch_id, 'batch', raw_tx, gas_limit, max_fee_per_gas,
            max_priority_fee_per_gas,
            CASE status WHEN 'signed' THEN 'signed' WHEN 'sent' THEN 'sent'
                        WHEN 'failed' THEN 'failed' ELSE 'mined' END,
            created_at, sent_at
        FROM batch_mints
        """
    )


def downgrade() -> None:
    op.drop_column("hot_wallets", "balance_needed")
    op.drop_column("hot_wallets", "balance")
    op.drop_column("hot_wallets", "low_funds_since")
    op.drop_table("wallet_transactions")

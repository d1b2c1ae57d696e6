"""Add settle_deadline to mint_queue and claim the soonest-expiring authorizations first

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # NULL for payments that are already on chain (custom): they have no deadline.
    op.add_column(
        "mint_queue", sa.Column("settle_deadline", sa.DateTime(timezone=True), nullable=True)
    )
    op.create_index(
        "ix_mint_queue_pending_claim_order",
        "mint_queue",
        [sa.text("settle_deadline ASC NULLS LAST"), "created_at", "queue_id"],
        postgresql_where=sa.text("status = 'pending'"),
    )
    op.drop_index("ix_mint_queue_pending_order", table_name="mint_queue")


def downgrade() -> None:
    op.create_index(
        "ix_mint_queue_pending_order",
        "mint_queue",
        ["created_at", "queue_id"],
        postgresql_where=sa.text("status = 'pending'"),
    )
    op.drop_index("ix_mint_queue_pending_claim_order", table_name="mint_queue")
    op.drop_column("mint_queue", "settle_deadline")

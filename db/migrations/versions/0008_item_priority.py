"""Give queue items a priority, and batch the highest first

An operator raises (or lowers) an item's priority; batches claim by priority, then settle
deadline, then arrival, so the claim order's index leads with it. Adding a column with a
constant default rewrites nothing; the index is rebuilt.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

# As db.models.MAX_PRIORITY when this was written.
MAX_PRIORITY = 1000


def upgrade() -> None:
    op.add_column(
        "mint_queue", sa.Column("priority", sa.Integer(), nullable=False, server_default="0")
    )
    op.create_check_constraint(
        op.f("ck_mint_queue_priority"),
        "mint_queue",
        f"priority BETWEEN {-MAX_PRIORITY} AND {MAX_PRIORITY}",
    )
    op.drop_index("ix_mint_queue_pending_claim_order", table_name="mint_queue")
    op.create_index(
        "ix_mint_queue_pending_claim_order",
        "mint_queue",
        [
            sa.text("priority DESC"),
            sa.text("settle_deadline ASC NULLS LAST"),
            "created_at",
            "queue_id",
        ],
        postgresql_where=sa.text("status = 'pending'"),
    )


def downgrade() -> None:
    op.drop_index("ix_mint_queue_pending_claim_order", table_name="mint_queue")
    op.create_index(
        "ix_mint_queue_pending_claim_order",
        "mint_queue",
        [sa.text("settle_deadline ASC NULLS LAST"), "created_at", "queue_id"],
        postgresql_where=sa.text("status = 'pending'"),
    )
    op.drop_constraint(op.f("ck_mint_queue_priority"), "mint_queue", type_="check")
    op.drop_column("mint_queue", "priority")

"""Index the failed items whose authorization was never settled by us

The nonce owner looks among them, every few seconds, for authorizations someone settled on
chain after their item failed; without an index that would scan the whole queue.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        "ix_mint_queue_unsettled_failures",
        "mint_queue",
        ["settle_deadline"],
        postgresql_where=sa.text("status = 'failed' AND payment_tx_hash IS NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_mint_queue_unsettled_failures", table_name="mint_queue")

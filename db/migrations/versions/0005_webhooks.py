"""Webhooks: a callback URL per queue item, and the delivery state of each webhook

The delivery state has a table of its own rather than columns on `mint_queue`: recording an
attempt must not touch the item's row, whose `updated_at` (kept by a trigger) clients see as
the time the mint last changed.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import UUID

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("mint_queue", sa.Column("callback_url", sa.Text))
    op.create_check_constraint(
        op.f("ck_mint_queue_callback_url_format"),
        "mint_queue",
        "callback_url ~ '^https?://' AND length(callback_url) <= 2048",
    )
    op.create_table(
        "webhook_deliveries",
        # No foreign key: like mint_history, the record outlives what it is about.
        sa.Column("queue_id", UUID(as_uuid=True), nullable=False),
        sa.Column("event", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("last_error", sa.Text),
        sa.Column("delivered_at", sa.DateTime(timezone=True)),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False,
                  server_default=sa.func.now()),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False,
                  server_default=sa.func.now()),
        sa.CheckConstraint("event IN ('completed', 'failed')",
                           name=op.f("ck_webhook_deliveries_event")),
        sa.CheckConstraint("attempts >= 0", name=op.f("ck_webhook_deliveries_attempts")),
        sa.PrimaryKeyConstraint("queue_id", "event", name="pk_webhook_deliveries"),
    )  # fmt: skip
    op.execute(
        "CREATE TRIGGER trg_webhook_deliveries_updated_at BEFORE UPDATE ON webhook_deliveries "
        "FOR EACH ROW EXECUTE FUNCTION set_updated_at()"
    )


def downgrade() -> None:
    op.drop_table("webhook_deliveries")
    op.drop_constraint(op.f("ck_mint_queue_callback_url_format"), "mint_queue", type_="check")
    op.drop_column("mint_queue", "callback_url")

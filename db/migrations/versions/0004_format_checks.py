"""Let the database refuse malformed addresses and payment ids in the queue

A row the worker cannot encode would fail every batch it is claimed into; no such row can come
from the API, and with these checks none can come from anywhere else either.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-24
"""

from __future__ import annotations

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

CHECKS = {
    "ck_mint_queue_payer_format": "payer ~ '^0x[0-9a-fA-F]{40}$'",
    "ck_mint_queue_recipient_format": "recipient ~ '^0x[0-9a-fA-F]{40}$'",
    "ck_mint_queue_payment_id_format": "payment_id ~ '^0x[0-9a-f]{64}$'",
}


def upgrade() -> None:
    for name, condition in CHECKS.items():
        op.create_check_constraint(op.f(name), "mint_queue", condition)


def downgrade() -> None:
    for name in CHECKS:
        op.drop_constraint(op.f(name), "mint_queue", type_="check")

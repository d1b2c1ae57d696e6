"""Let the chain size batches: max_batch_size and max_in_flight become caps, 2000 and 64

The nonce owner now sizes each batch and the number waiting to be mined to what the chain's
blocks take, so these two settings only cap that. Their old defaults (50 items, 3 batches)
held the queue to a small part of what a block takes; rows an operator changed are left alone.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

# (key, old default, new default, new description)
CHANGES = [
    (
        "max_batch_size",
        "50",
        "2000",
        "Most queue items in one batch; batches are otherwise sized to the chain's blocks.",
    ),
    (
        "max_in_flight",
        "3",
        "64",
        "Most batches awaiting confirmation; otherwise as many as the next blocks take.",
    ),
]
OLD_DESCRIPTIONS = {
    "max_batch_size": "Most queue items in one batchMint transaction.",
    "max_in_flight": "Batches that may wait for confirmation at consecutive nonces.",
}

_SET = sa.text(
    "UPDATE system_settings SET value = :new, description = :description "
    "WHERE key = :key AND value = :old"
)
_DESCRIBE = sa.text("UPDATE system_settings SET description = :description WHERE key = :key")


def upgrade() -> None:
    for key, old, new, description in CHANGES:
        op.execute(_SET.bindparams(key=key, old=old, new=new, description=description))
        op.execute(_DESCRIBE.bindparams(key=key, description=description))


def downgrade() -> None:
    for key, old, new, _ in CHANGES:
        op.execute(_SET.bindparams(key=key, old=new, new=old, description=OLD_DESCRIPTIONS[key]))
        op.execute(_DESCRIBE.bindparams(key=key, description=OLD_DESCRIPTIONS[key]))

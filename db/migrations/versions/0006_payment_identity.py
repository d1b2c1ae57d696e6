"""Payment ids follow the money: custom and facilitator-settled items get their canonical id

Before this revision a custom payment was identified by its transaction hash, and an x402
payment a remote facilitator settled by the settlement's hash, so the same money presented
two ways had two ids. From here an EIP-3009 authorization is `(chain, USDC, from, nonce)`
wherever it is found, and a plain transfer `(chain, USDC, tx, log index)`
(`mintq.payments`). Rows that carry an old-style id are given their canonical one; telling
which needs the receipts, so this revision reads the chain (`RPC_URL`, `USDC_ADDRESS`,
`PAY_TO`, as the app does) when, and only when, such rows exist. It applies `mintq.payments`'
own rules, imported only then: a second copy of what identifies a payment here could drift
from the one intake uses.

Two old rows that turn out to be one payment were minted twice before this fix. The first
keeps the canonical id; the later one gets an id of its own that no payment can have, and an
error that names the first, so the operator can see what was lost.

Drain the queue first (pause, let in-flight batches confirm): an item in a batch already
signed carries its old id inside the signed transaction.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06
"""

from __future__ import annotations

import uuid
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_OLD_STYLE = sa.text(
    "SELECT queue_id, payment_id, payment_type, payer, payment_tx_hash, payment_payload,"
    " created_at FROM mint_queue"
    " WHERE payment_type = 'custom' OR (payment_type = 'x402' AND payment_id = payment_tx_hash)"
    " ORDER BY created_at, queue_id"
)


def upgrade() -> None:
    connection = op.get_bind()
    rows = connection.execute(_OLD_STYLE).mappings().all()
    if not rows:
        return
    new_ids = canonical_ids(rows)
    # Ids that rows already carry, and the item each belongs to.
    first_of: dict[str, str] = {
        payment_id: str(queue_id)
        for queue_id, payment_id in connection.execute(
            sa.text("SELECT queue_id, payment_id FROM mint_queue WHERE NOT (queue_id = ANY(:ids))"),
            {"ids": [r["queue_id"] for r in rows]},
        )
    }
    for row in rows:
        queue_id, new_id = row["queue_id"], new_ids[row["queue_id"]]
        error = None
        if new_id in first_of:
            error = (
                f"the same payment as item {first_of[new_id]}: minted twice before revision 0006"
            )
            new_id = duplicate_id(queue_id)
        else:
            first_of[new_id] = str(queue_id)
        params = {"queue_id": queue_id, "payment_id": new_id, "error": error}
        connection.execute(
            sa.text(
                "UPDATE mint_queue SET payment_id = :payment_id,"
                " error = COALESCE(:error, error) WHERE queue_id = :queue_id"
            ),
            params,
        )
        connection.execute(
            sa.text("UPDATE mint_history SET payment_id = :payment_id WHERE queue_id = :queue_id"),
            params,
        )


def canonical_ids(rows: Any) -> dict[uuid.UUID, str]:
    """The canonical payment id of each old-style row, read from the chain."""
    from mintq.chain import Chain
    from mintq.eip3009 import Authorization
    from mintq.payments import authorization_id, identify_transfer
    from mintq.settings import Settings

    chain = Chain(Settings.from_env())
    ids = {}
    for row in rows:
        payload = row["payment_payload"] or {}
        if row["payment_type"] == "x402" and "authorization" in payload:
            auth = Authorization.from_json(payload["authorization"])
            ids[row["queue_id"]] = authorization_id(
                chain.chain_id, chain.usdc.address, auth.sender, auth.nonce
            )
        else:
            ids[row["queue_id"]] = identify_transfer(chain, row["payment_tx_hash"], row["payer"])
    return ids


def duplicate_id(queue_id: uuid.UUID) -> str:
    from mintq.eip3009 import keccak256

    return "0x" + keccak256(b"mintq.payment.duplicate" + queue_id.bytes).hex()


def downgrade() -> None:
    # Old-style ids cannot be restored without the chain, and are what let one payment be
    # minted twice; going back keeps the canonical ids, which the old code reads as opaque.
    pass

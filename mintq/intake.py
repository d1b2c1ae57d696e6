"""Intake: a presented payment becomes one queue item, once, however often it is presented."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from sqlalchemy import Connection

from db.models import QueueStatus
from mintq import queue
from mintq.errors import MintqError
from mintq.payments import Payment, VerifiedPayment
from mintq.queue import ItemRow


class PayerLimit(Protocol):
    """A per-payer allowance: `check` refuses a payer already over it (counting nothing);
    `count` counts a verified payment and, with `refuse`, refuses it over the allowance."""

    def check(self, payer: str) -> None: ...

    def count(self, payer: str, *, refuse: bool) -> None: ...


@dataclass(frozen=True)
class Submission:
    item: ItemRow
    created: bool


def submit(
    connection: Connection,
    payment: Payment,
    limit: PayerLimit,
    callback_url: str | None = None,
) -> Submission:
    """Verify `payment` and queue it; a payment already queued gets its item back.

    Verification comes first, and the queue is read only where that changes the answer: a
    new payment costs one statement (the insert). A refused presentation of a payment that
    is already queued (over a rate limit, or an authorization its own batch has settled since)
    is answered with its item, since it is the same money; if that item failed uncharged and
    this presentation proves the money has moved since, the item is queued again as paid. A
    payment whose verification moves
    money (a remote facilitator settles it) is looked up before it is verified, so it is
    never settled twice.
    """
    if payment.settles and payment.payment_id is not None:
        existing = queue.find(connection, payment.payment_id)
        if existing is not None:
            return Submission(existing, created=False)
    verified: VerifiedPayment | None = None
    try:
        if payment.payer is not None:
            limit.check(payment.payer)
        verified = payment.verify()
        # Once money has moved, a refusal would strand it: count, but queue anyway.
        limit.count(verified.payer, refuse=not payment.settles)
    except MintqError:
        payment_id = verified.payment_id if verified is not None else payment.payment_id
        existing = queue.find(connection, payment_id) if payment_id is not None else None
        if existing is None:
            raise
        return Submission(existing, created=False)
    item, created = queue.enqueue(connection, verified, callback_url)
    if not created and item.status == QueueStatus.FAILED and verified.payment_tx_hash:
        # Its item failed uncharged, yet the money has moved since: mint it after all.
        item = queue.requeue_paid(connection, item.queue_id, verified.payment_tx_hash) or item
    return Submission(item, created)

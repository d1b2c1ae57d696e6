"""Intake: a presented payment becomes one queue item, once, however often it is presented."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol

from sqlalchemy import Connection

from db.models import QueueStatus
from mintq import queue, sale
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
    item, created = _queue(connection, verified, callback_url)
    if not created and item.status == QueueStatus.FAILED and verified.payment_tx_hash:
        # Its item failed uncharged, yet the money has moved since: mint it after all.
        item = queue.requeue_paid(connection, item.queue_id, verified.payment_tx_hash) or item
    return Submission(item, created)


def _queue(
    connection: Connection, verified: VerifiedPayment, callback_url: str | None
) -> tuple[ItemRow, bool]:
    """Queue the payment for what the sale allows of it.

    An authorization not yet settled is refused under the sale's rules before any money moves.
    Money that has moved (a transfer, an authorization settled already) cannot be refused: it
    buys as many mints as its amount pays for and the rules allow, fewer on each refusal, down
    to none, and what it does not buy is owed back to the payer.
    """
    if not verified.moved:
        return queue.enqueue(connection, verified, callback_url)
    quantity = verified.quantity
    reason = "The transfer is less than the price of a mint; it is refunded."
    while quantity > 0:
        try:
            return queue.enqueue(connection, replace(verified, quantity=quantity), callback_url)
        except sale.SaleRefusal as refusal:
            quantity = _fewer(connection, quantity, refusal)
            reason = f"{refusal.message} What it could not buy is refunded."
    return queue.enqueue(
        connection, replace(verified, quantity=0), callback_url, refund_reason=reason
    )


def _fewer(connection: Connection, quantity: int, refusal: sale.SaleRefusal) -> int:
    """Fewer mints than `quantity`, as many as the refusal says might still be allowed."""
    detail = next(iter(refusal.details.values()), None)
    allowed = 0
    if refusal.code == "quantity_too_large":
        allowed = int(detail or 1)
    elif refusal.code == "sold_out":
        allowed = int(detail or 0)
    elif refusal.code == "payer_limit_reached":
        limit = sale.load_rules(connection).max_per_payer
        allowed = 0 if limit is None else limit - int(detail or 0)
    return max(0, min(quantity - 1, allowed))

"""Operator actions on the queue and the operating settings, shared by the admin API and CLI.

Each function takes a session and leaves the commit to its caller. Items are locked
`FOR UPDATE` (waiting, never skipping) so an action and the nonce owner's claim
(`FOR UPDATE SKIP LOCKED`) never both act on one row: whichever locks first wins and the
other sees the result.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from db.models import (
    BATCH_IN_FLIGHT,
    MAX_PRIORITY,
    BatchMint,
    MintQueueItem,
    QueueStatus,
    RefundStatus,
    SystemSetting,
    WalletTransaction,
)
from mintq import sale
from mintq.errors import MintqError
from mintq.operating import parse_setting

CANCELLED = "cancelled by an operator"
# Batches whose transaction may still mine: their items must not be queued a second time.
MAX_BATCHES = 500


class ActionRefused(MintqError):
    """The item's state does not allow this action (the details carry its status)."""

    status = 409
    code = "conflict"


class InvalidSetting(MintqError):
    status = 400
    code = "invalid_setting"


def _locked_item(session: Session, queue_id: uuid.UUID) -> MintQueueItem:
    item = session.scalars(
        select(MintQueueItem)
        .where(MintQueueItem.queue_id == queue_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    ).one_or_none()
    if item is None:
        raise MintqError(
            "No such queue item.",
            code="queue_item_not_found",
            status=404,
            details={"queueId": str(queue_id)},
        )
    return item


def _refused(item: MintQueueItem, code: str, message: str, **details: Any) -> ActionRefused:
    return ActionRefused(
        message,
        code=code,
        details={"queueId": str(item.queue_id), "status": item.status, **details},
    )


def retry_item(
    session: Session,
    queue_id: uuid.UUID,
    *,
    settle_margin_seconds: int = 0,
    now: float | None = None,
) -> MintQueueItem:
    """Put a failed item back in the queue; its error and batch are cleared.

    `retry_count` is kept, so a retried item that reverts again fails at once: each operator
    retry buys one more attempt. Minting stays exactly-once: `MintToken` skips a payment id it
    has minted. An authorization that can no longer be settled (expired, or expiring within
    `settle_margin_seconds`) is refused: the payer was never charged, and the worker could
    only fail it again.
    """
    item = _locked_item(session, queue_id)
    if item.status != "failed":
        raise _refused(
            item, "not_retryable", f"Only a failed item can be retried, not {item.status}."
        )
    if item.refund_status in (RefundStatus.SENT, RefundStatus.CONFIRMED):
        raise _refused(
            item,
            "refund_sent",
            "The payment is being paid back to its payer: it cannot buy a mint any more.",
            refundStatus=item.refund_status,
        )
    if item.batch_id is not None:
        batch_status = session.scalar(
            select(BatchMint.status).where(BatchMint.batch_id == item.batch_id)
        )
        if batch_status in BATCH_IN_FLIGHT:
            raise _refused(
                item,
                "batch_in_flight",
                "The item's batch may still mine; retry once it is final.",
                batchId=str(item.batch_id),
            )
    valid_before = _unsettled_valid_before(item)
    if valid_before is not None:
        left = valid_before - (time.time() if now is None else now)
        if left <= settle_margin_seconds:
            raise _refused(
                item,
                "authorization_expired",
                "The payment authorization has expired (or is about to): it can no longer be "
                "settled. Nothing was charged; the payer must sign a new one.",
                validBefore=valid_before,
            )
    item.status = "pending"
    item.error = None
    item.batch_id = None
    # A refund not yet sent is owed no more: the payment buys its mint after all.
    item.refund_amount = item.refund_status = None
    session.flush()
    session.refresh(item)  # updated_at comes from a trigger
    return item


def _unsettled_valid_before(item: MintQueueItem) -> int | None:
    """validBefore of an EIP-3009 authorization this item still has to settle, if any."""
    if item.payment_tx_hash is not None or not item.payment_payload:
        return None
    authorization = item.payment_payload.get("authorization")
    if not isinstance(authorization, dict) or "validBefore" not in authorization:
        return None
    return int(authorization["validBefore"])


def cancel_item(session: Session, queue_id: uuid.UUID) -> MintQueueItem:
    """Take a pending item out of the queue before any batch claims it.

    The row lock waits for a claim in progress: if the worker claimed the item first, this
    sees `processing` and refuses. An item whose money has moved (a transfer, an authorization
    settled already) becomes `refunded` and its payer is owed the whole amount; an unsettled
    authorization is simply never submitted, so its item just fails, uncharged.
    """
    item = _locked_item(session, queue_id)
    if item.status != "pending":
        raise _refused(
            item, "not_cancellable", f"Only a pending item can be cancelled, not {item.status}."
        )
    moved = item.payment_tx_hash is not None
    item.status = QueueStatus.REFUNDED if moved else QueueStatus.FAILED
    item.error = CANCELLED
    session.flush()
    session.refresh(item)
    return item


def refund_item(session: Session, queue_id: uuid.UUID) -> MintQueueItem:
    """Pay a pending item's money back instead of minting: it becomes `refunded`.

    Only a pending item whose money has moved (a transfer, or an authorization settled
    already); an unsettled authorization has taken nothing, so there is nothing to pay back
    (cancel it instead).
    """
    item = _locked_item(session, queue_id)
    if item.status != "pending":
        raise _refused(
            item, "not_refundable", f"Only a pending item can be refunded, not {item.status}."
        )
    if item.payment_tx_hash is None:
        raise _refused(
            item,
            "nothing_to_refund",
            "This payment's authorization was never settled: nothing was charged. Cancel it.",
        )
    return cancel_item(session, queue_id)


def set_priority(session: Session, queue_id: uuid.UUID, priority: int) -> MintQueueItem:
    """Set a pending item's priority: batches claim the highest priority first.

    Only a pending item: a claimed one is already in a batch. Like a cancel, the row lock
    waits for a claim in progress and then sees `processing`.
    """
    if isinstance(priority, bool) or not isinstance(priority, int) or abs(priority) > MAX_PRIORITY:
        raise MintqError(
            f"priority must be a whole number from {-MAX_PRIORITY} to {MAX_PRIORITY}.",
            code="invalid_priority",
            status=400,
            details={"priority": priority},
        )
    item = _locked_item(session, queue_id)
    if item.status != "pending":
        raise _refused(
            item, "not_pending", f"Only a pending item's priority can be set, not {item.status}."
        )
    item.priority = priority
    session.flush()
    session.refresh(item)
    return item


def _stored(value: int | float | bool) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not value.is_integer():
        return repr(value)
    return str(int(value))


def _reason(key: str, raw: str, exc: ValueError) -> str:
    """parse_setting's message, or a readable one where Python's int()/float() spoke."""
    message = str(exc)
    if message.startswith(key) or message.startswith("unknown setting"):
        return message
    kinds = {"batch_interval_seconds": "a number"}
    return f"{key} must be {kinds.get(key, 'an integer')}, got {raw!r}"


def _write_settings(session: Session, values: dict[str, str]) -> dict[str, tuple[str | None, str]]:
    """Store values (already validated); returns key -> (old, new) for the audit log."""
    old = {
        row.key: row.value
        for row in session.scalars(
            select(SystemSetting).where(SystemSetting.key.in_(values)).with_for_update()
        )
    }
    for key, value in values.items():
        stmt = insert(SystemSetting).values(key=key, value=value)
        session.execute(
            stmt.on_conflict_do_update(index_elements=[SystemSetting.key], set_={"value": value})
        )
    session.expire_all()
    return {key: (old.get(key), value) for key, value in values.items()}


def set_paused(session: Session, paused: bool) -> dict[str, tuple[str | None, str]]:
    """Stop or restart batching from the worker's next tick; items in flight still confirm."""
    return _write_settings(session, {"paused": _stored(paused)})


def read_settings(session: Session) -> dict[str, SystemSetting]:
    """Every row of system_settings, by key (values as stored)."""
    return {
        row.key: row for row in session.scalars(select(SystemSetting).order_by(SystemSetting.key))
    }


def update_settings(session: Session, changes: dict[str, str]) -> dict[str, tuple[str | None, str]]:
    """Validate every change with `parse_setting`, then store them all, or none.

    Values are stored normalized (`TRUE` as `true`, ` 5 ` as `5`, `10.0` seconds as `10`).
    Returns key -> (old, new).
    """
    values: dict[str, str] = {}
    errors: dict[str, list[str]] = {}
    for key, raw in changes.items():
        try:
            if key in sale.SETTING_KEYS:
                values[key] = sale.normalize(key, raw)
            else:
                values[key] = _stored(parse_setting(key, raw))
        except ValueError as exc:
            errors[key] = [_reason(key, raw, exc)]
    if not errors and {"sale_starts_at", "sale_ends_at"} & set(values):
        stored = {key: row.value for key, row in read_settings(session).items()}
        try:
            sale.check_window({**stored, **values})
        except ValueError as exc:
            errors["sale_ends_at"] = [str(exc)]
    if errors:
        first = next(iter(errors))
        raise InvalidSetting(
            f"Invalid setting {first}: {errors[first][0]}. Nothing was changed.",
            details=errors,
        )
    return _write_settings(session, values)


@dataclass(frozen=True)
class BatchView:
    """A batch and every transaction signed for its nonce (original first, then replacements)."""

    batch: BatchMint
    transactions: list[WalletTransaction]


def list_batches(
    session: Session, status: str | None = None, limit: int = 50, before: int | None = None
) -> list[BatchView]:
    """Batches newest first (by nonce); `before` is a nonce, to page back from."""
    query = (
        select(BatchMint).order_by(BatchMint.nonce.desc()).limit(min(max(limit, 1), MAX_BATCHES))
    )
    if status is not None:
        query = query.where(BatchMint.status == status)
    if before is not None:
        query = query.where(BatchMint.nonce < before)
    batches = list(session.scalars(query))
    by_batch: dict[uuid.UUID, list[WalletTransaction]] = {b.batch_id: [] for b in batches}
    if batches:
        for tx in session.scalars(
            select(WalletTransaction)
            .where(WalletTransaction.batch_id.in_(by_batch))
            .order_by(WalletTransaction.created_at, WalletTransaction.tx_hash)
        ):
            assert tx.batch_id is not None
            by_batch[tx.batch_id].append(tx)
    return [BatchView(b, by_batch[b.batch_id]) for b in batches]

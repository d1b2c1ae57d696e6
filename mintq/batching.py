"""The nonce owner's work: claim queued items, send them in one batch transaction, confirm it,
write history.

Beat ticks `process_queue`; only the holder of the nonce lock does anything (see
`mintq.wallet` for how the wallet's transactions are fenced, written ahead, replaced and
reconciled). Confirmation (`confirm_batch`) is polled per batch by a chained task.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from eth_abi import decode as abi_decode
from eth_utils import event_abi_to_log_topic, to_checksum_address
from hexbytes import HexBytes
from redis import RedisError
from sqlalchemy import func, select
from sqlalchemy.orm import Session
from web3.exceptions import ContractLogicError, Web3RPCError
from web3.types import Nonce, TxParams, Wei

from db.models import (
    BATCH_IN_FLIGHT,
    BatchKind,
    BatchMint,
    MintHistory,
    MintQueueItem,
    QueueStatus,
)
from mintq import events, positions, queue, refunds
from mintq.chain import Chain, load_artifact
from mintq.eip3009 import (
    Authorization,
    describe_settlement_failure,
    is_used_authorization,
    normalize_signature,
)
from mintq.operating import OperatingSettings, load_operating_settings
from mintq.payments import authorization_state_call, find_settlement
from mintq.wallet import (
    LostLock,
    LowFunds,
    Minter,
    NonceLock,
    broadcast,
    crash_point,
    ensure_funds,
    market_fees,
    receipt_of_any,
    reconcile,
    replace_stuck,
    sign_and_record,
    take_nonce,
    transactions_of,
)

__all__ = ["LostLock", "Minter", "NonceLock", "confirm_batch", "process_queue"]

log = logging.getLogger(__name__)

ZERO_ADDRESS = "0x" + "00" * 20
# Gas per item assumed until confirmed batches have measured it (a settle-and-mint item).
DEFAULT_GAS_PER_ITEM = 100_000


@dataclass
class TickResult:
    """What one beat tick did: `owner` is False when another worker holds the nonce."""

    owner: bool
    sent: list[uuid.UUID] = field(default_factory=list)
    in_flight: list[uuid.UUID] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    paused: bool = False
    low_funds: bool = False


def process_queue(minter: Minter) -> TickResult:
    """One beat tick: if we can take the nonce lock, keep the wallet moving and send what is due.

    As owner: reconcile our nonces with the chain, replace stuck batches, then send batches
    while one is due (a full batch waiting, or items waiting for `batch_interval_seconds`) and
    fewer than `max_in_flight` wait for confirmation.
    """
    lock = minter.lock()
    if not lock.acquire():
        return TickResult(owner=False)
    try:
        return _run_as_owner(minter, lock)
    finally:
        lock.release()


def _run_as_owner(minter: Minter, lock: NonceLock) -> TickResult:
    result = TickResult(owner=True)
    reconcile(minter, lock)
    with minter.sessions() as session:
        positions.reconcile(minter.redis, session)
    requeue_settled_failures(minter)
    result.replaced = replace_stuck(minter, lock)
    while True:
        with minter.sessions() as session:
            ops = load_operating_settings(session)
            if ops.paused:
                result.paused = True
                break
            if not _batch_due(session, ops):
                break
        try:
            batch_id = send_batch(minter, lock, ops)
        except LowFunds:
            result.low_funds = True
            break
        if batch_id is None:
            break
        result.sent.append(batch_id)
    if not (result.paused or result.low_funds):
        try:
            refund_batch = refunds.send_refunds(minter, lock)
        except LowFunds:
            result.low_funds = True
        else:
            if refund_batch is not None:
                result.sent.append(refund_batch)
    with minter.sessions() as session:
        result.in_flight = list(
            session.scalars(
                select(BatchMint.batch_id)
                .where(BatchMint.status == "sent")
                .order_by(BatchMint.nonce)
            )
        )
    return result


# How often the nonce owner looks for failed items whose authorization was settled since.
RECHECK_FAILURES_SECONDS = 10
_RECHECK_KEY = "mintq:recheck-failures"


def requeue_settled_failures(minter: Minter) -> int:
    """Failed, uncharged authorizations that someone has settled to us since: queue them again
    as paid, so a payer charged after its item failed is still minted. Returns how many.

    An authorization stays valid until its `validBefore` even after its item failed (the
    payer's balance was short, an operator cancelled it, it neared expiry), and anyone may
    submit it. Intake requeues it when the money is presented; this finds it when nobody does.
    Checked at most every RECHECK_FAILURES_SECONDS, for authorizations not yet expired.
    """
    try:
        if not minter.redis.set(_RECHECK_KEY, "1", nx=True, ex=RECHECK_FAILURES_SECONDS):
            return 0
    except RedisError:
        pass  # check anyway: Postgres and the chain decide
    with minter.sessions() as session:
        failed = session.execute(
            select(MintQueueItem.queue_id, MintQueueItem.payment_payload).where(
                MintQueueItem.status == QueueStatus.FAILED,
                MintQueueItem.payment_tx_hash.is_(None),
                MintQueueItem.settle_deadline > func.now() - timedelta(minutes=1),
            )
        ).all()
    if not failed:
        return 0
    chain = minter.chain
    authorizations = [Authorization.from_json(p["authorization"]) for _, p in failed]
    states = chain.rpc(
        [
            (
                "eth_call",
                [
                    {
                        "to": chain.usdc.address,
                        "data": "0x" + authorization_state_call(a).hex(),
                    },
                    "latest",
                ],
            )
            for a in authorizations
        ]
    )
    requeued = 0
    for (queue_id, _), auth, state in zip(failed, authorizations, states, strict=True):
        if state is None or not int(state, 16):
            continue
        tx_hash = find_settlement(chain, auth)
        if tx_hash is None:
            continue  # cancelled, or spent elsewhere: it paid us nothing
        with minter.sessions() as session, session.begin():
            item = queue.requeue_paid(session, queue_id, tx_hash)
        if item is not None:
            requeued += 1
            change = events.ItemChange(item.queue_id, item.status, item.created_at, None)
            events.announce(minter.redis, [change])
            log.warning(
                "a failed authorization was settled on chain since; requeued as paid",
                extra={"queueId": str(queue_id), "txHash": tx_hash},
            )
    return requeued


def _batch_due(session: Session, ops: OperatingSettings) -> bool:
    in_flight = session.scalar(
        select(func.count()).select_from(BatchMint).where(BatchMint.status.in_(BATCH_IN_FLIGHT))
    )
    if (in_flight or 0) >= ops.max_in_flight:
        return False
    pending = session.scalar(
        select(func.count()).select_from(MintQueueItem).where(MintQueueItem.status == "pending")
    )
    if not pending:
        return False
    if pending >= ops.max_batch_size:
        return True
    last = session.scalar(select(func.max(BatchMint.created_at)))
    if last is None:
        return True
    return (datetime.now(UTC) - last).total_seconds() >= ops.batch_interval_seconds


def max_gas_per_transaction(minter: Minter) -> int:
    """The most gas one batch may ask for: half a block, so that two batches fit in every
    block, and no more than MAX_TX_GAS (chains that cap a transaction, EIP-7825)."""
    latest = minter.chain.call(lambda: minter.chain.w3.eth.get_block("latest"))
    return int(min(int(latest["gasLimit"]) // 2, minter.settings.max_tx_gas) * 0.98)


def gas_per_item(session: Session) -> int:
    """Measured gas per item: the most expensive recent confirmed batch, per item."""
    measured = session.scalar(
        select(func.max(BatchMint.gas_used / BatchMint.size)).where(
            BatchMint.batch_id.in_(
                select(BatchMint.batch_id)
                .where(
                    BatchMint.status == "confirmed",
                    BatchMint.kind == BatchKind.MINT,
                    BatchMint.size > 0,
                )
                .order_by(BatchMint.confirmed_at.desc())
                .limit(20)
            )
        )
    )
    return int(measured) if measured else DEFAULT_GAS_PER_ITEM


def batch_limit(minter: Minter, session: Session, ops: OperatingSettings) -> int:
    """Items in the next batch: `max_batch_size`, and what fits under the gas cap."""
    per_item = gas_per_item(session) * minter.settings.gas_limit_multiplier
    by_gas = max(1, int(max_gas_per_transaction(minter) / per_item))
    return min(ops.max_batch_size, by_gas)


def send_batch(minter: Minter, lock: NonceLock, ops: OperatingSettings) -> uuid.UUID | None:
    """Claim pending items, write the signed batch ahead, broadcast it.

    Returns the batch id, or None when nothing was claimable or the batch would revert (items
    then stay pending and the reason is logged). Raises LowFunds (items stay pending) when the
    wallet cannot pay for it.
    """
    chain = minter.chain
    expire_unsettleable(minter)
    cap = max_gas_per_transaction(minter)
    with minter.sessions() as session, session.begin():
        items = list(
            session.scalars(
                select(MintQueueItem)
                .where(MintQueueItem.status == "pending")
                .order_by(*MintQueueItem.claim_order())
                .limit(batch_limit(minter, session, ops))
                .with_for_update(skip_locked=True)
            )
        )
        crash_point("after_claim")
        if not items:
            return None
        while True:
            call = batch_call(chain, items)
            try:
                gas = chain.call(lambda: call.estimate_gas({"from": minter.account.address}))  # noqa: B023
            except ContractLogicError as exc:
                # The contract skips bad items instead of reverting, so a revert here is
                # systemic (a revoked minter role, a paused token): burning the items' retries
                # would fail paid requests for an operator problem. Keep them pending.
                log.error("batch would revert; items stay pending: %s", exc)
                return None
            gas_limit = int(gas * minter.settings.gas_limit_multiplier)
            if gas_limit <= cap or len(items) == 1:
                break
            # Heavier items than measured: keep what fits, and estimate again.
            items = items[: max(1, min(len(items) - 1, len(items) * cap // gas_limit))]
        fees = market_fees(chain)
        ensure_funds(minter, gas_limit * fees.max_fee)
        wallet = take_nonce(minter, session)
        params: TxParams = call.build_transaction(
            {
                "from": minter.account.address,
                "chainId": chain.chain_id,
                "nonce": Nonce(wallet.next_nonce),
                "gas": gas_limit,
                "maxFeePerGas": Wei(fees.max_fee),
                "maxPriorityFeePerGas": Wei(fees.priority),
            }
        )
        batch_id = uuid.uuid4()
        session.add(
            BatchMint(
                batch_id=batch_id,
                nonce=wallet.next_nonce,
                tx_hash="",
                raw_tx="",
                size=len(items),
                gas_limit=gas_limit,
                max_fee_per_gas=fees.max_fee,
                max_priority_fee_per_gas=fees.priority,
                status="signed",
            )
        )
        session.flush()
        tx = sign_and_record(minter, session, lock, params, kind="batch", batch_id=batch_id)
        batch = session.get(BatchMint, batch_id)
        assert batch is not None
        batch.tx_hash, batch.raw_tx = tx.tx_hash, tx.raw_tx
        for item in items:
            item.status = "processing"
            item.batch_id = batch_id
            item.error = None
        wallet.next_nonce += 1
        tx_hash = tx.tx_hash
        changed = events.changes(items)
    events.announce(minter.redis, changed)
    crash_point("after_write_ahead")
    broadcast(minter, lock, tx_hash)
    crash_point("after_broadcast")
    return batch_id


def needs_settlement(item: MintQueueItem) -> bool:
    """An authorization we still have to submit (not a transfer already on chain)."""
    return item.payment_type != "custom" and item.payment_tx_hash is None


def batch_call(chain: Chain, items: Sequence[MintQueueItem]) -> Any:
    """`batchMint` when every item is paid already, else `batchSettleAndMint`.

    Settling an authorization in the mint's own transaction charges the payer if and only if
    the tokens are minted; the contract skips (and reports) an item whose settlement fails.
    """
    if not any(needs_settlement(i) for i in items):
        return chain.token.functions.batchMint(
            [to_checksum_address(i.recipient) for i in items],
            [HexBytes(i.payment_id) for i in items],
            [i.quantity for i in items],
        )
    rows = []
    for item in items:
        row: tuple[Any, ...] = (
            to_checksum_address(item.recipient),
            HexBytes(item.payment_id),
            item.quantity,
            ZERO_ADDRESS, 0, 0, 0, bytes(32), b"",
        )  # fmt: skip
        if needs_settlement(item):
            assert item.payment_payload is not None
            auth = Authorization.from_json(item.payment_payload["authorization"])
            signature = normalize_signature(HexBytes(item.payment_payload["signature"]))
            row = (
                row[0], row[1], row[2], auth.sender, auth.value, auth.valid_after,
                auth.valid_before, auth.nonce, signature,
            )  # fmt: skip
        rows.append(row)
    return chain.token.functions.batchSettleAndMint(chain.usdc.address, chain.settings.pay_to, rows)


def expire_unsettleable(minter: Minter) -> int:
    """Fail pending authorizations that would expire before a batch could mine them.

    Nothing was charged: an expired authorization can no longer move the payer's money.
    """
    margin = minter.settings.settle_margin_seconds
    with minter.sessions() as session, session.begin():
        expired = list(
            session.scalars(
                select(MintQueueItem)
                .where(
                    MintQueueItem.status == "pending",
                    MintQueueItem.settle_deadline < func.now() + timedelta(seconds=margin),
                )
                .with_for_update(skip_locked=True)
            )
        )
        for item in expired:
            item.status = "failed"
            item.error = "the payment authorization expired before its batch; nothing was charged"
            log.warning("authorization expired in the queue", extra={"queueId": str(item.queue_id)})
        changed = events.changes(expired)
    events.announce(minter.redis, changed)
    return len(expired)


# --- confirmation --------------------------------------------------------------------------


@dataclass(frozen=True)
class ConfirmResult:
    """`waiting` means poll again later; anything else is final for this batch."""

    state: str  # waiting | confirmed | reverted | dropped | done
    batch_id: uuid.UUID


def _event_topic(chain: Chain, name: str) -> bytes:
    abi = next(
        e for e in load_artifact("MintToken")["abi"] if e["type"] == "event" and e["name"] == name
    )
    return bytes(event_abi_to_log_topic(abi))


@dataclass(frozen=True)
class BatchOutcome:
    """What the token reported per payment id in a confirmed batch receipt."""

    minted: set[str]
    skipped: set[str]
    settlement_failed: dict[str, bytes]
    # Past the token's own cap (`maxMints`): neither minted nor settled.
    sold_out: set[str] = field(default_factory=set)


def _batch_outcome(chain: Chain, receipt: Any) -> BatchOutcome:
    """Read Minted / MintSkipped / SettlementFailed, from our token's logs only."""
    minted_topic = _event_topic(chain, "Minted")
    skipped_topic = _event_topic(chain, "MintSkipped")
    failed_topic = _event_topic(chain, "SettlementFailed")
    sold_out_topic = _event_topic(chain, "SoldOut")
    outcome = BatchOutcome(set(), set(), {})
    for entry in receipt["logs"]:
        if to_checksum_address(entry["address"]) != chain.token.address or not entry["topics"]:
            continue
        topic = bytes(entry["topics"][0])
        payment_id = "0x" + bytes(entry["topics"][1]).hex()
        if topic == minted_topic:
            outcome.minted.add(payment_id)
        elif topic == skipped_topic:
            outcome.skipped.add(payment_id)
        elif topic == failed_topic:
            (reason,) = abi_decode(["bytes"], bytes(entry["data"]))
            outcome.settlement_failed[payment_id] = bytes(reason)
        elif topic == sold_out_topic:
            outcome.sold_out.add(payment_id)
    return outcome


def _earlier_mint_tx(chain: Chain, payment_id: str) -> tuple[str, int] | None:
    """The transaction that minted a payment id before (when a batch reports it skipped)."""
    logs = chain.call(
        lambda: chain.w3.eth.get_logs(
            {
                "address": chain.token.address,
                "fromBlock": 0,
                "toBlock": "latest",
                "topics": ["0x" + _event_topic(chain, "Minted").hex(), payment_id],
            }
        )
    )
    if not logs:
        return None
    return "0x" + bytes(logs[0]["transactionHash"]).hex(), int(logs[0]["blockNumber"])


def confirm_batch(minter: Minter, batch_id: uuid.UUID) -> ConfirmResult:
    """Check a sent batch once: finalize it at the configured depth, or report `waiting`."""
    chain = minter.chain
    w3 = chain.w3
    with minter.sessions() as session:
        batch = session.get(BatchMint, batch_id)
        if batch is None or batch.status not in BATCH_IN_FLIGHT:
            return ConfirmResult("done", batch_id)
        nonce = batch.nonce
        # The original and every replacement: a receipt for any of them settles the nonce.
        tx_hashes = [t.tx_hash for t in transactions_of(session, batch_id)]

    # Read the mined nonce before the receipts: if the nonce was used and none of our receipts
    # exists after that, another transaction took the nonce and ours can never be mined.
    mined_nonce = minter.nonce("latest")
    receipt = receipt_of_any(minter, tx_hashes)
    crash_point("during_confirm")
    if receipt is None:
        if mined_nonce > nonce:
            return _drop_batch(minter, batch_id)
        return ConfirmResult("waiting", batch_id)

    block_number = int(receipt["blockNumber"])
    head = chain.call(lambda: w3.eth.block_number)
    if head - block_number + 1 < minter.settings.confirmations:
        return ConfirmResult("waiting", batch_id)
    block = chain.call(lambda: w3.eth.get_block(block_number))
    if block["hash"] != receipt["blockHash"]:
        return ConfirmResult("waiting", batch_id)  # reorged out; wait for it to be re-mined

    if receipt["status"] == 1:
        return _finish_confirmed(minter, batch_id, receipt)
    return _finish_reverted(minter, batch_id, receipt)


def _locked_batch(session: Session, batch_id: uuid.UUID) -> BatchMint | None:
    batch = session.get(BatchMint, batch_id, with_for_update=True)
    return batch if batch is not None and batch.status in BATCH_IN_FLIGHT else None


def _batch_items(session: Session, batch_id: uuid.UUID) -> list[MintQueueItem]:
    return list(
        session.scalars(
            select(MintQueueItem)
            .where(MintQueueItem.batch_id == batch_id, MintQueueItem.status == "processing")
            .with_for_update()
        )
    )


def _finish_confirmed(minter: Minter, batch_id: uuid.UUID, receipt: Any) -> ConfirmResult:
    chain = minter.chain
    outcome = _batch_outcome(chain, receipt)
    tx_hash = "0x" + bytes(receipt["transactionHash"]).hex()
    block_number = int(receipt["blockNumber"])
    # Chain reads happen before the row locks are taken.
    earlier: dict[str, tuple[str, int] | None] = {}
    settled_elsewhere: dict[str, str | None] = {}
    with minter.sessions() as session:
        for item in _batch_items(session, batch_id):
            if item.payment_id in outcome.skipped:
                earlier[item.payment_id] = _earlier_mint_tx(chain, item.payment_id)
            reason = outcome.settlement_failed.get(item.payment_id)
            if reason is not None and is_used_authorization(reason):
                assert item.payment_payload is not None
                auth = Authorization.from_json(item.payment_payload["authorization"])
                settled_elsewhere[item.payment_id] = find_settlement(chain, auth)
    now = datetime.now(UTC)
    with minter.sessions() as session, session.begin():
        batch = _locked_batch(session, batch_id)
        if batch is None:
            return ConfirmResult("done", batch_id)
        items = _batch_items(session, batch_id)
        for item in items:
            context = {"queueId": str(item.queue_id), "batchId": str(batch_id)}
            first = earlier.get(item.payment_id)
            if item.payment_id in outcome.minted:
                _complete(session, item, batch_id, tx_hash, block_number, chain.mint_amount, now)
            elif first is not None:
                # Minted by an earlier transaction (e.g. before a crash): done, exactly once.
                _complete(session, item, batch_id, *first, chain.mint_amount, now)
            elif settled_elsewhere.get(item.payment_id):
                # Someone else submitted the authorization and it paid us: mint it as paid.
                item.payment_tx_hash = settled_elsewhere[item.payment_id]
                item.settle_deadline = None
                item.status = "pending"
                item.batch_id = None
                log.info(
                    "authorization was settled by someone else; requeued as paid", extra=context
                )
            elif item.payment_id in outcome.sold_out:
                # The token's cap is reached: an unsettled authorization was not charged, and
                # money already paid is owed back (the database records what).
                item.status = "refunded" if item.payment_tx_hash else "failed"
                item.error = "sold out: the token's own cap (maxMints) is reached"
                log.warning("sold out on chain", extra=context)
            elif item.payment_id in outcome.settlement_failed:
                item.status = "failed"
                item.error = (
                    describe_settlement_failure(outcome.settlement_failed[item.payment_id])
                    + "; nothing was charged"
                )
                log.warning("settlement failed: %s", item.error, extra=context)
            else:
                item.status = "failed"
                item.error = "the batch transaction did not mint this item"
                log.error("item missing from a confirmed batch", extra=context)
        items += refunds.finish_confirmed(minter, session, batch_id, receipt)
        batch.status = "confirmed"
        batch.tx_hash = tx_hash
        _settle_transactions(session, batch_id, tx_hash)
        batch.gas_used = int(receipt["gasUsed"])
        batch.block_number = block_number
        batch.confirmed_at = now
        log.info(
            "batch confirmed",
            extra={"batchId": str(batch_id), "txHash": tx_hash, "nonce": batch.nonce},
        )
        changed = events.changes(items)
    events.announce(minter.redis, changed)
    return ConfirmResult("confirmed", batch_id)


def _complete(
    session: Session,
    item: MintQueueItem,
    batch_id: uuid.UUID,
    tx_hash: str,
    block_number: int,
    mint_amount: int,
    now: datetime,
) -> None:
    """`mint_amount` is one mint's: the item bought `quantity` of them."""
    item.status = "completed"
    item.mint_tx_hash = tx_hash
    item.completed_at = now
    item.error = None
    session.add(
        MintHistory(
            queue_id=item.queue_id,
            payment_id=item.payment_id,
            payment_type=item.payment_type,
            payer=item.payer,
            recipient=item.recipient,
            amount_paid=item.amount_paid,
            mint_amount=mint_amount * item.quantity,
            batch_id=batch_id,
            mint_tx_hash=tx_hash,
            block_number=block_number,
            queued_at=item.created_at,
            completed_at=now,
        )
    )


def _revert_reason(minter: Minter, batch: BatchMint, receipt: Any) -> str:
    if int(receipt["gasUsed"]) >= batch.gas_limit:
        return f"out of gas (limit {batch.gas_limit})"
    tx = minter.chain.w3.eth.get_transaction(receipt["transactionHash"])
    try:
        minter.chain.w3.eth.call(
            {"from": tx["from"], "to": tx["to"], "data": tx["input"], "gas": tx["gas"]},
            block_identifier=int(receipt["blockNumber"]) - 1,
        )
    except ContractLogicError as exc:
        return f"reverted: {exc}"
    except Web3RPCError as exc:
        return f"reverted: {exc}"
    return "reverted (no reason given)"


def _finish_reverted(minter: Minter, batch_id: uuid.UUID, receipt: Any) -> ConfirmResult:
    with minter.sessions() as session:
        batch = session.get(BatchMint, batch_id)
        assert batch is not None
        reason = minter.chain.call(lambda: _revert_reason(minter, batch, receipt))
    with minter.sessions() as session, session.begin():
        locked = _locked_batch(session, batch_id)
        if locked is None:
            return ConfirmResult("done", batch_id)
        ops = load_operating_settings(session)
        requeued = _requeue(session, batch_id, reason, ops, count_retry=True)
        locked.status = "reverted"
        locked.error = reason
        locked.tx_hash = "0x" + bytes(receipt["transactionHash"]).hex()
        _settle_transactions(session, batch_id, locked.tx_hash)
        locked.gas_used = int(receipt["gasUsed"])
        locked.block_number = int(receipt["blockNumber"])
        locked.confirmed_at = datetime.now(UTC)
        log.warning("batch reverted: %s", reason, extra={"batchId": str(batch_id)})
        changed = events.changes(requeued)
    events.announce(minter.redis, changed)
    return ConfirmResult("reverted", batch_id)


def _drop_batch(minter: Minter, batch_id: uuid.UUID) -> ConfirmResult:
    """Another transaction used this batch's nonce: ours can never mine, so requeue its items."""
    with minter.sessions() as session, session.begin():
        batch = _locked_batch(session, batch_id)
        if batch is None:
            return ConfirmResult("done", batch_id)
        reason = f"nonce {batch.nonce} was used by another transaction"
        ops = load_operating_settings(session)
        requeued = _requeue(session, batch_id, reason, ops, count_retry=False)
        batch.status = "failed"
        batch.error = reason
        _settle_transactions(session, batch_id, None)
        log.warning(reason, extra={"batchId": str(batch_id), "nonce": batch.nonce})
        changed = events.changes(requeued)
    events.announce(minter.redis, changed)
    return ConfirmResult("dropped", batch_id)


def _settle_transactions(session: Session, batch_id: uuid.UUID, mined: str | None) -> None:
    """The mined transaction of a batch's nonce is 'mined'; its siblings can never be."""
    for tx in transactions_of(session, batch_id):
        tx.status = "mined" if tx.tx_hash == mined else "failed"


def _requeue(
    session: Session,
    batch_id: uuid.UUID,
    reason: str,
    ops: OperatingSettings,
    *,
    count_retry: bool,
) -> list[MintQueueItem]:
    items = _batch_items(session, batch_id)
    for item in items:
        if count_retry:
            item.retry_count += 1
        item.error = reason
        item.batch_id = None
        if item.retry_count <= ops.max_retries:
            item.status = "pending"
        else:
            # Failed for good: money already paid (a transfer) is owed back.
            item.status = "refunded" if item.payment_tx_hash else "failed"
    # A refund batch that will not be mined: its refunds are owed again.
    return items + refunds.release(session, batch_id)

"""The nonce owner's work: claim queued items, send one batchMint, confirm it, write history.

Exactly one process at a time owns the hot wallet's nonce (a Redis lock with a token). The
nonce itself lives in Postgres (`hot_wallets`) and advances in the same transaction that
writes the batch and its signed bytes ahead of the broadcast, so a lost lock or a crash can
neither reuse a nonce nor lose a transaction: the next owner rebroadcasts the same bytes.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from eth_abi import decode as abi_decode
from eth_account.signers.local import LocalAccount
from eth_utils import event_abi_to_log_topic, to_checksum_address
from hexbytes import HexBytes
from redis import Redis
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker
from web3.exceptions import ContractLogicError, TransactionNotFound, Web3RPCError
from web3.types import Nonce, TxParams, Wei

from db.models import BatchMint, HotWallet, MintHistory, MintQueueItem
from mintq.chain import Chain, load_artifact
from mintq.eip3009 import (
    Authorization,
    describe_settlement_failure,
    is_used_authorization,
    normalize_signature,
)
from mintq.operating import OperatingSettings, load_operating_settings
from mintq.payments import find_settlement
from mintq.settings import Settings

log = logging.getLogger(__name__)

IN_FLIGHT = ("signed", "sent")
ZERO_ADDRESS = "0x" + "00" * 20
# Node answers to a rebroadcast that mean "this nonce is taken": by us (the receipt will
# tell) or by another transaction (confirmation will notice the nonce moved past it).
_KNOWN_TX_ERRORS = ("already known", "already imported", "nonce too low", "known transaction")


class LostLock(RuntimeError):
    """The nonce lock expired or was taken over; the caller must stop touching the wallet."""


class NonceLock:
    """A Redis lock with an owner token: only the holder of the token may renew or release."""

    _RENEW = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end"  # noqa: E501
    _RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"  # noqa: E501

    def __init__(self, redis: Redis, key: str, ttl_seconds: int) -> None:
        self.redis = redis
        self.key = key
        self.ttl_ms = ttl_seconds * 1000
        self.token = uuid.uuid4().hex

    def acquire(self) -> bool:
        return bool(self.redis.set(self.key, self.token, nx=True, px=self.ttl_ms))

    def check(self) -> None:
        """Prove we still own the lock and extend it; raise `LostLock` otherwise."""
        if not self.redis.eval(self._RENEW, 1, self.key, self.token, self.ttl_ms):
            raise LostLock(f"lost the nonce lock {self.key}")

    def release(self) -> None:
        self.redis.eval(self._RELEASE, 1, self.key, self.token)


@dataclass
class Minter:
    """Everything the nonce owner works with, built once per worker process."""

    settings: Settings
    chain: Chain
    sessions: sessionmaker[Session]
    redis: Redis
    account: LocalAccount = field(repr=False)

    @property
    def address(self) -> str:
        return str(self.account.address)

    def lock(self) -> NonceLock:
        key = f"mintq:nonce-owner:{self.chain.chain_id}:{self.address.lower()}"
        return NonceLock(self.redis, key, self.settings.lock_ttl_seconds)


@dataclass
class TickResult:
    """What one beat tick did: `owner` is False when another worker holds the nonce."""

    owner: bool
    sent: list[uuid.UUID] = field(default_factory=list)
    in_flight: list[uuid.UUID] = field(default_factory=list)
    paused: bool = False


def process_queue(minter: Minter) -> TickResult:
    """One beat tick: if we can take the nonce lock, send every batch that is due.

    A batch is due when a full batch is waiting, or when items are waiting and
    `batch_interval_seconds` have passed since the previous batch. Up to `max_in_flight`
    batches may wait for confirmation at consecutive nonces.
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
    _rebroadcast_unmined(minter, lock)
    while True:
        with minter.sessions() as session:
            ops = load_operating_settings(session)
            if ops.paused:
                result.paused = True
                break
            if not _batch_due(session, ops):
                break
        batch_id = send_batch(minter, lock, ops)
        if batch_id is None:
            break
        result.sent.append(batch_id)
    with minter.sessions() as session:
        result.in_flight = list(
            session.scalars(
                select(BatchMint.batch_id)
                .where(BatchMint.status == "sent")
                .order_by(BatchMint.nonce)
            )
        )
    return result


def _batch_due(session: Session, ops: OperatingSettings) -> bool:
    in_flight = session.scalar(
        select(func.count()).select_from(BatchMint).where(BatchMint.status.in_(IN_FLIGHT))
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


def _take_nonce(minter: Minter, session: Session) -> HotWallet:
    """Lock the wallet row, reconciling it with the chain when it lags behind.

    Our nonces are all accounted for by batch rows (written with the nonce they use), so the
    chain's pending nonce can only be ahead of ours when something else used the key.
    """
    chain_nonce = minter.chain.call(
        lambda: minter.chain.w3.eth.get_transaction_count(minter.account.address, "pending")
    )
    wallet = session.scalars(
        select(HotWallet).where(HotWallet.address == minter.address).with_for_update()
    ).one_or_none()
    if wallet is None:
        wallet = HotWallet(address=minter.address, next_nonce=chain_nonce)
        session.add(wallet)
        session.flush()
    elif wallet.next_nonce < chain_nonce:
        log.warning(
            "hot wallet nonce moved outside mintq; catching up",
            extra={"nonce": wallet.next_nonce, "chainNonce": chain_nonce},
        )
        wallet.next_nonce = chain_nonce
    return wallet


def _fees(chain: Chain) -> tuple[int, int]:
    """EIP-1559 (maxFeePerGas, maxPriorityFeePerGas): room for the base fee to double, capped."""
    w3 = chain.w3
    base = int(chain.call(lambda: w3.eth.get_block("latest"))["baseFeePerGas"])
    priority = int(chain.call(lambda: w3.eth.max_priority_fee))
    cap = int(chain.settings.max_fee_gwei * 10**9)
    max_fee = min(2 * base + priority, cap)
    return max_fee, min(priority, max_fee)


def send_batch(minter: Minter, lock: NonceLock, ops: OperatingSettings) -> uuid.UUID | None:
    """Claim up to `max_batch_size` pending items, write the signed batch ahead, broadcast it.

    Returns the batch id, or None when nothing was claimable or the batch would revert
    (items then stay pending and the reason is logged).
    """
    chain = minter.chain
    expire_unsettleable(minter)
    with minter.sessions() as session, session.begin():
        items = list(
            session.scalars(
                select(MintQueueItem)
                .where(MintQueueItem.status == "pending")
                .order_by(*MintQueueItem.claim_order())
                .limit(ops.max_batch_size)
                .with_for_update(skip_locked=True)
            )
        )
        if not items:
            return None
        call = batch_call(chain, items)
        try:
            gas = chain.call(lambda: call.estimate_gas({"from": minter.account.address}))
        except ContractLogicError as exc:
            # Our contract skips bad items instead of reverting, so a revert here is systemic
            # (a revoked minter role, a paused token): burning the items' retries would fail
            # paid requests for an operator problem. Keep them pending and say why.
            log.error("batchMint would revert; items stay pending: %s", exc)
            return None
        max_fee, priority_fee = _fees(chain)
        wallet = _take_nonce(minter, session)
        params: TxParams = {
            "from": minter.account.address,
            "chainId": chain.chain_id,
            "nonce": Nonce(wallet.next_nonce),
            "gas": math.ceil(gas * minter.settings.gas_limit_multiplier),
            "maxFeePerGas": Wei(max_fee),
            "maxPriorityFeePerGas": Wei(priority_fee),
        }
        tx = call.build_transaction(params)
        lock.check()  # fence: only the owner signs
        signed = minter.account.sign_transaction(tx)
        batch = BatchMint(
            nonce=wallet.next_nonce,
            tx_hash="0x" + bytes(signed.hash).hex(),
            raw_tx="0x" + bytes(signed.raw_transaction).hex(),
            size=len(items),
            gas_limit=tx["gas"],
            max_fee_per_gas=max_fee,
            max_priority_fee_per_gas=priority_fee,
            status="signed",
        )
        session.add(batch)
        session.flush()
        for item in items:
            item.status = "processing"
            item.batch_id = batch.batch_id
            item.error = None
        wallet.next_nonce += 1
        batch_id = batch.batch_id
        log.info(
            "batch signed",
            extra={"batchId": str(batch_id), "nonce": batch.nonce, "txHash": batch.tx_hash},
        )
    _broadcast(minter, lock, batch_id)
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
        )
    rows = []
    for item in items:
        row: tuple[Any, ...] = (
            to_checksum_address(item.recipient),
            HexBytes(item.payment_id),
            ZERO_ADDRESS, 0, 0, 0, bytes(32), b"",
        )  # fmt: skip
        if needs_settlement(item):
            assert item.payment_payload is not None
            auth = Authorization.from_json(item.payment_payload["authorization"])
            signature = normalize_signature(HexBytes(item.payment_payload["signature"]))
            row = (
                row[0], row[1], auth.sender, auth.value, auth.valid_after, auth.valid_before,
                auth.nonce, signature,
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
    return len(expired)


def _broadcast(minter: Minter, lock: NonceLock, batch_id: uuid.UUID) -> None:
    """Send a written-ahead batch's exact bytes and mark it sent."""
    with minter.sessions() as session, session.begin():
        batch = session.get(BatchMint, batch_id, with_for_update=True)
        if batch is None or batch.status not in IN_FLIGHT:
            return
        lock.check()  # fence: only the owner sends
        raw = HexBytes(batch.raw_tx)
        try:
            minter.chain.call(lambda: minter.chain.w3.eth.send_raw_transaction(raw))
        except Web3RPCError as exc:
            if not any(known in str(exc).lower() for known in _KNOWN_TX_ERRORS):
                log.error(
                    "broadcast refused: %s",
                    exc,
                    extra={"batchId": str(batch_id), "nonce": batch.nonce},
                )
                raise
        if batch.status == "signed":
            batch.status = "sent"
            batch.sent_at = datetime.now(UTC)
        log.info(
            "batch sent",
            extra={"batchId": str(batch_id), "nonce": batch.nonce, "txHash": batch.tx_hash},
        )


def _rebroadcast_unmined(minter: Minter, lock: NonceLock) -> None:
    """After a crash or a node restart, put our written-ahead transactions back on the wire."""
    chain_nonce = minter.chain.call(
        lambda: minter.chain.w3.eth.get_transaction_count(minter.account.address, "latest")
    )
    with minter.sessions() as session:
        batch_ids: Sequence[uuid.UUID] = session.scalars(
            select(BatchMint.batch_id)
            .where(BatchMint.status.in_(IN_FLIGHT), BatchMint.nonce >= chain_nonce)
            .order_by(BatchMint.nonce)
        ).all()
    for batch_id in batch_ids:
        _broadcast(minter, lock, batch_id)


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


def _batch_outcome(chain: Chain, receipt: Any) -> BatchOutcome:
    """Read Minted / MintSkipped / SettlementFailed, from our token's logs only."""
    minted_topic = _event_topic(chain, "Minted")
    skipped_topic = _event_topic(chain, "MintSkipped")
    failed_topic = _event_topic(chain, "SettlementFailed")
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
        if batch is None or batch.status not in IN_FLIGHT:
            return ConfirmResult("done", batch_id)
        tx_hash, nonce = batch.tx_hash, batch.nonce

    # Read the mined nonce before the receipt: if the nonce was used and our receipt is still
    # missing after that, another transaction took the nonce and ours can never be mined.
    mined_nonce = chain.call(lambda: w3.eth.get_transaction_count(minter.account.address, "latest"))
    try:
        receipt = chain.call(lambda: w3.eth.get_transaction_receipt(tx_hash))  # type: ignore[arg-type]
    except TransactionNotFound:
        receipt = None
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
    return batch if batch is not None and batch.status in IN_FLIGHT else None


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
        for item in _batch_items(session, batch_id):
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
        batch.status = "confirmed"
        batch.tx_hash = tx_hash
        batch.gas_used = int(receipt["gasUsed"])
        batch.block_number = block_number
        batch.confirmed_at = now
        log.info(
            "batch confirmed",
            extra={"batchId": str(batch_id), "txHash": tx_hash, "nonce": batch.nonce},
        )
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
            mint_amount=mint_amount,
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
        _requeue(session, batch_id, reason, ops, count_retry=True)
        locked.status = "reverted"
        locked.error = reason
        locked.gas_used = int(receipt["gasUsed"])
        locked.block_number = int(receipt["blockNumber"])
        locked.confirmed_at = datetime.now(UTC)
        log.warning("batch reverted: %s", reason, extra={"batchId": str(batch_id)})
    return ConfirmResult("reverted", batch_id)


def _drop_batch(minter: Minter, batch_id: uuid.UUID) -> ConfirmResult:
    """Another transaction used this batch's nonce: ours can never mine, so requeue its items."""
    with minter.sessions() as session, session.begin():
        batch = _locked_batch(session, batch_id)
        if batch is None:
            return ConfirmResult("done", batch_id)
        reason = f"nonce {batch.nonce} was used by another transaction"
        _requeue(session, batch_id, reason, load_operating_settings(session), count_retry=False)
        batch.status = "failed"
        batch.error = reason
        log.warning(reason, extra={"batchId": str(batch_id), "nonce": batch.nonce})
    return ConfirmResult("dropped", batch_id)


def _requeue(
    session: Session,
    batch_id: uuid.UUID,
    reason: str,
    ops: OperatingSettings,
    *,
    count_retry: bool,
) -> None:
    for item in _batch_items(session, batch_id):
        if count_retry:
            item.retry_count += 1
        item.error = reason
        item.batch_id = None
        item.status = "failed" if item.retry_count > ops.max_retries else "pending"

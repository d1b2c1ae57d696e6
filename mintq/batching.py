"""The nonce owner's work: claim queued items, send them in one batch transaction, confirm it,
write history.

Beat ticks `process_queue`; only the holder of the nonce lock does anything (see
`mintq.wallet` for how the wallet's transactions are fenced, written ahead, replaced and
reconciled). Confirmation (`confirm_batch`) is polled per batch by a chained task.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import Any

from eth_abi import decode as abi_decode
from eth_abi import encode as abi_encode
from eth_utils import event_abi_to_log_topic, keccak
from eth_utils.abi import function_abi_to_4byte_selector, get_abi_input_types
from hexbytes import HexBytes
from redis import RedisError
from sqlalchemy import ColumnElement, and_, func, insert, or_, select, update
from sqlalchemy.orm import Session
from web3.exceptions import ContractLogicError, Web3RPCError
from web3.types import TxParams

from db.models import (
    BATCH_IN_FLIGHT,
    BatchKind,
    BatchMint,
    BatchStatus,
    MintHistory,
    MintQueueItem,
    PaymentType,
    QueueStatus,
)
from mintq import events, positions, queue, refunds, sale
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
    receipt_of_any,
    reconcile,
    replace_stuck,
    sign_batch,
    transactions_of,
)

__all__ = ["LostLock", "Minter", "NonceLock", "confirm_batch", "process_queue"]

log = logging.getLogger(__name__)

ZERO_ADDRESS = "0x" + "00" * 20


@dataclass
class TickResult:
    """What one beat tick did: `owner` is False when another worker holds the nonce."""

    owner: bool
    sent: list[uuid.UUID] = field(default_factory=list)
    in_flight: list[uuid.UUID] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    paused: bool = False
    low_funds: bool = False
    # The owner left because its time was up, with batches still waiting for the chain: the
    # next tick should start now rather than at the next beat.
    more: bool = False


# Called with the batches the chain has just mined, to confirm them now rather than on a poll.
MinedListener = Callable[[list[uuid.UUID]], None]


def process_queue(minter: Minter, on_mined: MinedListener | None = None) -> TickResult:
    """One beat tick: if we can take the nonce lock, keep the wallet moving and the blocks full.

    As owner: reconcile our nonces with the chain, replace stuck batches, then keep sending
    due batches (a full batch waiting, or items waiting for `batch_interval_seconds`) while the
    chain has room for them (`fill_blocks`), handing each batch to `on_mined` once mined.
    """
    lock = minter.lock()
    if not lock.acquire():
        return TickResult(owner=False)
    try:
        return _run_as_owner(minter, lock, on_mined)
    finally:
        lock.release()


def _run_as_owner(
    minter: Minter, lock: NonceLock, on_mined: MinedListener | None = None
) -> TickResult:
    result = TickResult(owner=True)
    reconcile(minter, lock)
    with minter.sessions() as session:
        positions.reconcile(minter.redis, session)
    requeue_settled_failures(minter)
    with minter.sessions() as session, session.begin():
        sale.fold_releases(session)
    result.replaced = replace_stuck(minter, lock)
    fill_blocks(minter, lock, result, on_mined)
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


# --- keeping the blocks full ---------------------------------------------------------------
#
# A node includes a transaction only while the block being built still has room for its whole
# gas limit, and takes our transactions in nonce order. So the owner sizes batches so that a
# whole number of them fills a block (`ChainShape.plan`), keeps about two blocks' worth of gas
# waiting to be mined (the block being built and the next one), and between blocks prepares
# the next batches instead of waiting for confirmations: what the chain has mined no longer
# counts against what may be sent.

# Blocks' worth of gas the owner keeps unmined: the block being built and the next one.
WINDOW_BLOCKS = 2
# Part of a batch's planned gas the model may fill: room for an item heavier than measured.
PLAN_SLACK = 0.98
# Gas of a batch apart from its items: the transaction, the call, the loop's setup.
BATCH_BASE_GAS = 30_000
# Gas per item of any kind assumed until confirmed batches have measured it (more than a
# settle-and-mint item takes).
DEFAULT_GAS_PER_ITEM = 100_000
# How many recent confirmed batches the gas model learns from.
MODEL_BATCHES = 30


@dataclass(frozen=True)
class ChainShape:
    """What the chain takes: gas per block, seconds between blocks (about 0 on a chain that
    mines each transaction as it arrives) and the most gas one transaction may ask for."""

    block_gas: int
    block_seconds: float
    tx_gas: int

    def plan(self, multiplier: float) -> tuple[int, int]:
        """(gas one batch should use, the gas limit it asks for).

        The fewest batches per block whose limits stay under the per-transaction cap: k of
        them fill the block when k-1 use their planned gas and the last still finds room for
        its whole limit.
        """
        k = 1
        while multiplier * self.block_gas / (k - 1 + multiplier) > self.tx_gas:
            k += 1
        use = self.block_gas / (k - 1 + multiplier) * PLAN_SLACK
        return int(use), int(use * multiplier)


def chain_shape(minter: Minter) -> ChainShape:
    """The block gas limit and the block time of the last few blocks, and MAX_TX_GAS."""
    w3 = minter.chain.w3
    latest = minter.chain.call(lambda: w3.eth.get_block("latest"))
    number, block_gas = int(latest["number"]), int(latest["gasLimit"])
    back = min(number, 10)
    seconds = 0.0
    if back:
        earlier = minter.chain.call(lambda: w3.eth.get_block(number - back))
        seconds = (int(latest["timestamp"]) - int(earlier["timestamp"])) / back
    return ChainShape(block_gas, seconds, min(block_gas, minter.settings.max_tx_gas))


@dataclass(frozen=True)
class GasModel:
    """Gas per item, measured from recent confirmed batches, by what the item costs: a paid
    item in `batchMint`, an authorization settled with its mint, and a paid item beside such
    authorizations in `batchSettleAndMint` (its row is larger)."""

    mint: int = DEFAULT_GAS_PER_ITEM
    settle: int = DEFAULT_GAS_PER_ITEM
    paid_beside: int = DEFAULT_GAS_PER_ITEM
    # Whether `mint` and `settle` come from confirmed batches (else they are the default).
    measured_mint: bool = False
    measured_settle: bool = False

    def knows(self, settling: int, paid: int) -> bool:
        """Whether every kind of item in such a batch has been measured."""
        return (not settling or self.measured_settle) and (not paid or self.measured_mint)

    def gas(self, settling: int, paid: int) -> int:
        if not settling:
            return BATCH_BASE_GAS + self.mint * paid
        return BATCH_BASE_GAS + self.settle * settling + self.paid_beside * paid

    def fit(self, items: Sequence[MintQueueItem], budget: int) -> list[MintQueueItem]:
        """The longest prefix of `items` whose batch should use at most `budget` gas (one item
        at least)."""
        settling = paid = 0
        for n, item in enumerate(items):
            if needs_settlement(item):
                settling += 1
            else:
                paid += 1
            if n and self.gas(settling, paid) > budget:
                return list(items[:n])
        return list(items)


def gas_model(session: Session) -> GasModel:
    """Learn the model from the last MODEL_BATCHES confirmed batches, the heaviest item of
    each kind; defaults until a kind has been measured."""
    recent = (
        select(BatchMint.batch_id)
        .where(
            BatchMint.status == "confirmed",
            BatchMint.kind == BatchKind.MINT,
            BatchMint.size > 0,
            BatchMint.gas_used.is_not(None),
        )
        .order_by(BatchMint.confirmed_at.desc())
        .limit(MODEL_BATCHES)
        .scalar_subquery()
    )
    settled_here = and_(
        MintQueueItem.payment_type != PaymentType.CUSTOM, MintQueueItem.payment_tx_hash.is_(None)
    )
    rows: list[tuple[int, int, int]] = session.execute(  # type: ignore[assignment]
        select(BatchMint.gas_used, BatchMint.size, func.count().filter(settled_here))
        .join(MintQueueItem, MintQueueItem.batch_id == BatchMint.batch_id)
        .where(BatchMint.batch_id.in_(recent))
        .group_by(BatchMint.batch_id, BatchMint.gas_used, BatchMint.size)
    ).all()
    mint = max(
        ((gas - BATCH_BASE_GAS) // size for gas, size, settling in rows if not settling),
        default=None,
    )
    settle = max(
        ((gas - BATCH_BASE_GAS) // size for gas, size, settling in rows if settling == size),
        default=None,
    )
    model = GasModel(
        mint=mint or DEFAULT_GAS_PER_ITEM,
        settle=settle or DEFAULT_GAS_PER_ITEM,
        measured_mint=mint is not None,
        measured_settle=settle is not None,
    )
    beside = max(
        (
            (gas - BATCH_BASE_GAS - model.settle * settling) // (size - settling)
            for gas, size, settling in rows
            if 0 < settling < size
        ),
        default=None,
    )
    # A paid row costs at least what it costs in `batchMint`, and less than a settled one.
    paid_beside = min(max(beside or int(model.mint * 1.1), model.mint), model.settle)
    return dataclasses.replace(model, paid_beside=paid_beside)


@dataclass(frozen=True)
class _Pipeline:
    """What the owner reads before each send: the chain's mined nonce, our batches it has
    mined, the gas of ours still unmined, the unconfirmed batches, the queue."""

    mined_nonce: int
    mined: list[uuid.UUID]
    unmined_gas: int
    # Of that, what was broadcast: a batch signed but not sent waits for the next tick's
    # reconcile, not for the chain.
    broadcast_unmined: bool
    unconfirmed: int
    pending: int
    last_batch_at: datetime | None
    last_reverted: bool


def _read_pipeline(minter: Minter, session: Session) -> _Pipeline:
    mined_nonce = minter.nonce("latest")
    flying = session.execute(
        select(BatchMint.batch_id, BatchMint.nonce, BatchMint.gas_limit, BatchMint.status).where(
            BatchMint.status.in_(BATCH_IN_FLIGHT)
        )
    ).all()
    pending = session.scalar(
        select(func.count()).select_from(MintQueueItem).where(MintQueueItem.status == "pending")
    )
    return _Pipeline(
        mined_nonce=mined_nonce,
        mined=[b for b, nonce, _, _ in flying if nonce < mined_nonce],
        unmined_gas=sum(gas for _, nonce, gas, _ in flying if nonce >= mined_nonce),
        broadcast_unmined=any(
            status == BatchStatus.SENT for _, nonce, _, status in flying if nonce >= mined_nonce
        ),
        unconfirmed=len(flying),
        pending=pending or 0,
        last_batch_at=session.scalar(
            select(func.max(BatchMint.created_at)).where(BatchMint.kind == BatchKind.MINT)
        ),
        last_reverted=session.scalar(
            select(BatchMint.status)
            .where(BatchMint.status.in_((BatchStatus.CONFIRMED, BatchStatus.REVERTED)))
            .order_by(BatchMint.confirmed_at.desc())
            .limit(1)
        )
        == BatchStatus.REVERTED,
    )


def fill_blocks(
    minter: Minter, lock: NonceLock, result: TickResult, on_mined: MinedListener | None
) -> None:
    """Send due batches while the next blocks have room for them.

    The owner stays (for at most half the lock's TTL, renewing it) while its batches wait to be
    mined, preparing the next batch as soon as a block frees room, and hands every batch the
    chain has mined to `on_mined`. It leaves when the queue has nothing due and nothing of ours
    waits for the chain; on a chain that mines each transaction as it arrives, at once.
    """
    expire_unsettleable(minter)
    shape = chain_shape(minter)
    use, limit = shape.plan(float(minter.settings.gas_limit_multiplier))
    stay_until = time.monotonic() + minter.settings.lock_ttl_seconds / 2
    reported: set[uuid.UUID] = set()
    prepared: PreparedBatch | None = None
    simulated_at: int | None = None  # the chain's mined nonce at the last simulation
    model, modelled_at = GasModel(), None  # learned again when the chain has mined more
    # The last batch sent was as large as the chain takes: the queue outran the blocks, and
    # what is left of that backlog goes at once rather than after the interval.
    draining = False
    try:
        while True:
            with minter.sessions() as session:
                ops = load_operating_settings(session)
                if ops.paused:
                    result.paused = True
                    return
                now = _read_pipeline(minter, session)
                if now.mined_nonce != modelled_at:
                    model, modelled_at = gas_model(session), now.mined_nonce
            fresh = [b for b in now.mined if b not in reported]
            if fresh and on_mined is not None:
                on_mined(fresh)
            reported.update(fresh)

            full = min(ops.max_batch_size, max(1, (use - BATCH_BASE_GAS) // model.settle))
            since_last = (
                (datetime.now(UTC) - now.last_batch_at).total_seconds()
                if now.last_batch_at is not None
                else math.inf
            )
            backlog = now.pending >= full or draining
            due_in = 0.0 if backlog else ops.batch_interval_seconds - since_last
            due = now.pending > 0 and due_in <= 0
            room = (
                now.unconfirmed < ops.max_in_flight
                and now.unmined_gas + limit <= WINDOW_BLOCKS * shape.block_gas
            )
            # The first batch after each block is simulated (and any after a revert): a
            # systemic revert stops the owner within a block, and the model is checked
            # against the chain's state once a block; the rest go at the model's limit.
            simulate = now.mined_nonce != simulated_at or now.last_reverted
            if due and room:
                batch = prepared or prepare_batch(
                    minter, ops, shape=shape, model=model, simulate=simulate
                )
                prepared = None
                if batch is None:
                    return
                if batch.simulated:
                    simulated_at = now.mined_nonce
                try:
                    batch_id = send_prepared(minter, lock, batch)
                except LowFunds:
                    result.low_funds = True
                    return
                result.sent.append(batch_id)
                draining = batch.fills_plan
                continue
            left = stay_until - time.monotonic()
            if now.broadcast_unmined:
                if left <= 0:
                    result.more = True
                    return
                if due and prepared is None:
                    # No room until the chain mines: have the next batch ready by then, and
                    # simulated here rather than after the block, when every moment counts
                    # (sent first after the block, it is that block's simulated batch).
                    prepared = prepare_batch(minter, ops, shape=shape, model=model, simulate=True)
                    if prepared is not None:
                        continue
                # Our batches wait for the chain: wake when it mines (or a block's time passes).
                _wait_for_mining(minter, now.mined_nonce, min(left, max(shape.block_seconds, 0.2)))
            elif now.pending and 0 < due_in <= min(minter.settings.beat_tick_seconds, left):
                time.sleep(due_in)  # due before the next tick: send it on time
            else:
                return
            lock.check()
    finally:
        if prepared is not None:
            prepared.release()


def _wait_for_mining(minter: Minter, mined_nonce: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(MINING_POLL_SECONDS)
        if minter.nonce("latest") != mined_nonce:
            return


# How often the owner asks the node whether its batches were mined while it waits.
MINING_POLL_SECONDS = 0.05


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
            change = events.ItemChange(
                item.queue_id, item.status, item.created_at, None, item.priority
            )
            events.announce(minter.redis, [change])
            log.warning(
                "a failed authorization was settled on chain since; requeued as paid",
                extra={"queueId": str(queue_id), "txHash": tx_hash},
            )
    return requeued


def send_batch(
    minter: Minter,
    lock: NonceLock,
    ops: OperatingSettings,
    *,
    shape: ChainShape | None = None,
    model: GasModel | None = None,
) -> uuid.UUID | None:
    """Claim pending items, write the signed batch ahead, broadcast it.

    Returns the batch id, or None when nothing was claimable or the batch would revert (items
    then stay pending and the reason is logged). Raises LowFunds (items stay pending) when the
    wallet cannot pay for it.
    """
    prepared = prepare_batch(minter, ops, shape=shape, model=model)
    return None if prepared is None else send_prepared(minter, lock, prepared)


@dataclass
class PreparedBatch:
    """A batch claimed and simulated but not signed: its items' rows stay locked in
    `session`'s open transaction until it is sent (or released, and they stay pending)."""

    session: Session
    items: list[MintQueueItem]
    data: bytes
    gas_limit: int
    clock: _Phases
    simulated: bool
    # More was pending than fits the plan's gas (not `max_batch_size`, not the queue's end).
    fills_plan: bool

    def release(self) -> None:
        self.session.rollback()
        self.session.close()


def prepare_batch(
    minter: Minter,
    ops: OperatingSettings,
    *,
    shape: ChainShape | None = None,
    model: GasModel | None = None,
    simulate: bool = True,
) -> PreparedBatch | None:
    """Claim what the gas model says fits the plan of `shape` (and `max_batch_size`), encode
    it, and simulate it at the model's gas limit (or ask the node's estimate when that ran out
    of gas). None when nothing was claimable or the batch would revert.

    With `simulate` False, a batch whose every kind of item the model has measured is sent at
    the model's limit without a simulation (see `fill_blocks`)."""
    chain = minter.chain
    clock = _Phases()
    multiplier = minter.settings.gas_limit_multiplier
    shape = shape or chain_shape(minter)
    use, cap = shape.plan(float(multiplier))
    session = minter.sessions()
    session.begin()
    prepared = None
    try:
        model = model or gas_model(session)
        cheapest = min(model.mint, model.settle, model.paid_beside)
        # One more than fits at the cheapest kind's gas: when it is cut, the queue held more
        # than the chain takes in one batch.
        claimable = max(1, min(ops.max_batch_size, (use - BATCH_BASE_GAS) // cheapest + 1))
        claimed = list(
            session.scalars(
                select(MintQueueItem)
                .where(MintQueueItem.status == "pending", _settles_in_time(minter))
                .order_by(*MintQueueItem.claim_order())
                .limit(claimable)
                .with_for_update(skip_locked=True)
            )
        )
        crash_point("after_claim")
        if not claimed:
            return None
        items = model.fit(claimed, use)  # the rest stay pending, unlocked at commit
        clock.lap("claim")
        settling = sum(needs_settlement(i) for i in items)
        data = batch_calldata(chain, items)
        paid = len(items) - settling
        gas_limit = min(int(model.gas(settling, paid) * multiplier), cap)
        simulate = simulate or not model.knows(settling, paid)
        try:
            simulated = not simulate or _runs_within(minter, data, gas_limit)
        except ContractLogicError as exc:
            # The contract skips bad items instead of reverting, so a revert here is systemic
            # (a revoked minter role, a paused token): burning the items' retries would fail
            # paid requests for an operator problem. Keep them pending.
            log.error("batch would revert; items stay pending: %s", exc)
            return None
        while not simulated:
            unsigned: TxParams = {"from": minter.account.address, "to": chain.token.address,
                                  "data": HexBytes(data)}  # fmt: skip
            try:
                gas = chain.call(lambda: chain.w3.eth.estimate_gas(unsigned))  # noqa: B023
            except ContractLogicError as exc:
                log.error("batch would revert; items stay pending: %s", exc)
                return None
            gas_limit = int(gas * multiplier)
            if gas_limit <= cap or len(items) == 1:
                break
            # Heavier items than measured: keep what fits, and estimate again.
            items = items[: max(1, min(len(items) - 1, len(items) * cap // gas_limit))]
            data = batch_calldata(chain, items)
        clock.lap("estimate")
        fills_plan = len(items) < len(claimed)
        prepared = PreparedBatch(session, items, data, gas_limit, clock, simulate, fills_plan)
        return prepared
    finally:
        if prepared is None:
            session.rollback()
            session.close()


def send_prepared(minter: Minter, lock: NonceLock, prepared: PreparedBatch) -> uuid.UUID:
    """Sign a prepared batch at the next nonce, commit it (write-ahead), broadcast it.

    Raises LowFunds (items stay pending) when the wallet cannot pay for it.
    """
    session, items, gas_limit, clock = (
        prepared.session, prepared.items, prepared.gas_limit, prepared.clock
    )  # fmt: skip
    clock.restart()  # a batch prepared ahead waited for room: not part of its sending
    try:
        batch = sign_batch(
            minter,
            lock,
            session,
            data=prepared.data,
            gas_limit=gas_limit,
            size=len(items),
            kind=BatchKind.MINT,
            on_funded=lambda: clock.lap("fees_funds_nonce"),
        )
        batch_id, tx_hash = batch.batch_id, batch.tx_hash
        # One statement for the whole batch (the ORM would flush an UPDATE per item).
        session.execute(
            update(MintQueueItem)
            .where(MintQueueItem.queue_id.in_([i.queue_id for i in items]))
            .values(status="processing", batch_id=batch_id, error=None)
        )
        changed = events.changes(items)
        clock.lap("sign")
        session.commit()
    finally:
        session.close()
    clock.lap("write_ahead")
    events.announce(minter.redis, changed)
    crash_point("after_write_ahead")
    broadcast(minter, lock, tx_hash)
    crash_point("after_broadcast")
    clock.lap("broadcast")
    log.info(
        "batch sent",
        extra={"batchId": str(batch_id), "txHash": tx_hash, "size": len(items),
               "gasLimit": gas_limit, "phasesMs": clock.laps},
    )  # fmt: skip
    return batch_id


class _Phases:
    """Milliseconds spent in each phase of sending a batch, for the logs (and bench.throughput)."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = round((now - self._last) * 1000, 1)
        self._last = now

    def restart(self) -> None:
        self._last = time.perf_counter()


def needs_settlement(item: MintQueueItem) -> bool:
    """An authorization we still have to submit (not a transfer already on chain)."""
    return item.payment_type != "custom" and item.payment_tx_hash is None


def _function(name: str) -> tuple[bytes, list[str]]:
    abi = next(
        e
        for e in load_artifact("MintToken")["abi"]
        if e["type"] == "function" and e["name"] == name
    )
    return function_abi_to_4byte_selector(abi), get_abi_input_types(abi)


# Encoded with eth_abi directly: web3's contract functions normalize and validate every
# argument first, which for a batch of a few hundred rows costs more than the node's work.
_BATCH_MINT = _function("batchMint")
_BATCH_SETTLE_AND_MINT = _function("batchSettleAndMint")


def batch_calldata(chain: Chain, items: Sequence[MintQueueItem]) -> bytes:
    """`batchMint` when every item is paid already, else `batchSettleAndMint`.

    Settling an authorization in the mint's own transaction charges the payer if and only if
    the tokens are minted; the contract skips (and reports) an item whose settlement fails.
    Addresses go in as their 20 bytes: intake checked them, and the queue's format checks
    keep them well formed, so the checksums are not computed again for every batch.
    """
    if not any(needs_settlement(i) for i in items):
        selector, types = _BATCH_MINT
        return selector + abi_encode(
            types,
            [
                [_address(i.recipient) for i in items],
                [HexBytes(i.payment_id) for i in items],
                [i.quantity for i in items],
            ],
        )
    rows = []
    for item in items:
        row: tuple[Any, ...] = (
            _address(item.recipient), HexBytes(item.payment_id), item.quantity,
            bytes(20), 0, 0, 0, bytes(32), b"",
        )  # fmt: skip
        if needs_settlement(item):
            assert item.payment_payload is not None
            auth = item.payment_payload["authorization"]
            signature = normalize_signature(HexBytes(item.payment_payload["signature"]))
            row = (
                row[0], row[1], row[2], _address(auth["from"]), int(auth["value"]),
                int(auth["validAfter"]), int(auth["validBefore"]), HexBytes(auth["nonce"]),
                signature,
            )  # fmt: skip
        rows.append(row)
    selector, types = _BATCH_SETTLE_AND_MINT
    pay = [_address(chain.usdc.address), _address(chain.settings.pay_to), rows]
    return selector + abi_encode(types, pay)


def _address(text: str) -> bytes:
    return bytes.fromhex(text.removeprefix("0x"))


_SETTLEMENT_OUT_OF_GAS = "0x" + keccak(text="SettlementOutOfGas()")[:4].hex()
# What nodes answer to a call that ran out of gas (anvil, geth and its forks).
_OUT_OF_GAS = ("out of gas", "outofgas", "gas required exceeds")


def _runs_within(minter: Minter, data: bytes, gas_limit: int) -> bool:
    """Whether the batch runs to the end with `gas_limit` (one simulation, where an estimate
    searches); False when it ran out of gas. A revert for any other reason is raised
    (ContractLogicError)."""
    chain = minter.chain
    simulated: TxParams = {"from": minter.account.address, "to": chain.token.address,
                           "data": HexBytes(data), "gas": gas_limit}  # fmt: skip
    try:
        chain.call(lambda: chain.w3.eth.call(simulated, "latest"))
    except ContractLogicError as exc:
        if _SETTLEMENT_OUT_OF_GAS in str(exc.data or "") or _SETTLEMENT_OUT_OF_GAS in str(exc):
            return False
        raise
    except Web3RPCError as exc:
        if any(known in str(exc).lower() for known in _OUT_OF_GAS):
            return False
        raise
    return True


def _settles_in_time(minter: Minter) -> ColumnElement[bool]:
    """Not an authorization that would expire before its batch is mined (see
    `expire_unsettleable`, which fails those)."""
    margin = timedelta(seconds=minter.settings.settle_margin_seconds)
    return or_(
        MintQueueItem.settle_deadline.is_(None),
        MintQueueItem.settle_deadline >= func.now() + margin,
    )


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
    return _token_event_topic(name)


@cache
def _token_event_topic(name: str) -> bytes:
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
        if entry["address"] != chain.token.address or not entry["topics"]:
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
    # Chain reads happen before the row locks are taken: only for items the batch did not
    # mint (skipped, or refused by USDC).
    earlier: dict[str, tuple[str, int] | None] = {}
    settled_elsewhere: dict[str, str | None] = {}
    if outcome.skipped or outcome.settlement_failed:
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
        minted_here: list[MintQueueItem] = []
        for item in items:
            context = {"queueId": str(item.queue_id), "batchId": str(batch_id)}
            first = earlier.get(item.payment_id)
            if item.payment_id in outcome.minted:
                minted_here.append(item)
            elif first is not None:
                # Minted by an earlier transaction (e.g. before a crash): done, exactly once.
                _complete(session, [item], batch_id, *first, chain.mint_amount, now)
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
        _complete(session, minted_here, batch_id, tx_hash, block_number, chain.mint_amount, now)
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
    items: Sequence[MintQueueItem],
    batch_id: uuid.UUID,
    tx_hash: str,
    block_number: int,
    mint_amount: int,
    now: datetime,
) -> None:
    """Complete items minted by `tx_hash`, and write their history: one UPDATE and one INSERT
    for the lot (the ORM would flush a statement per item). `mint_amount` is one mint's: an
    item bought `quantity` of them."""
    if not items:
        return
    session.execute(
        update(MintQueueItem)
        .where(MintQueueItem.queue_id.in_([item.queue_id for item in items]))
        .values(status="completed", mint_tx_hash=tx_hash, completed_at=now, error=None)
    )
    session.execute(
        insert(MintHistory),
        [
            {
                "queue_id": item.queue_id,
                "payment_id": item.payment_id,
                "payment_type": item.payment_type,
                "payer": item.payer,
                "recipient": item.recipient,
                "amount_paid": item.amount_paid,
                "mint_amount": mint_amount * item.quantity,
                "batch_id": batch_id,
                "mint_tx_hash": tx_hash,
                "block_number": block_number,
                "queued_at": item.created_at,
                "completed_at": now,
            }
            for item in items
        ],
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

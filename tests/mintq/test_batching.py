"""The nonce owner's batch and confirmation logic, called directly on real services."""

from __future__ import annotations

import dataclasses
import math
import time
import uuid
from decimal import Decimal

import pytest
from sqlalchemy import func, select, text

from conftest import MINT_AMOUNT, Chainside, paid
from db.models import BatchMint, HotWallet, MintHistory, MintQueueItem
from mintq import batching, queue
from mintq.batching import Minter
from mintq.payments import VerifiedPayment


def queue_payments(minter: Minter, n: int) -> list[VerifiedPayment]:
    """Queue `n` payments (the batching logic does not care how they were verified)."""
    payments = []
    with minter.sessions() as session:
        for _ in range(n):
            payment = paid()
            queue.enqueue(session, payment)
            payments.append(payment)
        session.commit()
    return payments


def set_setting(minter: Minter, key: str, value: str) -> None:
    with minter.sessions() as session, session.begin():
        session.execute(
            text("UPDATE system_settings SET value = :v WHERE key = :k"), {"k": key, "v": value}
        )


def confirm_all(minter: Minter, batch_ids: list) -> list[str]:  # type: ignore[type-arg]
    states = []
    for batch_id in batch_ids:
        result = batching.confirm_batch(minter, batch_id)
        states.append(result.state)
    return states


def statuses(minter: Minter) -> dict[str, int]:
    with minter.sessions() as session:
        rows = session.execute(
            select(MintQueueItem.status, func.count()).group_by(MintQueueItem.status)
        )
        return {status: count for status, count in rows}


def test_a_tick_batches_pending_items_and_confirmation_completes_them(
    minter: Minter, chainside: Chainside
) -> None:
    payments = queue_payments(minter, 7)
    result = batching.process_queue(minter)
    assert result.owner and len(result.sent) == 1
    assert statuses(minter) == {"processing": 7}

    assert confirm_all(minter, result.sent) == ["confirmed"]
    assert statuses(minter) == {"completed": 7}
    for payment in payments:
        assert chainside.mint_balance(payment.recipient) == MINT_AMOUNT
        assert chainside.minted(payment.payment_id)
    with minter.sessions() as session:
        batch = session.get(BatchMint, result.sent[0])
        assert batch is not None
        assert (batch.status, batch.size) == ("confirmed", 7)
        assert batch.gas_used and batch.block_number and batch.confirmed_at
        history = session.scalars(select(MintHistory)).all()
        assert sorted(h.payment_id for h in history) == sorted(p.payment_id for p in payments)
        assert {h.mint_tx_hash for h in history} == {batch.tx_hash}
        items = session.scalars(select(MintQueueItem)).all()
        assert {i.mint_tx_hash for i in items} == {batch.tx_hash}


def test_batches_respect_max_batch_size_and_consecutive_nonces(
    minter: Minter, chainside: Chainside
) -> None:
    set_setting(minter, "max_batch_size", "20")
    queue_payments(minter, 45)
    result = batching.process_queue(minter)
    # Two full batches go at once; the remaining 5 wait for the interval.
    assert len(result.sent) == 2
    assert statuses(minter) == {"processing": 40, "pending": 5}
    with minter.sessions() as session:
        batches = session.scalars(select(BatchMint).order_by(BatchMint.nonce)).all()
        assert [b.size for b in batches] == [20, 20]
        assert batches[1].nonce == batches[0].nonce + 1
        wallet = session.get(HotWallet, minter.address)
        assert wallet is not None and wallet.next_nonce == batches[1].nonce + 1
    assert confirm_all(minter, result.sent) == ["confirmed", "confirmed"]

    set_setting(minter, "batch_interval_seconds", "0")
    later = batching.process_queue(minter)
    assert len(later.sent) == 1
    confirm_all(minter, later.sent)
    assert statuses(minter) == {"completed": 45}


def test_interval_holds_a_partial_batch_until_due(minter: Minter) -> None:
    queue_payments(minter, 2)
    assert len(batching.process_queue(minter).sent) == 1  # first batch: nothing to wait for
    queue_payments(minter, 2)
    assert batching.process_queue(minter).sent == []  # interval (10 s) not over yet
    set_setting(minter, "batch_interval_seconds", "0")
    assert len(batching.process_queue(minter).sent) == 1


def test_only_the_lock_holder_sends(minter: Minter) -> None:
    queue_payments(minter, 3)
    other = minter.lock()
    assert other.acquire()
    try:
        result = batching.process_queue(minter)
        assert not result.owner and result.sent == []
        assert statuses(minter) == {"pending": 3}
    finally:
        other.release()
    assert len(batching.process_queue(minter).sent) == 1


def test_paused_queue_sends_nothing(minter: Minter) -> None:
    queue_payments(minter, 3)
    set_setting(minter, "paused", "true")
    result = batching.process_queue(minter)
    assert result.paused and result.sent == []
    assert statuses(minter) == {"pending": 3}


def test_max_in_flight_limits_unconfirmed_batches(minter: Minter) -> None:
    set_setting(minter, "max_batch_size", "2")
    set_setting(minter, "max_in_flight", "2")
    queue_payments(minter, 10)
    assert len(batching.process_queue(minter).sent) == 2
    assert statuses(minter) == {"processing": 4, "pending": 6}


def test_a_payment_id_minted_before_is_completed_once_with_the_earlier_tx(
    minter: Minter, chainside: Chainside
) -> None:
    [payment] = queue_payments(minter, 1)
    # The same payment id reached the chain earlier (say, before a crash lost the record).
    earlier = chainside.token.functions.batchMint(
        [payment.recipient], [bytes.fromhex(payment.payment_id[2:])], [1]
    )
    from deploy.pay import send_and_wait

    earlier_tx = send_and_wait(chainside.w3, minter.account, earlier)
    result = batching.process_queue(minter)
    assert confirm_all(minter, result.sent) == ["confirmed"]
    assert chainside.mint_balance(payment.recipient) == MINT_AMOUNT  # not twice
    with minter.sessions() as session:
        item = session.scalars(select(MintQueueItem)).one()
        assert (item.status, item.mint_tx_hash) == ("completed", earlier_tx)
        assert session.scalars(select(MintHistory)).one().mint_tx_hash == earlier_tx


def test_a_reverted_batch_requeues_items_then_fails_them_past_max_retries(
    minter: Minter, chainside: Chainside
) -> None:
    # A gas limit far below the estimate makes the batch run out of gas on chain.
    starved = dataclasses.replace(
        minter, settings=minter.settings.replace(gas_limit_multiplier=Decimal("0.6"))
    )
    set_setting(minter, "max_retries", "1")
    set_setting(minter, "batch_interval_seconds", "0")
    [payment] = queue_payments(minter, 1)

    first = batching.process_queue(starved)
    assert confirm_all(starved, first.sent) == ["reverted"]
    with minter.sessions() as session:
        item = session.scalars(select(MintQueueItem)).one()
        assert (item.status, item.retry_count) == ("pending", 1)
        assert "out of gas" in (item.error or "")
        batch = session.get(BatchMint, first.sent[0])
        assert batch is not None and batch.status == "reverted" and batch.error

    second = batching.process_queue(starved)
    assert confirm_all(starved, second.sent) == ["reverted"]
    with minter.sessions() as session:
        item = session.scalars(select(MintQueueItem)).one()
        assert (item.status, item.retry_count) == ("failed", 2)
    assert not chainside.minted(payment.payment_id)
    assert chainside.mint_balance(payment.recipient) == 0


def test_confirmation_waits_for_the_configured_depth(minter: Minter, chainside: Chainside) -> None:
    deep = dataclasses.replace(minter, settings=minter.settings.replace(confirmations=3))
    queue_payments(minter, 1)
    [batch_id] = batching.process_queue(deep).sent
    assert batching.confirm_batch(deep, batch_id).state == "waiting"
    chainside.w3.provider.make_request("anvil_mine", [2])  # type: ignore[arg-type]
    assert batching.confirm_batch(deep, batch_id).state == "confirmed"
    assert batching.confirm_batch(deep, batch_id).state == "done"  # idempotent


def test_a_signed_but_unsent_batch_is_rebroadcast_with_the_same_bytes(
    minter: Minter, chainside: Chainside
) -> None:
    [payment] = queue_payments(minter, 1)
    lock = minter.lock()
    assert lock.acquire()
    # Simulate a crash between the write-ahead commit and the broadcast.
    original = batching.broadcast
    batching.broadcast = lambda *args: False  # type: ignore[assignment]
    try:
        [batch_id] = batching._run_as_owner(minter, lock).sent
    finally:
        batching.broadcast = original  # type: ignore[assignment]
        lock.release()
    with minter.sessions() as session:
        batch = session.get(BatchMint, batch_id)
        assert batch is not None and batch.status == "signed"
        tx_hash = batch.tx_hash
    assert chainside.w3.eth.get_transaction_count(minter.account.address) == batch.nonce

    batching.process_queue(minter)  # the next owner finds it and sends the same bytes
    assert batching.confirm_batch(minter, batch_id).state == "confirmed"
    with minter.sessions() as session:
        batch = session.get(BatchMint, batch_id)
        assert batch is not None and batch.tx_hash == tx_hash
    assert chainside.mint_balance(payment.recipient) == MINT_AMOUNT


@pytest.mark.parametrize("n", [1, 50])
def test_estimated_wait_counts_full_batches_ahead(n: int) -> None:
    ops = batching.OperatingSettings(max_batch_size=50, batch_interval_seconds=10)
    assert queue.estimated_wait_seconds(n, ops) == math.ceil(n / 50) * 10


def test_the_owner_keeps_two_blocks_of_gas_unmined_without_waiting_for_confirmations(
    minter: Minter, chainside: Chainside, mining_paused: None
) -> None:
    # A short lock: the owner waits for mining at most half of it before the tick ends.
    quick = dataclasses.replace(minter, settings=minter.settings.replace(lock_ttl_seconds=2))
    set_setting(minter, "max_batch_size", "2000")
    set_setting(minter, "max_in_flight", "64")
    set_setting(minter, "batch_interval_seconds", "0")
    queue_payments(minter, 600)
    block_gas = int(chainside.w3.eth.get_block("latest")["gasLimit"])

    sent = batching.process_queue(quick).sent
    with minter.sessions() as session:
        batches = session.scalars(select(BatchMint).order_by(BatchMint.nonce)).all()
    assert [b.batch_id for b in batches] == sent and len(sent) >= 3
    # Sent until one more would have passed the two blocks' worth of gas the chain can take.
    limits = [b.gas_limit for b in batches]
    assert sum(limits) <= 2 * block_gas < sum(limits) + limits[-1]
    assert all(limit <= minter.settings.max_tx_gas for limit in limits)
    assert [b.nonce for b in batches] == [batches[0].nonce + i for i in range(len(batches))]
    assert {b.status for b in batches} == {"sent"}  # none mined, none confirmed

    chainside.w3.provider.make_request("anvil_mine", [2])  # type: ignore[arg-type]
    mined: list[uuid.UUID] = []
    more = batching.process_queue(quick, on_mined=mined.extend).sent
    assert set(sent) <= set(mined)  # handed over for confirmation as soon as mined
    assert more  # and the freed room was filled at once
    chainside.w3.provider.make_request("anvil_mine", [2])  # type: ignore[arg-type]
    assert set(confirm_all(minter, sent + more)) == {"confirmed"}
    counts = statuses(minter)
    assert counts["completed"] == sum(b.size for b in batches) + sum(
        size for size in batch_sizes(minter, more)
    )


def batch_sizes(minter: Minter, batch_ids: list[uuid.UUID]) -> list[int]:
    with minter.sessions() as session:
        return [session.get(BatchMint, b).size for b in batch_ids]  # type: ignore[union-attr]


def test_a_batch_that_falls_due_before_the_next_tick_is_sent_on_time(minter: Minter) -> None:
    tick = minter.settings.beat_tick_seconds
    set_setting(minter, "batch_interval_seconds", str(tick * 0.9))
    queue_payments(minter, 1)
    assert len(batching.process_queue(minter).sent) == 1
    queue_payments(minter, 1)
    started = time.monotonic()
    # Due in under a beat tick: the owner waits for it rather than leave it to the next tick.
    assert len(batching.process_queue(minter).sent) == 1
    assert time.monotonic() - started < tick + 0.5


def test_the_gas_model_learns_each_kind_from_confirmed_batches(minter: Minter) -> None:
    set_setting(minter, "batch_interval_seconds", "0")
    with minter.sessions() as session:
        assert batching.gas_model(session) == batching.GasModel()  # nothing measured yet
    queue_payments(minter, 20)
    confirm_all(minter, batching.process_queue(minter).sent)
    with minter.sessions() as session:
        model = batching.gas_model(session)
        [(gas, size)] = session.execute(select(BatchMint.gas_used, BatchMint.size)).all()
    assert model.measured_mint and not model.measured_settle
    assert model.mint == (gas - batching.BATCH_BASE_GAS) // size
    assert model.knows(settling=0, paid=5) and not model.knows(settling=1, paid=0)


@pytest.mark.parametrize(
    ("block_gas", "tx_gas", "per_block"),
    [(30_000_000, 2**24, 2), (150_000_000, 2**24, 10), (30_000_000, 30_000_000, 1)],
)
def test_batches_are_planned_so_that_a_whole_number_fills_a_block(
    block_gas: int, tx_gas: int, per_block: int
) -> None:
    shape = batching.ChainShape(block_gas, 1.0, min(tx_gas, block_gas))
    use, limit = shape.plan(1.1)
    assert limit <= shape.tx_gas
    # per_block - 1 batches using their planned gas leave room for the last one's whole limit.
    assert (per_block - 1) * use + limit <= block_gas
    assert per_block * use >= 0.85 * block_gas

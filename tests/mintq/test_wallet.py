"""The hot wallet's lifecycle on a real chain: replacement, gaps, funds, fencing, outsiders."""

from __future__ import annotations

import dataclasses

import pytest
from sqlalchemy import select, text
from test_batching import queue_payments, set_setting, statuses

from conftest import MINT_AMOUNT, Chainside
from db.models import BatchMint, HotWallet, MintQueueItem, WalletTransaction
from deploy.pay import send_and_wait
from mintq import batching
from mintq.batching import Minter
from mintq.wallet import LostLock, NonceLock


def mine(chainside: Chainside, blocks: int = 1) -> None:
    chainside.w3.provider.make_request("anvil_mine", [blocks])  # type: ignore[arg-type]


def transactions(minter: Minter) -> list[WalletTransaction]:
    with minter.sessions() as session:
        return list(
            session.scalars(select(WalletTransaction).order_by(WalletTransaction.created_at))
        )


def test_a_stuck_batch_is_replaced_at_the_same_nonce_and_mints_once(
    minter: Minter, chainside: Chainside, mining_paused: None
) -> None:
    impatient = dataclasses.replace(minter, settings=minter.settings.replace(stuck_after_seconds=0))
    payments = queue_payments(minter, 3)
    [batch_id] = batching.process_queue(impatient).sent
    assert batching.confirm_batch(impatient, batch_id).state == "waiting"

    result = batching.process_queue(impatient)  # still unmined: replace it
    assert len(result.replaced) == 1 and result.sent == []
    original, replacement = transactions(minter)
    assert original.nonce == replacement.nonce
    assert replacement.kind == "replacement"
    assert replacement.max_fee_per_gas >= original.max_fee_per_gas * 1125 / 1000
    assert replacement.max_priority_fee_per_gas >= original.max_priority_fee_per_gas * 1125 / 1000

    mine(chainside)
    assert batching.confirm_batch(impatient, batch_id).state == "confirmed"
    with minter.sessions() as session:
        batch = session.get(BatchMint, batch_id)
        assert batch is not None and batch.tx_hash == replacement.tx_hash
    assert [t.status for t in transactions(minter)] == ["failed", "mined"]
    for payment in payments:
        assert chainside.mint_balance(payment.recipient) == MINT_AMOUNT


def test_the_fee_cap_stops_replacement(
    minter: Minter, chainside: Chainside, mining_paused: None
) -> None:
    queue_payments(minter, 1)
    batching.process_queue(minter)
    [sent] = transactions(minter)
    capped = dataclasses.replace(
        minter,
        settings=minter.settings.replace(
            stuck_after_seconds=0,
            max_fee_gwei=sent.max_fee_per_gas / 10**9,  # no room above what it already pays
        ),
    )
    assert batching.process_queue(capped).replaced == []
    mine(chainside)


def test_a_reserved_nonce_that_never_reached_the_chain_is_filled(
    minter: Minter, chainside: Chainside
) -> None:
    chain_nonce = minter.nonce("pending")
    with minter.sessions() as session, session.begin():
        # A nonce handed out whose transaction is gone (say, refused for good by the node).
        session.add(HotWallet(address=minter.address, next_nonce=chain_nonce + 1))
    payments = queue_payments(minter, 2)
    [batch_id] = batching.process_queue(minter).sent
    filler, batch_tx = transactions(minter)
    assert (filler.kind, filler.nonce, filler.batch_id) == ("filler", chain_nonce, None)
    assert batch_tx.nonce == chain_nonce + 1
    assert batching.confirm_batch(minter, batch_id).state == "confirmed"
    assert minter.nonce("latest") == chain_nonce + 2
    for payment in payments:
        assert chainside.mint_balance(payment.recipient) == MINT_AMOUNT


def test_a_nonce_used_outside_mintq_is_caught_up_with(minter: Minter, chainside: Chainside) -> None:
    queue_payments(minter, 1)
    batching.confirm_batch(minter, batching.process_queue(minter).sent[0])
    # Someone uses the hot wallet's key by hand.
    send_and_wait(chainside.w3, minter.account, chainside.token.functions.approve(
        minter.address, 1))  # fmt: skip
    set_setting(minter, "batch_interval_seconds", "0")
    payments = queue_payments(minter, 1)
    [batch_id] = batching.process_queue(minter).sent
    assert batching.confirm_batch(minter, batch_id).state == "confirmed"
    assert chainside.mint_balance(payments[0].recipient) == MINT_AMOUNT


def test_a_batch_whose_nonce_someone_else_took_goes_back_to_the_queue(
    minter: Minter, chainside: Chainside, mining_paused: None
) -> None:
    payments = queue_payments(minter, 2)
    [batch_id] = batching.process_queue(minter).sent
    [ours] = transactions(minter)
    # The same key replaces our pending batch with a higher-fee transaction of its own.
    w3 = chainside.w3
    rogue = minter.account.sign_transaction({
        "to": minter.address, "value": 0, "gas": 21_000, "nonce": ours.nonce,
        "chainId": 31337, "maxFeePerGas": int(ours.max_fee_per_gas) * 3,
        "maxPriorityFeePerGas": int(ours.max_priority_fee_per_gas) * 3,
    })  # fmt: skip
    w3.eth.send_raw_transaction(rogue.raw_transaction)
    mine(chainside)
    assert batching.confirm_batch(minter, batch_id).state == "dropped"
    with minter.sessions() as session:
        items = session.scalars(select(MintQueueItem)).all()
        assert {(i.status, i.retry_count) for i in items} == {("pending", 0)}
    w3.provider.make_request("evm_setAutomine", [True])  # type: ignore[arg-type]
    set_setting(minter, "batch_interval_seconds", "0")
    [again] = batching.process_queue(minter).sent
    assert batching.confirm_batch(minter, again).state == "confirmed"
    for payment in payments:
        assert chainside.mint_balance(payment.recipient) == MINT_AMOUNT


def test_low_funds_hold_the_queue_and_it_resumes_when_funded(
    minter: Minter, chainside: Chainside
) -> None:
    w3 = chainside.w3
    funded = w3.eth.get_balance(minter.address)
    w3.provider.make_request("anvil_setBalance", [minter.address, hex(10**9)])  # type: ignore[arg-type]
    try:
        queue_payments(minter, 2)
        result = batching.process_queue(minter)
        assert result.low_funds and result.sent == []
        assert statuses(minter) == {"pending": 2}
        with minter.sessions() as session:
            wallet = session.get(HotWallet, minter.address)
            assert wallet is not None and wallet.low_funds_since is not None
            assert wallet.balance_needed and wallet.balance_needed > 10**9
    finally:
        w3.provider.make_request("anvil_setBalance", [minter.address, hex(funded)])  # type: ignore[arg-type]
    [batch_id] = batching.process_queue(minter).sent
    assert batching.confirm_batch(minter, batch_id).state == "confirmed"
    with minter.sessions() as session:
        wallet = session.get(HotWallet, minter.address)
        assert wallet is not None and wallet.low_funds_since is None


def test_batch_size_is_bounded_by_the_gas_cap(minter: Minter) -> None:
    tight = dataclasses.replace(minter, settings=minter.settings.replace(max_tx_gas=600_000))
    queue_payments(minter, 12)
    # Batches of 5 fill a 600k cap: the queue outran what the chain takes, so they go at once,
    # and so does what is left of that backlog.
    sent = batching.process_queue(tight).sent
    with minter.sessions() as session:
        batches = [session.get(BatchMint, batch_id) for batch_id in sent]
    # 5 items at the 100k assumed before anything is measured, x 1.1, fit 600k.
    assert [b.size for b in batches if b is not None] == [5, 5, 2]
    assert all(b is not None and b.gas_limit <= 600_000 for b in batches)


def test_an_owner_that_lost_its_lock_signs_nothing(minter: Minter, chainside: Chainside) -> None:
    queue_payments(minter, 2)
    lock = minter.lock()
    assert lock.acquire()
    minter.redis.set(lock.key, "someone-else")  # the lock expired and another worker took it
    nonce_before = minter.nonce("pending")
    with pytest.raises(LostLock):
        batching.send_batch(minter, lock, batching.load_operating_settings(minter.sessions()))
    assert statuses(minter) == {"pending": 2}
    assert transactions(minter) == []
    assert minter.nonce("pending") == nonce_before
    with minter.sessions() as session:
        wallet = session.get(HotWallet, minter.address)
        assert wallet is None or wallet.next_nonce == nonce_before


def test_nonce_lock_tokens(minter: Minter) -> None:
    first = NonceLock(minter.redis, "mintq:test-lock", 5)
    second = NonceLock(minter.redis, "mintq:test-lock", 5)
    assert first.acquire() and not second.acquire()
    second.release()  # not the owner: no effect
    first.check()
    first.release()
    assert second.acquire()
    with pytest.raises(LostLock):
        first.check()
    second.release()


def test_settings_change_applies_on_the_next_tick(minter: Minter) -> None:
    queue_payments(minter, 12)
    minter_sessions = minter.sessions
    with minter_sessions() as session, session.begin():
        session.execute(text("UPDATE system_settings SET value = '5' WHERE key = 'max_batch_size'"))
    first = batching.process_queue(minter).sent
    with minter.sessions() as session:
        sizes = [session.get(BatchMint, b).size for b in first]  # type: ignore[union-attr]
    assert sizes == [5, 5]  # two full batches at once; 2 wait for the interval


def test_a_batch_reorged_out_before_its_depth_is_resent_and_confirmed_once(
    minter: Minter, chainside: Chainside
) -> None:
    deep = dataclasses.replace(minter, settings=minter.settings.replace(confirmations=3))
    payments = queue_payments(minter, 2)
    [batch_id] = batching.process_queue(deep).sent
    [ours] = transactions(minter)
    assert chainside.w3.eth.get_transaction_receipt(ours.tx_hash)["status"] == 1
    assert batching.confirm_batch(deep, batch_id).state == "waiting"  # 1 of 3 confirmations

    # The block holding the batch is replaced by one without it.
    chainside.w3.provider.make_request("anvil_reorg", [1, []])  # type: ignore[arg-type]
    assert batching.confirm_batch(deep, batch_id).state == "waiting"
    assert minter.nonce("latest") == ours.nonce  # the nonce is free again

    batching.process_queue(deep)  # the owner sends the recorded bytes again
    mine(chainside, 3)
    assert batching.confirm_batch(deep, batch_id).state == "confirmed"
    assert [t.tx_hash for t in transactions(minter)] == [ours.tx_hash]
    for payment in payments:
        assert chainside.mint_balance(payment.recipient) == MINT_AMOUNT
